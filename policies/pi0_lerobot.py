"""LeRobot's π0 / π0.5 checkpoints: load them into :class:`policies.pi0.PI0Policy`.

A LeRobot (0.4) π0 checkpoint is ``config.json`` (``"type": "pi0"`` or ``"pi05"``, ``paligemma_variant``,
``action_expert_variant``, features), ``model.safetensors`` (``model.paligemma_with_expert.paligemma.*``,
``model.paligemma_with_expert.gemma_expert.*``, ``model.action_in_proj`` ...; PaliGemma's input embedding is left
out as the tied duplicate of its LM head) and the processor files with the normalisation stats
(:mod:`policies.lerobot_checkpoint`). PaliGemma's tokenizer is not in it: the run names a local copy
(``policy.tokenizer_path``). The tensors are read one at a time from the memory-mapped file into a model built on
the meta device, so a 3.5B-parameter checkpoint needs one copy of its weights in memory, not two or three.

:func:`write_random_lerobot_checkpoint` and :func:`write_stand_in_tokenizer` write test and benchmark inputs in
those layouts (random weights from a key/shape listing; a word-level tokenizer with PaliGemma's special tokens).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

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
from policies.pi0 import VARIANTS, PI0Policy, PI0PolicyConfig, check_tokenizer_dir
from policies.vla_backbone import require_vla_dependencies

__all__ = [
    "is_lerobot_pi0_checkpoint",
    "load_lerobot_pi0_checkpoint",
    "write_random_lerobot_checkpoint",
    "write_stand_in_tokenizer",
]

logger = logging.getLogger(__name__)

# LeRobot config fields copied into PI0PolicyConfig under the same names (ours: the two miniature-only fields
# vision_variant and vocab_size, absent from LeRobot's configs, which always mean so400m and 257,152).
_ARCH_FIELDS = (
    "paligemma_variant",
    "action_expert_variant",
    "vision_variant",
    "vocab_size",
    "max_state_dim",
    "max_action_dim",
    "tokenizer_max_length",
    "min_period",
    "max_period",
)
# The run's policy section fields that apply to a loaded checkpoint.
_RUN_FIELDS = ("tokenizer_path", "dtype", "noise", "time_embed_dim")
# LeRobot's QUANTILES is MIN_MAX over the 1st..99th percentile: the normaliser takes q01/q99 as min/max.
_QUANTILES_AS_MIN_MAX = {"q01": "min", "q99": "max"}


def is_lerobot_pi0_checkpoint(path: str | Path) -> bool:
    """``path`` is a LeRobot π0 or π0.5 checkpoint (``config.json`` with type ``pi0`` / ``pi05`` + weights)."""
    return lerobot_policy_type(path) in VARIANTS


def _policy_config(lerobot: dict[str, Any], overrides: Any | None) -> PI0PolicyConfig:
    """Our config from a LeRobot ``config.json`` and, when given, the run's ``policy`` section."""
    images = [key for key, feature in lerobot["input_features"].items() if feature["type"] == "VISUAL"]
    cameras = list(getattr(overrides, "cameras", None) or [key.removeprefix(IMAGE_PREFIX) for key in images])
    modes = lerobot["normalization_mapping"]
    values = {name: lerobot[name] for name in _ARCH_FIELDS if name in lerobot}
    values.update(
        variant=lerobot["type"],
        horizon=lerobot["chunk_size"],
        denoising_steps=lerobot["num_inference_steps"],
        cameras=cameras,
        image_keys=images,
        image_resolution=list(lerobot["image_resolution"]),
        env_action_dim=int(lerobot["output_features"][ACTION_FEATURE]["shape"][0]),
        state_norm=modes["STATE"],
        action_norm=modes["ACTION"],
        lerobot_n_action_steps=lerobot["n_action_steps"],
    )
    for name in _RUN_FIELDS:
        value = getattr(overrides, name, None) if not isinstance(overrides, dict) else overrides.get(name)
        if value not in (None, ""):
            values[name] = value
    unsupported = {"empty_cameras": 0, "n_obs_steps": 1, "rtc_config": None}
    differing = {k: lerobot[k] for k, default in unsupported.items() if lerobot.get(k, default) != default}
    if differing:
        raise ValueError(f"π0 checkpoints with {differing} are not supported yet (supported: {unsupported}).")
    return PI0PolicyConfig(**values)


def load_lerobot_pi0_checkpoint(
    path: str | Path,
    state_dim: int | None = None,
    action_dim: int | None = None,
    overrides: Any | None = None,
) -> PI0Policy:
    """Load a LeRobot π0 / π0.5 checkpoint (``config.json`` + ``model.safetensors`` + processor files).

    Args:
        path: the checkpoint directory (LeRobot's ``pretrained_model`` folder).
        state_dim, action_dim: the env's sizes (checked against the checkpoint's features); default: its sizes.
        overrides: a run's ``policy`` section or a dict: ``tokenizer_path`` (required: LeRobot checkpoints have no
            tokenizer), ``cameras``, ``dtype``, ``noise``, ``time_embed_dim``.

    Raises:
        FileNotFoundError: not a π0 checkpoint, the tokenizer folder or a processor file is missing (the message
            names the expected path and ``policy.tokenizer_path=...``).
        KeyError: the processor files lack stats the normalisation modes need.
        ValueError: dims differ from the env's, or weights are missing, unexpected or wrong-shaped (all listed).
    """
    path = Path(path)
    if not is_lerobot_pi0_checkpoint(path):
        raise FileNotFoundError(
            f"{str(path)!r} is not a LeRobot π0 / π0.5 checkpoint (config.json with type 'pi0' or 'pi05' and "
            "model.safetensors)."
        )
    lerobot = json.loads((path / LEROBOT_CONFIG).read_text())
    config = _policy_config(lerobot, overrides)
    check_tokenizer_dir(Path(config.tokenizer_path))
    ckpt_state, _ = check_env_dims(path, lerobot, state_dim, action_dim)
    state_mode, action_mode = (
        "MIN_MAX" if mode == "QUANTILES" else mode for mode in (config.state_norm, config.action_norm)
    )
    state_stats, action_stats = normalization_stats(
        path, config.state_norm, config.action_norm, config.env_action_dim or config.max_action_dim, config.variant
    )
    if action_dim is not None:
        config = dataclasses.replace(config, env_action_dim=action_dim)

    policy = PI0Policy(ckpt_state, config.max_action_dim, config, init_weights=False)
    rename = _QUANTILES_AS_MIN_MAX
    policy.normalizer.load_stats(
        {rename.get(k, k): v for k, v in state_stats.items()},
        {rename.get(k, k): v[: policy.env_action_dim] for k, v in action_stats.items()},
        (state_mode, action_mode),
    )
    with safe_open(path / LEROBOT_WEIGHTS, framework="pt") as weights:
        policy.load_model_weights({key: weights.get_tensor(key) for key in weights.keys()})  # noqa: SIM118
    logger.info("Loaded LeRobot %s %s (%s).", config.variant, path, policy.parameter_counts())
    return policy


# ---- test and benchmark inputs in LeRobot's layouts -------------------------------------------------------

_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16"}


def _write_random_safetensors(path: Path, shapes: dict[str, list[int]], dtype: torch.dtype, seed: int) -> None:
    """A safetensors file of random tensors, generated and written one at a time (the format: an 8-byte header
    length, a JSON header of dtype / shape / byte offsets, the raw little-endian data), so memory holds one tensor.

    Weights are ``N(0, 0.02^2)`` and biases 0, as a model's init; norm scales are 1: SigLIP's LayerNorm weights
    1, Gemma's RMSNorm weights 0 (they scale by ``1 + w``).
    """
    item = torch.tensor([], dtype=dtype).element_size()
    header, offset = {}, 0
    for key, shape in shapes.items():
        size = item * int(torch.Size(shape).numel())
        header[key] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    generator = torch.Generator().manual_seed(seed)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for key, shape in shapes.items():
            if len(shape) == 1 and "norm" in key and "vision_tower" in key and key.endswith("weight"):
                tensor = torch.ones(shape)
            elif len(shape) == 1 and ("norm" in key or key.endswith("bias")):
                tensor = torch.zeros(shape)
            else:
                tensor = torch.randn(shape, generator=generator) * 0.02
            f.write(tensor.to(dtype).contiguous().view(torch.uint8).numpy().tobytes())


def write_random_lerobot_checkpoint(
    path: str | Path,
    listing: dict[str, Any],
    state_dim: int,
    action_dim: int,
    cameras: list[str],
    dtype: torch.dtype = torch.bfloat16,
    extra_config: dict[str, Any] | None = None,
    seed: int = 0,
) -> Path:
    """Write a LeRobot-layout π0 checkpoint with random weights of exactly ``listing["keys"]`` (key -> shape, as
    ``tests/fixtures/pi0/*_keys.json``) and ``listing["config"]``; random normalisation stats of the config's modes.
    ``extra_config`` adds fields to ``config.json`` (the miniature's ``vision_variant`` / ``vocab_size``)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    arch = listing["config"]
    resolution = list(arch["image_resolution"])
    images = {f"{IMAGE_PREFIX}{camera}": {"type": "VISUAL", "shape": [3, *resolution]} for camera in cameras}
    inputs = {**images, STATE_FEATURE: {"type": "STATE", "shape": [state_dim]}}
    outputs = {ACTION_FEATURE: {"type": "ACTION", "shape": [action_dim]}}
    modes = dict(arch["normalization_mapping"])
    lerobot = {
        "type": listing["family"],
        "n_obs_steps": 1,
        "input_features": inputs,
        "output_features": outputs,
        "device": "cpu",
        "use_amp": False,
        "num_inference_steps": arch["num_inference_steps"],
        "n_action_steps": arch["chunk_size"],
        **{k: v for k, v in arch.items() if k not in ("num_inference_steps", "normalization_mapping")},
        "normalization_mapping": modes,
        **(extra_config or {}),
    }
    (path / LEROBOT_CONFIG).write_text(json.dumps(lerobot, indent=4))
    _write_random_safetensors(path / LEROBOT_WEIGHTS, listing["keys"], dtype, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    stats = {}
    for feature, size in ((STATE_FEATURE, state_dim), (ACTION_FEATURE, action_dim)):
        mean, spread = torch.randn(size, generator=generator), torch.rand(size, generator=generator) + 0.5
        stats.update({f"{feature}.mean": mean, f"{feature}.std": spread})
        stats.update({f"{feature}.min": mean - 2 * spread, f"{feature}.max": mean + 2 * spread})
        stats.update({f"{feature}.q01": mean - 2 * spread, f"{feature}.q99": mean + 2 * spread})
    features = {**inputs, **outputs}
    steps = {
        PREPROCESSOR_CONFIG: ("normalizer_processor", "policy_preprocessor_step_3_normalizer_processor", features),
        POSTPROCESSOR_CONFIG: ("unnormalizer_processor", "policy_postprocessor_step_0_unnormalizer_processor", outputs),
    }
    for config_file, (registry_name, state_name, step_features) in steps.items():
        save_file(stats, path / f"{state_name}.safetensors")
        step = {
            "registry_name": registry_name,
            "config": {"eps": 1e-8, "features": step_features, "norm_map": modes},
            "state_file": f"{state_name}.safetensors",
        }
        (path / config_file).write_text(json.dumps({"name": config_file[:-5], "steps": [step]}, indent=2))
    return path


def write_stand_in_tokenizer(path: str | Path, words: list[str] | None = None, vocab_size: int | None = None) -> Path:
    """A word-level stand-in for PaliGemma's tokenizer (which LeRobot checkpoints lack and cannot be downloaded
    here): PaliGemma's special tokens (``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, ``<unk>`` 3), ``<bos>`` prepended like
    PaliGemma's, the π0.5 prompt words and state bins, and ``words``. ``vocab_size`` only bounds the check."""
    transformers = require_vla_dependencies()
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    special = ["<pad>", "<eos>", "<bos>", "<unk>"]
    prompt = ["Task", "State", "Action", ",", ";", ":", "-", *map(str, range(256))]
    vocab = {token: i for i, token in enumerate(dict.fromkeys([*special, *prompt, *(words or [])]))}
    if vocab_size is not None and len(vocab) > vocab_size:
        raise ValueError(f"The stand-in tokenizer has {len(vocab)} tokens, more than vocab_size={vocab_size}.")
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    word_level.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=word_level, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )
    path = Path(path)
    tokenizer.save_pretrained(path)
    return path
