"""LeRobot's SmolVLA checkpoints: load them into :class:`policies.smolvla.SmolVLAPolicy`, and export back.

A LeRobot (>= 0.4) SmolVLA checkpoint is a folder with ``config.json`` (``"type": "smolvla"``, the architecture,
the input/output features and the VLM folder's path in ``vlm_model_name``), ``model.safetensors`` (the whole
model, VLM included, under ``model.``) and two processor pipelines, ``policy_preprocessor.json`` and
``policy_postprocessor.json``, whose normaliser steps keep the dataset stats in their own safetensors files.
Our :class:`~policies.smolvla.SmolVLAPolicy` has LeRobot's module tree, so the weights load without renaming.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from policies.lerobot_checkpoint import (
    ACTION_FEATURE,
    IMAGE_PREFIX,
    LEROBOT_CONFIG,
    LEROBOT_WEIGHTS,
    POSTPROCESSOR_CONFIG,
    PREPROCESSOR_CONFIG,
    STATE_FEATURE,
    check_env_dims,
    lerobot_policy_type,
    normalization_stats,
)
from policies.smolvla import LEROBOT_NORM_EPS, SmolVLAPolicy, SmolVLAPolicyConfig, check_smolvlm_dir

__all__ = ["export_lerobot_checkpoint", "is_lerobot_checkpoint", "load_lerobot_checkpoint"]

logger = logging.getLogger(__name__)

# The LeRobot config fields that define the architecture, copied into SmolVLAPolicyConfig under the same names.
_LEROBOT_ARCH_FIELDS = (
    "max_state_dim",
    "max_action_dim",
    "tokenizer_max_length",
    "pad_language_to",
    "num_vlm_layers",
    "num_expert_layers",
    "self_attn_every_n_layers",
    "expert_width_multiplier",
    "attention_mode",
    "add_image_special_tokens",
    "prefix_length",
    "min_period",
    "max_period",
)


def is_lerobot_checkpoint(path: str | Path) -> bool:
    """``path`` is a LeRobot SmolVLA checkpoint (``config.json`` with ``"type": "smolvla"`` + weights)."""
    return lerobot_policy_type(path) == "smolvla"


def _lerobot_policy_config(lerobot: dict[str, Any], settings: Any | None) -> SmolVLAPolicyConfig:
    """Our config from a LeRobot ``config.json`` and, when given, the run's ``policy`` section (vlm_path,
    cameras, env_action_dim, noise, train_state_proj)."""
    images = [key for key, feature in lerobot["input_features"].items() if feature["type"] == "VISUAL"]
    default_cameras = [key.removeprefix(IMAGE_PREFIX) for key in images]
    cameras = list(getattr(settings, "cameras", None) or default_cameras)
    modes = lerobot["normalization_mapping"]
    values = {name: lerobot[name] for name in _LEROBOT_ARCH_FIELDS if name in lerobot}
    values.update(
        vlm_path=str(getattr(settings, "vlm_path", "") or lerobot["vlm_model_name"]),
        horizon=lerobot["chunk_size"],
        denoising_steps=lerobot["num_steps"],
        cameras=cameras,
        image_keys=images,
        image_size=list(lerobot["resize_imgs_with_padding"]),
        env_action_dim=int(
            getattr(settings, "env_action_dim", 0) or lerobot["output_features"][ACTION_FEATURE]["shape"][0]
        ),
        state_norm=modes["STATE"],
        action_norm=modes["ACTION"],
        lerobot_n_action_steps=lerobot["n_action_steps"],
    )
    for name in ("noise", "time_embed_dim", "train_state_proj"):  # the run's choices
        if hasattr(settings, name):
            values[name] = getattr(settings, name)
    unsupported = {"empty_cameras": 0, "adapt_to_pi_aloha": False, "n_obs_steps": 1}
    differing = {k: lerobot[k] for k, default in unsupported.items() if lerobot.get(k, default) != default}
    if differing:
        raise ValueError(f"SmolVLA checkpoints with {differing} are not supported yet (supported: {unsupported}).")
    return SmolVLAPolicyConfig(**values)


def load_lerobot_checkpoint(
    path: str | Path,
    vlm_path: str | Path | None = None,
    state_dim: int | None = None,
    action_dim: int | None = None,
    settings: Any | None = None,
) -> SmolVLAPolicy:
    """Load a LeRobot SmolVLA checkpoint (``config.json`` + ``model.safetensors`` + processor files).

    Args:
        path: the checkpoint directory (LeRobot's ``pretrained_model`` folder).
        vlm_path: the SmolVLM folder on this machine; default: ``settings.vlm_path``, else the checkpoint's
            ``vlm_model_name``.
        state_dim: the env's state size (checked against the checkpoint's ``observation.state``); default: its size.
        action_dim: the env's action size (checked against the checkpoint's ``action``); default: its size.
        settings: a run's ``policy`` section (``policy=smolvla``): cameras, noise scheme, ``vlm_path``.

    Raises:
        FileNotFoundError: the VLM folder is missing (the message names the expected path and
            ``policy.vlm_path=...``), or the processor files are.
        KeyError: the processor files lack stats of the state or action feature the policy uses.
        ValueError: dims or weights do not match.
    """
    path = Path(path)
    if not is_lerobot_checkpoint(path):
        raise FileNotFoundError(
            f"{str(path)!r} is not a LeRobot SmolVLA checkpoint (config.json with type 'smolvla' and "
            "model.safetensors)."
        )
    lerobot = json.loads((path / LEROBOT_CONFIG).read_text())
    # An explicit vlm_path wins over the run's policy.vlm_path, which wins over the checkpoint's own path.
    settings_vlm = str(vlm_path) if vlm_path is not None else (getattr(settings, "vlm_path", "") or "")
    config = _lerobot_policy_config(lerobot, settings)
    if settings_vlm:
        config = dataclasses.replace(config, vlm_path=settings_vlm)
    check_smolvlm_dir(Path(config.vlm_path), "policy.vlm_path", checkpoint=None if settings_vlm else path)
    ckpt_state, _ = check_env_dims(path, lerobot, state_dim, action_dim)
    if action_dim is not None and config.env_action_dim != action_dim:
        config = dataclasses.replace(config, env_action_dim=action_dim)

    # Normalisation stats: the preprocessor normalises the state, the postprocessor unnormalises the action.
    policy = SmolVLAPolicy(ckpt_state, config.max_action_dim, config)
    state_stats, action_stats = normalization_stats(
        path, config.state_norm, config.action_norm, policy.env_action_dim, "SmolVLA"
    )
    policy.normalizer.load_stats(state_stats, action_stats, (config.state_norm, config.action_norm))
    weights = load_file(path / LEROBOT_WEIGHTS)
    expected = {k: v for k, v in policy.state_dict().items() if k.startswith("model.")}
    missing_keys = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    wrong = [
        f"{k}: {tuple(weights[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in weights and weights[k].shape != v.shape
    ]
    # A tied LM head is stored once (as the embedding); it is unused here anyway.
    missing_keys = [k for k in missing_keys if not k.endswith("lm_head.weight")]
    if missing_keys or unexpected or wrong:
        raise ValueError(
            f"LeRobot checkpoint {str(path)!r} does not match SmolVLA built from its config: missing={missing_keys}, "
            f"unexpected={unexpected}, wrong_shape={wrong}."
        )
    policy.load_state_dict({k: v.float() for k, v in weights.items()}, strict=False)
    logger.info("Loaded LeRobot SmolVLA %s (%d tensors, VLM from %s).", path, len(weights), config.vlm_path)
    return policy


def export_lerobot_checkpoint(policy: SmolVLAPolicy, path: str | Path) -> Path:
    """Write ``policy`` in LeRobot's layout (``config.json``, ``model.safetensors``, processor files with stats),
    which ``SmolVLAPolicy.from_pretrained`` of LeRobot 0.4 loads. The VLM stays where ``config.vlm_path`` says."""
    config = policy.config
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    images = {
        key: {"type": "VISUAL", "shape": [3, config.image_size[1], config.image_size[0]]} for key in config.image_keys
    }
    inputs = {**images, STATE_FEATURE: {"type": "STATE", "shape": [policy.obs_dim]}}
    outputs = {ACTION_FEATURE: {"type": "ACTION", "shape": [policy.env_action_dim]}}
    modes = {"VISUAL": "IDENTITY", "STATE": config.state_norm, "ACTION": config.action_norm}
    lerobot = {
        "type": "smolvla",
        "n_obs_steps": 1,
        "input_features": inputs,
        "output_features": outputs,
        "device": "cpu",
        "use_amp": False,
        "push_to_hub": False,
        "chunk_size": config.horizon,
        "n_action_steps": min(config.lerobot_n_action_steps, config.horizon),
        "normalization_mapping": modes,
        "resize_imgs_with_padding": list(config.image_size),
        "num_steps": config.denoising_steps,
        "vlm_model_name": str(Path(config.vlm_path).resolve()),
        "load_vlm_weights": False,
        **{name: getattr(config, name) for name in _LEROBOT_ARCH_FIELDS},
    }
    (path / LEROBOT_CONFIG).write_text(json.dumps(lerobot, indent=4))
    weights = {k: v.detach().cpu().contiguous() for k, v in policy.state_dict().items() if k.startswith("model.")}
    save_file(weights, path / LEROBOT_WEIGHTS)
    norm = policy.normalizer
    if config.state_norm != "MEAN_STD" or config.action_norm != "MEAN_STD":
        raise ValueError("export_lerobot_checkpoint writes MEAN_STD stats only.")
    state_stats = {f"{STATE_FEATURE}.mean": norm.obs_mean, f"{STATE_FEATURE}.std": norm.obs_std - LEROBOT_NORM_EPS}
    action_stats = {f"{ACTION_FEATURE}.mean": norm.action_mean, f"{ACTION_FEATURE}.std": norm.action_std}
    stats = {k: v.detach().cpu().contiguous() for k, v in {**state_stats, **action_stats}.items()}
    features = {**inputs, **outputs}
    pre_steps = [
        {"registry_name": "rename_observations_processor", "config": {"rename_map": {}}},
        {"registry_name": "to_batch_processor", "config": {}},
        {"registry_name": "smolvla_new_line_processor", "config": {}},
        {
            "registry_name": "tokenizer_processor",
            "config": {
                "max_length": config.tokenizer_max_length,
                "task_key": "task",
                "padding_side": "right",
                "padding": config.pad_language_to,
                "truncation": True,
                "tokenizer_name": lerobot["vlm_model_name"],
            },
        },
        {"registry_name": "device_processor", "config": {"device": "cpu", "float_dtype": None}},
        {
            "registry_name": "normalizer_processor",
            "config": {"eps": LEROBOT_NORM_EPS, "features": features, "norm_map": modes},
            "state_file": "policy_preprocessor_step_5_normalizer_processor.safetensors",
        },
    ]
    post_steps = [
        {
            "registry_name": "unnormalizer_processor",
            "config": {"eps": LEROBOT_NORM_EPS, "features": outputs, "norm_map": modes},
            "state_file": "policy_postprocessor_step_0_unnormalizer_processor.safetensors",
        },
        {"registry_name": "device_processor", "config": {"device": "cpu", "float_dtype": None}},
    ]
    save_file(stats, path / pre_steps[-1]["state_file"])
    save_file(stats, path / post_steps[0]["state_file"])
    (path / PREPROCESSOR_CONFIG).write_text(json.dumps({"name": "policy_preprocessor", "steps": pre_steps}, indent=2))
    (path / POSTPROCESSOR_CONFIG).write_text(
        json.dumps({"name": "policy_postprocessor", "steps": post_steps}, indent=2)
    )
    return path
