"""π0 and π0.5 (Physical Intelligence, 2024/2025) with LeRobot's checkpoint layout, driven by our chain machinery.

Both are a PaliGemma (SigLIP vision tower + Gemma language model, from ``transformers``) and a narrower Gemma
*action expert* with the same depth and head layout. Every layer attends *jointly*: the expert's tokens (the
*suffix*) query the keys and values of the PaliGemma tokens of the same layer (the *prefix*) and their own. The
prefix ``[image tokens of every camera, instruction tokens]`` attends bidirectionally within itself and never to the
suffix, so it runs once per observation and leaves per-layer keys (after RoPE) and values, reused by every
denoising step, when sampling and when re-scoring a stored chain. The suffix attends to the whole (valid) prefix and
block-causally to itself:

- **π0** (``variant="pi0"``): suffix ``[state token, a_1 .. a_H]``. The state token (``state_proj`` of the padded
  normalised state) is its own block; the action tokens ``MLP([action_in_proj(x), sincos(tau)])`` form the next
  block (bidirectional among themselves, they see the state; the state does not see them).
- **π0.5** (``variant="pi05"``): suffix ``[a_1 .. a_H]`` (``action_in_proj(x)``, one block). The time enters every
  expert RMSNorm through adaptive RMSNorm (adaRMS): ``cond = silu(time_mlp_out(silu(time_mlp_in(sincos(tau)))))``
  gives per-norm ``scale, shift, gate``; the normed input is ``x_hat (1 + scale) + shift`` and the residual branch is
  multiplied by ``gate``. The state is not a token: it is discretised into 256 bins and written into the prompt
  (``"Task: ..., State: 12 200 ...;\\nAction: "``), as LeRobot's ``Pi05PrepareStateTokenizerProcessorStep`` does.

The velocity is ``action_out_proj`` of the expert's final normed action tokens. Arithmetic follows LeRobot 0.4.2's
``modeling_pi0`` / ``modeling_pi05`` on its patched ``transformers`` (openpi's ``transformers_replace``): image
features are the projector's output *without* PaliGemma's ``1/sqrt(width)`` (the fork removes it, and its Gemma does
not scale inputs by ``sqrt(width)``), language embeddings are scaled by ``sqrt(width)``, Gemma RMSNorm is
``x_hat (1 + w)``, attention is eager with an additive mask and a float32 softmax, RoPE base 10,000, positions are
the cumulative count of valid tokens (the suffix continues after the prefix's). Time conventions, the sine-cosine
time embedding and padding are SmolVLA's (:mod:`policies.smolvla`): ``t = 1 - tau``, ``v(x, t) = -u(x, 1 - t)``.
The reference cannot run here (it needs the git-only fork; 3.5B parameters at its smallest sizes), so outputs are not
compared with it: ``README`` says what is verified (parameter names and shapes against LeRobot's own constructors,
``tests/fixtures/pi0``; loading; finite forward passes; the chain's likelihood).

The module tree mirrors LeRobot's (``model.paligemma_with_expert.paligemma.*``, ``...gemma_expert.*``,
``model.action_in_proj`` ...). One difference of ``transformers`` versions is absorbed in the tree rather than by
renaming keys: LeRobot's ``transformers`` 4.57 names the SigLIP tower's parameters ``vision_tower.vision_model.*``,
transformers 5 ``vision_tower.*``, so our tower sits one module deeper (:class:`_VisionModelSlot`). Loading LeRobot
checkpoints is in :mod:`policies.pi0_lerobot`.
"""

from __future__ import annotations

import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from policies.mlp import SinusoidalEmbedding
from policies.noise import SCHEMES, FlowNoiseConfig

# SmolVLA's pieces that π0 shares: RoPE with halves rotated (Gemma's rotate_half form), grouped-query attention with
# a finite mask value, the LeRobot normaliser, its conditioning, and its chain methods (borrowed below).
from policies.smolvla import (
    SMOLVLA_NORM_MODES,
    SmolVLAConditioning,
    SmolVLANormalizer,
    SmolVLAPolicy,
    apply_rope,
    attention,
    check_camera_features,
    sincos_time_embedding,
)
from policies.vla import VLAPolicy
from policies.vla_backbone import VLAObservation, require_vla_dependencies

__all__ = ["GEMMA_VARIANTS", "VISION_VARIANTS", "PI0Policy", "PI0PolicyConfig", "check_tokenizer_dir"]

logger = logging.getLogger(__name__)

VARIANTS = ("pi0", "pi05")
# Our checkpoints keep the PaliGemma tokenizer here (a LeRobot checkpoint has none).
TOKENIZER_DIR = "tokenizer"
# LeRobot's QUANTILES (q01/q99 to [-1, 1], π0.5's default) is MIN_MAX with the quantiles as the range.
NORM_MODES = [*SMOLVLA_NORM_MODES, "QUANTILES"]
# π0.5 writes the normalised state into its prompt as one of this many bins of [-1, 1] (openpi's tokenizer).
STATE_BINS = 256


class GemmaSize(NamedTuple):
    """A Gemma stack's size (openpi's ``gemma.Config``): width, layers, MLP width, heads, kv heads, head size."""

    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


# LeRobot's two variants (``get_gemma_config``), and two miniatures of them with the same structure (ours, for
# tests: not LeRobot variants).
GEMMA_VARIANTS: dict[str, GemmaSize] = {
    "gemma_300m": GemmaSize(1024, 18, 4096, 8, 1, 256),
    "gemma_2b": GemmaSize(2048, 18, 16_384, 8, 1, 256),
    "gemma_tiny_300m": GemmaSize(16, 2, 32, 2, 1, 8),
    "gemma_tiny_2b": GemmaSize(32, 2, 64, 2, 1, 8),
}
# SigLIP towers: LeRobot's So400m/14 at 224 px (256 tokens per image; its intermediate size 4304 is set by LeRobot),
# and a miniature (ours, for tests: 32 px, 16 tokens per image).
VISION_VARIANTS: dict[str, dict[str, int]] = {
    "so400m": {
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "num_hidden_layers": 27,
        "num_attention_heads": 16,
        "patch_size": 14,
        "image_size": 224,
    },
    "tiny": {
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "patch_size": 8,
        "image_size": 32,
    },
}


@dataclass
class PI0PolicyConfig:
    """Architecture of :class:`PI0Policy` (read from a LeRobot ``config.json``) and our fine-tuning choices.

    Attributes:
        variant: ``pi0`` (state token, action-time MLP) or ``pi05`` (state in the prompt, adaRMS time conditioning).
        tokenizer_path: a folder with PaliGemma's tokenizer (``tokenizer.json`` + ``tokenizer_config.json``, e.g. a
            local copy of ``google/paligemma-3b-pt-224``). LeRobot checkpoints do not contain it.
        paligemma_variant, action_expert_variant: keys of :data:`GEMMA_VARIANTS` (LeRobot: gemma_2b, gemma_300m).
        vision_variant: key of :data:`VISION_VARIANTS` (LeRobot has only ``so400m``).
        vocab_size: PaliGemma's vocabulary (257,152 in every LeRobot checkpoint).
        dtype: storage of the frozen PaliGemma (and the expert's unused LM head): ``float32`` or ``bfloat16``
            (half the memory; the prefix is then computed in bfloat16). The expert, the projections, the noise
            head and the chain's log-probs are float32 either way.
        horizon: H, LeRobot's ``chunk_size``. denoising_steps: K, LeRobot's ``num_inference_steps``.
        cameras: our env cameras, in the order of ``image_keys`` (the checkpoint's ``observation.images.*``).
        image_resolution: ``(height, width)`` every image is resized to with padding (must match the SigLIP size).
        env_action_dim: actions the env takes (the first of the ``max_action_dim`` padded dims); 0: all.
        max_state_dim, max_action_dim, tokenizer_max_length, min_period, max_period: LeRobot's fields.
        state_norm, action_norm: normalisation modes (``MEAN_STD``, ``MIN_MAX``, ``QUANTILES``, ``IDENTITY``).
        lerobot_n_action_steps: LeRobot's ``n_action_steps`` (kept for reference).
        noise: the noise scheme that makes the chain stochastic during RL fine-tuning.
        time_embed_dim: size of the time embedding the ``reinflow`` scheme's std head takes (unused by the model).
    """

    variant: str = "pi0"
    tokenizer_path: str = ""
    paligemma_variant: str = "gemma_2b"
    action_expert_variant: str = "gemma_300m"
    vision_variant: str = "so400m"
    vocab_size: int = 257_152
    dtype: str = "float32"
    horizon: int = 50
    denoising_steps: int = 10
    cameras: list[str] = field(default_factory=lambda: ["agentview", "wrist"])
    image_keys: list[str] = field(default_factory=lambda: ["observation.images.agentview", "observation.images.wrist"])
    image_resolution: list[int] = field(default_factory=lambda: [224, 224])
    env_action_dim: int = 0
    max_state_dim: int = 32
    max_action_dim: int = 32
    tokenizer_max_length: int = 48
    min_period: float = 4e-3
    max_period: float = 4.0
    state_norm: str = "MEAN_STD"
    action_norm: str = "MEAN_STD"
    lerobot_n_action_steps: int = 50
    noise: FlowNoiseConfig = field(default_factory=lambda: FlowNoiseConfig(scheme="flow_noise"))
    time_embed_dim: int = 32

    def __post_init__(self) -> None:
        choices = {
            "variant": list(VARIANTS),
            "paligemma_variant": list(GEMMA_VARIANTS),
            "action_expert_variant": list(GEMMA_VARIANTS),
            "vision_variant": list(VISION_VARIANTS),
            "dtype": ["float32", "bfloat16"],
            "state_norm": NORM_MODES,
            "action_norm": NORM_MODES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"policy.{name}={getattr(self, name)!r} is not allowed; choose one of {allowed}.")
        for name in ("horizon", "denoising_steps", "max_state_dim", "max_action_dim", "tokenizer_max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"policy.{name} must be >= 1, got {getattr(self, name)}.")
        if not 0 <= self.env_action_dim <= self.max_action_dim:
            raise ValueError(
                f"policy.env_action_dim={self.env_action_dim} must be in [0, policy.max_action_dim="
                f"{self.max_action_dim}] (0: the checkpoint's action size)."
            )
        vlm, expert = GEMMA_VARIANTS[self.paligemma_variant], GEMMA_VARIANTS[self.action_expert_variant]
        if (vlm.depth, vlm.num_heads, vlm.num_kv_heads, vlm.head_dim) != (
            expert.depth,
            expert.num_heads,
            expert.num_kv_heads,
            expert.head_dim,
        ):
            raise ValueError(
                f"policy.paligemma_variant={self.paligemma_variant!r} and policy.action_expert_variant="
                f"{self.action_expert_variant!r} must have the same depth and head layout (joint attention pairs "
                f"their layers and heads): {vlm} vs {expert}."
            )
        check_camera_features(self.cameras, self.image_keys)
        size = VISION_VARIANTS[self.vision_variant]["image_size"]
        if list(self.image_resolution) != [size, size]:
            raise ValueError(
                f"policy.image_resolution={list(self.image_resolution)} must be the vision tower's input size "
                f"[{size}, {size}] (policy.vision_variant={self.vision_variant!r})."
            )
        if self.noise.scheme == "flow_sde" and self.denoising_steps < 2:
            raise ValueError(
                f"policy.noise.scheme='flow_sde' needs policy.denoising_steps >= 2, got {self.denoising_steps}."
            )


# ---- the model: LeRobot's module tree ---------------------------------------------------------------------


class AdaptiveRMSNorm(nn.Module):
    """openpi's ``GemmaRMSNorm`` with ``cond_dim`` (π0.5's expert): ``dense(cond)`` gives ``scale, shift, gate``.

    ``forward(x (N, T, W), cond (N, C))`` -> ``x_hat (1 + scale) + shift`` and the ``gate (N, 1, W)`` that multiplies
    the residual branch the norm feeds (``_gated_residual``). The statistics are float32.
    """

    def __init__(self, dim: int, cond_dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.dense = nn.Linear(cond_dim, 3 * dim)
        nn.init.zeros_(self.dense.weight)  # the fork's initialisation: no modulation until trained

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        scale, shift, gate = self.dense(cond)[:, None].chunk(3, dim=-1)  # (N, 1, W) each
        return (normed * (1 + scale.float()) + shift.float()).to(x.dtype), gate.to(x.dtype)


def _norm(module: nn.Module, x: torch.Tensor, cond: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A Gemma RMSNorm (``(normed, None)``) or an :class:`AdaptiveRMSNorm` (``(normed, gate)``)."""
    if isinstance(module, AdaptiveRMSNorm):
        return module(x, cond)
    return module(x), None


def _gated(residual: torch.Tensor, branch: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    return residual + branch if gate is None else residual + branch * gate


class _VisionModelSlot(nn.Module):
    """Holds the SigLIP tower as ``vision_model``: LeRobot's parameter names (transformers 4.x) on transformers 5."""

    def __init__(self, vision_model: nn.Module) -> None:
        super().__init__()
        self.vision_model = vision_model


class PaliGemmaWithExpert(nn.Module):
    """PaliGemma (``paligemma``) and the Gemma action expert (``gemma_expert``), with LeRobot's parameter names."""

    def __init__(self, config: PI0PolicyConfig) -> None:
        super().__init__()
        transformers = require_vla_dependencies()
        vlm, expert = GEMMA_VARIANTS[config.paligemma_variant], GEMMA_VARIANTS[config.action_expert_variant]
        vision = VISION_VARIANTS[config.vision_variant]
        gemma = {"head_dim": vlm.head_dim, "num_hidden_layers": vlm.depth, "num_attention_heads": vlm.num_heads}
        gemma.update(num_key_value_heads=vlm.num_kv_heads, vocab_size=config.vocab_size)
        paligemma_config = transformers.PaliGemmaConfig(
            text_config={"model_type": "gemma", "hidden_size": vlm.width, "intermediate_size": vlm.mlp_dim, **gemma},
            vision_config={**vision, "projection_dim": vlm.width, "vision_use_head": False},
            projection_dim=vlm.width,
            image_token_index=config.vocab_size,
        )
        self.paligemma = transformers.PaliGemmaForConditionalGeneration(paligemma_config)
        self.paligemma.model.vision_tower = _VisionModelSlot(self.paligemma.model.vision_tower)
        expert_config = transformers.GemmaConfig(hidden_size=expert.width, intermediate_size=expert.mlp_dim, **gemma)
        self.gemma_expert = transformers.GemmaForCausalLM(expert_config)
        # The expert reads embeddings from the projections, never token ids (LeRobot drops it too). Its LM head stays:
        # LeRobot's checkpoints contain it (unused).
        self.gemma_expert.model.embed_tokens = None
        if config.variant == "pi05":
            eps = expert_config.rms_norm_eps
            for layer in self.gemma_expert.model.layers:
                layer.input_layernorm = AdaptiveRMSNorm(expert.width, expert.width, eps)
                layer.post_attention_layernorm = AdaptiveRMSNorm(expert.width, expert.width, eps)
            self.gemma_expert.model.norm = AdaptiveRMSNorm(expert.width, expert.width, eps)
        self.num_heads = vlm.num_heads
        self.vlm_width, self.expert_width = vlm.width, expert.width

    @property
    def language_model(self) -> nn.Module:
        return self.paligemma.model.language_model

    def embed_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` in ``[-1, 1]`` -> ``(B, n, W_vlm)`` projected SigLIP features (not divided by
        ``sqrt(W_vlm)``: LeRobot's fork removed PaliGemma's scaling)."""
        tower = self.paligemma.model.vision_tower.vision_model
        hidden = tower(pixel_values=pixel_values).last_hidden_state
        return self.paligemma.model.multi_modal_projector(hidden)

    @staticmethod
    def _qkv(layer: nn.Module, normed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``normed (N, T, W)`` -> query, key, value ``(N, T, heads, D)`` of a Gemma layer."""
        attn = layer.self_attn
        shape = (*normed.shape[:-1], -1, attn.head_dim)
        return attn.q_proj(normed).view(shape), attn.k_proj(normed).view(shape), attn.v_proj(normed).view(shape)

    def prefix_cache(
        self, embeds: torch.Tensor, mask_2d: torch.Tensor, positions: torch.Tensor
    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """Run the prefix ``embeds (B, L, W_vlm)`` (``mask_2d (B, L, L)``, ``positions (B, L)``) through PaliGemma's
        layers.

        Returns:
            per layer the prefix keys (after RoPE) and values, each ``(B, L, kv_heads, D)`` float32, and the final
            normed prefix features ``(B, L, W_vlm)`` float32.
        """
        cache = []
        hidden = embeds
        for layer in self.language_model.layers:
            query, key, value = self._qkv(layer, layer.input_layernorm(hidden))
            query, key = apply_rope(query, positions), apply_rope(key, positions)
            cache.append((key.float(), value.float()))
            hidden = hidden + layer.self_attn.o_proj(attention(query, key, value, mask_2d, self.num_heads))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return cache, self.language_model.norm(hidden).float()

    def expert_forward(
        self,
        suffix: torch.Tensor,
        suffix_mask: torch.Tensor,
        cache: list[tuple[torch.Tensor, torch.Tensor]],
        prefix_mask: torch.Tensor,
        cond: torch.Tensor | None,
    ) -> torch.Tensor:
        """The suffix ``(N, S, W)`` through the expert's layers, attending to the cached prefix of N rows.

        Args:
            suffix_mask: ``(S, S)`` bool, which suffix tokens each one sees (LeRobot's ``make_att_2d_masks``).
            cache: per layer prefix keys and values ``(N, L, kv_heads, D)``.
            prefix_mask: ``(N, L)`` bool validity of the prefix tokens.
            cond: ``(N, W)`` adaRMS conditioning (π0.5) or None.

        Returns:
            the final normed suffix ``(N, S, W)``.
        """
        batch, length = suffix.shape[:2]
        mask = torch.cat([prefix_mask[:, None, :].expand(-1, length, -1), suffix_mask.expand(batch, -1, -1)], dim=2)
        positions = prefix_mask.sum(-1, keepdim=True) + torch.arange(length, device=suffix.device)  # (N, S)
        hidden = suffix
        for layer, (prefix_key, prefix_value) in zip(self.gemma_expert.model.layers, cache, strict=True):
            normed, gate = _norm(layer.input_layernorm, hidden, cond)
            query, key, value = self._qkv(layer, normed)
            query, key = apply_rope(query, positions), apply_rope(key, positions)
            key, value = torch.cat([prefix_key, key], dim=1), torch.cat([prefix_value, value], dim=1)
            hidden = _gated(hidden, layer.self_attn.o_proj(attention(query, key, value, mask, self.num_heads)), gate)
            normed, gate = _norm(layer.post_attention_layernorm, hidden, cond)
            hidden = _gated(hidden, layer.mlp(normed), gate)
        return _norm(self.gemma_expert.model.norm, hidden, cond)[0]


class PI0FlowModel(nn.Module):
    """LeRobot's ``PI0Pytorch`` / ``PI05Pytorch``: PaliGemma with its expert, and the action/state/time projections."""

    def __init__(self, config: PI0PolicyConfig) -> None:
        super().__init__()
        self.variant = config.variant
        self.paligemma_with_expert = PaliGemmaWithExpert(config)
        width = self.paligemma_with_expert.expert_width
        self.action_in_proj = nn.Linear(config.max_action_dim, width)
        self.action_out_proj = nn.Linear(width, config.max_action_dim)
        if config.variant == "pi0":
            self.state_proj = nn.Linear(config.max_state_dim, width)
            self.action_time_mlp_in = nn.Linear(2 * width, width)
            self.action_time_mlp_out = nn.Linear(width, width)
        else:
            self.time_mlp_in = nn.Linear(width, width)
            self.time_mlp_out = nn.Linear(width, width)
        self.min_period, self.max_period = config.min_period, config.max_period

    def velocity(
        self,
        x: torch.Tensor,
        tau: torch.Tensor,
        state: torch.Tensor,
        cache: list[tuple[torch.Tensor, torch.Tensor]],
        prefix_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """LeRobot's ``denoise_step``: ``x (N, H, A_pad)`` at time ``tau (N,)`` with the padded normalised state
        ``(N, max_state_dim)`` (π0; unused by π0.5) -> ``u (N, H, A_pad)`` (pointing from data to noise) and the
        expert's final action tokens averaged over the chunk ``(N, W)``."""
        horizon = x.shape[1]
        actions = self.action_in_proj(x)  # (N, H, W)
        time = sincos_time_embedding(tau, actions.shape[-1], self.min_period, self.max_period)  # (N, W)
        if self.variant == "pi0":
            time = time[:, None].expand_as(actions)
            actions = self.action_time_mlp_out(F.silu(self.action_time_mlp_in(torch.cat([actions, time], dim=2))))
            suffix = torch.cat([self.state_proj(state)[:, None], actions], dim=1)  # (N, 1+H, W)
            # Blocks [state | actions]: a token sees the blocks up to its own (make_att_2d_masks, att [1, 1, 0 ...]).
            block = torch.ones(1 + horizon, dtype=torch.long, device=x.device)
            block[0] = 0
            cond = None
        else:
            suffix = actions
            block = torch.zeros(horizon, dtype=torch.long, device=x.device)
            cond = F.silu(self.time_mlp_out(F.silu(self.time_mlp_in(time))))  # (N, W) adaRMS conditioning
        suffix_mask = block[None, :] <= block[:, None]  # (S, S)
        out = self.paligemma_with_expert.expert_forward(suffix, suffix_mask, cache, prefix_mask, cond)[:, -horizon:]
        return self.action_out_proj(out.float()), out.mean(1)


# ---- the policy -------------------------------------------------------------------------------------------


class PI0Policy(nn.Module):
    """π0 / π0.5 ``pi(a_{1:H} | images, instruction, state)`` with the chain interface of :class:`SmolVLAPolicy`.

    Takes :class:`policies.vla_backbone.VLAObservation` batches. ``obs_dim`` is the env's state size, ``action_dim``
    the chain's (``max_action_dim``; the env gets the first ``env_action_dim``). PaliGemma (and the expert's unused LM
    head) are frozen, the prefix is computed once per observation without grad; the expert, its projections and the
    noise head train.
    """

    observation_kind = "vla"
    FINETUNE_FIELDS: tuple[str, ...] = ("noise",)

    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        config: PI0PolicyConfig,
        tokenizer_dir: str | Path | None = None,
        init_weights: bool = True,
    ) -> None:
        """Build a policy; ``tokenizer_dir`` defaults to ``config.tokenizer_path``. ``init_weights=False`` leaves the
        model's parameters on the meta device for :meth:`load_model_weights` (no time or memory spent on a random
        initialisation of billions of parameters)."""
        super().__init__()
        if action_dim != config.max_action_dim:
            raise ValueError(f"PI0Policy's chain has max_action_dim={config.max_action_dim} dims, got {action_dim}.")
        if obs_dim > config.max_state_dim:
            raise ValueError(
                f"The env's state has {obs_dim} dims, more than policy.max_state_dim={config.max_state_dim}."
            )
        transformers = require_vla_dependencies()
        self.tokenizer_dir = Path(tokenizer_dir if tokenizer_dir is not None else config.tokenizer_path)
        check_tokenizer_dir(self.tokenizer_dir)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(self.tokenizer_dir)
        if len(self.tokenizer) > config.vocab_size:
            raise ValueError(
                f"The tokenizer in {str(self.tokenizer_dir)!r} has {len(self.tokenizer)} tokens, more than the "
                f"model's vocabulary ({config.vocab_size}); is it PaliGemma's?"
            )
        self.policy_type = config.variant
        self.obs_dim, self.action_dim, self.config = obs_dim, action_dim, config
        self.horizon, self.num_steps = config.horizon, config.denoising_steps
        self.env_action_dim = config.env_action_dim or action_dim
        with torch.device("cpu" if init_weights else "meta"):
            self.model = PI0FlowModel(config)
        if config.dtype == "bfloat16":
            self.model.paligemma_with_expert.paligemma.to(torch.bfloat16)
            self.model.paligemma_with_expert.gemma_expert.lm_head.to(torch.bfloat16)
        self.normalizer = SmolVLANormalizer(obs_dim, self.env_action_dim)
        self.time_embed = SinusoidalEmbedding(config.time_embed_dim)
        self.noise = self._build_scheme(config.noise)
        self.model.paligemma_with_expert.paligemma.requires_grad_(False)
        self.model.paligemma_with_expert.gemma_expert.lm_head.requires_grad_(False)
        self.train(self.training)

    # ---- construction ----
    @classmethod
    def from_checkpoint_dir(cls, path: str | Path, obs_dim: int, action_dim: int, config: PI0PolicyConfig) -> PI0Policy:
        """An untrained policy shaped like our checkpoint at ``path`` (its tokenizer in ``path/tokenizer``)."""
        return cls(obs_dim, action_dim, config, tokenizer_dir=Path(path) / TOKENIZER_DIR)

    @staticmethod
    def accepts_external_checkpoint(path: str | Path) -> bool:
        """``path`` is a LeRobot π0 / π0.5 checkpoint."""
        from policies.pi0_lerobot import is_lerobot_pi0_checkpoint

        return is_lerobot_pi0_checkpoint(path)

    @classmethod
    def from_external_checkpoint(
        cls, path: str | Path, obs_dim: int, action_dim: int, settings: Any | None = None
    ) -> PI0Policy:
        """Load a LeRobot checkpoint; ``settings`` is the run's ``policy`` section (``tokenizer_path``, ``cameras``,
        ``dtype``, noise; see :func:`policies.pi0_lerobot.load_lerobot_pi0_checkpoint`)."""
        from policies.pi0_lerobot import load_lerobot_pi0_checkpoint

        return load_lerobot_pi0_checkpoint(path, state_dim=obs_dim, action_dim=action_dim, overrides=settings)

    def load_model_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Load LeRobot's ``model.*`` tensors, exactly: a missing, unexpected or wrong-shaped key raises a ValueError
        that lists them. PaliGemma's tied input embedding may be absent (``save_pretrained`` keeps the LM head)."""
        expected = {k: v for k, v in self.state_dict().items() if k.startswith("model.")}
        tied = "model.paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight"
        missing = [k for k in expected if k not in weights and k != tied]
        unexpected = [k for k in weights if k not in expected]
        wrong = [
            f"{k}: {tuple(weights[k].shape)} vs ours {tuple(v.shape)}"
            for k, v in expected.items()
            if k in weights and weights[k].shape != v.shape
        ]
        if missing or unexpected or wrong:
            raise ValueError(
                f"The weights do not match {self.config.variant} built from its config "
                f"({self.config.paligemma_variant} + {self.config.action_expert_variant}): missing={missing}, "
                f"unexpected={unexpected}, wrong_shape={wrong}."
            )
        # Each tensor in its parameter's dtype (float32 expert, float32 or bfloat16 PaliGemma); assign=True replaces
        # meta parameters without a second copy.
        converted = {k: v.to(expected[k].dtype) for k, v in weights.items()}
        self.load_state_dict(converted, strict=False, assign=True)
        paligemma = self.model.paligemma_with_expert.paligemma
        paligemma.model.language_model.embed_tokens.weight = paligemma.lm_head.weight
        self._materialize_buffers()
        # assign=True adopts the tensors' requires_grad; re-apply the frozen parts.
        self.model.requires_grad_(True)
        paligemma.requires_grad_(False)
        self.model.paligemma_with_expert.gemma_expert.lm_head.requires_grad_(False)

    def _materialize_buffers(self) -> None:
        """Non-persistent buffers (not in any checkpoint) of a model built on the meta device, recomputed on CPU:
        SigLIP's patch position ids; the Gemma rotary tables and embedding scale, which our layers do not read
        (they apply RoPE and the sqrt(width) scale themselves), are dropped."""
        for module in self.model.modules():
            position_ids = getattr(module, "position_ids", None)
            if isinstance(position_ids, torch.Tensor) and position_ids.is_meta:
                module.register_buffer(
                    "position_ids", torch.arange(position_ids.shape[-1]).expand(1, -1), persistent=False
                )
            if isinstance(getattr(module, "embed_scale", None), torch.Tensor) and module.embed_scale.is_meta:
                module.register_buffer("embed_scale", torch.tensor(math.sqrt(module.weight.shape[1])), persistent=False)
            for name, child in list(module.named_children()):
                if name == "rotary_emb" and any(b.is_meta for b in child.buffers()):
                    setattr(module, name, None)
        left = [name for name, tensor in [*self.named_parameters(), *self.named_buffers()] if tensor.is_meta]
        assert not left, f"tensors still on the meta device after loading: {left}"

    def _build_scheme(self, config: FlowNoiseConfig) -> nn.Module:
        obs_time_dim = self.obs_dim + self.config.time_embed_dim
        width = self.model.paligemma_with_expert.expert_width
        return SCHEMES[config.scheme](obs_time_dim, width, self.horizon, self.action_dim, config)

    def train(self, mode: bool = True) -> PI0Policy:
        """Train mode for the expert; PaliGemma always computes in eval mode (the same prefix when sampling and
        re-scoring)."""
        super().train(mode)
        self.model.paligemma_with_expert.paligemma.eval()
        return self

    configure_noise = VLAPolicy.configure_noise
    configure_finetuning = SmolVLAPolicy.configure_finetuning

    # ---- inputs ----
    def _images(self, obs: VLAObservation) -> list[torch.Tensor]:
        """Per camera ``(B, 3, S, S)``: LeRobot's ``resize_with_pad_torch`` then ``x * 2 - 1``.

        The image keeps its aspect ratio (bilinear, no antialiasing) and is padded evenly (the odd pixel bottom /
        right). LeRobot pads the [0, 1] image with -1 (the value meant for [-1, 1] images) *before* the shift, so
        its padding ends up at -3; reproduced as is, since the checkpoints were trained through this code path.
        """
        height, width = self.config.image_resolution
        images = []
        for camera in self.config.cameras:
            image = obs.images[camera].permute(0, 3, 1, 2).float() / 255.0  # (B, 3, H, W)
            if image.shape[2:] != (height, width):
                ratio = max(image.shape[3] / width, image.shape[2] / height)
                size = (int(image.shape[2] / ratio), int(image.shape[3] / ratio))
                image = F.interpolate(image, size=size, mode="bilinear", align_corners=False).clamp(-1.0, 1.0)
                top, left = (height - size[0]) // 2, (width - size[1]) // 2
                padding = (left, width - size[1] - left, top, height - size[0] - top)
                image = F.pad(image, padding, value=-1.0)
            images.append(image * 2.0 - 1.0)
        return images

    def _prompts(self, obs: VLAObservation, state: torch.Tensor) -> list[str]:
        """The text LeRobot's preprocessor tokenizes: π0 ``instruction + "\\n"``; π0.5 ``"Task: <instruction>, State:
        <bins>;\\nAction: "`` with the normalised state (padded to ``max_state_dim``) as ``STATE_BINS`` bins."""
        if self.config.variant == "pi0":
            return [text if text.endswith("\n") else f"{text}\n" for text in obs.instructions]
        padded = F.pad(state, (0, self.config.max_state_dim - state.shape[1])).cpu().numpy()
        bins = np.digitize(padded, bins=np.linspace(-1, 1, STATE_BINS + 1)[:-1]) - 1  # (B, max_state_dim)
        prompts = []
        for text, row in zip(obs.instructions, bins, strict=True):
            cleaned = text.strip().replace("_", " ").replace("\n", " ")
            prompts.append(f"Task: {cleaned}, State: {' '.join(map(str, row))};\nAction: ")
        return prompts

    def _tokens(self, prompts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, T)`` token ids (with PaliGemma's ``<bos>``) and bool mask, padded to ``tokenizer_max_length``."""
        out = self.tokenizer(
            prompts,
            max_length=self.config.tokenizer_max_length,
            truncation=True,
            padding="max_length",
            padding_side="right",
            return_tensors="pt",
        )
        return out["input_ids"].to(device), out["attention_mask"].to(device).bool()

    def condition(self, obs: VLAObservation) -> SmolVLAConditioning:
        """Run PaliGemma once on ``obs``: the per-layer prefix cache, its validity, the normalised state and the
        pooled prefix (the critic's input)."""
        obs.validate(self.config.cameras, self.obs_dim)
        obs = obs.to(self.normalizer.obs_mean.device)
        pwe = self.model.paligemma_with_expert
        dtype = pwe.paligemma.lm_head.weight.dtype
        with torch.no_grad():
            state = self.normalizer.normalize_obs(obs.state)
            embeds = [pwe.embed_image(image.to(dtype)) for image in self._images(obs)]
            valid = [torch.ones(e.shape[:2], dtype=torch.bool, device=e.device) for e in embeds]
            tokens, token_mask = self._tokens(self._prompts(obs, state), state.device)
            # The plain embedding times sqrt(width) (LeRobot's embed_prefix); transformers 5's Gemma embedding would
            # scale by itself, 4.x's (LeRobot's) does not, so the table is read directly.
            language = F.embedding(tokens, pwe.language_model.embed_tokens.weight)
            embeds.append(language * math.sqrt(language.shape[-1]))
            valid.append(token_mask)
            embeds, valid = torch.cat(embeds, 1), torch.cat(valid, 1)  # (B, L, W_vlm), (B, L)
            mask_2d = valid[:, None, :] & valid[:, :, None]  # the prefix is one bidirectional block
            positions = valid.long().cumsum(1) - 1
            cache, features = pwe.prefix_cache(embeds, mask_2d, positions)
        weights = valid[..., None].float()
        pooled = (features * weights).sum(1) / weights.sum(1).clamp_min(1.0)  # (B, W_vlm)
        return SmolVLAConditioning(state, cache, valid, pooled_prefix=pooled)

    # ---- the chain: SmolVLA's methods (same time grid, schemes, sampling, re-scoring) over this model ----
    def velocity_and_features(
        self, x: torch.Tensor, t: torch.Tensor, cond: SmolVLAConditioning
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x (N, H, A_pad), t (N,)`` in our time -> velocity ``(N, H, A_pad)`` toward the data and the expert's
        pooled features ``(N, W)``. ``cond`` holds N rows (``cond.rows``) or N observations."""
        rows = cond.rows
        # Re-scoring gathers each (chain, step) pair's prefix cache; PaliGemma itself ran once per observation.
        cache = cond.prefix_kv if rows is None else [(k[rows], v[rows]) for k, v in cond.prefix_kv]
        state = cond.gather(cond.state)
        state = F.pad(state, (0, self.config.max_state_dim - state.shape[1]))
        u, features = self.model.velocity(x, 1.0 - t, state, cache, cond.gather(cond.prefix_mask))
        return -u, features

    time_grid = SmolVLAPolicy.time_grid
    step_inputs = SmolVLAPolicy.step_inputs
    transition = SmolVLAPolicy.transition
    sample = SmolVLAPolicy.sample
    _sample = SmolVLAPolicy._sample
    log_prob_and_entropy = SmolVLAPolicy.log_prob_and_entropy
    pretrain_loss = SmolVLAPolicy.pretrain_loss
    critic_features = SmolVLAPolicy.critic_features
    sample_with_critic_features = SmolVLAPolicy.sample_with_critic_features
    _critic_features = SmolVLAPolicy._critic_features

    def critic_feature_dim(self, source: str = "prefix") -> int:
        """Size of :meth:`critic_features`: PaliGemma's (``prefix``) or the expert's (``expert``) width plus
        ``obs_dim``."""
        pwe = self.model.paligemma_with_expert
        widths = {"prefix": pwe.vlm_width, "expert": pwe.expert_width}
        if source not in widths:
            raise ValueError(f"policy.critic_input={source!r} is not allowed; choose one of {list(widths)}.")
        return widths[source] + self.obs_dim

    # ---- checkpoint assets ----
    def save_assets(self, path: Path) -> None:
        """Copy the tokenizer files to ``path / "tokenizer"``, so our checkpoint loads on any machine."""
        target = path / TOKENIZER_DIR
        target.mkdir(parents=True, exist_ok=True)
        for item in self.tokenizer_dir.iterdir():
            if item.is_file():
                shutil.copy2(item, target / item.name)

    def parameter_counts(self) -> dict[str, int]:
        """Parameters of PaliGemma, the expert (with its projections and LM head), the noise head, and how many
        train."""
        paligemma = sum(p.numel() for p in self.model.paligemma_with_expert.paligemma.parameters())
        counts = {"paligemma": paligemma, "expert": sum(p.numel() for p in self.model.parameters()) - paligemma}
        counts["noise"] = sum(p.numel() for p in self.noise.parameters())
        counts["trainable"] = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return counts


def check_tokenizer_dir(path: Path, override_key: str = "policy.tokenizer_path") -> None:
    """Raise FileNotFoundError naming the expected tokenizer folder and how to point to it."""
    if not path.is_dir() or not (path / "tokenizer_config.json").is_file():
        problem = "lacks tokenizer_config.json" if path.is_dir() else "does not exist"
        raise FileNotFoundError(
            "π0 / π0.5 need PaliGemma's tokenizer (tokenizer.json + tokenizer_config.json) in a local folder, "
            f"expected at {str(path)!r}, which {problem}. LeRobot "
            f"checkpoints do not contain it: pass {override_key}=PATH with a local copy of the tokenizer of "
            "google/paligemma-3b-pt-224."
        )
