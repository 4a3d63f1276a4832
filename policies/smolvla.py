"""SmolVLA (Shukor et al. 2025) with LeRobot's checkpoint layout, driven by our chain machinery (DESIGN.md §3-4).

SmolVLA is a SmolVLM (Idefics3 layout) cut to its first ``num_vlm_layers`` text layers, plus an *action expert*:
a narrower Llama stack with one layer per VLM layer. The prefix ``[image tokens of every camera, instruction
tokens, state token]`` runs through the VLM once per observation and leaves, per layer, its keys (after RoPE)
and values. Each denoising step runs the expert on the ``H`` action tokens; its layers alternate between

- *self-attention* layers (every ``self_attn_every_n_layers``-th): the action tokens' own keys and values are
  appended to the prefix's, and the action tokens attend to the whole prefix and causally to each other;
- *cross-attention* layers: the expert's ``k_proj`` / ``v_proj`` map the cached prefix keys and values (VLM
  width) to its own, and the action tokens attend to the prefix only.

The action tokens are ``MLP([linear(x), sincos(tau)])`` and the velocity is a linear map of the expert's final
normed tokens. Everything is padded: the state to ``max_state_dim`` and the action chunk to ``max_action_dim``
(32 in every published checkpoint), and the env sees the first ``env_action_dim`` dims.

Time convention. LeRobot's flow goes from noise at ``tau = 1`` to data at ``tau = 0`` with velocity
``u = noise - action``; ours (:mod:`policies.flow`) from noise at ``t = 0`` to data at ``t = 1`` with
``v = action - noise``. So ``t = 1 - tau`` and ``v(x, t) = -u(x, 1 - t)``; the Euler steps are then identical
(LeRobot: ``x += (-1/K) u``; ours: ``x += (1/K) v``), and every noise scheme of :mod:`policies.noise` applies to
the chain unchanged. The chain covers all ``max_action_dim`` dims: the padded dims are inputs of the expert
(its attention mixes them into the real ones), so leaving them out would make the chain's likelihood inexact.

The module tree mirrors LeRobot's (``model.vlm_with_expert.vlm.*``, ``model.vlm_with_expert.lm_expert.*``,
``model.state_proj`` ...), so a LeRobot ``model.safetensors`` loads without renaming. The VLM's parameters come
from ``transformers`` (``SmolVLMForConditionalGeneration`` built from the VLM folder's config); the layer
arithmetic (RoPE, eager attention with a finite mask value, residuals) follows LeRobot's ``smolvlm_with_expert``
so that outputs agree to float tolerance (``tests/test_smolvla.py`` against ``tests/fixtures/smolvla``).
Loading and exporting LeRobot checkpoints (config, weights, processor stats) is in :mod:`policies.smolvla_lerobot`.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from policies.chain import ChainSample, score_chain
from policies.flow import sample_flow_chain
from policies.mlp import SinusoidalEmbedding
from policies.noise import SCHEMES, FlowNoiseConfig, StepInputs

# The VLA's cached-conditioning pieces: SmolVLA caches its prefix the same way, so re-scoring shares them.
from policies.vla import VLAConditioning, VLAPolicy, _CachedConditioningView
from policies.vla_backbone import CAMERA_IMAGE_KEYS, VLAObservation, require_vla_dependencies

__all__ = ["SmolVLAPolicy", "SmolVLAPolicyConfig", "check_smolvlm_dir"]

logger = logging.getLogger(__name__)

# Our checkpoints keep the VLM's config and tokenizer (not its weights, which are in model.safetensors) here.
VLM_DIR = "vlm"
# LeRobot's NormalizerProcessorStep adds this to the std (normalising only; unnormalising multiplies by std).
LEROBOT_NORM_EPS = 1e-8
# The normalisation modes of LeRobot checkpoints this policy reproduces (not QUANTILES / QUANTILE10).
SMOLVLA_NORM_MODES = ["MEAN_STD", "MIN_MAX", "IDENTITY"]


def check_camera_features(cameras: list[str], image_keys: list[str]) -> None:
    """Refuse ``cameras`` that are not distinct known env cameras, one per checkpoint image feature (``image_keys``)."""
    unknown = [c for c in cameras if c not in CAMERA_IMAGE_KEYS]
    if not cameras or unknown or len(set(cameras)) != len(cameras):
        raise ValueError(
            f"policy.cameras={cameras} must be a non-empty list of distinct names from {list(CAMERA_IMAGE_KEYS)}."
        )
    if len(image_keys) != len(cameras):
        raise ValueError(
            f"policy.cameras={cameras} must name one env camera per checkpoint image feature "
            f"policy.image_keys={image_keys} (in that order)."
        )


@dataclass
class SmolVLAPolicyConfig:
    """Architecture of :class:`SmolVLAPolicy` (read from a LeRobot ``config.json``) and our fine-tuning choices.

    Attributes:
        vlm_path: the SmolVLM folder (config + tokenizer; weights are not needed, the checkpoint has them). A LeRobot
            checkpoint names it by the absolute path it was trained with (``vlm_model_name``); set this to where
            the folder is on this machine. Empty: use the checkpoint's path.
        horizon: H, LeRobot's ``chunk_size`` (actions per chunk). The env executes ``env.act_steps <= H`` of them
            (LeRobot's ``n_action_steps``, kept in ``lerobot_n_action_steps`` for export only).
        denoising_steps: K, LeRobot's ``num_steps``.
        cameras: our env cameras, in the order of ``image_keys``: camera ``cameras[i]`` feeds ``image_keys[i]``.
        image_keys: the checkpoint's image features (``observation.images.*``), in its order.
        image_size: ``(width, height)`` every image is resized to with padding (``resize_imgs_with_padding``).
        env_action_dim: actions the env takes: the first ``env_action_dim`` of the ``max_action_dim`` padded dims
            (LeRobot crops to its ``action`` feature's size). 0: the checkpoint's ``action`` feature size.
        max_state_dim, max_action_dim: the padding of state and action chunk (32 in published checkpoints).
        tokenizer_max_length, pad_language_to: instruction tokenisation (``"longest"`` or ``"max_length"``).
        num_vlm_layers, num_expert_layers, self_attn_every_n_layers, expert_width_multiplier, attention_mode,
        add_image_special_tokens, prefix_length, min_period, max_period: LeRobot's fields of the same names.
        state_norm, action_norm: normalisation modes from the checkpoint (``MEAN_STD``, ``MIN_MAX``, ``IDENTITY``).
        lerobot_n_action_steps: LeRobot's ``n_action_steps`` (written back on export).
        train_state_proj: whether supervised pretraining (``robo-rlft pretrain``) trains the state projection, as
            LeRobot's SFT does (its field of the same name); RL keeps it frozen (the prefix is cached without grad).
        noise: the noise scheme that makes the chain stochastic during RL fine-tuning.
        time_embed_dim: size of the time embedding the ``reinflow`` scheme's std head takes (unused by the model).
    """

    vlm_path: str = ""
    horizon: int = 50
    denoising_steps: int = 10
    cameras: list[str] = field(default_factory=lambda: ["agentview", "wrist"])
    image_keys: list[str] = field(default_factory=lambda: ["observation.images.agentview", "observation.images.wrist"])
    image_size: list[int] = field(default_factory=lambda: [512, 512])
    env_action_dim: int = 0
    max_state_dim: int = 32
    max_action_dim: int = 32
    tokenizer_max_length: int = 48
    pad_language_to: str = "longest"
    num_vlm_layers: int = 16
    num_expert_layers: int = -1
    self_attn_every_n_layers: int = 2
    expert_width_multiplier: float = 0.75
    attention_mode: str = "cross_attn"
    add_image_special_tokens: bool = False
    prefix_length: int = -1
    min_period: float = 4e-3
    max_period: float = 4.0
    state_norm: str = "MEAN_STD"
    action_norm: str = "MEAN_STD"
    lerobot_n_action_steps: int = 50
    train_state_proj: bool = True
    noise: FlowNoiseConfig = field(default_factory=lambda: FlowNoiseConfig(scheme="flow_noise"))
    time_embed_dim: int = 32

    def __post_init__(self) -> None:
        for name in ("horizon", "denoising_steps", "max_state_dim", "max_action_dim", "tokenizer_max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"policy.{name} must be >= 1, got {getattr(self, name)}.")
        if not 0 <= self.env_action_dim <= self.max_action_dim:
            raise ValueError(
                f"policy.env_action_dim={self.env_action_dim} must be in [0, policy.max_action_dim="
                f"{self.max_action_dim}] (0: the checkpoint's action size)."
            )
        check_camera_features(self.cameras, self.image_keys)
        if len(self.image_size) != 2 or min(self.image_size) < 1:
            raise ValueError(f"policy.image_size must be [width, height], got {self.image_size}.")
        if self.pad_language_to not in ("longest", "max_length"):
            raise ValueError(
                f"policy.pad_language_to={self.pad_language_to!r} is not allowed; choose one of "
                "['longest', 'max_length']."
            )
        if "cross" not in self.attention_mode and self.attention_mode != "self_attn":
            raise ValueError(
                f"policy.attention_mode={self.attention_mode!r} is not allowed; choose 'cross_attn' or 'self_attn'."
            )
        if self.add_image_special_tokens or self.prefix_length > 0:
            raise ValueError(
                "add_image_special_tokens and prefix_length > 0 are not supported yet (no published SmolVLA uses them)."
            )
        for name in ("state_norm", "action_norm"):
            if getattr(self, name) not in SMOLVLA_NORM_MODES:
                raise ValueError(
                    f"policy.{name}={getattr(self, name)!r} is not allowed; choose one of {SMOLVLA_NORM_MODES}."
                )
        if self.noise.scheme == "flow_sde" and self.denoising_steps < 2:
            raise ValueError(
                f"policy.noise.scheme='flow_sde' needs policy.denoising_steps >= 2, got {self.denoising_steps}."
            )


# ---- normalisation ----------------------------------------------------------------------------------------


class SmolVLANormalizer(nn.Module):
    """LeRobot's state normalisation and action unnormalisation, as affine maps held in buffers.

    ``normalize_obs(s) = (s - obs_mean) / obs_std`` and ``unnormalize_action(x) = x[..., :A] * action_std +
    action_mean`` (``A`` = the env's action dims). ``MEAN_STD`` gives ``obs_std = std + 1e-8`` (LeRobot's eps);
    ``MIN_MAX`` (to ``[-1, 1]``) is written in the same centre/half-range form. The buffers are named as in
    :class:`policies.normalizer.Normalizer` (``obs_mean`` is also what the chain code reads the device from), so
    checkpoints store them in ``normalization.safetensors`` like every other policy's.
    """

    def __init__(self, state_dim: int, action_dim: int) -> None:
        super().__init__()
        self.register_buffer("obs_mean", torch.zeros(state_dim))
        self.register_buffer("obs_std", torch.ones(state_dim))
        self.register_buffer("action_mean", torch.zeros(action_dim))
        self.register_buffer("action_std", torch.ones(action_dim))

    def normalize_obs(self, state: torch.Tensor) -> torch.Tensor:
        """``(B, state_dim)`` env units -> normalised."""
        return (state - self.obs_mean) / self.obs_std

    def normalize_action(self, action: torch.Tensor) -> torch.Tensor:
        """``(..., A)`` env units -> normalised (LeRobot divides by ``std + 1e-8`` here; the difference is
        below float32 resolution for any std above 1e-4)."""
        return (action - self.action_mean) / self.action_std

    def unnormalize_action(self, action: torch.Tensor) -> torch.Tensor:
        """``(..., A_pad)`` normalised chain values -> ``(..., A)`` env units (the padded dims dropped)."""
        return action[..., : self.action_mean.shape[0]] * self.action_std + self.action_mean

    def fit(self, state: np.ndarray, actions: np.ndarray, modes: tuple[str, str], std_floor: float) -> None:
        """Fill the buffers from demonstrations, ``state (N, S)`` and ``actions (N, A)`` in env units, in the
        checkpoint's ``modes`` (as LeRobot does when it trains a pretrained policy on a new dataset); the std is
        floored at ``std_floor`` so that a constant dimension is not blown up."""
        unsupported = [mode for mode in modes if mode not in SMOLVLA_NORM_MODES]
        if unsupported:
            raise ValueError(
                f"Pretraining sets the normalisation of {SMOLVLA_NORM_MODES} from the dataset; this checkpoint uses "
                f"{unsupported} (policy.state_norm / policy.action_norm={list(modes)}), which is not supported yet."
            )

        def feature_stats(values: np.ndarray) -> dict[str, torch.Tensor]:
            x = values.astype(np.float64)  # float64 so the variance of large N is accurate
            stats = {"mean": x.mean(0), "std": np.maximum(x.std(0), std_floor), "min": x.min(0), "max": x.max(0)}
            return {name: torch.as_tensor(value, dtype=torch.float32) for name, value in stats.items()}

        self.load_stats(feature_stats(state), feature_stats(actions), modes)

    def load_stats(
        self, state: dict[str, torch.Tensor], action: dict[str, torch.Tensor], modes: tuple[str, str]
    ) -> None:
        """Fill the buffers from LeRobot's per-feature stats (``mean``/``std`` or ``min``/``max``)."""
        for (mean_name, std_name), stats, mode, eps in (
            (("obs_mean", "obs_std"), state, modes[0], LEROBOT_NORM_EPS),
            (("action_mean", "action_std"), action, modes[1], 0.0),
        ):
            size = getattr(self, mean_name).shape[0]
            if mode == "MEAN_STD":
                center, scale = stats["mean"], stats["std"] + eps
            elif mode == "MIN_MAX":
                # LeRobot: 2 (x - min) / d - 1 and back (x + 1) / 2 d + min, with d = max - min (eps where 0), i.e.
                # centre min + d / 2 and scale d / 2.
                denom = stats["max"] - stats["min"]
                half = torch.where(denom == 0, torch.full_like(denom, LEROBOT_NORM_EPS), denom) / 2
                center, scale = stats["min"] + half, half
            else:
                center, scale = torch.zeros(size), torch.ones(size)
            if center.shape != (size,):
                raise ValueError(f"Normalisation stats of shape {tuple(center.shape)} for a {size}-D feature.")
            getattr(self, mean_name).copy_(center.float())
            getattr(self, std_name).copy_(scale.float())


# ---- the model: LeRobot's module tree ---------------------------------------------------------------------


def apply_rope(x: torch.Tensor, positions: torch.Tensor, max_wavelength: float = 10_000.0) -> torch.Tensor:
    """Rotary embedding of ``x (B, L, heads, D)`` at ``positions (B, L)``, computed in float32.

    SmolVLA applies its own RoPE (base 10,000, halves rotated) instead of the VLM's configured one.
    """
    half = x.shape[-1] // 2
    exponents = (2.0 / x.shape[-1]) * torch.arange(half, dtype=torch.float32, device=x.device)
    radians = positions[..., None].float() / (max_wavelength**exponents)  # (B, L, D/2)
    sin, cos = radians.sin()[:, :, None], radians.cos()[:, :, None]  # (B, L, 1, D/2)
    x1, x2 = x.float().split(half, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def sincos_time_embedding(tau: torch.Tensor, width: int, min_period: float, max_period: float) -> torch.Tensor:
    """``tau (N,)`` LeRobot time -> ``(N, width)`` sine-cosine embedding, periods log-spaced from min to max, computed
    in float64 (openpi's ``create_sinusoidal_pos_embedding``)."""
    fraction = torch.linspace(0.0, 1.0, width // 2, dtype=torch.float64, device=tau.device)
    period = min_period * (max_period / min_period) ** fraction
    angle = (2 * math.pi / period)[None] * tau[:, None]  # (N, width/2)
    return torch.cat([angle.sin(), angle.cos()], dim=1).float()


def attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, num_heads: int
) -> torch.Tensor:
    """Grouped-query attention ``q (B, T, heads, D)``, ``k/v (B, S, kv_heads, D)``, ``mask (B, T, S)`` bool
    -> ``(B, T, heads*D)``.

    Masked logits get the most negative float rather than -inf: a query with no valid key (a padding token
    of the prefix) then gets uniform weights instead of NaN, which would leak into the next layer's values.
    """
    groups = num_heads // key.shape[2]
    key = key.repeat_interleave(groups, dim=2).transpose(1, 2).float()  # (B, heads, S, D)
    value = value.repeat_interleave(groups, dim=2).transpose(1, 2)
    logits = torch.matmul(query.transpose(1, 2).float(), key.transpose(2, 3)) * query.shape[-1] ** -0.5
    logits = torch.where(mask[:, None], logits, torch.finfo(logits.dtype).min)  # (B, heads, T, S)
    out = torch.matmul(logits.softmax(-1).to(value.dtype), value)  # (B, heads, T, D)
    return out.transpose(1, 2).flatten(2)


def _vision_positions(rows: int, cols: int, per_side: int, device: torch.device) -> torch.Tensor:
    """``(rows * cols,)`` position-embedding ids of an image's patch grid, as transformers 4.x computes them.

    Each patch's fractional coordinate ``i / n * (1 - 1e-6)`` is bucketed on the ``1 / per_side`` grid. The
    ``(1 - 1e-6)`` pushes coordinates that sit on a boundary into the bucket below (on a 4-patch side the rows
    get ids 0, 0, 1, 2). transformers 5 clamps instead (0, 1, 2, 3). SmolVLA was trained, and LeRobot 0.4 runs,
    on transformers 4.x, so the 4.x ids are the ones its weights expect.
    """
    boundaries = torch.arange(1 / per_side, 1.0, 1 / per_side, device=device)
    ids = []
    for count in (rows, cols):
        coords = torch.arange(count, device=device, dtype=torch.float32) / count * (1 - 1e-6)
        ids.append(torch.bucketize(coords, boundaries, right=True))
    return (ids[0][:, None] * per_side + ids[1]).flatten()


def _vision_features(vision_model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """SmolVLM's vision tower on ``pixel_values (B, 3, S, S)`` -> ``(B, patches, W_vision)``, with the patch
    position ids of :func:`_vision_positions` (every patch valid, so the encoder needs no mask)."""
    embeddings = vision_model.embeddings
    patches = embeddings.patch_embedding(pixel_values)  # (B, W, rows, cols)
    positions = _vision_positions(*patches.shape[2:], embeddings.num_patches_per_side, pixel_values.device)
    hidden = patches.flatten(2).transpose(1, 2) + embeddings.position_embedding(positions)[None]
    hidden = vision_model.encoder(inputs_embeds=hidden, attention_mask=None).last_hidden_state
    return vision_model.post_layernorm(hidden)


def _expert_intermediate_size(width: int, multiplier: int = 4, multiple_of: int = 256) -> int:
    """The action expert's MLP width for a hidden ``width`` (LeRobot's ``get_intermediate_size``)."""
    hidden = int(multiplier * int(2 * width / 3))
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


class SmolVLMWithExpert(nn.Module):
    """The truncated SmolVLM (``vlm``) and the action expert (``lm_expert``), with LeRobot's parameter names."""

    def __init__(self, vlm_config: Any, config: SmolVLAPolicyConfig) -> None:
        super().__init__()
        transformers = require_vla_dependencies()
        self.vlm = transformers.SmolVLMForConditionalGeneration(vlm_config)
        text = self.vlm.model.text_model
        if config.num_vlm_layers > 0:
            text.layers = text.layers[: config.num_vlm_layers]
        self.num_vlm_layers = len(text.layers)
        text_config = vlm_config.text_config
        expert_config = copy.deepcopy(text_config)
        width = int(text_config.hidden_size * config.expert_width_multiplier)
        expert_config.hidden_size = width
        expert_config.intermediate_size = _expert_intermediate_size(width)
        expert_config.num_hidden_layers = (
            config.num_expert_layers if config.num_expert_layers > 0 else self.num_vlm_layers
        )
        if self.num_vlm_layers % expert_config.num_hidden_layers:
            raise ValueError(
                f"num_vlm_layers={self.num_vlm_layers} must be a multiple of num_expert_layers="
                f"{expert_config.num_hidden_layers}."
            )
        self.lm_expert = transformers.AutoModel.from_config(expert_config)
        self.self_attn_every = config.self_attn_every_n_layers
        self.cross = "cross" in config.attention_mode
        kv_width = text_config.num_key_value_heads * text_config.head_dim
        for index in self.cross_layers():
            # Cross-attention layers project the VLM's (RoPE'd) prefix keys and values, of the VLM's kv width.
            attn = self.lm_expert.layers[index].self_attn
            bias = expert_config.attention_bias
            attn.k_proj = nn.Linear(kv_width, attn.k_proj.out_features, bias=bias)
            attn.v_proj = nn.Linear(kv_width, attn.v_proj.out_features, bias=bias)
        self.lm_expert.embed_tokens = None
        self.num_heads = text_config.num_attention_heads
        self.head_dim = text_config.head_dim
        self.expert_width = width
        self.expert_every = self.num_vlm_layers // len(self.lm_expert.layers)

    def cross_layers(self) -> list[int]:
        """Expert layers that cross-attend to the prefix (the others self-attend over prefix + actions)."""
        if not self.cross:
            return []
        return [
            i
            for i in range(len(self.lm_expert.layers))
            if not (self.self_attn_every > 0 and i % self.self_attn_every == 0)
        ]

    def is_self_attn_layer(self, layer: int) -> bool:
        """VLM layer ``layer`` runs the expert in self-attention (LeRobot's rule, on the VLM layer index)."""
        return not self.cross or (self.self_attn_every > 0 and layer % self.self_attn_every == 0)

    def expert_layer(self, layer: int) -> nn.Module | None:
        """The expert layer paired with VLM layer ``layer`` (None: the action tokens skip this layer)."""
        if layer % self.expert_every:
            return None
        return self.lm_expert.layers[layer // self.expert_every]

    @staticmethod
    def _qkv(layer: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normed ``hidden (B, L, W)`` -> query, key, value ``(B, L, heads, D)`` of a Llama layer."""
        normed = layer.input_layernorm(hidden)
        attn = layer.self_attn
        shape = (*normed.shape[:-1], -1, attn.head_dim)
        return attn.q_proj(normed).view(shape), attn.k_proj(normed).view(shape), attn.v_proj(normed).view(shape)

    @staticmethod
    def _finish(layer: nn.Module, hidden: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """Output projection, residual, post-attention norm, MLP, residual."""
        hidden = hidden + layer.self_attn.o_proj(attended)
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))

    def prefix_cache(
        self, embeds: torch.Tensor, mask_2d: torch.Tensor, positions: torch.Tensor
    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """Run the prefix ``embeds (B, L, W_vlm)`` through the VLM layers.

        Returns:
            per VLM layer the prefix keys (after RoPE) and values, each ``(B, L, kv_heads, D)``, and the final
            normed prefix features ``(B, L, W_vlm)``.
        """
        cache = []
        hidden = embeds
        for layer in self.vlm.model.text_model.layers:
            query, key, value = self._qkv(layer, hidden)
            query, key = apply_rope(query, positions), apply_rope(key, positions)
            cache.append((key, value))
            hidden = self._finish(layer, hidden, attention(query, key, value, mask_2d, self.num_heads))
        return cache, self.vlm.model.text_model.norm(hidden)

    def expert_forward(
        self, suffix: torch.Tensor, cache: list[tuple[torch.Tensor, torch.Tensor]], prefix_mask: torch.Tensor
    ) -> torch.Tensor:
        """The action tokens ``suffix (N, H, W)`` through the expert, given the prefix cache of N rows and its
        ``(N, L)`` validity mask -> final normed tokens ``(N, H, W)``."""
        batch, horizon = suffix.shape[:2]
        device = suffix.device
        causal = torch.ones(horizon, horizon, dtype=torch.bool, device=device).tril()  # (H, H)
        cross_mask = prefix_mask[:, None, :].expand(batch, horizon, -1)  # (N, H, L)
        full_mask = torch.cat([cross_mask, causal.expand(batch, -1, -1)], dim=2)  # (N, H, L + H)
        steps = torch.arange(horizon, device=device)[None]  # (1, H)
        # Self-attention positions continue after the prefix's valid tokens; cross-attention ones start at 0.
        self_positions = prefix_mask.sum(-1, keepdim=True) + steps  # (N, H)
        cross_positions = steps.expand(batch, -1)
        hidden = suffix
        for index, (prefix_key, prefix_value) in enumerate(cache):
            layer = self.expert_layer(index)
            if layer is None:
                continue
            if self.is_self_attn_layer(index):
                query, key, value = self._qkv(layer, hidden)
                query, key = apply_rope(query, self_positions), apply_rope(key, self_positions)
                key, value = torch.cat([prefix_key, key], dim=1), torch.cat([prefix_value, value], dim=1)
                attended = attention(query, key, value, full_mask, self.num_heads)
            else:
                normed = layer.input_layernorm(hidden)
                attn = layer.self_attn
                query = apply_rope(attn.q_proj(normed).view(batch, horizon, -1, attn.head_dim), cross_positions)
                key = attn.k_proj(prefix_key.flatten(2)).view(*prefix_key.shape[:2], -1, attn.head_dim)
                value = attn.v_proj(prefix_value.flatten(2)).view(*prefix_value.shape[:2], -1, attn.head_dim)
                attended = attention(query, key, value, cross_mask, self.num_heads)
            hidden = self._finish(layer, hidden, attended)
        return self.lm_expert.norm(hidden)


class SmolVLAFlowModel(nn.Module):
    """LeRobot's ``VLAFlowMatching``: the VLM with its expert, and the state, action and time projections."""

    def __init__(self, vlm_config: Any, config: SmolVLAPolicyConfig) -> None:
        super().__init__()
        self.vlm_with_expert = SmolVLMWithExpert(vlm_config, config)
        width = self.vlm_with_expert.expert_width
        self.state_proj = nn.Linear(config.max_state_dim, vlm_config.text_config.hidden_size)
        self.action_in_proj = nn.Linear(config.max_action_dim, width)
        self.action_out_proj = nn.Linear(width, config.max_action_dim)
        self.action_time_mlp_in = nn.Linear(2 * width, width)
        self.action_time_mlp_out = nn.Linear(width, width)
        self.min_period, self.max_period = config.min_period, config.max_period

    def time_embedding(self, tau: torch.Tensor) -> torch.Tensor:
        """``tau (N,)`` LeRobot time -> ``(N, W)`` sine-cosine embedding."""
        return sincos_time_embedding(tau, self.vlm_with_expert.expert_width, self.min_period, self.max_period)

    def velocity(
        self, x: torch.Tensor, tau: torch.Tensor, cache: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """LeRobot's ``denoise_step``: ``x (N, H, A_pad)`` at time ``tau (N,)`` -> ``u (N, H, A_pad)`` (pointing
        from data to noise) and the expert's final tokens averaged over the chunk ``(N, W)``."""
        actions = self.action_in_proj(x)  # (N, H, W)
        time = self.time_embedding(tau)[:, None].expand_as(actions)
        tokens = self.action_time_mlp_out(F.silu(self.action_time_mlp_in(torch.cat([actions, time], dim=2))))
        out = self.vlm_with_expert.expert_forward(tokens, cache, mask)  # (N, H, W)
        return self.action_out_proj(out.float()), out.mean(1)


# ---- the policy -------------------------------------------------------------------------------------------


@dataclass
class SmolVLAConditioning(VLAConditioning):
    """:class:`policies.vla.VLAConditioning` whose ``prefix_kv`` holds per VLM layer the prefix keys (after
    RoPE) and values ``(B, L, kv_heads, D)``, and whose ``state`` is the normalised, unpadded state."""


class SmolVLAPolicy(nn.Module):
    """SmolVLA ``pi(a_{1:H} | images, instruction, state)`` with the chain interface of :class:`policies.vla.VLAPolicy`.

    Takes :class:`policies.vla_backbone.VLAObservation` batches (``observation_kind = "vla"``), so rollouts,
    evaluation and the critic's input reuse the VLA's adapter. ``obs_dim`` is the env's state size and
    ``action_dim`` is the *chain's* action size, ``max_action_dim`` (the env gets the first
    ``config.env_action_dim`` dims of each action). The VLM and the state projection are frozen (the prefix is
    computed once per observation, without grad); the action expert, the action/time projections and the noise
    head train.
    """

    policy_type = "smolvla"
    observation_kind = "vla"
    FINETUNE_FIELDS: tuple[str, ...] = ("noise",)

    def __init__(self, obs_dim: int, action_dim: int, config: SmolVLAPolicyConfig, vlm_dir: str | Path | None = None):
        """Build an untrained policy; ``vlm_dir`` (default ``config.vlm_path``) supplies the VLM's config and
        tokenizer. ``action_dim`` must equal ``config.max_action_dim``."""
        super().__init__()
        if action_dim != config.max_action_dim:
            raise ValueError(
                f"SmolVLAPolicy's chain has max_action_dim={config.max_action_dim} dims, got action_dim={action_dim}."
            )
        if obs_dim > config.max_state_dim:
            raise ValueError(
                f"The env's state has {obs_dim} dims, more than policy.max_state_dim={config.max_state_dim}."
            )
        transformers = require_vla_dependencies()
        vlm_dir = Path(vlm_dir if vlm_dir is not None else config.vlm_path)
        check_smolvlm_dir(vlm_dir, "policy.vlm_path")
        self.obs_dim = obs_dim
        self.action_dim = action_dim
        self.config = config
        self.horizon = config.horizon
        self.num_steps = config.denoising_steps
        self.env_action_dim = config.env_action_dim or action_dim
        self.vlm_dir = vlm_dir
        vlm_config = transformers.AutoConfig.from_pretrained(vlm_dir)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(vlm_dir)
        self.model = SmolVLAFlowModel(vlm_config, config)
        self.normalizer = SmolVLANormalizer(obs_dim, self.env_action_dim)
        self.time_embed = SinusoidalEmbedding(config.time_embed_dim)
        self.noise = self._build_scheme(config.noise)
        # Frozen: the VLM (its prefix is cached without grad) and the state projection, whose output is a prefix
        # token (training it would need gradients through every VLM layer).
        self.model.vlm_with_expert.vlm.requires_grad_(False)
        self.model.state_proj.requires_grad_(False)
        self.train(self.training)

    # ---- construction ----
    @classmethod
    def from_checkpoint_dir(
        cls, path: str | Path, obs_dim: int, action_dim: int, config: SmolVLAPolicyConfig
    ) -> SmolVLAPolicy:
        """An untrained policy shaped like our checkpoint at ``path`` (its VLM config and tokenizer in ``path/vlm``)."""
        return cls(obs_dim, action_dim, config, vlm_dir=Path(path) / VLM_DIR)

    @staticmethod
    def accepts_external_checkpoint(path: str | Path) -> bool:
        """``path`` is a checkpoint of another framework this class loads (a LeRobot SmolVLA checkpoint)."""
        from policies.smolvla_lerobot import is_lerobot_checkpoint

        return is_lerobot_checkpoint(path)

    @classmethod
    def from_external_checkpoint(
        cls, path: str | Path, obs_dim: int, action_dim: int, settings: Any | None = None
    ) -> SmolVLAPolicy:
        """Load a LeRobot checkpoint for an env with ``obs_dim`` state and ``action_dim`` action dims; ``settings``
        is the run's ``policy`` section (``vlm_path``, ``cameras``; see
        :func:`policies.smolvla_lerobot.load_lerobot_checkpoint`)."""
        from policies.smolvla_lerobot import load_lerobot_checkpoint

        return load_lerobot_checkpoint(path, state_dim=obs_dim, action_dim=action_dim, settings=settings)

    def _build_scheme(self, config: FlowNoiseConfig) -> nn.Module:
        obs_time_dim = self.obs_dim + self.config.time_embed_dim
        width = self.model.vlm_with_expert.expert_width
        return SCHEMES[config.scheme](obs_time_dim, width, self.horizon, self.action_dim, config)

    def train(self, mode: bool = True) -> SmolVLAPolicy:
        """Train mode for the expert; the VLM always computes in eval mode (the same prefix when sampling and
        re-scoring)."""
        super().train(mode)
        self.model.vlm_with_expert.vlm.eval()
        return self

    def configure_finetuning(self, settings: Any) -> SmolVLAPolicy:
        """Apply the run's fine-tuning fields (``FINETUNE_FIELDS``: the noise scheme); returns the policy."""
        self.configure_noise(settings.noise)
        return self

    def prepare_pretraining(self) -> None:
        """Supervised pretraining trains the state projection too (``config.train_state_proj``, as LeRobot's SFT)."""
        self.model.state_proj.requires_grad_(self.config.train_state_proj)

    def finish_pretraining(self) -> None:
        """Freeze the state projection again: RL computes the prefix once per observation, without grad."""
        self.model.state_proj.requires_grad_(False)

    # The same scheme switch as the VLA's (both keep their scheme in ``self.noise`` / ``config.noise``).
    configure_noise = VLAPolicy.configure_noise

    # ---- inputs ----
    def _images(self, obs: VLAObservation) -> list[torch.Tensor]:
        """Per camera ``(B, 3, h, w)`` in ``[-1, 1]``: resized keeping the aspect ratio, padded on the left and top
        with 0 (before the shift to ``[-1, 1]``, so padding is -1), as LeRobot's ``resize_with_pad``."""
        width, height = self.config.image_size
        images = []
        for camera in self.config.cameras:
            image = obs.images[camera].permute(0, 3, 1, 2).float() / 255.0  # (B, 3, H, W)
            ratio = max(image.shape[3] / width, image.shape[2] / height)
            size = (int(image.shape[2] / ratio), int(image.shape[3] / ratio))
            image = F.interpolate(image, size=size, mode="bilinear", align_corners=False)
            image = F.pad(image, (max(0, width - size[1]), 0, max(0, height - size[0]), 0), value=0.0)
            images.append(image * 2.0 - 1.0)
        return images

    def _tokens(self, instructions: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, T)`` token ids and bool mask of the instructions, each ending in a newline (LeRobot's processor)."""
        texts = [text if text.endswith("\n") else f"{text}\n" for text in instructions]
        out = self.tokenizer(
            texts,
            max_length=self.config.tokenizer_max_length,
            truncation=True,
            padding=self.config.pad_language_to,
            padding_side="right",
            return_tensors="pt",
        )
        return out["input_ids"].to(device), out["attention_mask"].to(device).bool()

    def _prefix(self, obs: VLAObservation) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The prefix embeddings ``(B, L, W_vlm)``, validity ``(B, L)``, its 2-D attention mask ``(B, L, L)`` and the
        normalised state ``(B, obs_dim)``."""
        vlm = self.model.vlm_with_expert.vlm.model
        embeds, valid = [], []
        for image in self._images(obs):
            features = vlm.connector(_vision_features(vlm.vision_model, image))  # (B, n, W)
            embeds.append(features * math.sqrt(features.shape[-1]))
            valid.append(torch.ones(features.shape[:2], dtype=torch.bool, device=features.device))
        tokens, token_mask = self._tokens(obs.instructions, obs.state.device)
        language = vlm.text_model.get_input_embeddings()(tokens)
        embeds.append(language * math.sqrt(language.shape[-1]))
        valid.append(token_mask)
        state = self.normalizer.normalize_obs(obs.state)
        padded = F.pad(state, (0, self.config.max_state_dim - state.shape[1]))
        embeds.append(self.model.state_proj(padded)[:, None])
        valid.append(torch.ones(state.shape[0], 1, dtype=torch.bool, device=state.device))
        embeds, valid = torch.cat(embeds, 1), torch.cat(valid, 1)
        # Images and language attend to each other bidirectionally; the state token (its own block) attends to
        # them, they do not attend to it (LeRobot's make_att_2d_masks with att_masks = [0 ... 0, 1]).
        block = torch.zeros(embeds.shape[1], dtype=torch.long, device=embeds.device)
        block[-1] = 1
        mask_2d = (block[None, :] <= block[:, None])[None] & valid[:, None, :] & valid[:, :, None]
        return embeds, valid, mask_2d, state

    def condition(self, obs: VLAObservation) -> SmolVLAConditioning:
        """Run the VLM once on ``obs``: what every denoising step needs (the prefix cache, state, masks)."""
        obs.validate(self.config.cameras, self.obs_dim)
        obs = obs.to(self.normalizer.obs_mean.device)
        # Without grad (RL caches the prefix), except while SFT trains the state projection, whose token runs
        # through the VLM.
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.model.state_proj.weight.requires_grad):
            embeds, valid, mask_2d, state = self._prefix(obs)
            positions = valid.long().cumsum(1) - 1  # (B, L): padding does not advance the position
            cache, features = self.model.vlm_with_expert.prefix_cache(embeds, mask_2d, positions)
        weights = valid[..., None].float()
        pooled = (features * weights).sum(1) / weights.sum(1).clamp_min(1.0)  # (B, W_vlm), mean over valid tokens
        return SmolVLAConditioning(state, cache, valid, pooled_prefix=pooled)

    # ---- the one place that defines the chain's time grid, means and stds ----
    def time_grid(self) -> torch.Tensor:
        """``(K,)`` start times ``t_k = k / K`` of the Euler steps (LeRobot's ``tau = 1 - t``)."""
        return torch.arange(self.num_steps, device=self.normalizer.obs_mean.device) / self.num_steps

    def velocity_and_features(
        self, x: torch.Tensor, t: torch.Tensor, cond: SmolVLAConditioning
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x (N, H, A_pad), t (N,)`` in our time -> velocity ``(N, H, A_pad)`` (toward the data) and the expert's
        pooled features ``(N, W)``. ``cond`` holds N rows (``cond.rows``) or N observations."""
        rows = cond.rows
        # Re-scoring gathers each (chain, step) pair's prefix cache; the VLM itself ran once per observation.
        cache = cond.prefix_kv if rows is None else [(k[rows], v[rows]) for k, v in cond.prefix_kv]
        u, features = self.model.velocity(x, 1.0 - t, cache, cond.gather(cond.prefix_mask))
        return -u, features

    def step_inputs(self, x: torch.Tensor, k: torch.Tensor, cond: SmolVLAConditioning) -> StepInputs:
        """Everything a scheme needs for step ``k``: ``x (N, H, A_pad), k (N,) long``, conditioning of N rows."""
        t = self.time_grid()[k]
        velocity, features = self.velocity_and_features(x, t, cond)
        obs_time = torch.cat([cond.gather(cond.state), self.time_embed(t)], dim=-1)  # reinflow's std head input
        return StepInputs(x, t, 1.0 / self.num_steps, velocity, obs_time, features)

    def transition(
        self, x: torch.Tensor, k: torch.Tensor, cond: SmolVLAConditioning
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std ``(N, H, A_pad)`` of a stochastic step ``x_{k+1} | x_k``."""
        return self.noise.mean_std(self.step_inputs(x, k, cond))

    # ---- chain interface ----
    def sample(
        self, obs: VLAObservation, deterministic: bool = False, generator: torch.Generator | None = None
    ) -> ChainSample:
        """An action chunk ``(B, H, env_action_dim)`` (env units) and its chain ``(B, K+1, H, A_pad)``.

        Deterministic sampling is LeRobot's Euler ODE (how the policy is evaluated and deployed).
        """
        return self._sample(self.condition(obs), obs.batch_size, deterministic, generator)

    def _sample(
        self, cond: SmolVLAConditioning, batch: int, deterministic: bool, generator: torch.Generator | None
    ) -> ChainSample:
        sample = sample_flow_chain(self, cond, batch, deterministic, generator)
        # sample_flow_chain clips the final x to [-1, 1], the range of our min/max-normalised policies. SmolVLA's
        # actions are mean/std-normalised and LeRobot never clips them: take the unclipped end of the chain.
        return dataclasses.replace(sample, actions=self.normalizer.unnormalize_action(sample.chain[:, -1]))

    def log_prob_and_entropy(
        self, obs: VLAObservation, chain: torch.Tensor, stochastic: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Re-score a stored chain ``(B, K+1, H, A_pad)`` (``stochastic (B, K)``): one VLM forward per observation,
        one batched expert forward over all stochastic (chain, step) pairs. Returns ``(B, K, H, A_pad)`` each."""
        return score_chain(_CachedConditioningView(self, self.condition(obs)), obs, chain, stochastic)

    def pretrain_loss(self, obs: VLAObservation, actions: torch.Tensor) -> dict[str, torch.Tensor]:
        """Flow-matching loss of the expert on ``actions (B, H, env_action_dim)`` (env units), padded with zeros
        to the chain's dims, the loss taken over the env's dims only (as LeRobot does)."""
        cond = self.condition(obs)
        x1 = self.normalizer.normalize_action(actions.to(self.normalizer.obs_mean.device))
        x1 = F.pad(x1, (0, self.action_dim - x1.shape[-1]))
        x0 = torch.randn_like(x1)
        t = torch.rand(x1.shape[0], device=x1.device)
        x_t = (1 - t)[:, None, None] * x0 + t[:, None, None] * x1
        velocity, _ = self.velocity_and_features(x_t, t, cond)
        error = (velocity - (x1 - x0))[..., : self.env_action_dim]
        return {"flow_matching": error.pow(2).mean()}

    # ---- the critic's input (as VLAPolicy) ----
    def critic_feature_dim(self, source: str = "prefix") -> int:
        """Size of :meth:`critic_features`: the VLM's (``prefix``) or the expert's (``expert``) width + ``obs_dim``."""
        widths = {
            "prefix": self.model.vlm_with_expert.vlm.config.text_config.hidden_size,
            "expert": self.model.vlm_with_expert.expert_width,
        }
        if source not in widths:
            raise ValueError(f"policy.critic_input={source!r} is not allowed; choose one of {list(widths)}.")
        return widths[source] + self.obs_dim

    @torch.no_grad()
    def critic_features(self, obs: VLAObservation, source: str = "prefix") -> torch.Tensor:
        """``(B, D)`` detached critic input: the pooled prefix (or expert features at ``x = 0, t = 0``) and the
        normalised state."""
        return self._critic_features(self.condition(obs), source)

    @torch.no_grad()
    def sample_with_critic_features(
        self, obs: VLAObservation, source: str = "prefix", generator: torch.Generator | None = None
    ) -> tuple[ChainSample, torch.Tensor]:
        """:meth:`sample` (stochastic) and :meth:`critic_features` of ``obs`` from one VLM forward."""
        cond = self.condition(obs)
        return self._sample(cond, obs.batch_size, False, generator), self._critic_features(cond, source)

    def _critic_features(self, cond: SmolVLAConditioning, source: str) -> torch.Tensor:
        self.critic_feature_dim(source)  # validates source
        if source == "prefix":
            pooled = cond.pooled_prefix
        else:
            batch = cond.state.shape[0]
            x = torch.zeros(batch, self.horizon, self.action_dim, device=cond.state.device)
            _, pooled = self.velocity_and_features(x, torch.zeros(batch, device=x.device), cond)
        return torch.cat([pooled, cond.state], dim=-1).detach()

    # ---- checkpoint assets ----
    def save_assets(self, path: Path) -> None:
        """Copy the VLM folder's config, tokenizer and processor files (not its weights, which are in
        ``model.safetensors``) to ``path / "vlm"``, so our checkpoint loads on any machine."""
        target = path / VLM_DIR
        target.mkdir(parents=True, exist_ok=True)
        for item in self.vlm_dir.iterdir():
            if item.is_file() and item.suffix not in (".safetensors", ".bin", ".pt"):
                shutil.copy2(item, target / item.name)

    def parameter_counts(self) -> dict[str, int]:
        """Parameters of the VLM, the expert (with its projections) and the noise head, and how many train."""
        vlm = sum(p.numel() for p in self.model.vlm_with_expert.vlm.parameters())
        counts = {"vlm": vlm, "expert": sum(p.numel() for p in self.model.parameters()) - vlm}
        counts["noise"] = sum(p.numel() for p in self.noise.parameters())
        counts["trainable"] = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return counts


# ---- the VLM folder ---------------------------------------------------------------------------------------


def check_smolvlm_dir(vlm_dir: Path, override_key: str = "policy.vlm_path", checkpoint: Path | None = None) -> None:
    """Raise FileNotFoundError saying which VLM folder was expected and how to point to it."""
    source = f" (the checkpoint {str(checkpoint)!r} names it in config.json's vlm_model_name)" if checkpoint else ""
    if not vlm_dir.is_dir():
        raise FileNotFoundError(
            f"SmolVLA needs its VLM folder (config and tokenizer of a SmolVLM) at {str(vlm_dir)!r}{source}, which does "
            f"not exist. Pass {override_key}=PATH with the folder on this machine (e.g. a local copy of "
            "HuggingFaceTB/SmolVLM2-500M-Video-Instruct)."
        )
    missing = [name for name in ("config.json", "tokenizer_config.json") if not (vlm_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"The VLM folder {str(vlm_dir)!r} lacks {missing}; pass {override_key}=PATH.")
