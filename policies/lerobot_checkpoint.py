"""What every LeRobot (>= 0.4) policy checkpoint shares: file names, the policy type, env dims, normalisation stats.

A LeRobot checkpoint is a folder with ``config.json`` (``"type"``, the architecture, the input/output features),
``model.safetensors`` (the whole model under ``model.``) and two processor pipelines, ``policy_preprocessor.json``
and ``policy_postprocessor.json``, whose normaliser steps keep the dataset stats in their own safetensors files.
The family-specific loaders (:mod:`policies.smolvla_lerobot`, :mod:`policies.pi0_lerobot`) build on these.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

__all__ = [
    "ACTION_FEATURE",
    "IMAGE_PREFIX",
    "LEROBOT_CONFIG",
    "LEROBOT_WEIGHTS",
    "POSTPROCESSOR_CONFIG",
    "PREPROCESSOR_CONFIG",
    "STATE_FEATURE",
    "check_env_dims",
    "lerobot_policy_type",
    "normalization_stats",
    "processor_stats",
]

LEROBOT_CONFIG = "config.json"
LEROBOT_WEIGHTS = "model.safetensors"
PREPROCESSOR_CONFIG = "policy_preprocessor.json"
POSTPROCESSOR_CONFIG = "policy_postprocessor.json"
STATE_FEATURE = "observation.state"
ACTION_FEATURE = "action"
IMAGE_PREFIX = "observation.images."
# The stats each normalisation mode reads (LeRobot's NormalizerProcessorStep).
STATS_OF_MODE: dict[str, tuple[str, ...]] = {
    "MEAN_STD": ("mean", "std"),
    "MIN_MAX": ("min", "max"),
    "QUANTILES": ("q01", "q99"),
    "IDENTITY": (),
}


def lerobot_policy_type(path: str | Path) -> str | None:
    """The ``"type"`` of the LeRobot checkpoint at ``path`` (``config.json`` + weights), or None if it is not one."""
    path = Path(path)
    config = path / LEROBOT_CONFIG
    if not (config.is_file() and (path / LEROBOT_WEIGHTS).is_file()):
        return None
    try:
        return json.loads(config.read_text()).get("type")
    except json.JSONDecodeError:
        return None


def processor_stats(path: Path, config_file: str, step_name: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The stats tensors and config of the ``step_name`` step of a LeRobot processor pipeline file."""
    pipeline_file = path / config_file
    if not pipeline_file.is_file():
        raise FileNotFoundError(
            f"LeRobot checkpoint {str(path)!r} has no {config_file}: the normalisation stats live in its "
            "pre/post-processor files (LeRobot >= 0.4 writes them beside model.safetensors)."
        )
    steps = json.loads(pipeline_file.read_text())["steps"]
    for step in steps:
        if step.get("registry_name") == step_name:
            state_file = step.get("state_file")
            stats = load_file(path / state_file) if state_file else {}
            return stats, step.get("config", {})
    raise ValueError(
        f"{str(pipeline_file)!r} has no {step_name!r} step; its steps: {[s.get('registry_name') for s in steps]}."
    )


def check_env_dims(
    path: Path, lerobot: dict[str, Any], state_dim: int | None, action_dim: int | None
) -> tuple[int, int]:
    """The checkpoint's ``(state, action)`` sizes; a ValueError when the env's (when given) differ."""
    have_state = lerobot["input_features"][STATE_FEATURE]["shape"][0]
    have_action = lerobot["output_features"][ACTION_FEATURE]["shape"][0]
    for name, want, have in (("state", state_dim, have_state), ("action", action_dim, have_action)):
        if want is not None and want != have:
            raise ValueError(
                f"LeRobot checkpoint {str(path)!r} was trained with a {have}-D {name}, but the env's {name} has "
                f"{want} dims."
            )
    return have_state, have_action


def normalization_stats(
    path: Path, state_mode: str, action_mode: str, action_dim: int, family: str
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The state stats (preprocessor) and action stats (postprocessor, first ``action_dim`` dims) a policy with these
    modes reads, by stat name (``mean`` / ``std`` / ``min`` / ``max`` / ``q01`` / ``q99``).

    Raises:
        FileNotFoundError: a processor file is missing.
        KeyError: the processor files lack a stat the modes need (the message lists them).
    """
    pre, _ = processor_stats(path, PREPROCESSOR_CONFIG, "normalizer_processor")
    post, _ = processor_stats(path, POSTPROCESSOR_CONFIG, "unnormalizer_processor")
    wanted = [
        (pre, STATE_FEATURE, state_mode, PREPROCESSOR_CONFIG),
        (post, ACTION_FEATURE, action_mode, POSTPROCESSOR_CONFIG),
    ]
    missing = [
        f"{feature}.{stat} ({source})"
        for stats, feature, mode, source in wanted
        for stat in STATS_OF_MODE[mode]
        if f"{feature}.{stat}" not in stats
    ]
    if missing:
        raise KeyError(
            f"LeRobot checkpoint {str(path)!r}: the processor files lack normalisation stats {missing} of the "
            f"features {family} uses (state mode {state_mode}, action mode {action_mode})."
        )
    state = {s: pre[f"{STATE_FEATURE}.{s}"] for s in STATS_OF_MODE[state_mode]}
    action = {s: post[f"{ACTION_FEATURE}.{s}"][:action_dim] for s in STATS_OF_MODE[action_mode]}
    return state, action
