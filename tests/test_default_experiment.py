"""The default experiment: the built-in checkpoint, the README commands that regenerate it, and that
fine-tuning it really raises the return."""

from __future__ import annotations

import csv
import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest

from policies.checkpoint import load_policy, read_checkpoint_config
from robo_rlft.cli import main
from robo_rlft.commands import BUILTIN_FOR_ENV, BUILTIN_PREFIX, resolve_checkpoint

README = Path(__file__).resolve().parent.parent / "README.md"


def _readme_commands(verb: str) -> list[str]:
    """The ``robo-rlft <verb> ...`` lines of the README's regeneration recipe (comments stripped)."""
    lines = [line.split("#")[0].strip() for line in README.read_text().splitlines()]
    return [line for line in lines if re.match(rf"robo-rlft {verb} .*run_dir=runs/hopper_(medium|bc)\b", line)]


def test_builtin_checkpoint_loads_for_the_default_env():
    path = resolve_checkpoint(BUILTIN_PREFIX + BUILTIN_FOR_ENV["hopper"])
    policy, metadata = load_policy(path, expected_type="flow", obs_dim=11, action_dim=3)
    assert metadata["env"] == "hopper" and metadata["trained_by"] == "robo-rlft pretrain"
    assert policy.horizon == 4 and policy.num_steps == 4
    assert not any(k.startswith("noise.") for k in _weight_keys(path)), "BC checkpoints carry no noise head"


def _weight_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(path / "model.safetensors", "pt") as f:
        return list(f.keys())


@pytest.mark.slow
def test_readme_commands_regenerate_the_builtin_checkpoint(tmp_path, monkeypatch):
    """Run the README's collect + pretrain recipe with only the compute budgets shrunk; the result must
    be the built-in checkpoint's kind: same type, dims, architecture and metadata."""
    collect_cmds, pretrain_cmds = _readme_commands("collect"), _readme_commands("pretrain")
    assert len(collect_cmds) == 1 and len(pretrain_cmds) == 1, (collect_cmds, pretrain_cmds)
    monkeypatch.chdir(tmp_path)
    budgets = {
        "collect": ["collect.expert_steps=2048", "collect.episodes=3", "progress=false"],
        "pretrain": ["pretrain.gradient_steps=20", "pretrain.eval_episodes=1", "progress=false"],
    }
    for command in (collect_cmds[0], pretrain_cmds[0]):
        argv = shlex.split(command)[1:]
        assert main(argv + budgets[argv[0]]) == 0, command

    made = read_checkpoint_config(tmp_path / "runs" / "hopper_bc" / "final")
    builtin = read_checkpoint_config(resolve_checkpoint(BUILTIN_PREFIX + BUILTIN_FOR_ENV["hopper"]))
    assert made == builtin
    dataset_meta = json.loads((tmp_path / "runs" / "hopper_medium" / "collect.json").read_text())
    assert dataset_meta["episodes"] == 3


@pytest.mark.slow
def test_finetuning_the_builtin_checkpoint_raises_the_return(tmp_path):
    """A shortened default run (12 of the 40 iterations): the rollout return of the last iterations
    clearly exceeds that of the first ones (measured: ~900 -> ~1,400 at this point of the run)."""
    run_dir = tmp_path / "run"
    assert main(["finetune", f"run_dir={run_dir}", "algo.iterations=12", "algo.eval_every=0", "progress=false"]) == 0
    with open(run_dir / "metrics.csv") as f:
        pretrained, *rows = csv.DictReader(f)  # row 0 evaluates the pretrained policy
    returns = np.array([float(row["return_mean"]) for row in rows])
    assert np.isfinite(returns).all()
    first, last = returns[:3].mean(), returns[-3:].mean()
    assert last > 1.2 * first, f"rollout return did not rise: first iterations {first:.0f}, last {last:.0f}"
    before, after = float(pretrained["eval_return_mean"]), float(rows[-1]["eval_return_mean"])
    assert after > before, f"deterministic evaluation did not improve: {before:.0f} -> {after:.0f}"
