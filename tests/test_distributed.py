"""The data-parallel learner under torchrun, 2 CPU processes (gloo): the same rollouts as the single-process run
with the same rollout workers (PPO and GRPO), identical parameters on every rank (checked by the run after every
update), an FSDP-sharded learner that makes the same update as the replicated one, and resume with a different
number of processes."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from distributed_launch import torchrun_finetune
from safetensors.torch import load_file

from robo_rlft.cli import main
from robo_rlft.distributed import MinibatchPlan

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
# GRPO on hopper: 2 groups of 2 episodes of at most 10 chunks, one group per rollout worker.
TINY_GRPO = [
    "algo=grpo",
    "env.num_envs=4",
    "env.act_steps=2",
    "algo.group_size=2",
    "algo.max_chunk_steps=10",
    "algo.minibatch_size=10",
    "algo.update_epochs=2",
    "algo.eval_episodes=2",
    "scale.num_workers=2",
    "progress=false",
    "torch_threads=1",
]
GRPO_ROLLOUT_COLUMNS = ("env_steps", "return_mean", "ep_len_mean", "episodes", "groups_dropped", "samples")


def _rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [row for row in csv.DictReader(f) if row["iteration"] != "0"]


@pytest.mark.slow
def test_two_ranks_collect_the_single_process_rollouts_and_stay_identical(tmp_path, hopper_checkpoint):
    # A tiny random policy: its hopper falls within the rollout, so episodes finish and returns are compared.
    run = [*TINY, f"policy.pretrained={hopper_checkpoint}", "algo.iterations=2"]
    ddp = torchrun_finetune(*run, f"run_dir={tmp_path / 'ddp'}")
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
    first = torchrun_finetune(*TINY, "algo.iterations=1", "algo.checkpoint_every=1", f"run_dir={run_dir}")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert main(["finetune", f"resume={run_dir}", "algo.iterations=2"]) == 0
    assert [r["iteration"] for r in _rows(run_dir)] == ["1", "2"]


def test_torchrun_refuses_a_worker_count_it_cannot_share(tmp_path):
    result = torchrun_finetune(*TINY, "scale.num_workers=1", "algo.iterations=1", f"run_dir={tmp_path / 'bad'}")
    assert result.returncode != 0
    assert "scale.num_workers a multiple of 2" in result.stderr + result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True])
def test_two_ranks_run_grpo_on_the_single_process_rollouts(tmp_path, hopper_checkpoint, fsdp):
    run = [*TINY_GRPO, f"policy.pretrained={hopper_checkpoint}", "algo.iterations=2"]
    ddp = torchrun_finetune(*run, f"scale.fsdp={fsdp}", f"run_dir={tmp_path / 'ddp'}")
    assert ddp.returncode == 0, ddp.stdout[-3000:] + ddp.stderr[-3000:]
    assert main(["finetune", *run, f"run_dir={tmp_path / 'local'}"]) == 0
    first_ddp, first_local = _rows(tmp_path / "ddp")[0], _rows(tmp_path / "local")[0]
    # Each rank ran one worker's group; the gathered statistics are the single-process run's.
    assert {k: first_ddp[k] for k in GRPO_ROLLOUT_COLUMNS} == {k: first_local[k] for k in GRPO_ROLLOUT_COLUMNS}
    assert abs(float(first_ddp["ratio_first_minibatch"]) - 1.0) < 1e-5
    assert [r["iteration"] for r in _rows(tmp_path / "ddp")] == ["1", "2"]
    assert (tmp_path / "ddp" / "final" / "model.safetensors").is_file()


@pytest.mark.slow
def test_the_fsdp_learner_makes_the_replicated_learners_update_and_resumes(tmp_path, hopper_checkpoint):
    run = [*TINY, f"policy.pretrained={hopper_checkpoint}", "algo.critic_warmup_iterations=0"]
    run += ["algo.iterations=1", "algo.checkpoint_every=1"]
    replicated = torchrun_finetune(*run, f"run_dir={tmp_path / 'ddp'}")
    assert replicated.returncode == 0, replicated.stdout[-3000:] + replicated.stderr[-3000:]
    sharded = torchrun_finetune(*run, "scale.fsdp=true", f"run_dir={tmp_path / 'fsdp'}")
    assert sharded.returncode == 0, sharded.stdout[-3000:] + sharded.stderr[-3000:]
    # Same data, same minibatches: FSDP's reduce-scatter differs from the all-reduce only in rounding.
    expected = load_file(tmp_path / "ddp" / "final" / "model.safetensors")
    got = load_file(tmp_path / "fsdp" / "final" / "model.safetensors")
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    moved = load_file(hopper_checkpoint / "model.safetensors")
    assert any(not torch.equal(moved[name], got[name]) for name in moved if name in got)
    # The sharded optimiser state was saved whole: the run resumes sharded, and in one process.
    resumed = torchrun_finetune(f"resume={tmp_path / 'fsdp'}", "algo.iterations=2", "algo.checkpoint_every=1")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert main(["finetune", f"resume={tmp_path / 'fsdp'}", "algo.iterations=3", "scale.fsdp=false"]) == 0
    assert [r["iteration"] for r in _rows(tmp_path / "fsdp")] == ["1", "2", "3"]


def test_fsdp_needstorchrun_finetune(tmp_path, hopper_checkpoint, capsys):
    run = [*TINY, f"policy.pretrained={hopper_checkpoint}", "algo.iterations=1", "scale.fsdp=true"]
    assert main(["finetune", *run, f"run_dir={tmp_path / 'run'}"]) == 2
    assert "scale.fsdp=true shards the learner across data-parallel ranks" in capsys.readouterr().err


def test_minibatch_weights_average_to_the_whole_minibatch_gradient():
    # Two ranks with 5 and 2 samples, minibatches of 6: each rank takes 3 per minibatch, so minibatch 0 has
    # 3 + 2 samples and minibatch 1 has 2 + 0 (rank 1 is idle in it).
    plan = MinibatchPlan(size=3, count=2, global_sizes=(5, 2), world_size=2)
    samples = [torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]), torch.tensor([10.0, 20.0])]
    for index in range(plan.count):
        parts = [rank[index * plan.size : (index + 1) * plan.size] for rank in samples]
        weight = torch.zeros((), requires_grad=True)
        grads = []
        for part in parts:  # d/dw of each rank's weighted mean loss, then the ranks' mean (the all-reduce)
            if len(part) == 0:
                grads.append(torch.zeros(()))
                continue
            loss = (weight * part).mean() * plan.weight(index, len(part))
            grads.append(torch.autograd.grad(loss, weight)[0])
        whole = torch.cat(parts)
        assert torch.allclose(torch.stack(grads).mean(), whole.mean()), index
    assert MinibatchPlan(size=4, count=3, global_sizes=(4, 4, 2)).weight(2, 2) == 1.0
