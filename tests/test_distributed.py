"""The data-parallel learner under torchrun, 2 CPU processes (gloo): the same rollouts as the single-process run
with the same rollout workers, identical parameters on every rank (checked by the run after every update), and
resume with a different number of processes."""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from robo_rlft.cli import main

TINY = [
    "env.num_envs=4",
    "env.act_steps=2",
    "algo.steps_per_iteration=60",
    "algo.minibatch_size=20",
    "algo.update_epochs=2",
    "algo.eval_episodes=2",
    "scale.num_workers=2",
    "policy.critic.hidden_dims=[32,32]",
    "progress=false",
    "torch_threads=1",
]
ROLLOUT_COLUMNS = ("env_steps", "return_mean", "episodes", "noise_std_mean")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(*args: str, processes: int = 2) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}"]
    command += [f"--master_port={_free_port()}", "-m", "robo_rlft.cli", "finetune", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)


def _rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [row for row in csv.DictReader(f) if row["iteration"] != "0"]


@pytest.mark.slow
def test_two_ranks_collect_the_single_process_rollouts_and_stay_identical(tmp_path, hopper_checkpoint):
    # A tiny random policy: its hopper falls within the rollout, so episodes finish and returns are compared.
    run = [*TINY, f"policy.pretrained={hopper_checkpoint}", "algo.iterations=2"]
    ddp = _torchrun(*run, f"run_dir={tmp_path / 'ddp'}")
    # The run checks after every update that the ranks' parameters are identical (it raises otherwise).
    assert ddp.returncode == 0, ddp.stdout[-3000:] + ddp.stderr[-3000:]
    assert main(["finetune", *run, f"run_dir={tmp_path / 'local'}"]) == 0
    first_ddp, first_local = _rows(tmp_path / "ddp")[0], _rows(tmp_path / "local")[0]
    # Iteration 1's rollouts (same initial policy, the same workers' seeds and noise streams) are the same data.
    assert {k: first_ddp[k] for k in ROLLOUT_COLUMNS} == {k: first_local[k] for k in ROLLOUT_COLUMNS}
    assert int(float(first_ddp["episodes"])) > 0
    assert abs(float(first_ddp["ratio_first_minibatch"]) - 1.0) < 1e-5
    # Only rank 0 wrote the run: one metrics row per iteration, one final policy.
    assert [r["iteration"] for r in _rows(tmp_path / "ddp")] == ["1", "2"]
    assert (tmp_path / "ddp" / "final" / "model.safetensors").is_file()


@pytest.mark.slow
def test_a_torchrun_run_resumes_in_one_process(tmp_path):
    run_dir = tmp_path / "run"
    first = _torchrun(*TINY, "algo.iterations=1", "algo.checkpoint_every=1", f"run_dir={run_dir}")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert main(["finetune", f"resume={run_dir}", "algo.iterations=2"]) == 0
    assert [r["iteration"] for r in _rows(run_dir)] == ["1", "2"]


def test_torchrun_refuses_a_worker_count_it_cannot_share(tmp_path):
    result = _torchrun(*TINY, "scale.num_workers=1", "algo.iterations=1", f"run_dir={tmp_path / 'bad'}")
    assert result.returncode != 0
    assert "scale.num_workers a multiple of 2" in result.stderr + result.stdout
