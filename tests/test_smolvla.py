"""SmolVLA from LeRobot checkpoints: our implementation against LeRobot's own outputs, loading errors, the chain
machinery (ratio 1 when re-scoring), our checkpoints, the LeRobot export, and RL fine-tuning through the CLI.

The reference is ``tests/fixtures/smolvla`` (written by ``scripts/smolvla_fixtures.py`` with LeRobot 0.4.2 in a
separate venv): a tiny random SmolVLA checkpoint in LeRobot's layout, its SmolVLM folder, fixed inputs and noise,
and the action chunks LeRobot predicted for them. Nothing here needs LeRobot or the network.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from policies.chain import reduce_log_prob
from policies.checkpoint import load_policy, save_policy
from policies.noise import FlowNoiseConfig
from policies.smolvla import SmolVLANormalizer, SmolVLAPolicy
from policies.smolvla_lerobot import export_lerobot_checkpoint, is_lerobot_checkpoint, load_lerobot_checkpoint
from policies.vla_backbone import VLAObservation
from robo_rlft.cli import main

FIXTURES = Path(__file__).parent / "fixtures" / "smolvla"
CHECKPOINT = FIXTURES / "checkpoint"
VLM = FIXTURES / "SmolVLM-tiny"
# float32 everywhere on both sides; the measured difference is 0 on this machine, the bound leaves room for BLAS.
ATOL = 1e-5


@pytest.fixture(scope="module")
def reference() -> tuple[dict[str, np.ndarray], dict]:
    with np.load(FIXTURES / "reference.npz") as data:
        arrays = {key: data[key] for key in data.files}
    return arrays, json.loads((FIXTURES / "reference.json").read_text())


@pytest.fixture
def policy() -> SmolVLAPolicy:
    return load_lerobot_checkpoint(CHECKPOINT, vlm_path=VLM).eval()


def _observation(reference: tuple[dict[str, np.ndarray], dict]) -> VLAObservation:
    arrays, meta = reference
    images = {camera: torch.from_numpy(arrays[camera]) for camera in ("agentview", "wrist")}
    return VLAObservation(images, list(meta["instructions"]), torch.from_numpy(arrays["state"]))


def _euler(policy: SmolVLAPolicy, obs: VLAObservation, noise: torch.Tensor) -> torch.Tensor:
    """The deterministic chain from a given ``x_0 (B, H, A_pad)`` through the policy's own step function."""
    cond = policy.condition(obs)
    x = noise
    for k in range(policy.num_steps):
        step = policy.step_inputs(x, torch.full((x.shape[0],), k), cond)
        x = x + step.velocity * step.dt
    return x


@torch.no_grad()
def test_reproduces_lerobot_action_chunks(policy, reference):
    arrays, meta = reference
    obs = _observation(reference)
    tokens, mask = policy._tokens(obs.instructions, torch.device("cpu"))
    assert np.array_equal(tokens.numpy(), arrays["tokens"]) and np.array_equal(mask.numpy(), arrays["token_mask"])
    assert not mask.all(), "the fixture's instructions differ in length, so padding is exercised"
    noise = torch.from_numpy(arrays["noise"])  # (B, H, 32)
    # LeRobot's first denoising step is at tau = 1 (noise), ours at t = 0, with the opposite sign of velocity.
    velocity, _ = policy.velocity_and_features(noise, torch.zeros(noise.shape[0]), policy.condition(obs))
    np.testing.assert_allclose(-velocity.numpy(), arrays["velocity_t1"], atol=ATOL)
    chunk = _euler(policy, obs, noise)
    np.testing.assert_allclose(chunk.numpy(), arrays["chunk_normalized"], atol=ATOL)
    actions = policy.normalizer.unnormalize_action(chunk)
    assert actions.shape == (2, meta["chunk_size"], meta["action_dim"])
    np.testing.assert_allclose(actions.numpy(), arrays["actions"], atol=ATOL)


@torch.no_grad()
def test_sample_is_the_unclipped_euler_chain_of_its_noise(policy, reference):
    obs = _observation(reference)
    sample = policy.sample(obs, deterministic=True, generator=torch.Generator().manual_seed(3))
    assert sample.chain.shape == (2, policy.num_steps + 1, policy.horizon, 32)
    assert not sample.stochastic.any() and not sample.log_prob.any()
    torch.testing.assert_close(sample.chain[:, -1], _euler(policy, obs, sample.chain[:, 0]), atol=ATOL, rtol=0)
    # Mean/std-normalised actions leave [-1, 1]; like LeRobot, the policy does not clip them.
    assert sample.chain[:, -1, :, :7].abs().max() > 1.0
    torch.testing.assert_close(sample.actions, policy.normalizer.unnormalize_action(sample.chain[:, -1]))


def test_state_dict_matches_lerobot_layout(policy):
    weights = load_file(CHECKPOINT / "model.safetensors")
    ours = {k: tuple(v.shape) for k, v in policy.state_dict().items() if k.startswith("model.")}
    assert ours == {k: tuple(v.shape) for k, v in weights.items()}
    expert = "model.vlm_with_expert.lm_expert.layers"
    # Self-attention layers (0, 2) project the expert's width (48 = 0.75 x 64); cross-attention layers (1, 3)
    # project the VLM's key/value width (2 kv heads x 16).
    assert ours[f"{expert}.0.self_attn.k_proj.weight"] == (32, 48)
    assert ours[f"{expert}.1.self_attn.k_proj.weight"] == (32, 32)
    assert ours["model.state_proj.weight"] == (64, 32) and ours["model.action_in_proj.weight"] == (48, 32)
    assert not any(k.startswith("model.vlm_with_expert.lm_expert.embed_tokens") for k in ours)


def test_missing_vlm_folder_names_the_path_and_the_override(reference):
    _, meta = reference
    with pytest.raises(FileNotFoundError) as err:
        load_lerobot_checkpoint(CHECKPOINT)  # its config names a temporary folder of the machine that built it
    assert meta["vlm_path_at_build"] in str(err.value) and "policy.vlm_path=" in str(err.value)


def test_missing_normalisation_stats_are_named(tmp_path):
    broken = tmp_path / "checkpoint"
    shutil.copytree(CHECKPOINT, broken)
    stats_file = broken / "policy_postprocessor_step_0_unnormalizer_processor.safetensors"
    stats = load_file(stats_file)
    save_file({k: v for k, v in stats.items() if k != "action.std"}, stats_file)
    with pytest.raises(KeyError, match=r"action\.std"):
        load_lerobot_checkpoint(broken, vlm_path=VLM)
    (broken / "policy_preprocessor.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"policy_preprocessor\.json"):
        load_lerobot_checkpoint(broken, vlm_path=VLM)


def test_normaliser_follows_lerobots_formulas():
    """LeRobot's NormalizerProcessorStep: MEAN_STD (x - mean) / (std + 1e-8), back x * std + mean; MIN_MAX
    2 (x - min) / d - 1, back (x + 1) / 2 d + min, d = max - min with 0 replaced by 1e-8."""
    x = torch.tensor([[0.3, -2.0, 5.0]])
    lo, hi = torch.tensor([-1.0, 2.0, -3.0]), torch.tensor([1.0, 2.0, 7.0])  # the second dim is constant
    norm = SmolVLANormalizer(3, 3)
    norm.load_stats({"min": lo, "max": hi}, {"min": lo, "max": hi}, ("MIN_MAX", "MIN_MAX"))
    d = torch.where(hi == lo, torch.full_like(hi, 1e-8), hi - lo)
    torch.testing.assert_close(norm.normalize_obs(x), 2 * (x - lo) / d - 1)
    torch.testing.assert_close(norm.unnormalize_action(x), (x + 1) / 2 * d + lo)
    mean, std = torch.tensor([1.0, -1.0, 0.5]), torch.tensor([2.0, 0.5, 1e-3])
    norm.load_stats({"mean": mean, "std": std}, {"mean": mean, "std": std}, ("MEAN_STD", "MEAN_STD"))
    torch.testing.assert_close(norm.normalize_obs(x), (x - mean) / (std + 1e-8))
    torch.testing.assert_close(norm.unnormalize_action(x), x * std + mean)


def test_env_dims_must_match_the_checkpoint():
    with pytest.raises(ValueError, match="8-D state, but the env's state has 9"):
        load_lerobot_checkpoint(CHECKPOINT, vlm_path=VLM, state_dim=9)
    with pytest.raises(ValueError, match="7-D action, but the env's action has 6"):
        load_lerobot_checkpoint(CHECKPOINT, vlm_path=VLM, action_dim=6)
    assert is_lerobot_checkpoint(CHECKPOINT) and not is_lerobot_checkpoint(VLM)


@pytest.mark.parametrize("scheme", ["flow_noise", "flow_sde"])
def test_rescoring_a_sampled_chain_gives_ratio_one(policy, reference, scheme):
    policy.configure_noise(FlowNoiseConfig(scheme=scheme, hidden_dims=[16]))
    obs = _observation(reference)
    with torch.no_grad():
        sample = policy.sample(obs, generator=torch.Generator().manual_seed(0))
    assert sample.stochastic.all() and (sample.std > 0).all()
    policy.train()
    log_prob, entropy = policy.log_prob_and_entropy(obs, sample.chain, sample.stochastic)
    torch.testing.assert_close(log_prob, sample.log_prob, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(entropy, 0.5 + 0.5 * np.log(2 * np.pi) + sample.std.log(), atol=1e-5, rtol=1e-5)
    ratio = (
        reduce_log_prob(log_prob, sample.stochastic, "sum") - reduce_log_prob(sample.log_prob, sample.stochastic, "sum")
    ).exp()
    torch.testing.assert_close(ratio, torch.ones(2), atol=1e-4, rtol=0)
    # The gradient reaches the expert (and the noise head for flow_noise), never the frozen VLM.
    log_prob.sum().backward()
    assert policy.model.action_out_proj.weight.grad is not None
    assert all(p.grad is None for p in policy.model.vlm_with_expert.vlm.parameters())


@torch.no_grad()
def test_our_checkpoint_round_trips_with_its_own_vlm_assets(policy, reference, tmp_path):
    obs = _observation(reference)
    saved = save_policy(policy, tmp_path / "ours")
    assert (saved / "vlm" / "tokenizer.json").is_file() and not (saved / "vlm" / "model.safetensors").exists()
    loaded, _ = load_policy(saved, "smolvla")
    assert isinstance(loaded, SmolVLAPolicy) and loaded.action_dim == 32 and loaded.env_action_dim == 7
    before = policy.sample(obs, deterministic=True, generator=torch.Generator().manual_seed(1)).actions
    after = loaded.eval().sample(obs, deterministic=True, generator=torch.Generator().manual_seed(1)).actions
    torch.testing.assert_close(after, before, atol=0, rtol=0)


@torch.no_grad()
def test_lerobot_export_loads_back_unchanged(policy, reference, tmp_path):
    exported = export_lerobot_checkpoint(policy, tmp_path / "exported")
    config = json.loads((exported / "config.json").read_text())
    assert config["type"] == "smolvla" and config["vlm_model_name"] == str(VLM.resolve())
    assert config["chunk_size"] == 8 and config["output_features"]["action"]["shape"] == [7]
    again = load_lerobot_checkpoint(exported)  # the export names the VLM folder by its absolute path
    for key, value in policy.state_dict().items():
        if not key.startswith("noise."):
            torch.testing.assert_close(again.state_dict()[key], value, atol=0, rtol=0)
    obs = _observation(reference)
    noise = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(_euler(again, obs, noise), _euler(policy, obs, noise), atol=0, rtol=0)


# ---- RL fine-tuning through the CLI -----------------------------------------------------------------------

TINY_PPO = [
    "env=tabletop",
    "env.task=LiftCube",
    "env.cameras=[agentview,wrist]",
    "env.image_size=32",
    "env.num_envs=2",
    "env.act_steps=4",
    "progress=false",
    "algo.iterations=1",
    "algo.steps_per_iteration=2",
    "algo.minibatch_size=2",
    "algo.update_epochs=2",
    "algo.critic_warmup_iterations=0",
    "algo.eval_episodes=1",
    "algo.target_kl=null",
    "policy.critic.hidden_dims=[16]",
    "policy.noise.hidden_dims=[16]",
]


@pytest.mark.parametrize("scheme", ["flow_noise", "flow_sde"])
def test_ppo_finetunes_a_lerobot_checkpoint_with_ratio_one(tmp_path, scheme):
    run_dir = tmp_path / "run"
    argv = ["finetune", f"run_dir={run_dir}", "policy=smolvla", f"policy.pretrained={CHECKPOINT}"]
    assert main([*argv, f"policy.vlm_path={VLM}", f"policy.noise.scheme={scheme}", *TINY_PPO]) == 0
    with open(run_dir / "metrics.csv", newline="") as f:
        (row,) = [r for r in csv.DictReader(f) if r["iteration"] != "0"]
    assert abs(float(row["ratio_first_minibatch"]) - 1.0) < 1e-5, row
    assert float(row["approx_kl"]) > 0 and int(float(row["skipped_updates"])) == 0
    # The run's checkpoints are ours (self-describing, with the VLM's config and tokenizer), and RL moved the
    # action expert but not the frozen VLM or state projection.
    policy, metadata = load_policy(run_dir / "final", "smolvla")
    assert policy.config.noise.scheme == scheme and metadata["env_kwargs"]["cameras"] == ["agentview", "wrist"]
    initial, final = load_file(CHECKPOINT / "model.safetensors"), load_file(run_dir / "final" / "model.safetensors")
    expert = [k for k in initial if ".lm_expert." in k or "action_" in k]
    frozen = [k for k in initial if ".vlm_with_expert.vlm." in k or "state_proj" in k]
    assert any(not torch.equal(initial[k], final[k]) for k in expert)
    assert all(torch.equal(initial[k], final[k]) for k in frozen)


def test_grpo_finetunes_a_lerobot_checkpoint(tmp_path):
    run_dir = tmp_path / "grpo"
    argv = ["finetune", f"run_dir={run_dir}", "policy=smolvla", f"policy.pretrained={CHECKPOINT}", "algo=grpo"]
    argv += [f"policy.vlm_path={VLM}", "policy.noise.scheme=flow_sde", "algo.group_size=2", "algo.max_chunk_steps=2"]
    argv += ["algo.dynamic_sampling=false", "algo.minibatch_size=2", "algo.update_epochs=1"]  # keep the failing groups
    tiny = [arg for arg in TINY_PPO if not arg.startswith(("algo.", "policy.critic"))]
    assert main([*argv, *tiny, "algo.iterations=1", "algo.eval_episodes=1"]) == 0
    with open(run_dir / "metrics.csv", newline="") as f:
        (row,) = [r for r in csv.DictReader(f) if r["iteration"] != "0"]
    assert int(float(row["samples"])) > 0 and abs(float(row["ratio_first_minibatch"]) - 1.0) < 1e-5, row


# ---- SFT of a LeRobot checkpoint on our demonstrations through the CLI ----------------------------------------


def test_pretrain_continues_from_a_lerobot_checkpoint(tmp_path):
    """`robo-rlft pretrain policy.pretrained=<LeRobot checkpoint>` fits the expert and the state projection to our
    demos (VLM frozen, as LeRobot's SFT), with the normalisation taken from the demos, and writes our checkpoint,
    from which SFT continues in turn."""
    from robo_rlft.data import load_dataset

    env = [arg for arg in TINY_PPO if arg.startswith("env") and arg != "env.num_envs=2"] + ["progress=false"]
    data = tmp_path / "data"
    assert main(["collect", "collect.episodes=2", "collect.action_noise=0", f"run_dir={data}", *env]) == 0
    sft = ["pretrain", "policy=smolvla", f"policy.vlm_path={VLM}", f"pretrain.dataset={data / 'dataset.npz'}", *env]
    sft += ["pretrain.gradient_steps=3", "pretrain.batch_size=4", "pretrain.eval_episodes=0"]
    assert main([*sft, f"policy.pretrained={CHECKPOINT}", f"run_dir={tmp_path / 'sft'}"]) == 0

    initial, final = load_file(CHECKPOINT / "model.safetensors"), load_file(tmp_path / "sft/final/model.safetensors")
    expert = [k for k in initial if ".lm_expert." in k or "action_" in k or "state_proj" in k]
    frozen = [k for k in initial if ".vlm_with_expert.vlm." in k]
    assert expert and frozen
    assert all(not torch.equal(initial[k], final[k]) for k in expert)
    assert all(torch.equal(initial[k], final[k]) for k in frozen)
    policy, metadata = load_policy(tmp_path / "sft" / "final", "smolvla")
    assert not policy.model.state_proj.weight.requires_grad  # frozen again for RL, which caches the prefix
    assert isinstance(policy, SmolVLAPolicy) and policy.horizon == 8 and metadata["trained_by"] == "robo-rlft pretrain"
    actions = torch.as_tensor(load_dataset(data / "dataset.npz").actions)
    torch.testing.assert_close(policy.normalizer.action_mean, actions.mean(0))
    # policy.train_state_proj=false keeps LeRobot's state projection as it was.
    kept = tmp_path / "kept"
    assert main([*sft, f"policy.pretrained={CHECKPOINT}", "policy.train_state_proj=false", f"run_dir={kept}"]) == 0
    final = load_file(kept / "final" / "model.safetensors")
    assert all(torch.equal(initial[k], final[k]) for k in initial if "state_proj" in k)
    # Our run checkpoint (a run directory) is a starting point of SFT too.
    assert main([*sft, f"policy.pretrained={tmp_path / 'sft'}", f"run_dir={tmp_path / 'again'}"]) == 0
    assert load_policy(tmp_path / "again" / "final", "smolvla")[0].horizon == 8
