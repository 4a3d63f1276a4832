"""The Gaussian MLP baseline behind the chain interface: exact log-probs, BC, checkpoints and the CLI."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from policies.chain import reduce_log_prob
from policies.checkpoint import load_policy, save_policy
from policies.gaussian import GaussianPolicy, GaussianPolicyConfig
from robo_rlft.cli import main

OBS_DIM, ACTION_DIM, BATCH = 5, 2, 8


def _policy(horizon: int = 3) -> GaussianPolicy:
    torch.manual_seed(0)
    policy = GaussianPolicy(OBS_DIM, ACTION_DIM, GaussianPolicyConfig(horizon=horizon, hidden_dims=[16, 16]))
    with torch.no_grad():
        policy.log_std.copy_(torch.randn(horizon, ACTION_DIM) * 0.3 - 1.0)
    return policy


def test_log_prob_is_the_normal_density_and_rescoring_gives_ratio_one():
    policy, obs = _policy(), torch.randn(BATCH, OBS_DIM)
    with torch.no_grad():
        sample = policy.sample(obs)
        log_prob, entropy = policy.log_prob_and_entropy(obs, sample.chain, sample.stochastic)
        mean = policy.mean_net(policy.normalizer.normalize_obs(obs)).view(BATCH, 3, ACTION_DIM)
    normal = torch.distributions.Normal(mean, policy.log_std.exp())
    assert sample.chain.shape == (BATCH, 2, 3, ACTION_DIM) and sample.stochastic.all()
    torch.testing.assert_close(log_prob[:, 0], normal.log_prob(sample.chain[:, 1]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy[:, 0], normal.entropy(), atol=1e-6, rtol=1e-6)
    for reduction in ("sum", "mean"):
        new = reduce_log_prob(log_prob, sample.stochastic, reduction)
        old = reduce_log_prob(sample.log_prob, sample.stochastic, reduction)
        torch.testing.assert_close((new - old).exp(), torch.ones(BATCH), atol=1e-5, rtol=0)


def test_deterministic_sample_is_the_mean_and_has_no_likelihood():
    policy, obs = _policy(), torch.randn(BATCH, OBS_DIM)
    with torch.no_grad():
        sample = policy.sample(obs, deterministic=True)
        mean = policy.mean_net(policy.normalizer.normalize_obs(obs)).view(BATCH, 3, ACTION_DIM)
    torch.testing.assert_close(sample.chain[:, 1], mean)
    assert not sample.stochastic.any() and not sample.log_prob.any()


def test_behaviour_cloning_fits_the_mean_and_checkpoints_round_trip(tmp_path):
    policy = _policy()
    obs, actions = torch.randn(64, OBS_DIM), torch.rand(64, 3, ACTION_DIM) * 1.6 - 0.8
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-2)
    first = policy.pretrain_loss(obs, actions)["bc_mse"].item()
    for _ in range(200):
        loss = policy.pretrain_loss(obs, actions)["bc_mse"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.2 * first
    loaded, _ = load_policy(save_policy(policy, tmp_path / "ckpt"), expected_type="gaussian")
    with torch.no_grad():
        a = policy.sample(obs, generator=torch.Generator().manual_seed(3))
        b = loaded.sample(obs, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.actions, b.actions) and torch.equal(loaded.log_std, policy.log_std)


def test_bad_config_names_the_field():
    with pytest.raises(ValueError, match=r"policy.log_std_init must be in \[-10, 2\], got 5"):
        GaussianPolicyConfig(log_std_init=5)


def test_cli_finetunes_the_gaussian_baseline_with_ppo(tmp_path, tiny_finetune):
    torch.manual_seed(0)
    policy = GaussianPolicy(11, 3, GaussianPolicyConfig(horizon=4, hidden_dims=[32, 32]))
    checkpoint = save_policy(policy, tmp_path / "bc", {"env": "hopper", "act_steps": 2})
    argv = ["finetune", f"policy.pretrained={checkpoint}", f"run_dir={tmp_path / 'ft'}", "policy=gaussian"]
    assert main([*argv, *tiny_finetune, "algo.iterations=2", "algo.critic_warmup_iterations=0"]) == 0
    with open(tmp_path / "ft" / "metrics.csv", newline="") as f:
        rows = [row for row in csv.DictReader(f) if row["iteration"] != "0"]
    assert [abs(float(r["ratio_first_minibatch"]) - 1) < 1e-5 for r in rows] == [True, True]
    final = json.loads((tmp_path / "ft" / "final" / "config.json").read_text())
    assert final["policy_type"] == "gaussian"
    loaded, _ = load_policy(tmp_path / "ft" / "final")
    assert not torch.equal(loaded.log_std, policy.log_std), "PPO trains the exploration std too"
