"""Rollout workers: local and Ray (2 actors on this machine) produce the same batch; a killed actor is restarted
and its rollout re-run without losing or duplicating samples."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import ray
import torch
from safetensors.torch import load_file

from policies.checkpoint import load_policy
from policies.critic import ValueCritic
from robo_rlft.algos.ppo import ROLLOUT_TENSORS
from robo_rlft.cli import compose_config, main
from robo_rlft.observations import ObservationAdapter
from robo_rlft.scale import LocalRolloutWorkers, RayRolloutWorkers

NUM_ENVS, STEPS = 4, 10


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray instance for the module (starting one takes seconds): room for 2 workers and a learner."""
    ray.init(num_cpus=3, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


def _setup(hopper_checkpoint, *overrides: str):
    base = ["env.act_steps=2", f"env.num_envs={NUM_ENVS}", "torch_threads=1"]
    if "algo=grpo" not in overrides:
        base.append(f"algo.steps_per_iteration={STEPS}")
    cfg = compose_config([*base, *overrides])
    policy, _ = load_policy(hopper_checkpoint)
    torch.manual_seed(0)
    critic = ValueCritic(ObservationAdapter.for_policy(policy).critic_dim(policy), cfg.policy.critic)
    return cfg, policy, critic


def _assert_same_rollout(a, b) -> None:
    torch.testing.assert_close(a.obs.flat(), b.obs.flat(), rtol=0, atol=0)
    for name in ROLLOUT_TENSORS:
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-6, atol=1e-6, msg=name)
    assert a.env_steps == b.env_steps
    assert sorted(a.finished_returns) == pytest.approx(sorted(b.finished_returns))


def test_ray_workers_collect_the_local_batch(hopper_checkpoint, ray_local):
    """2 Ray actors and 2 in-process workers: the same (T, N) batch, value for value."""
    cfg, policy, critic = _setup(hopper_checkpoint, "scale=ray", "scale.num_workers=2")
    local = LocalRolloutWorkers(cfg, policy, critic)
    remote = RayRolloutWorkers(cfg, policy, critic)
    try:
        expected = local.collect_ppo(policy, critic, iteration=3)
        got = remote.collect_ppo(policy, critic, iteration=3)
    finally:
        local.close()
        remote.close()
    assert got.rewards.shape == (STEPS, NUM_ENVS)
    assert got.chains.shape[:2] == (STEPS, NUM_ENVS)
    _assert_same_rollout(expected, got)


def test_worker_slices_get_the_single_process_seeds(hopper_checkpoint):
    """One worker or two: every env starts from the same state (only the sampling noise streams differ)."""
    cfg1, policy, critic = _setup(hopper_checkpoint)
    cfg2, _, _ = _setup(hopper_checkpoint, "scale.num_workers=2")
    one, two = LocalRolloutWorkers(cfg1, policy, critic), LocalRolloutWorkers(cfg2, policy, critic)
    try:
        a, b = one.collect_ppo(policy, critic, 0), two.collect_ppo(policy, critic, 0)
    finally:
        one.close()
        two.close()
    torch.testing.assert_close(a.obs[0], b.obs[0], rtol=0, atol=0)  # (N, obs_dim) at reset
    assert a.rewards.shape == b.rewards.shape == (STEPS, NUM_ENVS)
    assert not torch.equal(a.chains, b.chains)  # different noise streams, same distribution


def test_a_killed_worker_is_restarted_and_its_rollout_rerun(hopper_checkpoint, ray_local):
    cfg, policy, critic = _setup(hopper_checkpoint, "scale=ray", "scale.num_workers=2", "algo.steps_per_iteration=1500")
    remote = RayRolloutWorkers(cfg, policy, critic)
    local = LocalRolloutWorkers(cfg, policy, critic)
    try:
        expected = local.collect_ppo(policy, critic, iteration=1)
        victim = remote.pids()[1]
        killer = threading.Timer(1.0, lambda: os.kill(victim, signal.SIGKILL))
        killer.start()
        tic = time.perf_counter()
        got = remote.collect_ppo(policy, critic, iteration=1)
        elapsed = time.perf_counter() - tic
        killer.join()
        assert victim not in remote.pids(), "the actor was not restarted in a new process"
    finally:
        local.close()
        remote.close()
    assert elapsed > 1.0, f"the rollout ended ({elapsed:.2f} s) before the kill: make it longer"
    assert got.rewards.shape == (1500, NUM_ENVS)
    _assert_same_rollout(expected, got)  # nothing lost, nothing duplicated


def test_grpo_groups_stay_on_one_worker(hopper_checkpoint, ray_local):
    grpo = ["algo=grpo", "algo.group_size=2", "algo.max_chunk_steps=8"]
    cfg, policy, _ = _setup(hopper_checkpoint, *grpo, "scale=ray", "scale.num_workers=2")
    local, remote = LocalRolloutWorkers(cfg, policy, None), RayRolloutWorkers(cfg, policy, None)
    try:
        expected, got = local.collect_grpo(policy, 0), remote.collect_grpo(policy, 0)
    finally:
        local.close()
        remote.close()
    assert got.returns.shape == (NUM_ENVS,)
    torch.testing.assert_close(got.chains, expected.chains)
    torch.testing.assert_close(got.valid, expected.valid)
    # Members of a group start from one state.
    first = got.obs[0]
    torch.testing.assert_close(first[0], first[1])
    torch.testing.assert_close(first[2], first[3])


def test_finetune_with_ray_equals_local(tmp_path, hopper_checkpoint, tiny_finetune, ray_local):
    """Through the CLI: the same first update (weights) with 2 Ray workers as with 2 in-process workers, whether
    the learner is this process or a Ray actor."""
    runs = {"local": ["scale=local"], "ray": ["scale=ray"], "actor": ["scale=ray", "scale.learner=actor"]}
    for name, scale in runs.items():
        argv = ["finetune", f"policy.pretrained={hopper_checkpoint}", *tiny_finetune, "env.num_envs=4"]
        argv += ["algo.iterations=1", *scale, "scale.num_workers=2", f"run_dir={tmp_path / name}"]
        assert main(argv) == 0
    a = load_file(tmp_path / "local" / "final" / "model.safetensors")
    for name in ("ray", "actor"):
        b = load_file(tmp_path / name / "final" / "model.safetensors")
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-6, msg=f"{name}: {key}")
    # The actor's learner wrote the run (metrics, checkpoint, log) from another process.
    log = (tmp_path / "actor" / "finetune.log").read_text()
    (pid,) = [int(line.split("(pid ")[1].split()[0]) for line in log.splitlines() if "learner runs in a Ray" in line]
    assert pid != os.getpid()
    assert (tmp_path / "actor" / "checkpoints" / "latest").is_file()


def test_scale_options_are_validated():
    with pytest.raises(ValueError, match=r"does not divide among scale\.num_workers=3"):
        compose_config(["scale.num_workers=3", "env.num_envs=4"])
    with pytest.raises(ValueError, match=r"not a multiple of algo\.group_size=4"):
        compose_config(["algo=grpo", "algo.group_size=4", "env.num_envs=8", "scale.num_workers=4"])
    assert compose_config(["scale=ray", "scale.envs_per_worker=3"]).env.num_envs == 6
    with pytest.raises(ValueError, match=r"scale\.backend='spark' is not allowed"):
        compose_config(["scale.backend=spark"])
    with pytest.raises(ValueError, match=r"scale\.learner=actor runs the learner in a Ray actor: it needs scale=ray"):
        compose_config(["scale.learner=actor"])
    with pytest.raises(ValueError, match=r"scale\.learner_gpus=1"):
        compose_config(["scale=ray", "scale.learner=actor", "device=cuda"])
