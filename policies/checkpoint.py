"""Self-describing policy checkpoints.

A checkpoint is a directory::

    config.json                  {"format_version", "policy_type", "obs_dim", "action_dim", "config", "metadata"}
    model.safetensors            network weights (the RL noise head is optional)
    normalization.safetensors    obs mean/std and action min/max used in training

Nothing else is needed to load it, and it holds no pickled objects.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from policies.registry import policy_classes

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
NORMALIZATION_FILE = "normalization.safetensors"
_NORMALIZER_PREFIX = "normalizer."
_BASE_PREFIX = "base_model."
# Weights that only RL fine-tuning needs; evaluation and deployment use the deterministic sampler.
_OPTIONAL_PREFIXES = ("noise.",)


def apply_umask(path: Path) -> None:
    """Give ``path`` (a file, or a directory and everything in it) the permissions a plain
    ``open``/``mkdir`` would have had: ``tempfile`` creates private (0600/0700) entries and
    safetensors writes 0600 files, which would hide checkpoints from other users or processes.
    """
    umask = os.umask(0)
    os.umask(umask)
    entries = [path, *path.rglob("*")] if path.is_dir() else [path]
    for entry in entries:
        entry.chmod((0o777 if entry.is_dir() else 0o666) & ~umask)


def _config_from_dict(config_cls: type, data: dict[str, Any]) -> Any:
    """Rebuild a (possibly nested) config dataclass from its ``asdict`` form."""
    kwargs = {}
    for f in dataclasses.fields(config_cls):
        if f.name not in data:
            continue
        value = data[f.name]
        if isinstance(value, dict) and f.default_factory is not dataclasses.MISSING:
            nested = f.default_factory()
            if dataclasses.is_dataclass(nested):
                value = _config_from_dict(type(nested), value)
        kwargs[f.name] = value
    unknown = set(data) - {f.name for f in dataclasses.fields(config_cls)}
    if unknown:
        raise ValueError(f"Checkpoint config has keys {sorted(unknown)} unknown to {config_cls.__name__}.")
    return config_cls(**kwargs)


def tied_aliases(state: dict[str, torch.Tensor]) -> set[str]:
    """The keys of ``state`` whose tensor is an earlier key's (tied weights, e.g. an LM head tied to its token
    embedding): safetensors refuses to write shared tensors twice, and loading the first ties the others back."""
    first: dict[tuple[int, int, tuple[int, ...]], str] = {}
    aliases = set()
    for key, tensor in state.items():
        if tensor.numel() == 0:  # empty tensors have no storage to share
            continue
        where = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if where in first:
            aliases.add(key)
        else:
            first[where] = key
    return aliases


def save_policy(
    policy: torch.nn.Module,
    path: str | Path,
    metadata: dict[str, Any] | None = None,
    include_noise: bool = True,
) -> Path:
    """Write ``policy`` to directory ``path`` atomically (a crash never leaves a half-written checkpoint)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    tied = tied_aliases(policy.state_dict())  # written once, under the first of their names
    state = {k: v.detach().cpu().contiguous() for k, v in policy.state_dict().items() if k not in tied}
    # A frozen base network (DPPO's early denoising steps) is part of the fine-tuned policy's behaviour.
    if getattr(policy, "base_model", None) is not None:
        state.update(
            {_BASE_PREFIX + k: v.detach().cpu().contiguous() for k, v in policy.base_model.state_dict().items()}
        )
    norm = {k[len(_NORMALIZER_PREFIX) :]: v for k, v in state.items() if k.startswith(_NORMALIZER_PREFIX)}
    weights = {
        k: v
        for k, v in state.items()
        if not k.startswith(_NORMALIZER_PREFIX) and (include_noise or not k.startswith(_OPTIONAL_PREFIXES))
    }
    save_file(weights, tmp / WEIGHTS_FILE)
    save_file(norm, tmp / NORMALIZATION_FILE)
    config = {
        "format_version": FORMAT_VERSION,
        "policy_type": policy.policy_type,
        "obs_dim": policy.obs_dim,
        "action_dim": policy.action_dim,
        "config": dataclasses.asdict(policy.config),
        "metadata": metadata or {},
    }
    env_action_dim = getattr(policy, "env_action_dim", policy.action_dim)
    if env_action_dim != policy.action_dim:
        # The env's action size, where the chain is wider (SmolVLA denoises actions padded to 32 dims).
        config["env_action_dim"] = env_action_dim
    (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    # Files a policy needs beside its weights (a VLA's VLM config, tokenizer and processor config).
    if hasattr(policy, "save_assets"):
        policy.save_assets(tmp)
    apply_umask(tmp)
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
    return path


def read_checkpoint_config(path: str | Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a checkpoint, with a clear error when it is not one."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"No policy checkpoint at {str(path)!r}: expected a directory with {CONFIG_FILE}, {WEIGHTS_FILE} "
            f"and {NORMALIZATION_FILE} (written by `robo-rlft pretrain` or `robo-rlft finetune`)."
        )
    missing = [f for f in (CONFIG_FILE, WEIGHTS_FILE, NORMALIZATION_FILE) if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(f"Checkpoint {str(path)!r} is missing {missing}.")
    config = json.loads((path / CONFIG_FILE).read_text())
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"Checkpoint {str(path)!r} has format_version={config.get('format_version')!r}; "
            f"this robo_rlft reads version {FORMAT_VERSION}."
        )
    return config


def load_policy(
    path: str | Path,
    expected_type: str | None = None,
    obs_dim: int | None = None,
    action_dim: int | None = None,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load a checkpoint directory; returns ``(policy, metadata)``.

    ``expected_type``/``obs_dim``/``action_dim``, when given, are checked against the checkpoint and
    a mismatch names both sides. Missing noise-head weights are allowed (freshly initialised).
    """
    path = Path(path)
    config = read_checkpoint_config(path)
    ptype = config["policy_type"]
    if expected_type is not None and ptype != expected_type:
        raise ValueError(
            f"Checkpoint {str(path)!r} holds a {ptype!r} policy, but policy={expected_type!r} was asked for."
        )
    env_dims = {"obs_dim": config["obs_dim"], "action_dim": config.get("env_action_dim", config["action_dim"])}
    for name, want in (("obs_dim", obs_dim), ("action_dim", action_dim)):
        if want is not None and env_dims[name] != want:
            raise ValueError(
                f"Checkpoint {str(path)!r} has {name}={env_dims[name]} (env {config['metadata'].get('env')!r}), "
                f"but the environment needs {name}={want}."
            )
    model_cls, config_cls = policy_classes(ptype)
    policy_config = _config_from_dict(config_cls, config["config"])
    if hasattr(model_cls, "from_checkpoint_dir"):
        # A policy with assets (a VLA) is built from the checkpoint's own copy of them, not from the paths
        # in its config.
        policy = model_cls.from_checkpoint_dir(path, config["obs_dim"], config["action_dim"], policy_config)
    else:
        policy = model_cls(config["obs_dim"], config["action_dim"], policy_config)
    weights = load_file(path / WEIGHTS_FILE)
    weights.update({_NORMALIZER_PREFIX + k: v for k, v in load_file(path / NORMALIZATION_FILE).items()})
    base = {k[len(_BASE_PREFIX) :]: weights.pop(k) for k in list(weights) if k.startswith(_BASE_PREFIX)}
    expected = policy.state_dict()
    tied = tied_aliases(expected)
    missing = [k for k in expected if k not in weights and k not in tied and not k.startswith(_OPTIONAL_PREFIXES)]
    unexpected = [k for k in weights if k not in expected]
    wrong_shape = [
        f"{k}: checkpoint {tuple(weights[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in weights
        if k in expected and weights[k].shape != expected[k].shape
    ]
    if missing or unexpected or wrong_shape:
        raise ValueError(
            f"Checkpoint {str(path)!r} does not match a {ptype!r} policy built from its config: "
            f"missing={missing}, unexpected={unexpected}, wrong_shape={wrong_shape}."
        )
    if any(k.startswith(_OPTIONAL_PREFIXES) for k in expected) and not any(
        k.startswith(_OPTIONAL_PREFIXES) for k in weights
    ):
        logger.info("Checkpoint %s has no noise head; it starts from its initialisation.", path)
    policy.load_state_dict(weights, strict=False)
    if base:
        policy.freeze_base()
        policy.base_model.load_state_dict(base)
    return policy, config["metadata"]
