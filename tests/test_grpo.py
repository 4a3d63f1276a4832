"""GRPO fine-tuning: shared initial states, group advantages, dynamic sampling, the asymmetric clip,
the first-minibatch ratio and exact resume."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import robo_rlft.algos.grpo as grpo
import robo_rlft.scale as scale
from envs import make_vector_env
from robo_rlft.checkpointing import latest_checkpoint, load_training_checkpoint
from robo_rlft.cli import main
from robo_rlft.config import GRPOConfig

# `robo-rlft finetune algo=grpo` on hopper in a couple of seconds: 2 groups of 2 episodes of at most 10 chunks.
TINY_GRPO = [
    "algo=grpo",
    "env.num_envs=4",
    "env.act_steps=2",
    "algo.group_size=2",
    "algo.max_chunk_steps=10",
    "algo.minibatch_size=10",
    "algo.update_epochs=2",
    "algo.eval_episodes=2",
    "progress=false",
]


def _finetune(run_dir: Path, checkpoint: Path, *extra: str) -> int:
    return main(["finetune", f"run_dir={run_dir}", f"policy.pretrained={checkpoint}", *TINY_GRPO, *extra])


def _all_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _rows(run_dir: Path) -> list[dict[str, str]]:
    """The training iterations' rows (row 0 is the evaluation of the pretrained policy)."""
    return [row for row in _all_rows(run_dir) if row["iteration"] != "0"]


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), f"{key}: max diff {(wa[key] - wb[key]).abs().max().item()}"


# ---- rollout ----------------------------------------------------------------------------------------------


def test_group_members_share_their_initial_state(flow_policy_factory):
    policy = flow_policy_factory(horizon=4, denoising_steps=2)
    algo = GRPOConfig(group_size=3, max_chunk_steps=5)
    envs = make_vector_env("hopper", 6, policy.horizon, act_steps=2)
    try:
        torch.manual_seed(0)
        rollout = grpo.collect_group_rollouts(policy, envs, algo, grpo.group_seeds(0, 0, 2))
    finally:
        envs.close()
    first = rollout.obs[0]  # (N, obs_dim)
    for g in range(2):
        members = first[3 * g : 3 * g + 3]
        assert torch.equal(members, members[0].expand_as(members)), f"group {g} members start differently"
    assert not torch.allclose(first[0], first[3]), "two groups start from the same state"
    # Members then diverge (the policy's noise differs), so the group carries a signal.
    assert not torch.equal(rollout.obs[1, 0], rollout.obs[1, 1])
    T, N = rollout.valid.shape
    assert 1 <= T <= 5 and N == 6
    assert rollout.chains.shape == (T, N, 3, 4, 3) and rollout.log_probs.shape == (T, N)
    assert not rollout.log_probs.requires_grad
    # One episode per env: its valid steps are a prefix, and its length is the env steps of that prefix.
    assert rollout.valid[0].all()
    for i in range(N):
        steps = int(rollout.valid[:, i].sum())
        assert rollout.valid[:steps, i].all() and not rollout.valid[steps:, i].any()
        assert steps <= rollout.lengths[i] <= 2 * steps
    assert rollout.success is None  # hopper defines no success


def test_different_iterations_and_groups_get_different_seeds():
    seeds = [s for it in range(3) for s in grpo.group_seeds(7, it, 4)]
    assert len(set(seeds)) == len(seeds)
    assert grpo.group_seeds(7, 2, 4) == grpo.group_seeds(7, 2, 4)


# ---- advantages and dynamic sampling ----------------------------------------------------------------------


def test_group_advantages_are_normalised_within_each_group():
    returns = torch.tensor([1.0, 5.0, 2.0, 100.0, 300.0, 200.0, -3.0, -1.0, -2.0], dtype=torch.float64)
    adv = grpo.group_advantages(returns, 3).view(3, 3)
    torch.testing.assert_close(adv.sum(1), torch.zeros(3, dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(adv.std(1, correction=0), torch.ones(3, dtype=torch.float64), atol=1e-5, rtol=0)
    # Groups 1 and 2 differ only by scale and offset: same advantages (population std: sqrt(2/3) * spread).
    expected = torch.tensor([-1.0, 1.0, 0.0], dtype=torch.float64) * math.sqrt(1.5)
    torch.testing.assert_close(adv[1], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(adv[2], expected, atol=1e-5, rtol=0)
    # A group of equal returns gets zero advantages, not 0/0.
    assert torch.equal(grpo.group_advantages(torch.full((4,), 3.0), 2), torch.zeros(4))


def test_groups_with_signal():
    returns = torch.tensor([1.0, 1.0, 1.0, 2.0, 5.0, 5.0], dtype=torch.float64)
    assert grpo.groups_with_signal(returns, None, 2).tolist() == [False, True, False]
    # With success, all-succeed and all-fail groups are dropped, whatever their returns.
    success = torch.tensor([True, False, True, True, False, False])
    assert grpo.groups_with_signal(returns, success, 2).tolist() == [True, False, False]


def _with_equal_returns(monkeypatch, groups: list[int]) -> None:
    """Make the rollout's returns of ``groups`` all equal (as if every member scored alike)."""
    real = grpo.collect_group_rollouts

    def rollout(policy, envs, algo, seeds, device="cpu"):
        result = real(policy, envs, algo, seeds, device)
        for g in groups:
            result.returns[g * algo.group_size : (g + 1) * algo.group_size] = 42.0
        return result

    monkeypatch.setattr(scale, "collect_group_rollouts", rollout)  # the workers run the rollout


@pytest.mark.parametrize(("dynamic", "equal_groups"), [(True, [0]), (False, [0]), (True, [0, 1])])
def test_dynamic_sampling_drops_groups_without_signal(tmp_path, hopper_checkpoint, monkeypatch, dynamic, equal_groups):
    _with_equal_returns(monkeypatch, equal_groups)
    run_dir = tmp_path / "run"
    extra = ["algo.iterations=1", f"algo.dynamic_sampling={str(dynamic).lower()}", "algo.actor_lr=1e-3"]
    assert _finetune(run_dir, hopper_checkpoint, *extra) == 0
    (row,) = _rows(run_dir)
    assert int(float(row["groups"])) == 2
    assert int(float(row["groups_dropped"])) == (len(equal_groups) if dynamic else 0)
    initial, final = load_file(hopper_checkpoint / "model.safetensors"), load_file(run_dir / "final/model.safetensors")
    moved = any(not torch.equal(initial[k], final[k]) for k in initial)
    if len(equal_groups) == 2 and dynamic:  # nothing left to learn from: the update is skipped
        assert int(float(row["samples"])) == 0 and int(float(row["epochs"])) == 0 and not moved
        assert math.isnan(float(row["ratio_first_minibatch"]))
    else:
        assert int(float(row["samples"])) > 0 and moved
        assert abs(float(row["ratio_first_minibatch"]) - 1.0) < 1e-5


# ---- the loss ---------------------------------------------------------------------------------------------


def test_asymmetric_clip_zeroes_the_gradient_only_on_the_clipped_side():
    clip_low, clip_high = 0.01, 0.014
    # (ratio, advantage, gradient expected non-zero)
    cases = [
        (1.0, 1.0, True),
        (1.0, -1.0, True),
        (1.012, 1.0, True),  # inside [0.99, 1.014]: a symmetric clip of 0.01 would have cut it
        (1.02, 1.0, False),  # above 1 + clip_high with A > 0: clipped
        (1.02, -1.0, True),  # above, but A < 0: the unclipped term is the pessimistic one
        (0.988, -1.0, False),  # below 1 - clip_low with A < 0: clipped
        (0.988, 1.0, True),  # below, but A > 0: unclipped
        (0.995, -1.0, True),
    ]
    ratio = torch.tensor([c[0] for c in cases], requires_grad=True)
    advantages = torch.tensor([c[1] for c in cases])
    grpo.clipped_surrogate(ratio, advantages, clip_low, clip_high).sum().backward()
    for (r, a, live), grad in zip(cases, ratio.grad.tolist(), strict=True):
        if live:
            assert grad == pytest.approx(-a), (r, a)
        else:
            assert grad == 0.0, (r, a)


def test_loss_ratio_is_one_on_fresh_samples_and_old_log_probs_must_be_detached(flow_policy_factory):
    policy = flow_policy_factory(random_noise_head=True)
    algo = GRPOConfig()
    torch.manual_seed(0)
    obs = torch.randn(6, policy.obs_dim)
    with torch.no_grad():
        sample = policy.sample(obs)
    old = grpo.reduce_log_prob(sample.log_prob, sample.stochastic, algo.log_prob_reduction)
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0])
    weights = torch.tensor([1.0, 1.0, 0.5, 0.5, 1.5, 1.5])
    losses = grpo.grpo_losses(policy, obs, sample.chain, sample.stochastic, old, advantages, weights, algo)
    assert losses.ratio_mean == pytest.approx(1.0, abs=1e-5) and losses.clip_fraction == 0.0
    assert losses.policy.item() == pytest.approx(-(weights * advantages).mean().item(), abs=1e-5)
    losses.policy.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.parameters())
    with pytest.raises(RuntimeError, match="detached"):
        grpo.grpo_losses(policy, obs, sample.chain, sample.stochastic, old.requires_grad_(), advantages, weights, algo)


def test_episode_weights_make_every_episode_count_the_same():
    # Chunk steps kept per episode (columns): a success of 1 step, a failure that ran 3 steps, a dropped episode.
    used = torch.tensor([[True, True, False], [False, True, False], [False, True, False]])  # (T=3, N=3)
    advantages = torch.tensor([1.0, -1.0, 0.0])  # one group of two: the success's and the failure's
    step_advantages = advantages[None].expand_as(used)[used]  # (B=4,) in x[used] order: ep 0, ep 1, ep 1, ep 1
    mean_length = 4 / 2
    weights = grpo.step_weights(used, "episode", mean_length)
    torch.testing.assert_close(weights, torch.tensor([2.0, 2 / 3, 2 / 3, 2 / 3]))
    assert weights.mean().item() == pytest.approx(1.0)
    # At ratio 1 the loss is -mean(w * A): balanced per episode, dominated by the long failure per step.
    assert (weights * step_advantages).sum().item() == pytest.approx(0.0, abs=1e-6)
    steps = grpo.step_weights(used, "step", mean_length)
    assert torch.equal(steps, torch.ones(4)) and (steps * step_advantages).sum().item() == -2.0


def test_unknown_loss_aggregation_is_refused():
    with pytest.raises(ValueError, match=r"algo\.loss_aggregation.*'token'.*'episode'.*'step'"):
        GRPOConfig(loss_aggregation="token")


# ---- training runs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["reinflow", "flow_sde"])
def test_first_minibatch_ratio_is_one_every_iteration(tmp_path, hopper_checkpoint, scheme):
    run_dir = tmp_path / "run"
    extra = ["algo.iterations=3", f"policy.noise.scheme={scheme}", "policy.noise.hidden_dims=[16]"]
    extra += ["algo.target_kl=null", "algo.actor_lr=1e-3"]
    assert _finetune(run_dir, hopper_checkpoint, *extra) == 0
    first, *rows = _all_rows(run_dir)
    assert (first["iteration"], first["env_steps"]) == ("0", "0") and float(first["eval_return_mean"]) > 0
    assert len(rows) == 3
    for row in rows:
        assert abs(float(row["ratio_first_minibatch"]) - 1.0) < 1e-5, row
        assert int(float(row["groups"])) == 2 and int(float(row["episodes"])) == 4 and int(float(row["samples"])) > 0
        assert float(row["noise_std_mean"]) > 0 and int(float(row["skipped_updates"])) == 0
    assert [int(float(r["env_steps"])) for r in rows] == sorted({int(float(r["env_steps"])) for r in rows})
    # The policy really moved (so the ratio of 1 is not trivial).
    assert max(float(r["approx_kl"]) for r in rows[1:]) > 0
    initial, final = load_file(hopper_checkpoint / "model.safetensors"), load_file(run_dir / "final/model.safetensors")
    assert any(not torch.equal(initial[k], final[k]) for k in initial)
    assert (run_dir / "best" / "model.safetensors").is_file() and (run_dir / "learning_curve.png").is_file()


RESUME = ["algo.checkpoint_every=1", "algo.eval_every=1"]


def test_resume_continues_exactly(tmp_path, hopper_checkpoint):
    reference = tmp_path / "reference"
    assert _finetune(reference, hopper_checkpoint, *RESUME, "algo.iterations=2") == 0
    run_dir = tmp_path / "run"
    assert _finetune(run_dir, hopper_checkpoint, *RESUME, "algo.iterations=1") == 0
    loaded = load_training_checkpoint(latest_checkpoint(run_dir))
    assert loaded["critic_state"] is None and not (latest_checkpoint(run_dir) / "critic.safetensors").exists()
    assert set(loaded["optim"]) == {"actor_optimizer", "torch_rng"}
    assert main(["finetune", f"resume={run_dir}", "algo.iterations=2"]) == 0
    _assert_same_weights(reference / "final", run_dir / "final")
    timeless = [{k: v for k, v in r.items() if not k.startswith("time_")} for r in _all_rows(run_dir)]
    assert timeless == [{k: v for k, v in r.items() if not k.startswith("time_")} for r in _all_rows(reference)]
    assert np.isclose(float(_rows(run_dir)[-1]["ratio_first_minibatch"]), 1.0, atol=1e-5)
