"""PPO fine-tuning: the first-minibatch ratio, exact resume, interrupts and non-finite values."""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import logging
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import robo_rlft.algos.ppo as ppo
from policies.checkpoint import load_policy
from policies.critic import CriticConfig, ValueCritic
from robo_rlft.checkpointing import latest_checkpoint, load_training_checkpoint, save_training_checkpoint
from robo_rlft.cli import compose_config, main

# Columns that hold wall-clock times: they differ between any two runs.
TIME_COLUMNS = ("time_sim", "time_inference", "time_rollout", "time_update")


def _all_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _rows(run_dir: Path) -> list[dict[str, str]]:
    """The training iterations' rows (row 0 is the evaluation of the pretrained policy)."""
    return [row for row in _all_rows(run_dir) if row["iteration"] != "0"]


def _rows_without_times(run_dir: Path) -> list[dict[str, str]]:
    return [{k: v for k, v in row.items() if k not in TIME_COLUMNS} for row in _all_rows(run_dir)]


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), f"{key}: max diff {(wa[key] - wb[key]).abs().max().item()}"


def _finetune(run_dir: Path, checkpoint: Path, tiny: list[str], *extra: str) -> int:
    return main(["finetune", f"run_dir={run_dir}", f"policy.pretrained={checkpoint}", *tiny, *extra])


# ---- the importance ratio ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reduction", "scheme"),
    [
        ("sum", "reinflow"),
        ("mean", "reinflow"),
        ("mean", "flow_noise"),
        ("sum", "flow_sde"),
        ("mean", "flow_sde-one"),
        ("sum", "reinflow-transition"),
        ("mean", "flow_sde-transition"),
    ],
)
def test_first_minibatch_ratio_is_one_every_iteration(tmp_path, hopper_checkpoint, tiny_finetune, reduction, scheme):
    run_dir = tmp_path / "run"
    extra = ["algo.iterations=3", "algo.critic_warmup_iterations=1", f"algo.log_prob_reduction={reduction}"]
    name, _, variant = scheme.partition("-")
    extra += [f"policy.noise.scheme={name}", "policy.noise.hidden_dims=[16]"]
    extra += ["policy.noise.sde_steps=one"] if variant == "one" else []
    if variant == "transition":  # DPPO's per-transition ratio with its clip schedule and denoising discount
        extra += ["algo.ratio_unit=transition", "algo.clip_coef_first=0.001", "algo.denoising_discount=0.9"]
    extra += ["algo.target_kl=null", "algo.actor_lr=1e-3"]
    assert _finetune(run_dir, hopper_checkpoint, tiny_finetune, *extra) == 0
    first, *rows = _all_rows(run_dir)
    assert (first["iteration"], first["env_steps"]) == ("0", "0") and float(first["eval_return_mean"]) > 0
    assert len(rows) == 3
    for row in rows:
        assert abs(float(row["ratio_first_minibatch"]) - 1.0) < 1e-5, row
    # The policy really moved (so the ratio of 1 is not trivial): later minibatches saw a KL, and the
    # final weights differ from the pretrained ones.
    assert max(float(r["approx_kl"]) for r in rows[1:]) > 0
    initial, final = load_file(hopper_checkpoint / "model.safetensors"), load_file(run_dir / "final/model.safetensors")
    assert any(not torch.equal(initial[k], final[k]) for k in initial)


# ---- resume -----------------------------------------------------------------------------------------------

# Evaluate every iteration so that a run cut after iteration 1 and an uninterrupted one evaluate at the
# same points (see test_resume_continues_exactly_with_default_eval_cadence for why that matters today).
RESUME = ["algo.checkpoint_every=1", "algo.critic_warmup_iterations=0", "algo.eval_every=1"]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, hopper_checkpoint, tiny_finetune) -> Path:
    """Two uninterrupted iterations, checkpointing and evaluating after each."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    assert _finetune(run_dir, hopper_checkpoint, tiny_finetune, *RESUME, "algo.iterations=2") == 0
    return run_dir


def test_resume_continues_exactly(tmp_path, hopper_checkpoint, tiny_finetune, reference_run):
    run_dir = tmp_path / "run"
    assert _finetune(run_dir, hopper_checkpoint, tiny_finetune, *RESUME, "algo.iterations=1") == 0
    assert main(["finetune", f"resume={run_dir}", "algo.iterations=2"]) == 0
    _assert_same_weights(reference_run / "final", run_dir / "final")
    assert _rows_without_times(run_dir) == _rows_without_times(reference_run)
    assert "iterations: 2" in (run_dir / "config.yaml").read_text()


def test_interrupted_run_keeps_its_last_checkpoint_and_resumes(
    tmp_path, hopper_checkpoint, tiny_finetune, reference_run, monkeypatch, capsys
):
    run_dir = tmp_path / "run"
    calls = []
    real_gae = ppo.compute_gae

    def gae_interrupted_in_iteration_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_gae(*args, **kwargs)

    monkeypatch.setattr(ppo, "compute_gae", gae_interrupted_in_iteration_2)
    assert _finetune(run_dir, hopper_checkpoint, tiny_finetune, *RESUME, "algo.iterations=2") == 130
    assert "interrupted" in capsys.readouterr().err
    monkeypatch.undo()

    root = run_dir / "checkpoints"
    assert (root / "latest").read_text().strip() == "iter_000001"
    assert sorted(p.name for p in root.iterdir()) == ["iter_000001", "latest"], "no half-written checkpoint"
    assert not (run_dir / "final").exists()
    critic = ValueCritic(11, CriticConfig(hidden_dims=[32, 32]))
    loaded = load_training_checkpoint(latest_checkpoint(run_dir))
    critic.load_state_dict(loaded["critic_state"])
    assert loaded["state"]["iteration"] == 1 and loaded["state"]["env_steps"] > 0
    assert all(torch.isfinite(p).all() for p in loaded["policy"].state_dict().values())
    assert {"actor_optimizer", "critic_optimizer"} <= loaded["optim"].keys()
    assert [r["iteration"] for r in _rows(run_dir)] == ["1"]

    assert main(["finetune", f"resume={run_dir}"]) == 0
    _assert_same_weights(reference_run / "final", run_dir / "final")
    assert _rows_without_times(run_dir) == _rows_without_times(reference_run)


def test_resume_continues_exactly_with_default_eval_cadence(tmp_path, hopper_checkpoint, tiny_finetune):
    settings = [*tiny_finetune, "algo.checkpoint_every=1", "algo.critic_warmup_iterations=0", "algo.eval_every=10"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert _finetune(straight, hopper_checkpoint, settings, "algo.iterations=2") == 0
    assert _finetune(resumed, hopper_checkpoint, settings, "algo.iterations=1") == 0
    assert main(["finetune", f"resume={resumed}", "algo.iterations=2"]) == 0
    _assert_same_weights(straight / "final", resumed / "final")


def test_resuming_a_finished_run_keeps_its_results(tmp_path, hopper_checkpoint, tiny_finetune, capsys):
    run_dir = tmp_path / "run"
    assert _finetune(run_dir, hopper_checkpoint, tiny_finetune, "algo.iterations=1") == 0
    before = json.loads((run_dir / "eval.json").read_text())
    rc = main(["finetune", f"resume={run_dir}"])
    err = capsys.readouterr().err
    assert json.loads((run_dir / "eval.json").read_text()) == before
    assert rc == 0 or "algo.iterations" in err, err


def test_finetune_into_an_existing_run_dir_is_refused_cleanly(tmp_path, hopper_checkpoint, tiny_finetune, capsys):
    run_dir = tmp_path / "run"
    assert _finetune(run_dir, hopper_checkpoint, tiny_finetune, "algo.iterations=1") == 0
    config_before = (run_dir / "config.yaml").read_text()
    try:
        rc = _finetune(run_dir, hopper_checkpoint, tiny_finetune, "algo.iterations=5", "algo.clip_coef=0.2")
    finally:
        config_after = (run_dir / "config.yaml").read_text()
    assert config_after == config_before
    assert rc == 2 and str(run_dir) in capsys.readouterr().err


def test_finetune_uses_the_checkpoint_horizon(tmp_path, flow_policy_factory, tiny_finetune, capsys):
    from policies.checkpoint import save_policy

    policy = flow_policy_factory(horizon=2, denoising_steps=2)
    checkpoint = save_policy(policy, tmp_path / "h2", {"env": "hopper", "act_steps": 2}, include_noise=False)
    rc = _finetune(tmp_path / "run", checkpoint, tiny_finetune, "algo.iterations=1")
    err = capsys.readouterr().err
    assert rc == 0 or ("policy.horizon" in err and "=2" in err), err


# ---- non-finite values ------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`")
def test_nan_loss_skips_the_update_and_never_writes_nan(
    tmp_path, hopper_checkpoint, tiny_finetune, monkeypatch, caplog
):
    run_dir = tmp_path / "run"
    overrides = [*tiny_finetune, "algo.iterations=1", "algo.critic_warmup_iterations=0", f"run_dir={run_dir}"]
    cfg = compose_config(overrides)
    policy, _ = load_policy(hopper_checkpoint)
    initial = copy.deepcopy(policy.state_dict())
    real_losses = ppo.ppo_losses

    def nan_policy_loss(*args, **kwargs):
        losses = real_losses(*args, **kwargs)
        return dataclasses.replace(losses, policy=losses.policy * math.nan)

    monkeypatch.setattr(ppo, "ppo_losses", nan_policy_loss)
    with caplog.at_level(logging.WARNING, logger="robo_rlft.algos.ppo"):
        ppo.train_ppo(cfg, run_dir, policy)

    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "Non-finite loss" in r.getMessage()]
    (row,) = _rows(run_dir)
    # 20 samples, minibatches of 10, 2 epochs: every one of the 4 updates is skipped.
    assert int(float(row["skipped_updates"])) == 4 == len(warnings)
    assert abs(float(row["ratio_first_minibatch"]) - 1.0) < 1e-5
    for key, value in policy.state_dict().items():
        assert torch.equal(value, initial[key]), key
    for path in (run_dir / "final", latest_checkpoint(run_dir) / "policy"):
        saved, _ = load_policy(path)
        for key, value in saved.state_dict().items():
            assert torch.isfinite(value).all(), (path, key)
            assert torch.equal(value, initial[key]), (path, key)
    critic = load_file(latest_checkpoint(run_dir) / "critic.safetensors")
    assert all(torch.isfinite(v).all() for v in critic.values())


def _save(run_dir: Path, iteration: int, policy: torch.nn.Module, critic: torch.nn.Module) -> Path:
    return save_training_checkpoint(run_dir, iteration, policy, critic, {}, {"env_steps": 10 * iteration}, {})


@pytest.mark.parametrize("broken", ["policy", "critic"])
def test_checkpoint_refuses_nan_parameters_and_keeps_the_previous_one(tmp_path, flow_policy_factory, broken):
    policy = flow_policy_factory()
    critic = ValueCritic(11, CriticConfig(hidden_dims=[8]))
    _save(tmp_path, 1, policy, critic)
    good = copy.deepcopy(policy.state_dict())
    with torch.no_grad():
        if broken == "policy":
            policy.velocity_net[0].weight[0, 0] = math.nan
        else:
            critic.net[0].bias[1] = math.inf
    with pytest.raises(FloatingPointError, match="net.0.weight" if broken == "policy" else "net.0.bias"):
        _save(tmp_path, 2, policy, critic)

    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["iter_000001", "latest"]
    assert latest_checkpoint(tmp_path) == root / "iter_000001"
    fresh_critic = ValueCritic(11, CriticConfig(hidden_dims=[8]))
    loaded = load_training_checkpoint(latest_checkpoint(tmp_path))
    fresh_critic.load_state_dict(loaded["critic_state"])
    assert loaded["state"] == {"iteration": 1, "env_steps": 10}
    for key, value in loaded["policy"].state_dict().items():
        assert torch.equal(value, good[key]), key
    assert all(torch.isfinite(p).all() for p in fresh_critic.parameters())


def test_checkpoints_keep_only_the_newest_two(tmp_path, flow_policy_factory):
    policy, critic = flow_policy_factory(), ValueCritic(11, CriticConfig(hidden_dims=[8]))
    for iteration in range(1, 5):
        _save(tmp_path, iteration, policy, critic)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["iter_000003", "iter_000004", "latest"]
    assert json.loads((latest_checkpoint(tmp_path) / "state.json").read_text())["iteration"] == 4


# ---- BC regulariser toward the frozen pretrained policy ---------------------------------------------------


def test_bc_regulariser_is_zero_at_the_base_and_pulls_back_toward_it(flow_policy_factory):
    base = flow_policy_factory(random_noise_head=True)
    policy = copy.deepcopy(base)
    obs = torch.randn(32, 11, generator=torch.Generator().manual_seed(0))
    assert ppo.bc_regulariser(policy, base, obs).item() == 0.0
    with torch.no_grad():
        policy.velocity_net[-1].bias.add_(0.3)  # fine-tuning drifted away from the base
    drift = ppo.bc_regulariser(policy, base, obs)
    assert drift.item() > 1e-3
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.05)
    for _ in range(20):
        optimizer.zero_grad()
        ppo.bc_regulariser(policy, base, obs).backward()
        optimizer.step()
    assert ppo.bc_regulariser(policy, base, obs).item() < 0.5 * drift.item()
    assert all(p.grad is None for p in base.parameters()), "the base stays frozen"


def test_finetune_with_bc_regulariser_keeps_its_base_and_resumes(tmp_path, hopper_checkpoint, tiny_finetune):
    settings = [*tiny_finetune, "algo.bc_coef=1.0", "algo.critic_warmup_iterations=0", "algo.checkpoint_every=1"]
    run_dir = tmp_path / "run"
    assert _finetune(run_dir, hopper_checkpoint, settings, "algo.iterations=1") == 0
    first = _rows(run_dir)[0]
    assert float(first["bc_loss"]) >= 0 and abs(float(first["ratio_first_minibatch"]) - 1) < 1e-5
    base_before = load_file(run_dir / "base_policy" / "model.safetensors")
    assert main(["finetune", f"resume={run_dir}", "algo.iterations=2"]) == 0
    base_after = load_file(run_dir / "base_policy" / "model.safetensors")
    assert all(torch.equal(base_before[k], base_after[k]) for k in base_before), "resume keeps the original base"
    initial = load_file(hopper_checkpoint / "model.safetensors")
    assert all(torch.equal(initial[k], base_after[k]) for k in initial), "the base is the pretrained policy"
