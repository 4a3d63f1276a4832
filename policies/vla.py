"""π0-shaped vision-language-action policy: a VLM prefix and a flow-matching action expert (DESIGN.md §4).

A vision-language backbone (:mod:`policies.vla_backbone`) turns the camera images and the instruction
into prefix features, once per observation. A small transformer, the *action expert*, denoises the
action chunk in K Euler steps: its tokens are ``[state, a_1 .. a_H]`` (with the flow time mixed into
every action token), they attend to each other and cross-attend to the prefix. The expert's cross-attention
keys and values of the prefix are computed once per observation too (a KV cache of the prefix), and reused
for every denoising step, when sampling and when re-scoring a stored chain. The noise schemes of
:mod:`policies.noise` (``flow_noise`` on the expert's pooled features, ``flow_sde`` on the velocity) make
the chain's log-probability exact, through the same :func:`policies.chain.score_chain` every flow policy uses.

The backbone is frozen by default (its prefix is computed without grad), or fine-tuned through LoRA
adapters (``peft``); the action expert and the noise head are trained.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from policies.chain import ChainSample, score_chain
from policies.flow import sample_flow_chain
from policies.mlp import SinusoidalEmbedding
from policies.noise import SCHEMES, FlowNoiseConfig, StepInputs
from policies.normalizer import Normalizer
from policies.vla_backbone import (
    CAMERA_IMAGE_KEYS,
    TINY_IMAGE_SIZE,
    TINY_VLM,
    VLA_INSTALL_HINT,
    VLAObservation,
    VLMBackbone,
    check_tiny_image_size,
    check_vlm_dir,
)

__all__ = ["VLAObservation", "VLAPolicy", "VLAPolicyConfig"]

# Checkpoint subfolder with the VLM's config, tokenizer and processor config (its weights are in
# model.safetensors under "backbone.vlm.").
VLM_DIR = "vlm"


@dataclass
class VLAPolicyConfig:
    """Architecture and training mode of :class:`VLAPolicy`.

    Attributes:
        vlm_path: local directory of a ``transformers`` image-text-to-text model (``save_pretrained``
            layout: config, weights, tokenizer, processor config), or ``"tiny"`` for the random tiny
            Idefics3 of :func:`policies.vla_backbone.build_tiny_vlm`. A checkpoint keeps its own copy of the
            VLM, so this is only read when a policy is first built.
        tiny_image_size: (``vlm_path="tiny"`` only) the tiny VLM's image size S, a multiple of 16; each camera
            image becomes ``(S / 16)^2`` tokens (32 px: 4, 64 px: 16). Ignored for other VLMs, whose config says.
        horizon: H, actions per chunk.
        denoising_steps: K, Euler steps from noise (t=0) to action (t=1).
        cameras: which camera images enter the prefix, in this order (``agentview``, ``wrist``).
        max_instruction_tokens: instructions are cut to this many tokens (bounds the prefix length).
        expert_width, expert_layers, expert_heads: the action expert transformer.
        time_embed_dim: size of the sinusoidal embedding of the flow time t.
        freeze_backbone: the VLM is not trained (its prefix is computed without grad). With
            ``lora_rank > 0`` only its LoRA adapters are trained.
        lora_rank: rank of LoRA adapters on the VLM's ``lora_target_modules`` (0 = no LoRA).
        lora_alpha: LoRA scaling numerator (the update is scaled by alpha / rank).
        lora_target_modules: names of the VLM linear layers that get adapters.
        noise: the noise scheme that makes the chain stochastic during RL fine-tuning.
        bf16_autocast: on CUDA, run the VLM under bf16 autocast. The expert, the noise scheme and the
            log-probs stay fp32: the expert is cheap, and bf16 in the chain's means would make re-scored
            log-probs differ from the sampled ones by kernel-dependent rounding (the first PPO ratio != 1).
        gradient_checkpointing: recompute activations in the backward pass (expert blocks, and the VLM when
            it is trained), trading compute for memory.
        object_loss_weight: weight of an auxiliary supervised-pretraining loss: a small head predicts the
            objects' poses (the env's ``object_state``, z-scored) from the pooled VLM prefix. The flow-matching
            loss alone barely teaches a VLM to localise a small object (the tiny VLM's SFT ignored its images);
            this term does, when the VLM trains (``freeze_backbone=false`` or LoRA). The head exists only
            during pretraining (:meth:`VLAPolicy.add_object_head`): checkpoints, RL and deployment never see it.
            0 = plain flow matching.
        state_noise_std: std of Gaussian noise added to the normalised state in the pretraining loss only (never
            when sampling or in RL). Each demonstration's start pose is jittered, so a precise state identifies
            the episode and, through it, where the object was: the tiny VLA's SFT memorised that instead of
            looking (same actions for any cube position at evaluation). The noise blurs that fingerprint.
        prefix_summary: the expert's state token also gets a linear map of the pooled prefix (the features the
            object head and the critic read), a direct path from what the VLM saw besides cross-attention,
            whose keys and values barely vary between observations in a VLM that was trained from scratch.
    """

    vlm_path: str = ""
    tiny_image_size: int = TINY_IMAGE_SIZE
    horizon: int = 8
    denoising_steps: int = 5
    cameras: list[str] = field(default_factory=lambda: ["agentview", "wrist"])
    max_instruction_tokens: int = 48
    expert_width: int = 128
    expert_layers: int = 3
    expert_heads: int = 4
    time_embed_dim: int = 32
    freeze_backbone: bool = True
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    noise: FlowNoiseConfig = field(default_factory=lambda: FlowNoiseConfig(scheme="flow_noise"))
    bf16_autocast: bool = True
    gradient_checkpointing: bool = False
    object_loss_weight: float = 0.0
    state_noise_std: float = 0.0
    prefix_summary: bool = False

    def __post_init__(self) -> None:
        # An empty vlm_path is valid here: a run that starts from a checkpoint (policy.pretrained) takes the
        # VLM from it. Building a fresh policy without one fails in VLAPolicy.
        for name in ("horizon", "denoising_steps", "max_instruction_tokens", "expert_width", "expert_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"policy.{name} must be >= 1, got {getattr(self, name)}.")
        if self.expert_heads < 1 or self.expert_width % self.expert_heads:
            raise ValueError(
                f"policy.expert_width={self.expert_width} must be a multiple of policy.expert_heads="
                f"{self.expert_heads} (>= 1)."
            )
        if self.time_embed_dim < 2 or self.time_embed_dim % 2:
            raise ValueError(f"policy.time_embed_dim must be even and >= 2, got {self.time_embed_dim}.")
        unknown = [c for c in self.cameras if c not in CAMERA_IMAGE_KEYS]
        if not self.cameras or unknown or len(set(self.cameras)) != len(self.cameras):
            raise ValueError(
                f"policy.cameras={self.cameras} must be a non-empty list of distinct names from "
                f"{list(CAMERA_IMAGE_KEYS)}."
            )
        if self.vlm_path == TINY_VLM:
            check_tiny_image_size(self.tiny_image_size)
        if self.lora_rank < 0:
            raise ValueError(f"policy.lora_rank must be >= 0 (0 = no LoRA), got {self.lora_rank}.")
        for name in ("object_loss_weight", "state_noise_std"):
            if not getattr(self, name) >= 0.0:
                raise ValueError(f"policy.{name} must be >= 0 (0 = off), got {getattr(self, name)}.")
        if self.lora_rank > 0 and not self.freeze_backbone:
            raise ValueError(
                "policy.lora_rank > 0 trains adapters on a frozen backbone; it needs policy.freeze_backbone=true "
                "(freeze_backbone=false with lora_rank=0 fine-tunes the whole VLM)."
            )
        if self.lora_rank > 0 and not self.lora_target_modules:
            raise ValueError("policy.lora_target_modules is empty; name the VLM layers that get LoRA adapters.")
        if self.noise.scheme == "flow_sde" and self.denoising_steps < 2:
            # sigma_t = a sqrt((1-t)/t) is infinite at t=0; with one step it would be taken at t=1, where it is 0.
            raise ValueError(
                f"policy.noise.scheme='flow_sde' needs policy.denoising_steps >= 2, got {self.denoising_steps}."
            )


# ---- the action expert ------------------------------------------------------------------------------------


@dataclass
class VLAConditioning:
    """What the expert needs of a batch of observations, computed once per observation.

    Attributes:
        state: ``(B, state_dim)`` normalised proprioception.
        prefix_kv: per expert layer, the cross-attention keys and values of the prefix, each
            ``(B, heads, L, head_dim)``.
        prefix_mask: ``(B, L)`` bool, False at instruction padding.
        rows: ``(N,)`` which observation each of the N (chain, step) pairs uses, or None for N = B.
            Indexing composes ``rows`` instead of copying the prefix, so re-scoring B*K pairs costs one
            prefix per observation, not per pair.
        pooled_prefix: ``(B, D)`` the prefix features averaged over their real tokens (a critic's input).
    """

    state: torch.Tensor
    prefix_kv: list[tuple[torch.Tensor, torch.Tensor]]
    prefix_mask: torch.Tensor
    rows: torch.Tensor | None = None
    pooled_prefix: torch.Tensor | None = None

    def __getitem__(self, rows: torch.Tensor) -> VLAConditioning:
        composed = rows if self.rows is None else self.rows[rows]
        return dataclasses.replace(self, rows=composed)

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """A per-observation ``(B, ...)`` tensor as per-pair ``(N, ...)``."""
        return tensor if self.rows is None else tensor[self.rows]


class ExpertBlock(nn.Module):
    """Pre-norm transformer block: self-attention over the expert tokens, cross-attention to the prefix, MLP."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.self_norm = nn.LayerNorm(width)
        self.self_qkv = nn.Linear(width, 3 * width)
        self.self_out = nn.Linear(width, width)
        self.cross_norm = nn.LayerNorm(width)
        self.cross_q = nn.Linear(width, width)
        self.cross_kv = nn.Linear(width, 2 * width)
        self.cross_out = nn.Linear(width, width)
        self.mlp_norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (N, T, W) -> (N, heads, T, W/heads)

    def prefix_kv(self, prefix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``prefix (B, L, W)`` -> keys, values ``(B, heads, L, W/heads)``: computed once per observation."""
        keys, values = self.cross_kv(prefix).chunk(2, dim=-1)
        return self._split_heads(keys), self._split_heads(values)

    def forward(self, h: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``h (N, T, W)``, ``keys/values (N, heads, L, W/heads)``, ``mask (N, 1, 1, L)`` -> ``(N, T, W)``."""
        q, k, v = (self._split_heads(x) for x in self.self_qkv(self.self_norm(h)).chunk(3, dim=-1))
        h = h + self.self_out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))
        q = self._split_heads(self.cross_q(self.cross_norm(h)))
        attended = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # (N, heads, T, W/heads)
        h = h + self.cross_out(attended.transpose(1, 2).flatten(2))
        return h + self.mlp(self.mlp_norm(h))


class ActionExpert(nn.Module):
    """The flow-matching action expert: ``v_theta(x_t, t, state, prefix)``.

    Tokens ``[state, a_1 .. a_H]`` of width W: the state token is a linear map of the normalised state;
    each action token is ``MLP([linear(a_h) + pos_h, emb(t)])`` (π0's action-time mixing). The blocks attend
    bidirectionally among the tokens and cross-attend to the projected prefix. The velocity is a linear map of
    the final action tokens; their mean is the feature vector ``flow_noise`` puts its std head on.
    """

    def __init__(self, state_dim: int, action_dim: int, prefix_dim: int, config: VLAPolicyConfig) -> None:
        super().__init__()
        width = config.expert_width
        self.gradient_checkpointing = config.gradient_checkpointing
        self.time_embed = SinusoidalEmbedding(config.time_embed_dim)
        self.state_in = nn.Linear(state_dim, width)
        self.prefix_summary = nn.Linear(prefix_dim, width) if config.prefix_summary else None
        self.action_in = nn.Linear(action_dim, width)
        self.action_pos = nn.Parameter(torch.randn(config.horizon, width) * 0.02)
        self.action_time_mlp = nn.Sequential(
            nn.Linear(width + config.time_embed_dim, width), nn.SiLU(), nn.Linear(width, width)
        )
        self.prefix_proj = nn.Sequential(nn.Linear(prefix_dim, width), nn.LayerNorm(width))
        self.blocks = nn.ModuleList(ExpertBlock(width, config.expert_heads) for _ in range(config.expert_layers))
        self.out_norm = nn.LayerNorm(width)
        self.velocity_out = nn.Linear(width, action_dim)

    def prefix_kv(self, prefix: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``prefix (B, L, D)`` VLM features -> per block ``(keys, values)``, each ``(B, heads, L, W/heads)``."""
        projected = self.prefix_proj(prefix)
        return [block.prefix_kv(projected) for block in self.blocks]

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: VLAConditioning) -> tuple[torch.Tensor, torch.Tensor]:
        """``x (N, H, A)``, ``t (N,)`` -> velocity ``(N, H, A)`` and pooled features ``(N, W)``."""
        time = self.time_embed(t)[:, None].expand(-1, x.shape[1], -1)  # (N, H, E)
        actions = self.action_time_mlp(torch.cat([self.action_in(x) + self.action_pos, time], dim=-1))  # (N, H, W)
        state_token = self.state_in(cond.gather(cond.state))  # (N, W)
        if self.prefix_summary is not None:
            state_token = state_token + self.prefix_summary(cond.gather(cond.pooled_prefix))
        h = torch.cat([state_token[:, None], actions], dim=1)  # (N, 1+H, W)
        mask = cond.gather(cond.prefix_mask)[:, None, None, :]  # (N, 1, 1, L)
        for block, (keys, values) in zip(self.blocks, cond.prefix_kv, strict=True):
            keys, values = cond.gather(keys), cond.gather(values)  # (N, heads, L, W/heads)
            if self.gradient_checkpointing and torch.is_grad_enabled():
                h = checkpoint(block, h, keys, values, mask, use_reentrant=False)
            else:
                h = block(h, keys, values, mask)
        features = self.out_norm(h[:, 1:])  # (N, H, W)
        return self.velocity_out(features), features.mean(1)


class _CachedConditioningView:
    """Lets :func:`policies.chain.score_chain` re-score with conditioning computed once per observation.

    ``score_chain`` takes its per-pair conditioning as ``policy.normalizer.normalize_obs(obs)[rows]``; this
    view answers that with the cached :class:`VLAConditioning` (indexable by rows), so the VLA shares the one
    gather / score / scatter implementation with every other flow policy.
    """

    def __init__(self, policy: VLAPolicy, cond: VLAConditioning) -> None:
        self.num_steps, self.horizon, self.action_dim = policy.num_steps, policy.horizon, policy.action_dim
        self.transition = policy.transition
        self._cond = cond
        self.normalizer = self

    def normalize_obs(self, obs: Any) -> VLAConditioning:
        return self._cond


# ---- the policy -------------------------------------------------------------------------------------------


class VLAPolicy(nn.Module):
    """Vision-language-action policy ``pi(a_{1:H} | images, instruction, state)`` with the chain interface.

    Observations are :class:`VLAObservation` batches (env units); actions cross the API in env units and the
    chain lives in normalised units, as for :class:`policies.flow.FlowPolicy`. ``obs_dim`` is the state size.
    """

    policy_type = "vla"
    # Takes images, state and instruction (a VLAObservation), not the flat state vector: robo_rlft.observations.
    observation_kind = "vla"
    # Fine-tuning choices of a run (the rest of the config is the checkpoint's architecture): the noise scheme
    # and its bounds, and whether RL trains the VLM (``freeze_backbone``; LoRA adapters train either way).
    FINETUNE_FIELDS: tuple[str, ...] = ("noise", "freeze_backbone")

    def __init__(self, obs_dim: int, action_dim: int, config: VLAPolicyConfig, vlm_dir: str | Path | None = None):
        """Build the policy; ``vlm_dir`` (a checkpoint's ``vlm/`` folder) builds the VLM from its config alone,
        because the checkpoint's weights replace it; otherwise the VLM is loaded from ``config.vlm_path``."""
        super().__init__()
        self.obs_dim = obs_dim
        self.action_dim = action_dim
        self.config = config
        self.horizon = config.horizon
        self.num_steps = config.denoising_steps
        self.normalizer = Normalizer(obs_dim, action_dim)
        if vlm_dir is None and not config.vlm_path:
            raise ValueError(
                "policy.vlm_path is empty: give a local directory with a transformers VLM (written by "
                f"save_pretrained), {TINY_VLM!r} for the random tiny test model, or start from a VLA checkpoint."
            )
        if vlm_dir is not None:
            self.backbone = VLMBackbone.from_dir(vlm_dir, config.max_instruction_tokens, load_weights=False)
        elif config.vlm_path == TINY_VLM:
            self.backbone = VLMBackbone.tiny(config.max_instruction_tokens, image_size=config.tiny_image_size)
        else:
            self.backbone = VLMBackbone.from_dir(config.vlm_path, config.max_instruction_tokens)
        self._configure_backbone_training()
        self.expert = ActionExpert(obs_dim, action_dim, self.backbone.hidden_size, config)
        self.noise = self._build_scheme(config.noise)
        # Pretraining only (config.object_loss_weight): pooled prefix -> z-scored object_state.
        self.object_head: nn.Module | None = None

    @classmethod
    def from_checkpoint_dir(cls, path: str | Path, obs_dim: int, action_dim: int, config: VLAPolicyConfig) -> VLAPolicy:
        """An untrained policy shaped like the checkpoint at ``path``, its VLM built from ``path/vlm`` (config
        and tokenizer, no weights: the caller loads the checkpoint's ``model.safetensors`` into it)."""
        check_vlm_dir(Path(path) / VLM_DIR)
        return cls(obs_dim, action_dim, config, vlm_dir=Path(path) / VLM_DIR)

    def _configure_backbone_training(self) -> None:
        config = self.config
        if config.lora_rank > 0:
            try:
                from peft import LoraConfig, inject_adapter_in_model
            except ImportError as err:
                raise ImportError(f"policy.lora_rank > 0 needs peft: {VLA_INSTALL_HINT}") from err
            lora = LoraConfig(
                r=config.lora_rank,
                lora_alpha=config.lora_alpha,
                lora_dropout=0.0,
                target_modules=list(config.lora_target_modules),
            )
            try:
                inject_adapter_in_model(lora, self.backbone.vlm)
            except ValueError as err:
                raise ValueError(f"policy.lora_target_modules={config.lora_target_modules}: {err}") from err
        self._set_backbone_requires_grad()

    def _set_backbone_requires_grad(self) -> None:
        for name, param in self.backbone.named_parameters():
            # Frozen: nothing trains; LoRA: only the adapters; unfrozen: the whole VLM.
            param.requires_grad_(not self.config.freeze_backbone or "lora_" in name)
        self._vlm_checkpointing = self.config.gradient_checkpointing and self.backbone_trainable
        if self._vlm_checkpointing:
            self.backbone.vlm.activation_checkpointing_enable({"use_reentrant": False})
        self.train(self.training)

    @property
    def backbone_trainable(self) -> bool:
        return not self.config.freeze_backbone or self.config.lora_rank > 0

    def train(self, mode: bool = True) -> VLAPolicy:
        """Train mode for the expert; the VLM always runs in eval mode (no dropout), so the prefix of an
        observation is the same when sampling and when re-scoring."""
        super().train(mode)
        self.backbone.eval()
        if self._vlm_checkpointing:
            # transformers recomputes a layer in the backward pass only while that layer is in training mode:
            # flag just those layers (not their attention or dropout children), so the VLM still computes as
            # in eval mode.
            for module in self.backbone.vlm.modules():
                if getattr(module, "gradient_checkpointing", False):
                    module.training = mode
        return self

    def _build_scheme(self, config: FlowNoiseConfig) -> nn.Module:
        obs_time_dim = self.obs_dim + self.config.time_embed_dim
        return SCHEMES[config.scheme](obs_time_dim, self.config.expert_width, self.horizon, self.action_dim, config)

    def configure_finetuning(self, settings: Any) -> VLAPolicy:
        """Apply the fine-tuning fields (``FINETUNE_FIELDS``) of a run's policy config; returns the policy.

        ``settings.freeze_backbone`` decides whether RL trains the VLM: ``true`` leaves only the action expert,
        the noise head (and PPO's critic) to train, also from a checkpoint whose SFT trained the VLM
        (``vla_tiny``); ``false`` trains the whole VLM. ``settings.lora_rank > 0`` on a checkpoint without
        adapters adds them (:meth:`add_lora`); with 0 a checkpoint's own adapters are kept and train.
        """
        self.configure_noise(settings.noise)
        self.set_freeze_backbone(settings.freeze_backbone)
        if settings.lora_rank > 0 and settings.lora_rank != self.config.lora_rank:
            self.add_lora(settings.lora_rank, settings.lora_alpha, settings.lora_target_modules)
        return self

    def set_freeze_backbone(self, frozen: bool) -> None:
        """Freeze the VLM (its prefix is then computed without grad) or let it train; LoRA adapters, if any,
        train either way, and need the frozen backbone (``ValueError`` otherwise)."""
        if frozen == self.config.freeze_backbone:
            return
        self.config = dataclasses.replace(self.config, freeze_backbone=frozen)  # validates against LoRA
        self._set_backbone_requires_grad()

    def add_lora(self, rank: int, alpha: float, target_modules: list[str]) -> None:
        """Add LoRA adapters to the frozen VLM of a policy that has none (e.g. RL on a checkpoint pretrained with a
        frozen backbone). LoRA's B matrices start at zero, so the policy computes exactly what it did before."""
        if self.config.lora_rank > 0:
            raise ValueError(
                f"The policy already has LoRA adapters of rank {self.config.lora_rank}; train them with "
                f"policy.lora_rank={self.config.lora_rank} (or 0, which keeps the checkpoint's), not {rank}."
            )
        device = self.normalizer.obs_mean.device
        self.config = dataclasses.replace(
            self.config, lora_rank=rank, lora_alpha=alpha, lora_target_modules=list(target_modules)
        )  # validates: LoRA needs freeze_backbone=true
        self._configure_backbone_training()
        self.to(device)

    def configure_noise(self, config: FlowNoiseConfig) -> None:
        """Switch the noise scheme; the same scheme and head shape keep a trained head's weights."""
        if config.scheme == "flow_sde" and self.num_steps < 2:
            raise ValueError(f"policy.noise.scheme='flow_sde' needs policy.denoising_steps >= 2, got {self.num_steps}.")
        old = self.config.noise
        fresh = self._build_scheme(config)
        if (config.scheme, config.hidden_dims) == (old.scheme, old.hidden_dims):
            fresh.load_state_dict(self.noise.state_dict())
        self.noise = fresh.to(self.normalizer.obs_mean.device)
        self.config = dataclasses.replace(self.config, noise=config)

    # ---- the auxiliary object head (pretraining only) ----
    def add_object_head(self, object_dim: int) -> None:
        """Add the head that predicts ``object_dim`` object-state values from the pooled prefix (a fresh one).

        Called by pretraining before the optimiser is built when ``config.object_loss_weight > 0``; removed
        again by :meth:`remove_object_head` before the policy is saved, so a checkpoint never holds it.
        """
        if object_dim < 1:
            raise ValueError(
                f"policy.object_loss_weight={self.config.object_loss_weight} needs the dataset's object_state, but "
                f"it has {object_dim} object dims; set policy.object_loss_weight=0 for a task without objects."
            )
        width = self.backbone.hidden_size
        device = self.normalizer.obs_mean.device
        self.object_head = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, object_dim)).to(device)

    def remove_object_head(self) -> None:
        """Drop the pretraining-only object head (a no-op without one)."""
        self.object_head = None

    # ---- prefix: once per observation ----
    def _autocast(self) -> contextlib.AbstractContextManager:
        device = self.normalizer.obs_mean.device
        enabled = self.config.bf16_autocast and device.type == "cuda"
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)

    def condition(self, obs: VLAObservation) -> VLAConditioning:
        """Run the VLM once on ``obs`` and cache what every denoising step needs (state, prefix K/V)."""
        obs.validate(self.config.cameras, self.obs_dim)
        obs = obs.to(self.normalizer.obs_mean.device)
        grad = self.backbone_trainable and torch.is_grad_enabled()
        with torch.set_grad_enabled(grad), self._autocast():
            prefix = self.backbone(obs, self.config.cameras)
        features = prefix.features.float()  # (B, L, D)
        mask = prefix.mask[..., None].float()  # (B, L, 1)
        pooled = (features * mask).sum(1) / mask.sum(1).clamp_min(1.0)  # (B, D): mean over the real tokens
        prefix_kv = self.expert.prefix_kv(features)
        return VLAConditioning(self.normalizer.normalize_obs(obs.state), prefix_kv, prefix.mask, pooled_prefix=pooled)

    # ---- the critic's input ----
    def critic_feature_dim(self, source: str = "prefix") -> int:
        """Size of :meth:`critic_features`: the VLM's (``prefix``) or the expert's (``expert``) width + ``obs_dim``."""
        pooled = {"prefix": self.backbone.hidden_size, "expert": self.config.expert_width}
        if source not in pooled:
            raise ValueError(f"policy.critic_input={source!r} is not allowed; choose one of {list(pooled)}.")
        return pooled[source] + self.obs_dim

    @torch.no_grad()
    def critic_features(self, obs: VLAObservation, source: str = "prefix") -> torch.Tensor:
        """``(B, D)`` detached features a value head ``V(o)`` takes: pooled features and the normalised state.

        ``prefix``: the mean of the VLM prefix over its real (unpadded) tokens, ``(B, hidden_size)``. ``expert``:
        the action expert's pooled features at the start of the chain with the noise's mean (``x = 0, t = 0``),
        ``(B, expert_width)``: a deterministic function of the observation, as a critic input must be. Detached:
        the critic's loss never moves the policy (the VLA has no shared trunk that both would train).
        """
        return self._critic_features(self.condition(obs), source)

    @torch.no_grad()
    def sample_with_critic_features(
        self, obs: VLAObservation, source: str = "prefix", generator: torch.Generator | None = None
    ) -> tuple[ChainSample, torch.Tensor]:
        """:meth:`sample` (stochastic) and :meth:`critic_features` of ``obs`` from one VLM forward."""
        cond = self.condition(obs)
        return sample_flow_chain(self, cond, obs.batch_size, False, generator), self._critic_features(cond, source)

    def _critic_features(self, cond: VLAConditioning, source: str) -> torch.Tensor:
        self.critic_feature_dim(source)  # validates source
        if source == "prefix":
            pooled = cond.pooled_prefix  # (B, D_vlm)
        else:
            batch = cond.state.shape[0]
            x = torch.zeros(batch, self.horizon, self.action_dim, device=cond.state.device)
            _, pooled = self.velocity_and_features(x, torch.zeros(batch, device=x.device), cond)  # (B, W)
        return torch.cat([pooled, cond.state], dim=-1).detach()

    # ---- the one place that defines the chain's time grid, means and stds ----
    def time_grid(self) -> torch.Tensor:
        """``(K,)`` start times ``t_k = k / K`` of the Euler steps."""
        return torch.arange(self.num_steps, device=self.normalizer.obs_mean.device) / self.num_steps

    def velocity_and_features(
        self, x: torch.Tensor, t: torch.Tensor, cond: VLAConditioning
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x (N, H, A), t (N,)`` -> velocity ``(N, H, A)`` and expert features ``(N, W)`` (fp32, see
        ``VLAPolicyConfig.bf16_autocast``)."""
        return self.expert(x, t, cond)

    def step_inputs(self, x: torch.Tensor, k: torch.Tensor, cond: VLAConditioning) -> StepInputs:
        """Everything a scheme needs for step ``k``: ``x (N, H, A), k (N,) long``, conditioning of N pairs."""
        t = self.time_grid()[k]
        velocity, features = self.velocity_and_features(x, t, cond)
        obs_time = torch.cat([cond.gather(cond.state), self.expert.time_embed(t)], dim=-1)  # for reinflow's head
        return StepInputs(x, t, 1.0 / self.num_steps, velocity, obs_time, features)

    def transition(self, x: torch.Tensor, k: torch.Tensor, cond: VLAConditioning) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std ``(N, H, A)`` of a stochastic step ``x_{k+1} | x_k``."""
        return self.noise.mean_std(self.step_inputs(x, k, cond))

    # ---- chain interface ----
    def sample(
        self, obs: VLAObservation, deterministic: bool = False, generator: torch.Generator | None = None
    ) -> ChainSample:
        """Sample an action chunk ``(B, H, A)`` (env units) and its chain; the VLM runs once.

        Deterministic sampling is the Euler ODE (no step stochastic, the noise scheme unused), which is how
        the policy is evaluated and deployed; it is deterministic given ``x_0``. ``generator`` draws all noise.
        """
        return sample_flow_chain(self, self.condition(obs), obs.batch_size, deterministic, generator)

    def log_prob_and_entropy(
        self, obs: VLAObservation, chain: torch.Tensor, stochastic: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Re-score a stored chain: one VLM forward per observation, one batched expert forward over all
        stochastic (chain, step) pairs.

        Args:
            obs: B observations.
            chain: ``(B, K+1, H, A)`` as returned by :meth:`sample`.
            stochastic: ``(B, K)`` bool mask returned with the chain.

        Returns:
            ``(log_prob, entropy)``, each ``(B, K, H, A)`` element-wise, zero at deterministic steps.
        """
        return score_chain(_CachedConditioningView(self, self.condition(obs)), obs, chain, stochastic)

    def pretrain_loss(self, obs: VLAObservation, actions: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rectified-flow matching loss of the expert (and of the LoRA adapters or VLM when trained), plus, with
        ``config.object_loss_weight > 0``, the weighted object-state regression of the object head.

        ``actions (B, H, A)`` env units; ``obs.object_state (B, object_dim)`` z-scored (needed with the weight).
        """
        cond = self.condition(obs)
        if self.config.state_noise_std > 0.0:
            noisy = cond.state + self.config.state_noise_std * torch.randn_like(cond.state)  # (B, state_dim)
            cond = dataclasses.replace(cond, state=noisy)
        x1 = self.normalizer.normalize_action(actions.to(self.normalizer.obs_mean.device))
        x0 = torch.randn_like(x1)
        t = torch.rand(x1.shape[0], device=x1.device)
        x_t = (1 - t)[:, None, None] * x0 + t[:, None, None] * x1
        velocity, _ = self.velocity_and_features(x_t, t, cond)
        losses = {"flow_matching": (velocity - (x1 - x0)).pow(2).mean()}
        weight = self.config.object_loss_weight
        if weight > 0.0:
            if self.object_head is None or obs.object_state is None:
                raise ValueError(
                    f"policy.object_loss_weight={weight} needs the object head (VLAPolicy.add_object_head) and "
                    "VLAObservation.object_state (robo_rlft.observations.ObservationAdapter.dataset_inputs gives it)."
                )
            target = obs.object_state.to(cond.pooled_prefix.device)  # (B, object_dim)
            losses["object_state"] = weight * (self.object_head(cond.pooled_prefix) - target).pow(2).mean()
        return losses

    # ---- checkpoint assets ----
    def save_assets(self, path: Path) -> None:
        """Write the VLM's config, tokenizer and processor config to ``path / "vlm"`` (weights are in
        ``model.safetensors``), so a checkpoint loads with nothing else."""
        self.backbone.save_assets(path / VLM_DIR)

    def parameter_counts(self) -> dict[str, int]:
        """Parameters of the backbone, the expert and the noise head, and how many of them train."""
        groups = {"backbone": self.backbone, "expert": self.expert, "noise": self.noise}
        counts = {name: sum(p.numel() for p in module.parameters()) for name, module in groups.items()}
        counts["trainable"] = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return counts


# ---- checkpoints ------------------------------------------------------------------------------------------
