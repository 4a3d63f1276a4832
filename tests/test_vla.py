"""VLA policy: tiny VLM in the real transformers format, prefix caching, exact chain log-probs, LoRA, checkpoints."""

from __future__ import annotations

import collections
import dataclasses
import json
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from policies.checkpoint import WEIGHTS_FILE, load_policy, save_policy
from policies.noise import FlowNoiseConfig
from policies.vla import VLAObservation, VLAPolicy, VLAPolicyConfig
from policies.vla_backbone import TINY_IMAGE_SIZE, build_tiny_vlm

STATE_DIM, ACTION_DIM, BATCH = 8, 7, 3
INSTRUCTIONS = ["lift the red cube", "put the can and the red cube in the basket", "open the drawer"]
# Flow-noise and both Flow-SDE modes: the schemes a VLA is fine-tuned with.
SCHEMES = [
    pytest.param("flow_noise", "all", id="flow_noise"),
    pytest.param("flow_sde", "all", id="flow_sde-all"),
    pytest.param("flow_sde", "one", id="flow_sde-one"),
]


def make_vla(
    vlm_path: str = "tiny",
    scheme: str = "flow_noise",
    sde_steps: str = "all",
    steps: int = 3,
    lora_rank: int = 0,
    gradient_checkpointing: bool = False,
    seed: int = 0,
    freeze_backbone: bool = True,
    object_loss_weight: float = 0.0,
    state_noise_std: float = 0.0,
    prefix_summary: bool = False,
) -> VLAPolicy:
    """A tiny VLA with a non-trivial normaliser and an input-dependent noise head."""
    config = VLAPolicyConfig(
        vlm_path=vlm_path,
        horizon=4,
        denoising_steps=steps,
        expert_width=32,
        expert_layers=2,
        expert_heads=2,
        time_embed_dim=8,
        lora_rank=lora_rank,
        gradient_checkpointing=gradient_checkpointing,
        freeze_backbone=freeze_backbone,
        object_loss_weight=object_loss_weight,
        state_noise_std=state_noise_std,
        prefix_summary=prefix_summary,
        noise=FlowNoiseConfig(scheme, sigma_min=0.05, sigma_max=0.15, hidden_dims=[16], sde_steps=sde_steps),
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        policy = VLAPolicy(STATE_DIM, ACTION_DIM, config)
    with torch.no_grad():
        norm = policy.normalizer
        norm.obs_mean.copy_(torch.randn(STATE_DIM, generator=gen))
        norm.obs_std.copy_(0.5 + torch.rand(STATE_DIM, generator=gen))
        norm.action_min.copy_(-0.5 - torch.rand(ACTION_DIM, generator=gen))
        norm.action_max.copy_(0.5 + torch.rand(ACTION_DIM, generator=gen))
        if hasattr(policy.noise, "std_head"):  # the head starts constant; make the std depend on its input
            last = policy.noise.std_head.net[-1]
            last.weight.copy_(torch.randn(last.weight.shape, generator=gen))
            last.bias.copy_(torch.randn(last.bias.shape, generator=gen))
    return policy


def make_obs(seed: int = 0, batch: int = BATCH, image_size: int = 48) -> VLAObservation:
    """Random camera images (not the VLM's size, so resizing is exercised), instructions and states."""
    gen = torch.Generator().manual_seed(seed)
    images = {
        name: torch.randint(0, 256, (batch, image_size, image_size, 3), dtype=torch.uint8, generator=gen)
        for name in ("agentview", "wrist")
    }
    instructions = [INSTRUCTIONS[i % len(INSTRUCTIONS)] for i in range(batch)]
    return VLAObservation(images, instructions, torch.randn(batch, STATE_DIM, generator=gen) * 2)


@pytest.fixture(scope="module")
def tiny_vlm_dir(tmp_path_factory: pytest.TempPathFactory):
    return build_tiny_vlm(tmp_path_factory.mktemp("vlm") / "tiny_smolvlm")


def count_forwards(module: torch.nn.Module, counts: collections.Counter, name: str) -> None:
    """Add 1 to ``counts[name]`` at the start of every call of ``module`` (a pre-hook: a checkpointed recompute
    may stop early, before the module returns)."""

    def hook(*_) -> None:
        counts[name] += 1

    module.register_forward_pre_hook(hook)


class BackboneCalls:
    """Counts forward passes of a policy's VLM."""

    def __init__(self, policy: VLAPolicy) -> None:
        self.count = 0
        self._handle = policy.backbone.vlm.register_forward_hook(self._hook)

    def _hook(self, *args) -> None:
        self.count += 1


# ---- the tiny VLM is a real transformers model -------------------------------------------------------------


def test_tiny_vlm_builds_fast_and_reloads_with_the_transformers_auto_classes(tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    start = time.perf_counter()
    path = build_tiny_vlm(tmp_path / "vlm")
    assert time.perf_counter() - start < 2.0
    model = AutoModelForImageTextToText.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    assert type(model).__name__ == "Idefics3ForConditionalGeneration"
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    # Every special token of the SmolVLM prompt is a real token, not <unk>.
    for token in ("<fake_token_around_image>", "<global-img>", "<image>", "<end_of_utterance>"):
        assert processor.tokenizer.convert_tokens_to_ids(token) != processor.tokenizer.unk_token_id, token


@pytest.mark.parametrize(("image_size", "tokens"), [(32, 4), (64, 16)])
def test_tiny_image_size_sets_the_image_tokens(image_size, tokens):
    """``policy.tiny_image_size`` builds the tiny VLM for S-pixel images, ``(S / 16)^2`` tokens each."""
    config = VLAPolicyConfig(vlm_path="tiny", tiny_image_size=image_size, expert_width=32, expert_heads=2)
    policy = VLAPolicy(STATE_DIM, ACTION_DIM, config)
    assert policy.backbone.image_size == image_size and policy.backbone.layout.tokens_per_image == tokens
    with torch.no_grad():
        prefix = policy.backbone(make_obs(16), policy.config.cameras)
    image_tokens = (policy.backbone.input_ids(["lift"], 2)[0] == policy.backbone.layout.image_token_id).sum()
    assert image_tokens == 2 * tokens and prefix.features.shape[0] == BATCH
    with pytest.raises(ValueError, match=r"policy\.tiny_image_size must be a positive multiple of 16.*got 40"):
        VLAPolicyConfig(vlm_path="tiny", tiny_image_size=40)


def test_prefix_inputs_match_the_transformers_processor(tiny_vlm_dir):
    """Our torch preprocessing and prompt layout give the ids and pixels the Idefics3 processor gives."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_vlm_dir)
    policy = make_vla(str(tiny_vlm_dir))
    obs = make_obs(image_size=TINY_IMAGE_SIZE)
    ours_ids, ours_mask = policy.backbone.input_ids(obs.instructions, num_images=2)
    ours_pixels = policy.backbone.pixel_values(obs, ["agentview", "wrist"])
    for i in range(BATCH):
        images = [obs.images["agentview"][i].numpy(), obs.images["wrist"][i].numpy()]
        theirs = processor(text=["<image><image>" + obs.instructions[i]], images=[images], return_tensors="pt")
        length = int(ours_mask[i].sum())
        assert ours_ids[i, :length].tolist() == theirs["input_ids"][0].tolist()
        torch.testing.assert_close(ours_pixels[i], theirs["pixel_values"][0], atol=1e-6, rtol=0)


def test_policy_from_a_vlm_folder_equals_the_in_memory_tiny_preset(tiny_vlm_dir):
    from_folder, in_memory = make_vla(str(tiny_vlm_dir)), make_vla("tiny")
    folder_state, memory_state = from_folder.state_dict(), in_memory.state_dict()
    assert folder_state.keys() == memory_state.keys()
    assert all(torch.equal(folder_state[k], memory_state[k]) for k in folder_state)


def build_tiny_paligemma(path):
    """A random tiny PaliGemma (SigLIP + Gemma, ~0.14M parameters) with a WordLevel tokenizer and its processor."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoModelForImageTextToText, PaliGemmaConfig, PreTrainedTokenizerFast
    from transformers.models.paligemma.processing_paligemma import PaliGemmaProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    word_level = Tokenizer(models.WordLevel(unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["<unk>", "<pad>", "<bos>", "<eos>", "<image>"]
    word_level.train_from_iterator(INSTRUCTIONS, trainers.WordLevelTrainer(special_tokens=specials))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=word_level,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        extra_special_tokens={"image_token": "<image>"},
    )
    image_processor = SiglipImageProcessorPil(
        size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    image_processor.image_seq_length = (32 // 8) ** 2
    processor = PaliGemmaProcessor(image_processor, tokenizer)  # adds PaliGemma's <loc>/<seg> tokens
    vocab = len(processor.tokenizer)
    config = PaliGemmaConfig(
        image_token_index=processor.tokenizer.convert_tokens_to_ids("<image>"),
        projection_dim=64,
        hidden_size=64,
        vocab_size=vocab,
        vision_config={
            "model_type": "siglip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        text_config={
            "model_type": "gemma",
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 32,
            "vocab_size": vocab,
        },
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        AutoModelForImageTextToText.from_config(config).save_pretrained(path)
    processor.save_pretrained(path)
    return path


# PaliGemma's processor builds its labels with np.array(..., copy=False) on torch tensors (numpy 2 deprecation).
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_paligemma_layout_matches_its_processor_and_gives_exact_log_probs(tmp_path):
    from transformers import AutoProcessor

    path = build_tiny_paligemma(tmp_path / "paligemma")
    processor = AutoProcessor.from_pretrained(path)
    policy = make_vla(str(path))
    obs = make_obs(8, image_size=32)
    ids, mask = policy.backbone.input_ids(obs.instructions, num_images=2)
    pixels = policy.backbone.pixel_values(obs, ["agentview", "wrist"])
    for i in range(BATCH):
        images = [obs.images["agentview"][i].numpy(), obs.images["wrist"][i].numpy()]
        theirs = processor(text=["<image><image>" + obs.instructions[i]], images=[images], return_tensors="pt")
        assert ids[i, : int(mask[i].sum())].tolist() == theirs["input_ids"][0].tolist()
        torch.testing.assert_close(pixels[i], theirs["pixel_values"], atol=1e-6, rtol=0)
    with torch.no_grad():
        sample = policy.sample(obs, generator=torch.Generator().manual_seed(0))
        log_prob, _ = policy.log_prob_and_entropy(obs, sample.chain, sample.stochastic)
    assert (log_prob - sample.log_prob).abs().max().item() < 1e-5
    loaded, _ = load_policy(save_policy(policy, tmp_path / "ckpt"))
    with torch.no_grad():
        again = loaded.sample(obs, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.chain, sample.chain)


# ---- the chain: exact log-probs, prefix computed once ------------------------------------------------------


@pytest.mark.parametrize(("scheme", "sde_steps"), SCHEMES)
def test_rescoring_a_sampled_chain_gives_ratio_one(scheme, sde_steps):
    policy = make_vla(scheme=scheme, sde_steps=sde_steps)
    obs = make_obs(1)
    with torch.no_grad():
        sample = policy.sample(obs, generator=torch.Generator().manual_seed(0))
        log_prob, entropy = policy.log_prob_and_entropy(obs, sample.chain, sample.stochastic)
    assert sample.actions.shape == (BATCH, 4, ACTION_DIM)
    assert log_prob.shape == sample.log_prob.shape == (BATCH, 3, 4, ACTION_DIM)
    assert (sample.stochastic.sum(1) == (1 if sde_steps == "one" else 3)).all()
    assert sample.std[sample.stochastic].min() > 0
    assert (log_prob - sample.log_prob).abs().max().item() < 1e-5
    ratio = (log_prob.sum((1, 2, 3)) - sample.log_prob.sum((1, 2, 3))).exp()
    torch.testing.assert_close(ratio, torch.ones(BATCH), atol=1e-5, rtol=0)
    assert (entropy[~sample.stochastic] == 0).all() and (entropy[sample.stochastic] != 0).all()


@pytest.mark.parametrize(("scheme", "sde_steps"), SCHEMES)
def test_batched_rescoring_equals_a_loop_over_steps(scheme, sde_steps):
    policy = make_vla(scheme=scheme, sde_steps=sde_steps)
    obs = make_obs(2)
    with torch.no_grad():
        sample = policy.sample(obs, generator=torch.Generator().manual_seed(1))
        log_prob, entropy = policy.log_prob_and_entropy(obs, sample.chain, sample.stochastic)
        cond = policy.condition(obs)
        for k in range(policy.num_steps):  # one forward per step: the reference for the one batched forward
            x_k = sample.chain[:, k]
            mean, std = policy.transition(x_k, torch.full((BATCH,), k), cond)
            reference = torch.distributions.Normal(mean, std)
            noisy = sample.stochastic[:, k]
            torch.testing.assert_close(log_prob[noisy, k], reference.log_prob(sample.chain[:, k + 1])[noisy])
            torch.testing.assert_close(entropy[noisy, k], reference.entropy()[noisy])
            velocity, _ = policy.velocity_and_features(x_k, torch.full((BATCH,), k / policy.num_steps), cond)
            euler = x_k + velocity / policy.num_steps  # deterministic steps follow the ODE exactly
            torch.testing.assert_close(sample.chain[~noisy, k + 1], euler[~noisy], atol=1e-6, rtol=1e-6)


def test_minibatches_of_observation_rows_rescore_like_the_whole_batch():
    """PPO scores minibatches ``obs[rows]`` of single transitions; each must equal the whole-batch score."""
    from policies.chain import step_log_prob
    from robo_rlft.algos.ppo import ppo_samples

    policy = make_vla(scheme="flow_sde", sde_steps="all")
    obs = make_obs(9, batch=4)
    with torch.no_grad():
        sample = policy.sample(obs, generator=torch.Generator().manual_seed(2))
        whole = step_log_prob(policy.log_prob_and_entropy(obs, sample.chain, sample.stochastic)[0], "sum")  # (B, K)
        rows, masks = ppo_samples(sample.stochastic, "transition")
        alone = step_log_prob(policy.log_prob_and_entropy(obs[rows], sample.chain[rows], masks)[0], "sum")
    assert obs[rows].instructions == [obs.instructions[i] for i in rows.tolist()]
    torch.testing.assert_close(alone[masks], whole[sample.stochastic], atol=1e-5, rtol=1e-5)


def test_prefix_is_computed_once_per_observation_batch():
    policy = make_vla(steps=5)
    obs = make_obs(3)
    calls = BackboneCalls(policy)
    with torch.no_grad():
        sample = policy.sample(obs)
    assert calls.count == 1, "sampling must reuse the prefix across the K=5 denoising steps"
    with torch.no_grad():
        policy.log_prob_and_entropy(obs, sample.chain, sample.stochastic)
    assert calls.count == 2, "re-scoring B*K pairs must run the VLM once, on the B observations"
    policy.pretrain_loss(obs, sample.actions)
    assert calls.count == 3


def test_deterministic_sampling_ignores_the_noise_scheme():
    obs = make_obs(4)
    samples = []
    for scheme, sde_steps, seed_of_head in [("flow_noise", "all", 0), ("flow_noise", "all", 5), ("flow_sde", "one", 0)]:
        policy = make_vla(scheme=scheme, sde_steps=sde_steps)
        if seed_of_head:  # a different noise head on the same base weights
            torch.nn.init.normal_(policy.noise.std_head.net[-1].weight, generator=torch.Generator().manual_seed(9))
        with torch.no_grad():
            samples.append(policy.sample(obs, deterministic=True, generator=torch.Generator().manual_seed(0)))
    for sample in samples:
        assert not sample.stochastic.any()
        assert torch.equal(sample.log_prob, torch.zeros_like(sample.log_prob))
        assert torch.equal(sample.std, torch.zeros_like(sample.std))
        assert torch.equal(sample.actions, samples[0].actions)
    with torch.no_grad():
        stochastic = policy.sample(obs, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(stochastic.actions, samples[0].actions), "the stochastic sampler must add noise"


# ---- training ---------------------------------------------------------------------------------------------


def test_pretraining_fits_a_fixed_batch_with_a_frozen_backbone():
    """Behaviour cloning on 8 (observation, chunk) pairs: the flow-matching loss falls and the deterministic
    sampler's chunks move onto the demonstrated ones, while the frozen VLM does not change."""
    policy = make_vla()
    obs = make_obs(5, batch=8)
    actions = torch.rand(8, 4, ACTION_DIM, generator=torch.Generator().manual_seed(0)) - 0.5

    def chunk_error() -> float:
        with torch.no_grad():
            sample = policy.sample(obs, deterministic=True, generator=torch.Generator().manual_seed(0))
        return (sample.actions - actions).abs().mean().item()

    error_before = chunk_error()
    backbone_before = {k: v.clone() for k, v in policy.backbone.state_dict().items()}
    optimiser = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=3e-3)
    torch.manual_seed(0)
    losses = []
    for _ in range(200):
        loss = policy.pretrain_loss(obs, actions)["flow_matching"]
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert sum(losses[-20:]) / 20 < 0.5 * sum(losses[:20]) / 20
    assert chunk_error() < 0.5 * error_before
    assert all(torch.equal(v, backbone_before[k]) for k, v in policy.backbone.state_dict().items())
    assert not any(p.requires_grad for p in policy.backbone.parameters())


def test_lora_trains_only_the_adapters():
    policy = make_vla(lora_rank=4)
    adapters = {n: p for n, p in policy.backbone.named_parameters() if "lora_" in n}
    assert adapters and all(p.requires_grad for p in adapters.values())
    base = {n: p.detach().clone() for n, p in policy.backbone.named_parameters() if "lora_" not in n}
    assert not any(p.requires_grad for n, p in policy.backbone.named_parameters() if "lora_" not in n)
    adapters_before = {n: p.detach().clone() for n, p in adapters.items()}
    obs, actions = make_obs(6), torch.zeros(BATCH, 4, ACTION_DIM)
    with torch.no_grad():
        prefix_before = policy.backbone(obs, policy.config.cameras).features
    optimiser = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):  # LoRA's B starts at zero, so A first moves on the second step
        optimiser.zero_grad()
        policy.pretrain_loss(obs, actions)["flow_matching"].backward()
        optimiser.step()
    for name, param in policy.backbone.named_parameters():
        if "lora_" in name:
            assert not torch.equal(param, adapters_before[name]), f"adapter {name} did not move"
        else:
            assert torch.equal(param, base[name]), f"base weight {name} changed"
    with torch.no_grad():
        assert not torch.allclose(policy.backbone(obs, policy.config.cameras).features, prefix_before)


def test_gradient_checkpointing_recomputes_activations_and_keeps_the_gradients():
    """With checkpointing, the VLM's decoder layers and the expert blocks run again in the backward pass, and
    the LoRA adapters and the expert get the same gradients (the noise head has none in pretraining)."""
    obs, actions = make_obs(10), torch.rand(BATCH, 4, ACTION_DIM) - 0.5
    results = []
    for checkpointing in (False, True):
        policy = make_vla(lora_rank=2, gradient_checkpointing=checkpointing)
        runs = collections.Counter()
        # transformers checkpoints a layer's forward, not its __call__: count a sublayer's calls.
        count_forwards(policy.backbone.vlm.text_model.layers[0].self_attn, runs, "vlm")
        count_forwards(policy.expert.blocks[0], runs, "expert")
        torch.manual_seed(0)
        policy.pretrain_loss(obs, actions)["flow_matching"].backward()
        results.append((runs, {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}))
    (plain_runs, plain_grads), (checkpointed_runs, checkpointed_grads) = results
    assert plain_runs == {"vlm": 1, "expert": 1} and checkpointed_runs == {"vlm": 2, "expert": 2}
    assert plain_grads.keys() == checkpointed_grads.keys()
    assert any("lora_A" in n for n in plain_grads) and any(n.startswith("expert.") for n in plain_grads)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_zero_object_loss_weight_is_plain_flow_matching():
    """With ``object_loss_weight=0`` the loss and its gradients are those of flow matching alone, whether or not
    the batch carries object states; with a weight the flow term is unchanged and the object term is added."""
    obs, actions = make_obs(11), torch.rand(BATCH, 4, ACTION_DIM) - 0.5
    with_objects = dataclasses.replace(obs, object_state=torch.randn(BATCH, 7))
    results = []
    for weight, batch in ((0.0, obs), (0.0, with_objects), (2.0, with_objects)):
        policy = make_vla(freeze_backbone=False, object_loss_weight=weight)
        if weight:
            policy.add_object_head(7)
        torch.manual_seed(0)
        losses = policy.pretrain_loss(batch, actions)
        losses["flow_matching"].backward()
        grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
        results.append((losses, grads))
    (plain, plain_grads), (ignored, ignored_grads), (weighted, weighted_grads) = results
    assert plain.keys() == ignored.keys() == {"flow_matching"}
    assert weighted.keys() == {"flow_matching", "object_state"} and weighted["object_state"] > 0
    assert torch.equal(plain["flow_matching"], ignored["flow_matching"])
    assert torch.equal(plain["flow_matching"], weighted["flow_matching"])
    assert plain_grads.keys() == ignored_grads.keys()
    assert all(torch.equal(plain_grads[n], ignored_grads[n]) for n in plain_grads)
    assert all(torch.equal(plain_grads[n], weighted_grads[n]) for n in plain_grads)
    with pytest.raises(ValueError, match="object_loss_weight"):
        make_vla(object_loss_weight=1.0).pretrain_loss(obs, actions)  # no head and no object_state


@pytest.mark.parametrize("freeze_backbone", [False, True])
def test_object_loss_reaches_the_vision_tower_only_when_it_trains(freeze_backbone):
    """The object term's gradient reaches the VLM's patch embedding when the backbone trains (the point of the
    term: the flow loss alone left the tiny VLM blind), and nothing of a frozen one."""
    policy = make_vla(freeze_backbone=freeze_backbone, object_loss_weight=1.0)
    policy.add_object_head(7)
    obs = dataclasses.replace(make_obs(12), object_state=torch.randn(BATCH, 7))
    policy.pretrain_loss(obs, torch.zeros(BATCH, 4, ACTION_DIM))["object_state"].backward()
    patches = policy.backbone.vlm.vision_model.embeddings.patch_embedding.weight
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.object_head.parameters())
    if freeze_backbone:
        assert patches.grad is None
    else:
        assert patches.grad is not None and patches.grad.abs().sum() > 0


def test_state_noise_changes_the_pretraining_loss_only():
    """``state_noise_std`` perturbs the state the pretraining loss sees; sampling and re-scoring are unchanged."""
    plain, noisy = make_vla(), make_vla(state_noise_std=0.5)  # same seed: the same weights
    obs, actions = make_obs(14), torch.rand(BATCH, 4, ACTION_DIM) - 0.5
    losses = []
    for policy in (plain, noisy):
        torch.manual_seed(0)
        losses.append(policy.pretrain_loss(obs, actions)["flow_matching"])
    assert not torch.equal(losses[0], losses[1])
    with torch.no_grad():
        a = plain.sample(obs, generator=torch.Generator().manual_seed(1))
        b = noisy.sample(obs, generator=torch.Generator().manual_seed(1))
        assert torch.equal(a.chain, b.chain) and torch.equal(a.log_prob, b.log_prob)
        log_prob, _ = noisy.log_prob_and_entropy(obs, a.chain, a.stochastic)
    torch.testing.assert_close(log_prob, a.log_prob)


def test_prefix_summary_is_a_direct_path_from_the_pooled_prefix():
    """With ``prefix_summary`` the expert's state token adds a linear map of the pooled prefix: zeroed, the policy
    acts exactly as one without it; trained, the flow loss sends it gradient."""
    plain, summary = make_vla(), make_vla(prefix_summary=True)
    missing, unexpected = summary.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(missing) == ["expert.prefix_summary.bias", "expert.prefix_summary.weight"] and not unexpected
    obs = make_obs(15)
    with torch.no_grad():
        torch.nn.init.zeros_(summary.expert.prefix_summary.weight)
        torch.nn.init.zeros_(summary.expert.prefix_summary.bias)
        a = plain.sample(obs, True, generator=torch.Generator().manual_seed(0))
        b = summary.sample(obs, True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.actions, b.actions)
    summary.pretrain_loss(obs, torch.rand(BATCH, 4, ACTION_DIM))["flow_matching"].backward()
    assert summary.expert.prefix_summary.weight.grad.abs().sum() > 0


# ---- checkpoints ------------------------------------------------------------------------------------------


def test_object_head_is_not_saved_and_not_needed_to_load(tmp_path):
    """Pretraining removes the object head before saving: the checkpoint has no ``object_head`` weights, loads
    into a policy built from its config (weight > 0 kept), and acts as the policy that was trained."""
    policy = make_vla(freeze_backbone=False, object_loss_weight=1.0)
    policy.add_object_head(7)
    policy.remove_object_head()
    path = save_policy(policy, tmp_path / "ckpt")
    assert not any(k.startswith("object_head") for k in load_file(path / WEIGHTS_FILE))
    loaded, _ = load_policy(path, obs_dim=STATE_DIM, action_dim=ACTION_DIM)
    assert loaded.config.object_loss_weight == 1.0 and loaded.object_head is None
    obs = make_obs(13)
    with torch.no_grad():
        a = policy.sample(obs, True, generator=torch.Generator().manual_seed(0))
        b = loaded.sample(obs, True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.actions, b.actions)


@pytest.mark.parametrize("lora_rank", [0, 2])
def test_checkpoint_round_trip_is_exact_and_needs_nothing_else(tmp_path, lora_rank):
    source = build_tiny_vlm(tmp_path / "source_vlm")
    policy = make_vla(str(source), lora_rank=lora_rank)
    if lora_rank:  # non-zero adapters, so that they matter
        for name, param in policy.backbone.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param.data, std=0.1)
    path = save_policy(policy, tmp_path / "ckpt", metadata={"env": "tabletop"})
    shutil.rmtree(source)  # the checkpoint must not refer back to the folder the VLM came from
    assert {p.name for p in path.iterdir()} == {"config.json", "model.safetensors", "normalization.safetensors", "vlm"}
    vlm_files = {p.name for p in (path / "vlm").iterdir()}
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "processor_config.json"} <= vlm_files
    assert not any(name.endswith(".safetensors") for name in vlm_files), "VLM weights live in model.safetensors"
    loaded, metadata = load_policy(path, obs_dim=STATE_DIM, action_dim=ACTION_DIM)
    assert metadata == {"env": "tabletop"} and loaded.config == policy.config
    state, loaded_state = policy.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    assert all(torch.equal(state[k], loaded_state[k]) for k in state)
    obs = make_obs(7)
    for deterministic in (False, True):
        with torch.no_grad():
            a = policy.sample(obs, deterministic, generator=torch.Generator().manual_seed(3))
            b = loaded.sample(obs, deterministic, generator=torch.Generator().manual_seed(3))
        assert torch.equal(a.actions, b.actions) and torch.equal(a.chain, b.chain)
        assert torch.equal(a.log_prob, b.log_prob)


def test_missing_checkpoint_parts_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_checkpoint"):
        load_policy(tmp_path / "no_such_checkpoint")
    path = save_policy(make_vla(), tmp_path / "ckpt")
    (path / "vlm" / "tokenizer_config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"vlm.*missing \['tokenizer_config\.json'\]"):
        load_policy(path)
    shutil.rmtree(path / "vlm")
    with pytest.raises(FileNotFoundError, match=r"No VLM directory.*ckpt/vlm"):
        load_policy(path)
    (path / "normalization.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"normalization\.safetensors"):
        load_policy(path)


def test_incompatible_checkpoints_name_the_shapes_that_differ(tmp_path):
    path = save_policy(make_vla(), tmp_path / "ckpt")
    weights = load_file(path / WEIGHTS_FILE)
    weights["expert.state_in.weight"] = torch.zeros(3, 3)
    save_file(weights, path / WEIGHTS_FILE)
    with pytest.raises(ValueError, match=r"expert\.state_in\.weight: checkpoint \(3, 3\) vs model \(32, 8\)"):
        load_policy(path)

    path = save_policy(make_vla(), tmp_path / "ckpt2")
    vlm_config = json.loads((path / "vlm" / "config.json").read_text())
    vlm_config["text_config"]["intermediate_size"] = 200  # a different VLM than the weights came from
    (path / "vlm" / "config.json").write_text(json.dumps(vlm_config))
    with pytest.raises(ValueError, match=r"backbone\.vlm\.text_model\.layers\.0\.mlp\.\w+_proj\.weight: checkpoint"):
        load_policy(path)

    with pytest.raises(ValueError, match=r"obs_dim=8.*needs obs_dim=9"):
        load_policy(tmp_path / "ckpt", obs_dim=9)


# ---- configuration and observations -----------------------------------------------------------------------


def test_config_errors_name_the_field_and_the_allowed_values():
    with pytest.raises(ValueError, match=r"policy\.vlm_path is empty"):
        VLAPolicy(STATE_DIM, ACTION_DIM, VLAPolicyConfig())  # the config alone may leave it to a checkpoint
    with pytest.raises(ValueError, match=r"policy\.cameras=\['front'\].*agentview.*wrist"):
        VLAPolicyConfig(vlm_path="tiny", cameras=["front"])
    with pytest.raises(ValueError, match=r"expert_width=30.*expert_heads=4"):
        VLAPolicyConfig(vlm_path="tiny", expert_width=30, expert_heads=4)
    with pytest.raises(ValueError, match=r"lora_rank > 0.*freeze_backbone=true"):
        VLAPolicyConfig(vlm_path="tiny", lora_rank=4, freeze_backbone=False)
    with pytest.raises(ValueError, match=r"policy\.object_loss_weight must be >= 0.*got -1"):
        VLAPolicyConfig(vlm_path="tiny", object_loss_weight=-1.0)
    with pytest.raises(ValueError, match=r"flow_sde.*denoising_steps >= 2, got 1"):
        VLAPolicyConfig(vlm_path="tiny", denoising_steps=1, noise=FlowNoiseConfig(scheme="flow_sde"))
    with pytest.raises(ValueError, match=r"lora_target_modules=\['nope'\]"):
        VLAPolicy(STATE_DIM, ACTION_DIM, VLAPolicyConfig(vlm_path="tiny", lora_rank=2, lora_target_modules=["nope"]))
    with pytest.raises(FileNotFoundError, match=r"No VLM directory at '/no/such/vlm'"):
        VLAPolicy(STATE_DIM, ACTION_DIM, VLAPolicyConfig(vlm_path="/no/such/vlm"))


def test_observation_from_env_dicts_and_bad_observations():
    gen = torch.Generator().manual_seed(0)
    per_env = [
        {
            "agentview_image": torch.randint(0, 256, (20, 20, 3), dtype=torch.uint8, generator=gen).numpy(),
            "wrist_image": torch.randint(0, 256, (20, 20, 3), dtype=torch.uint8, generator=gen).numpy(),
            "state": torch.randn(STATE_DIM, generator=gen).numpy(),
            "object_state": torch.randn(7, generator=gen).numpy(),
        }
        for _ in range(2)
    ]
    obs = VLAObservation.from_env(per_env, ["open the drawer", "close the drawer"])
    assert obs.images["agentview"].shape == (2, 20, 20, 3) and obs.images["wrist"].dtype == torch.uint8
    assert obs.state.shape == (2, STATE_DIM) and obs.instructions == ["open the drawer", "close the drawer"]
    batched = {k: torch.stack([torch.as_tensor(o[k]) for o in per_env]).numpy() for k in per_env[0]}
    same = VLAObservation.from_env(batched, "open the drawer")
    assert torch.equal(same.images["wrist"], obs.images["wrist"]) and same.instructions == ["open the drawer"] * 2
    with pytest.raises(KeyError, match=r"wrist_image.*cameras=\['agentview', 'wrist'\]"):
        VLAObservation.from_env([{"agentview_image": per_env[0]["agentview_image"], "state": per_env[0]["state"]}], "x")
    policy = make_vla()
    with pytest.raises(ValueError, match=r"lacks images of cameras \['wrist'\]"):
        policy.sample(VLAObservation({"agentview": obs.images["agentview"]}, obs.instructions, obs.state))
    with pytest.raises(ValueError, match=r"state must be \(B, 8\)"):
        policy.sample(VLAObservation(obs.images, obs.instructions, obs.state[:, :3]))


def test_policy_drives_the_tabletop_env(monkeypatch):
    monkeypatch.setenv("MUJOCO_GL", "egl")
    from envs.tabletop.env import TabletopEnv

    env = TabletopEnv("PickCubeOntoPlate", cameras=("agentview", "wrist"), image_size=TINY_IMAGE_SIZE)
    raw, info = env.reset(seed=0)
    policy = make_vla()
    obs = VLAObservation.from_env([raw], [info["instruction"]])
    with torch.no_grad():
        chunk = policy.sample(obs, deterministic=True).actions[0]  # (H, A)
    assert chunk.shape == (4, env.action_space.shape[0])
    for action in chunk.numpy():
        raw, _, terminated, truncated, _ = env.step(action.clip(env.action_space.low, env.action_space.high))
        assert not (terminated or truncated)
    env.close()
