"""Training checkpoints: everything needed to resume a run exactly, written atomically.

Layout inside a run directory::

    checkpoints/
      iter_000010/
        policy/             a full policy checkpoint (policies.checkpoint format, with noise head)
        critic.safetensors  the value network (PPO only: critic-free algorithms such as GRPO have none)
        optim.pt            optimizer and LR-scheduler states, torch RNG state (tensors only)
        state.json          iteration, env_steps, reward scaler, best eval return, ...
      latest                name of the newest complete checkpoint

A checkpoint directory is built under a temporary name and renamed into place, and ``latest`` is
replaced atomically afterwards, so a crash or Ctrl-C at any moment leaves the previous checkpoint
intact and resumable.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from policies.checkpoint import apply_umask, load_policy, save_policy

LATEST_FILE = "latest"


def _assert_finite(module: torch.nn.Module, what: str) -> None:
    bad = [name for name, p in module.state_dict().items() if p.is_floating_point() and not torch.isfinite(p).all()]
    if bad:
        raise FloatingPointError(f"Refusing to checkpoint {what}: non-finite values in {bad[:5]}.")


def save_training_checkpoint(
    run_dir: Path,
    iteration: int,
    policy: torch.nn.Module,
    critic: torch.nn.Module | None,
    optim_state: dict[str, Any],
    state: dict[str, Any],
    policy_metadata: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write checkpoint ``iter_<iteration>``, point ``latest`` at it, keep the newest ``keep``.

    ``critic`` is None for critic-free algorithms (GRPO); the checkpoint then has no ``critic.safetensors``.
    """
    _assert_finite(policy, "policy")
    if critic is not None:
        _assert_finite(critic, "critic")
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"iter_{iteration:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    save_policy(policy, tmp / "policy", metadata=policy_metadata)
    if critic is not None:
        state_dict = {k: v.detach().cpu().contiguous() for k, v in critic.state_dict().items()}
        save_file(state_dict, tmp / "critic.safetensors")
    torch.save({**optim_state, "torch_rng": torch.get_rng_state()}, tmp / "optim.pt")
    (tmp / "state.json").write_text(json.dumps({"iteration": iteration, **state}, indent=2))
    apply_umask(tmp)
    final = root / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    pointer_tmp = root / f".{LATEST_FILE}.tmp"
    pointer_tmp.write_text(name)
    os.replace(pointer_tmp, root / LATEST_FILE)
    for old in sorted(p for p in root.glob("iter_*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path:
    """The newest complete checkpoint of a run, with a clear error if there is none."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / LATEST_FILE
    if not pointer.is_file():
        raise FileNotFoundError(
            f"Cannot resume from {str(run_dir)!r}: no {root / LATEST_FILE} (the run wrote no checkpoint yet)."
        )
    path = root / pointer.read_text().strip()
    if not path.is_dir():
        raise FileNotFoundError(f"{pointer} names {path.name!r}, which does not exist.")
    return path


def load_training_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_training_checkpoint`.

    Returns ``{"policy", "critic_state", "optim", "state"}``; the policy is rebuilt from its own
    directory, the critic's state dict is for the caller's critic (None when the run has no critic,
    e.g. GRPO), and ``optim["torch_rng"]`` is the RNG state to restore with ``torch.set_rng_state``
    right before training continues (building modules after restoring it would consume random
    numbers the uninterrupted run did not).
    """
    policy, _ = load_policy(path / "policy")
    optim = torch.load(path / "optim.pt", weights_only=True)
    critic_file = path / "critic.safetensors"
    return {
        "policy": policy,
        "critic_state": load_file(critic_file) if critic_file.is_file() else None,
        "optim": optim,
        "state": json.loads((path / "state.json").read_text()),
    }
