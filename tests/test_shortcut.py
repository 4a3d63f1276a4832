"""Shortcut flow policies (policy=shortcut): one model, sampled at 1, 2 or 4 steps."""

from __future__ import annotations

import pytest
import torch

from policies.chain import reduce_log_prob
from policies.flow import FlowPolicy, FlowPolicyConfig
from robo_rlft.cli import compose_config

OBS_DIM, ACTION_DIM = 4, 2


def _shortcut(steps: int = 4) -> FlowPolicy:
    torch.manual_seed(0)
    config = FlowPolicyConfig(horizon=2, denoising_steps=steps, hidden_dims=[64, 64], shortcut=True)
    return FlowPolicy(OBS_DIM, ACTION_DIM, config)


def _fit(policy: FlowPolicy, obs: torch.Tensor, modes: torch.Tensor, gen: torch.Generator) -> None:
    """Fit two equally likely chunks per observation (``modes (2, B, H, A)``): a multimodal target."""
    optimizer = torch.optim.Adam(policy.parameters(), lr=2e-3)
    for _ in range(1500):
        index = torch.randint(obs.shape[0], (128,), generator=gen)
        which = torch.randint(2, (128,), generator=gen)
        losses = policy.pretrain_loss(obs[index], modes[which, index])
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()


def _distance_to_nearest_mode(policy: FlowPolicy, obs: torch.Tensor, modes: torch.Tensor) -> float:
    with torch.no_grad():
        actions = policy.sample(obs, deterministic=True, generator=torch.Generator().manual_seed(1)).actions
    return torch.minimum((actions - modes[0]).abs().mean((1, 2)), (actions - modes[1]).abs().mean((1, 2))).mean().item()


def test_one_shortcut_model_samples_the_modes_at_1_2_and_4_steps():
    """With two modes per observation, one Euler step of a plain flow lands between them (the mean
    velocity); a shortcut model lands on a mode at 1, 2 and 4 steps."""
    gen = torch.Generator().manual_seed(0)
    obs = torch.randn(8, OBS_DIM, generator=gen).repeat(8, 1)  # 64 rows: 8 observations x 8 noise draws
    chunk = (torch.rand(8, 2, ACTION_DIM, generator=gen) * 0.6 + 0.2).repeat(8, 1, 1)
    modes = torch.stack([chunk, -chunk])  # (2, 64, H, A)
    policy = _shortcut()
    _fit(policy, obs, modes, gen)
    assert set(policy.pretrain_loss(obs, chunk)) == {"flow_matching", "self_consistency"}
    distances = {}
    for steps in (1, 2, 4):
        policy.configure_finetuning(compose_config(["policy=shortcut", f"policy.denoising_steps={steps}"]).policy)
        assert policy.num_steps == steps
        distances[steps] = _distance_to_nearest_mode(policy, obs, modes)
        # The modes are ~0.48 from zero (their mean): landing within 0.22 is landing on a mode.
        assert distances[steps] < 0.22, f"shortcut at {steps} steps: {distances[steps]:.3f} from the nearest mode"
    torch.manual_seed(0)
    plain = FlowPolicy(OBS_DIM, ACTION_DIM, FlowPolicyConfig(horizon=2, denoising_steps=1, hidden_dims=[64, 64]))
    _fit(plain, obs, modes, gen)
    plain_distance = _distance_to_nearest_mode(plain, obs, modes)  # measured 0.39 vs the shortcut's 0.17
    assert plain_distance > 1.5 * distances[1], "one plain Euler step averages the modes; a shortcut does not"


@pytest.mark.parametrize("steps", [1, 2])
def test_shortcut_chains_rescore_to_ratio_one(steps):
    policy = _shortcut(steps)
    obs = torch.randn(16, OBS_DIM)
    with torch.no_grad():
        sample = policy.sample(obs)
        new, _ = policy.log_prob_and_entropy(obs, sample.chain, sample.stochastic)
    ratio = reduce_log_prob(new, sample.stochastic, "sum") - reduce_log_prob(sample.log_prob, sample.stochastic, "sum")
    torch.testing.assert_close(ratio.exp(), torch.ones(16), atol=1e-5, rtol=0)


def test_shortcut_steps_must_be_a_power_of_two_and_only_shortcuts_change_k():
    with pytest.raises(ValueError, match=r"denoising_steps=3.*power of two"):
        FlowPolicyConfig(denoising_steps=3, shortcut=True)
    plain = FlowPolicy(OBS_DIM, ACTION_DIM, FlowPolicyConfig(denoising_steps=4, hidden_dims=[8]))
    plain.configure_finetuning(compose_config(["policy.denoising_steps=2"]).policy)
    assert plain.num_steps == 4, "a plain flow keeps the K it was trained for"
    assert "denoising_steps" in _shortcut().FINETUNE_FIELDS and "denoising_steps" not in plain.FINETUNE_FIELDS
