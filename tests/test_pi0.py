"""π0 / π0.5 import: parameter names and shapes against LeRobot's own constructors, loading LeRobot-layout
checkpoints, the prefix cache, the chain's likelihood, and loading errors.

The reference is ``tests/fixtures/pi0/*_keys.json`` (written by ``scripts/pi0_reference.py`` from LeRobot 0.4.2's
``PI0Policy`` / ``PI05Policy`` built on the meta device): every key of LeRobot's ``model.safetensors`` and its shape.
The reference model cannot run here, so outputs are not compared with it. Nothing here needs LeRobot or the network.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from policies.chain import reduce_log_prob
from policies.checkpoint import load_policy
from policies.noise import FlowNoiseConfig
from policies.pi0 import PI0FlowModel, PI0Policy, PI0PolicyConfig
from policies.pi0_lerobot import (
    is_lerobot_pi0_checkpoint,
    load_lerobot_pi0_checkpoint,
    write_random_lerobot_checkpoint,
    write_stand_in_tokenizer,
)
from policies.vla_backbone import VLAObservation
from robo_rlft.cli import main

FIXTURES = Path(__file__).parent / "fixtures" / "pi0"
FAMILIES = ("pi0", "pi05")
TIED = "model.paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight"
# The miniature: the same module tree as the real sizes (ours, not LeRobot variants), small enough for milliseconds.
TINY = {
    "paligemma_variant": "gemma_tiny_2b",
    "action_expert_variant": "gemma_tiny_300m",
    "vision_variant": "tiny",
    "vocab_size": 512,
}
TINY_ARCH = {
    **TINY,
    "chunk_size": 4,
    "num_inference_steps": 3,
    "image_resolution": [32, 32],
    "tokenizer_max_length": 24,
}
STATE_DIM, ACTION_DIM = 8, 7
INSTRUCTIONS = ["lift the red cube", "put the can in the basket"]


def _listing(family: str) -> dict:
    return json.loads((FIXTURES / f"{family}_keys.json").read_text())


def _model_keys(config: PI0PolicyConfig) -> dict[str, list[int]]:
    """Our model's checkpoint keys and shapes (built on the meta device: no memory, no init), as LeRobot saves them."""
    with torch.device("meta"):
        model = PI0FlowModel(config)
    return {f"model.{k}": list(v.shape) for k, v in model.state_dict().items() if f"model.{k}" != TIED}


@pytest.mark.parametrize("family", FAMILIES)
def test_real_size_keys_and_shapes_are_lerobots(family):
    listing = _listing(family)
    ours = _model_keys(PI0PolicyConfig(variant=family))
    theirs = listing["keys"]
    assert sorted(set(theirs) - set(ours)) == [] and sorted(set(ours) - set(theirs)) == []
    assert {k: v for k, v in ours.items() if theirs[k] != v} == {}
    assert sum(int(np.prod(v)) for v in ours.values()) == listing["num_parameters"]
    assert list(listing["omitted_by_save_pretrained"]) == [TIED]  # the tied duplicate LeRobot's save leaves out
    assert listing["config"]["paligemma_variant"] == "gemma_2b" and listing["versions"]["lerobot"] == "0.4.2"


def _structure(keys: dict) -> set[str]:
    return {re.sub(r"\.layers\.\d+\.", ".layers.N.", key) for key in keys}


@pytest.mark.parametrize("family", FAMILIES)
def test_miniature_has_the_real_key_structure(family):
    assert _structure(_model_keys(PI0PolicyConfig(variant=family, image_resolution=[32, 32], **TINY))) == _structure(
        _listing(family)["keys"]
    )


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    words = sorted({word for text in INSTRUCTIONS for word in text.split()})
    return write_stand_in_tokenizer(tmp_path_factory.mktemp("tok") / "paligemma", words, vocab_size=TINY["vocab_size"])


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request, tmp_path_factory) -> Path:
    """A LeRobot-layout miniature checkpoint with random weights of exactly the keys our model has."""
    family = request.param
    listing = _listing(family)
    config = PI0PolicyConfig(variant=family, image_resolution=[32, 32], **TINY)
    tiny = {
        "family": family,
        "config": {**listing["config"], **TINY_ARCH},
        "keys": _model_keys(config),
    }
    path = tmp_path_factory.mktemp(family) / "pretrained_model"
    return write_random_lerobot_checkpoint(
        path, tiny, STATE_DIM, ACTION_DIM, ["agentview", "wrist"], dtype=torch.float32, extra_config=TINY
    )


def _load(checkpoint: Path, tokenizer: Path, **overrides) -> PI0Policy:
    return load_lerobot_pi0_checkpoint(
        checkpoint, STATE_DIM, ACTION_DIM, {"tokenizer_path": str(tokenizer), **overrides}
    )


def _observation(batch: int = 2) -> VLAObservation:
    generator = torch.Generator().manual_seed(0)
    images = {
        "agentview": torch.randint(0, 256, (batch, 32, 32, 3), dtype=torch.uint8, generator=generator),
        "wrist": torch.randint(0, 256, (batch, 24, 40, 3), dtype=torch.uint8, generator=generator),  # resize + pad
    }
    return VLAObservation(images, INSTRUCTIONS[:batch], torch.randn(batch, STATE_DIM, generator=generator))


def _count_prefix_runs(policy: PI0Policy) -> list[int]:
    calls = [0]
    pwe = policy.model.paligemma_with_expert
    original = pwe.prefix_cache

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    pwe.prefix_cache = counted
    return calls


def test_checkpoint_loads_and_samples_finite_chunks_with_one_prefix_per_observation(checkpoint, tokenizer):
    assert is_lerobot_pi0_checkpoint(checkpoint)
    policy = _load(checkpoint, tokenizer).eval()
    family = json.loads((checkpoint / "config.json").read_text())["type"]
    assert policy.config.variant == family and policy.policy_type == family
    assert policy.model.paligemma_with_expert.gemma_expert.model.embed_tokens is None
    paligemma = policy.model.paligemma_with_expert.paligemma
    assert paligemma.model.language_model.embed_tokens.weight is paligemma.lm_head.weight  # tied, as LeRobot's
    calls = _count_prefix_runs(policy)
    obs = _observation()
    with torch.no_grad():
        sample = policy.sample(obs, deterministic=True, generator=torch.Generator().manual_seed(1))
    assert sample.actions.shape == (2, 4, ACTION_DIM) and torch.isfinite(sample.actions).all()
    assert sample.chain.shape == (2, policy.num_steps + 1, 4, 32) and policy.num_steps == 3
    assert calls[0] == 1, "the prefix runs once per observation batch, not once per denoising step"
    # The image (and for π0.5 the state, through the prompt) reaches the actions.
    other = VLAObservation({**obs.images, "agentview": 255 - obs.images["agentview"]}, obs.instructions, obs.state)
    with torch.no_grad():
        moved = policy.sample(other, deterministic=True, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(moved.actions, sample.actions)


def test_pi05_prompt_carries_the_discretised_state(checkpoint, tokenizer):
    policy = _load(checkpoint, tokenizer)
    obs = _observation(1)
    state = torch.tensor([[-1.0, -0.999, 0.0, 0.999, 1.0, 0.5, -0.5, 0.25]])
    (prompt,) = policy._prompts(obs, state)
    if policy.config.variant == "pi0":
        assert prompt == f"{INSTRUCTIONS[0]}\n"
        return
    bins = prompt.split("State: ")[1].split(";")[0].split()
    # openpi: np.digitize(x, linspace(-1, 1, 257)[:-1]) - 1; padding zeros fall in bin 128.
    assert bins[:8] == ["0", "0", "128", "255", "255", "192", "64", "160"] and len(bins) == 32
    assert set(bins[8:]) == {"128"} and prompt.startswith(f"Task: {INSTRUCTIONS[0]}, State: ")
    assert prompt.endswith(";\nAction: ")


@pytest.mark.parametrize("scheme", ["flow_noise", "flow_sde"])
def test_rescoring_a_sampled_chain_gives_ratio_one_with_one_prefix(checkpoint, tokenizer, scheme):
    policy = _load(checkpoint, tokenizer)
    policy.configure_noise(FlowNoiseConfig(scheme=scheme, hidden_dims=[16]))
    calls = _count_prefix_runs(policy)
    obs = _observation()
    with torch.no_grad():
        sample = policy.sample(obs, generator=torch.Generator().manual_seed(0))
    assert sample.stochastic.all() and (sample.std > 0).all()
    policy.train()
    log_prob, _ = policy.log_prob_and_entropy(obs, sample.chain, sample.stochastic)
    assert calls[0] == 2, "sampling and re-scoring run the prefix once each, for all K steps"
    torch.testing.assert_close(log_prob, sample.log_prob, atol=1e-4, rtol=1e-5)
    ratio = (
        reduce_log_prob(log_prob, sample.stochastic, "sum") - reduce_log_prob(sample.log_prob, sample.stochastic, "sum")
    ).exp()
    torch.testing.assert_close(ratio, torch.ones(2), atol=1e-4, rtol=0)
    log_prob.sum().backward()
    assert policy.model.action_out_proj.weight.grad is not None
    assert all(p.grad is None for p in policy.model.paligemma_with_expert.paligemma.parameters())
    assert policy.critic_features(obs).shape == (2, policy.critic_feature_dim())


def test_bfloat16_paligemma_keeps_a_float32_expert(checkpoint, tokenizer):
    policy = _load(checkpoint, tokenizer, dtype="bfloat16").eval()
    pwe = policy.model.paligemma_with_expert
    assert pwe.paligemma.lm_head.weight.dtype == torch.bfloat16
    assert pwe.gemma_expert.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    with torch.no_grad():
        sample = policy.sample(_observation(), deterministic=True)
    assert sample.actions.dtype == torch.float32 and torch.isfinite(sample.actions).all()


def test_missing_tokenizer_is_named_with_the_override(checkpoint, tmp_path):
    expected = tmp_path / "no-tokenizer-here"
    with pytest.raises(FileNotFoundError) as err:
        _load(checkpoint, expected)
    assert str(expected) in str(err.value) and "policy.tokenizer_path=" in str(err.value)
    with pytest.raises(FileNotFoundError, match=r"policy\.tokenizer_path="):
        load_lerobot_pi0_checkpoint(checkpoint, STATE_DIM, ACTION_DIM)


def test_wrong_shaped_or_missing_weight_is_named(checkpoint, tokenizer, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    for item in checkpoint.iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    weights = load_file(broken / "model.safetensors")
    key = "model.action_in_proj.weight"
    weights[key] = torch.zeros(3, 5)
    dropped = "model.paligemma_with_expert.gemma_expert.model.layers.1.mlp.up_proj.weight"
    del weights[dropped]
    save_file(weights, broken / "model.safetensors")
    with pytest.raises(ValueError) as err:
        _load(broken, tokenizer)
    assert f"{key}: (3, 5)" in str(err.value) and dropped in str(err.value)


def test_ppo_finetunes_a_lerobot_checkpoint_through_the_cli(checkpoint, tokenizer, tmp_path):
    family = json.loads((checkpoint / "config.json").read_text())["type"]
    run_dir = tmp_path / "run"
    argv = ["finetune", f"run_dir={run_dir}", f"policy={family}", f"policy.pretrained={checkpoint}"]
    argv += [f"policy.tokenizer_path={tokenizer}", "policy.cameras=[agentview,wrist]"]
    argv += ["env=tabletop", "env.task=LiftCube", "env.cameras=[agentview,wrist]", "env.image_size=32"]
    argv += ["env.num_envs=2", "env.act_steps=4", "algo.steps_per_iteration=2", "algo.minibatch_size=2"]
    argv += ["algo.update_epochs=1", "algo.critic_warmup_iterations=0", "algo.iterations=1", "algo.eval_episodes=1"]
    argv += ["algo.target_kl=null", "policy.critic.hidden_dims=[16]", "policy.noise.hidden_dims=[16]"]
    assert main([*argv, "progress=false"]) == 0
    with open(run_dir / "metrics.csv", newline="") as f:
        (row,) = [r for r in csv.DictReader(f) if r["iteration"] != "0"]
    assert abs(float(row["ratio_first_minibatch"]) - 1.0) < 1e-5 and float(row["approx_kl"]) > 0, row
    # The run's own checkpoint (with the tokenizer) reloads as the same family.
    policy, _ = load_policy(run_dir / "final", family)
    assert isinstance(policy, PI0Policy) and policy.config.variant == family
