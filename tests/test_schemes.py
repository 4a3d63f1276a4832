"""Flow noise schemes: stochastic steps really are N(mean, std^2), Flow-SDE keeps the flow's marginals,
and switching schemes on a loaded policy keeps or resets the right weights."""

from __future__ import annotations

import math

import pytest
import torch

from policies.noise import FlowNoiseConfig, FlowSDE, StepInputs


def _ks_statistic_vs_standard_normal(z: torch.Tensor) -> float:
    """Kolmogorov-Smirnov distance between the empirical CDF of ``z`` and N(0, 1)."""
    z, _ = z.double().sort()
    n = z.numel()
    cdf = 0.5 * (1 + torch.erf(z / math.sqrt(2)))
    upper = torch.arange(1, n + 1, dtype=torch.float64) / n - cdf
    lower = cdf - torch.arange(n, dtype=torch.float64) / n
    return max(upper.max().item(), lower.max().item())


@pytest.mark.parametrize(("scheme", "sde_steps"), [("reinflow", "all"), ("flow_noise", "all"), ("flow_sde", "one")])
def test_stochastic_steps_follow_their_gaussian(flow_policy_factory, scheme, sde_steps):
    """Standardise every sampled stochastic element by the (mean, std) that re-scoring computes: the
    result must be N(0, 1) (KS test at 1 %, fixed seed), so sampling and likelihood agree."""
    policy = flow_policy_factory(5, 2, horizon=2, denoising_steps=3, scheme=scheme, sde_steps=sde_steps)
    obs = torch.randn(4000, 5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sample = policy.sample(obs, generator=torch.Generator().manual_seed(1))
        rows, steps = sample.stochastic.nonzero(as_tuple=True)
        mean, std = policy.transition(sample.chain[rows, steps], steps, policy.normalizer.normalize_obs(obs)[rows])
    z = ((sample.chain[rows, steps + 1] - mean) / std).flatten()
    assert z.numel() >= 4000 * 2 * 2
    critical_1pct = 1.63 / math.sqrt(z.numel())
    assert _ks_statistic_vs_standard_normal(z) < critical_1pct
    assert abs(z.mean().item()) < 0.05 and abs(z.std().item() - 1) < 0.05


def _gaussian_flow_velocity(x: torch.Tensor, t: torch.Tensor, mu: float, s: float) -> torch.Tensor:
    """Exact rectified-flow velocity E[x1 - x0 | x_t = x] for x0 ~ N(0, 1), x1 ~ N(mu, s^2)."""
    var_t = (1 - t) ** 2 + (t * s) ** 2
    cov = t * s**2 - (1 - t)
    return mu + cov / var_t * (x - t * mu)


@pytest.mark.parametrize("noise_level", [0.3, 0.7])
def test_flow_sde_keeps_the_flow_marginals(noise_level):
    """With the exact velocity of a 1-D Gaussian problem, integrating the SDE from noise must land
    on the data distribution N(mu, s^2), like the ODE does — while adding real noise on the way."""
    mu, s, num_steps, n = 0.7, 0.3, 400, 40_000
    scheme = FlowSDE(0, 0, 1, 1, FlowNoiseConfig(scheme="flow_sde", noise_level=noise_level))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 1, generator=gen)
    dt = 1.0 / num_steps
    injected = 0.0
    for k in range(num_steps):
        t = torch.full((n,), k * dt)
        v = _gaussian_flow_velocity(x, t[:, None, None], mu, s)
        empty = torch.zeros(n, 0)
        mean, std = scheme.mean_std(StepInputs(x, t, dt, v, empty, empty))
        x = mean + std * torch.randn(x.shape, generator=gen)
        injected += (std**2).mean().item()
    assert injected > 0.05, "the SDE must inject noise, else it is just the ODE"
    assert x.mean().item() == pytest.approx(mu, abs=0.02)
    assert x.std().item() == pytest.approx(s, abs=0.02)


def test_configure_noise_keeps_the_head_for_new_bounds_and_resets_it_for_a_new_scheme(flow_policy_factory):
    policy = flow_policy_factory(5, 2, random_noise_head=True)
    trained = policy.noise.std_head.net[-1].weight.clone()
    wider = FlowNoiseConfig(sigma_min=0.01, sigma_max=0.5, hidden_dims=[16])
    policy.configure_noise(wider)
    assert torch.equal(policy.noise.std_head.net[-1].weight, trained)
    assert policy.noise.std_head.sigma_max == 0.5 and policy.config.noise == wider
    policy.configure_noise(FlowNoiseConfig(scheme="flow_sde"))
    assert isinstance(policy.noise, FlowSDE) and not list(policy.noise.parameters())
    policy.configure_noise(FlowNoiseConfig(scheme="flow_noise", hidden_dims=[16]))
    assert torch.equal(policy.noise.std_head.net[-1].weight, torch.zeros_like(trained)), "a fresh head"
    with pytest.raises(ValueError, match="denoising_steps >= 2"):
        flow_policy_factory(5, 2, denoising_steps=1).configure_noise(FlowNoiseConfig(scheme="flow_sde"))


def test_transition_clip_schedule_rises_to_the_last_step_and_survives_one_step():
    from robo_rlft.algos.ppo import transition_clip_schedule

    last_four = torch.tensor([[False, False, True, True, True, True]])  # DDPM-style: last K' = 4 of K = 6
    clips = transition_clip_schedule(last_four, clip_last=0.01, clip_first=0.001, rate=3.0)
    assert clips.shape == (6,)
    torch.testing.assert_close(clips[2 : 4 + 2][[0, -1]], torch.tensor([0.001, 0.01]))
    assert (clips[2:].diff() > 0).all(), "the clip rises toward the final denoising step"
    one_step = torch.tensor([[False, False, True]])  # a single fine-tuned step: DPPO divided by zero here
    torch.testing.assert_close(transition_clip_schedule(one_step, 0.01, 0.001, 3.0)[2], torch.tensor(0.01))
    assert torch.isfinite(transition_clip_schedule(one_step, 0.01, 0.001, 3.0)).all()
    torch.testing.assert_close(transition_clip_schedule(last_four, 0.02, None, 3.0), torch.full((6,), 0.02))


@pytest.mark.parametrize(("scheme", "sde_steps"), [("reinflow", "all"), ("flow_sde", "one")])
def test_transition_samples_cover_each_stochastic_transition_once_and_rescore_it_alone(
    flow_policy_factory, scheme, sde_steps
):
    """DPPO minibatches (chain, step) pairs: every stochastic transition is one PPO sample, and scoring a
    sample's one-hot mask gives that transition's log-prob from the whole-chain re-scoring."""
    from policies.chain import step_log_prob
    from robo_rlft.algos.ppo import ppo_samples

    policy = flow_policy_factory(5, 2, horizon=2, denoising_steps=4, scheme=scheme, sde_steps=sde_steps)
    obs = torch.randn(16, 5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sample = policy.sample(obs, generator=torch.Generator().manual_seed(1))
        whole = step_log_prob(policy.log_prob_and_entropy(obs, sample.chain, sample.stochastic)[0], "sum")  # (B, K)
        rows, masks = ppo_samples(sample.stochastic, "transition")
        alone = step_log_prob(policy.log_prob_and_entropy(obs[rows], sample.chain[rows], masks)[0], "sum")
    assert rows.shape[0] == int(sample.stochastic.sum())
    assert (masks.sum(1) == 1).all() and sample.stochastic[rows].logical_and(masks).sum() == rows.shape[0]
    pairs = {(int(r), int(k)) for r, k in zip(rows, masks.float().argmax(1), strict=True)}
    assert pairs == {(int(r), int(k)) for r, k in zip(*sample.stochastic.nonzero(as_tuple=True), strict=True)}
    torch.testing.assert_close(alone[masks], whole[sample.stochastic])
    chain_rows, chain_masks = ppo_samples(sample.stochastic, "chain")
    assert torch.equal(chain_rows, torch.arange(16)) and torch.equal(chain_masks, sample.stochastic)
