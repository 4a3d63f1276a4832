"""DPPO-style diffusion policy: ε-prediction DDPM/DDIM over action chunks, behind the chain interface.

Pretraining fits an ε-prediction network on a diffusers noise schedule (T = ``train_steps``). Sampling
runs K steps from ``x_0 ~ N(0, I)`` (the chain's index k counts *denoising* steps, so diffusion
timestep ``t_k`` decreases with k). RL fine-tuning follows DPPO (Ren et al. 2024, "Diffusion Policy
Policy Optimization"), whose "denoising MDP" makes each step a Gaussian transition:

* ``ddpm``: K = T steps with the DDPM posterior ``N(mu_theta, beta_tilde_t)``. Only the last
  ``finetune_steps`` steps are fine-tuned and scored; the earlier ones run a frozen copy of the
  pretrained network (:meth:`DiffusionPolicy.freeze_base`), still with noise, outside the likelihood.
* ``ddim``: K = ``ddim_steps`` η-DDIM steps, all fine-tuned and scored.

Every std is floored at ``sigma_min`` so that late steps (where the DDPM posterior std goes to 0)
explore and keep finite log-probs. Deterministic sampling is DDIM with η = 0 on the same time grid.

diffusers provides only the schedule (``alphas_cumprod`` and the DDIM timestep grid); the step
means and stds are written out here in closed form in :meth:`DiffusionPolicy._step`, the single
function that sampling, re-scoring and deterministic sampling all call.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from policies.chain import ChainSample, gaussian_log_prob, score_chain
from policies.mlp import SinusoidalEmbedding, mlp
from policies.normalizer import Normalizer

SAMPLERS: tuple[str, ...] = ("ddpm", "ddim")
BACKBONES: tuple[str, ...] = ("mlp", "unet1d")
BETA_SCHEDULES: tuple[str, ...] = ("squaredcos_cap_v2", "linear", "scaled_linear")
# x_0 ~ N(0, I) only matches the forward process if almost no signal survives at t = T - 1.
_MAX_FINAL_ALPHA_BAR = 0.01


@dataclass
class DiffusionPolicyConfig:
    """Architecture, noise schedule and RL noise of :class:`DiffusionPolicy`.

    Attributes:
        horizon: H, actions per predicted chunk.
        train_steps: T, diffusion timesteps of the noise schedule (DPPO: 20). ``ddpm`` samples all T.
        sampler: ``ddpm`` (K = T posterior steps) or ``ddim`` (K = ``ddim_steps`` η-DDIM steps).
        ddim_steps: K for ``ddim``; timesteps follow diffusers' ``leading`` spacing (e.g. 16, 12, 8, 4, 0).
        backbone: ε-network, ``mlp`` on the flattened chunk or ``unet1d`` over the horizon axis.
        hidden_dims: widths of the ``mlp`` backbone.
        unet_dims: ``[level, bottleneck]`` channels of the ``unet1d`` backbone (one down/up level).
        time_embed_dim: size of the sinusoidal embedding of ``t / T`` (even).
        beta_schedule: diffusers ``beta_schedule``; ``linear``/``scaled_linear`` use diffusers' betas
            (1e-4 .. 0.02), which only reach pure noise for T in the hundreds.
        clip_sample: clip the predicted x_0 to [-1, 1] (the normalised action range) in every step.
        finetune_steps: K', ``ddpm`` only: the last K' steps are fine-tuned and stochastic in the
            likelihood; the first K - K' use the frozen base network. ``ddim`` fine-tunes all K steps.
        sigma_min: floor of every sampling / likelihood std, in normalised action units.
        eta: DDIM η of the stochastic ``ddim`` steps (``ddpm`` is η = 1 by definition).
    """

    horizon: int = 4
    train_steps: int = 20
    sampler: str = "ddpm"
    ddim_steps: int = 5
    backbone: str = "mlp"
    hidden_dims: list[int] = field(default_factory=lambda: [256, 256, 256])
    unet_dims: list[int] = field(default_factory=lambda: [64, 128])
    time_embed_dim: int = 16
    beta_schedule: str = "squaredcos_cap_v2"
    clip_sample: bool = True
    finetune_steps: int = 10
    sigma_min: float = 0.1
    eta: float = 1.0

    def __post_init__(self) -> None:
        for name in ("horizon", "train_steps", "ddim_steps", "finetune_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"policy.{name} must be >= 1, got {getattr(self, name)}.")
        for name, allowed in (("sampler", SAMPLERS), ("backbone", BACKBONES), ("beta_schedule", BETA_SCHEDULES)):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"policy.{name}={getattr(self, name)!r} is not allowed; choose one of {list(allowed)}."
                )
        if self.sampler == "ddim" and self.ddim_steps > self.train_steps:
            raise ValueError(
                f"policy.ddim_steps={self.ddim_steps} exceeds policy.train_steps={self.train_steps}: "
                "DDIM samples a subset of the training timesteps."
            )
        if self.sampler == "ddpm" and self.finetune_steps > self.train_steps:
            raise ValueError(
                f"policy.finetune_steps={self.finetune_steps} exceeds the {self.train_steps} ddpm sampling steps "
                f"(policy.train_steps); allowed: 1..{self.train_steps}."
            )
        if not self.hidden_dims or min(self.hidden_dims) < 1:
            raise ValueError(f"policy.hidden_dims must be a non-empty list of positive ints, got {self.hidden_dims}.")
        if len(self.unet_dims) != 2 or min(self.unet_dims) < 1:
            raise ValueError(f"policy.unet_dims must be two positive ints [level, bottleneck], got {self.unet_dims}.")
        if self.time_embed_dim < 2 or self.time_embed_dim % 2:
            raise ValueError(f"policy.time_embed_dim must be an even int >= 2, got {self.time_embed_dim}.")
        if not isinstance(self.clip_sample, bool):
            raise ValueError(f"policy.clip_sample must be true or false, got {self.clip_sample!r}.")
        if not self.sigma_min > 0:
            raise ValueError(f"policy.sigma_min must be > 0 (it keeps log-probs finite), got {self.sigma_min}.")
        if not 0 <= self.eta <= 1:
            raise ValueError(f"policy.eta must be in [0, 1] (0: DDIM, 1: DDPM-like noise), got {self.eta}.")

    @property
    def num_steps(self) -> int:
        """K, the number of sampling steps."""
        return self.train_steps if self.sampler == "ddpm" else self.ddim_steps


def _noise_schedule(config: DiffusionPolicyConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``(alphas_cumprod (T,), timesteps (K,) long)`` from diffusers, decreasing timesteps.

    diffusers is imported here, not at module level: it costs seconds and only the schedule is used.
    """
    from diffusers import DDIMScheduler, DDPMScheduler

    if config.sampler == "ddpm":
        scheduler = DDPMScheduler(num_train_timesteps=config.train_steps, beta_schedule=config.beta_schedule)
        return scheduler.alphas_cumprod.clone(), scheduler.timesteps.clone().long()  # T-1, ..., 0
    scheduler = DDIMScheduler(
        num_train_timesteps=config.train_steps,
        beta_schedule=config.beta_schedule,
        timestep_spacing="leading",
        steps_offset=0,
        set_alpha_to_one=True,
    )
    scheduler.set_timesteps(config.ddim_steps)
    return scheduler.alphas_cumprod.clone(), scheduler.timesteps.clone().long()


# ---- ε-networks: (x (N, H, A), t (N,) in [0, 1), obs_norm (N, obs_dim)) -> eps (N, H, A) ---------------------


class MLPNoiseNet(nn.Module):
    """ε-network: an MLP on ``[obs_norm, emb(t), x.flatten()]``."""

    def __init__(self, obs_dim: int, horizon: int, action_dim: int, config: DiffusionPolicyConfig) -> None:
        super().__init__()
        chunk_dim = horizon * action_dim
        self.time_embed = SinusoidalEmbedding(config.time_embed_dim)
        self.net = mlp(obs_dim + config.time_embed_dim + chunk_dim, config.hidden_dims, chunk_dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor, obs_norm: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([obs_norm, self.time_embed(t), x.flatten(1)], dim=-1)).view_as(x)


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(8, channels), channels)


class _FiLMResBlock(nn.Module):
    """Two Conv1d-GroupNorm-Mish layers; FiLM (per-channel scale and shift from ``cond``) between them."""

    def __init__(self, in_ch: int, out_ch: int, cond_dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv1d(in_ch, out_ch, 3, padding=1), _group_norm(out_ch), nn.Mish())
        self.conv2 = nn.Sequential(nn.Conv1d(out_ch, out_ch, 3, padding=1), _group_norm(out_ch), nn.Mish())
        self.film = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, 2 * out_ch))
        self.skip = nn.Conv1d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.conv1(x)  # (N, C, L)
        scale, shift = self.film(cond)[:, :, None].chunk(2, dim=1)  # (N, C, 1) each
        return self.conv2((1 + scale) * h + shift) + self.skip(x)


class UNet1DNoiseNet(nn.Module):
    """ε-network: a small temporal U-Net over the horizon axis (Chi et al.'s Diffusion Policy, one level).

    Actions are channels, chunk steps are the length. Conditioning ``[obs_norm, emb(t)]`` enters every
    block through FiLM. The horizon is zero-padded to an even length for the stride-2 down/up pair and
    cropped back afterwards.
    """

    def __init__(self, obs_dim: int, horizon: int, action_dim: int, config: DiffusionPolicyConfig) -> None:
        super().__init__()
        level, bottleneck = config.unet_dims
        cond_dim = obs_dim + config.time_embed_dim
        self.time_embed = SinusoidalEmbedding(config.time_embed_dim)
        self.down = nn.ModuleList([_FiLMResBlock(action_dim, level, cond_dim), _FiLMResBlock(level, level, cond_dim)])
        self.downsample = nn.Conv1d(level, level, 3, stride=2, padding=1)
        self.mid = nn.ModuleList(
            [_FiLMResBlock(level, bottleneck, cond_dim), _FiLMResBlock(bottleneck, bottleneck, cond_dim)]
        )
        self.upsample = nn.ConvTranspose1d(bottleneck, bottleneck, 4, stride=2, padding=1)
        self.up = nn.ModuleList(
            [_FiLMResBlock(bottleneck + level, level, cond_dim), _FiLMResBlock(level, level, cond_dim)]
        )
        self.head = nn.Conv1d(level, action_dim, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, obs_norm: torch.Tensor) -> torch.Tensor:
        horizon = x.shape[1]
        cond = torch.cat([obs_norm, self.time_embed(t)], dim=-1)  # (N, cond_dim)
        h = nn.functional.pad(x.transpose(1, 2), (0, horizon % 2))  # (N, A, L), L even
        for block in self.down:
            h = block(h, cond)
        skip = h  # (N, level, L)
        h = self.downsample(h)  # (N, level, L/2)
        for block in self.mid:
            h = block(h, cond)
        h = torch.cat([self.upsample(h), skip], dim=1)  # (N, bottleneck + level, L)
        for block in self.up:
            h = block(h, cond)
        return self.head(h)[:, :, :horizon].transpose(1, 2)  # (N, H, A)


_BACKBONES: dict[str, type[nn.Module]] = {"mlp": MLPNoiseNet, "unet1d": UNet1DNoiseNet}


class DiffusionPolicy(nn.Module):
    """Diffusion policy ``pi(a_{1:H} | o)`` over action chunks with DPPO's denoising-MDP likelihood.

    Observations and actions cross the API in env units; the chain lives in normalised action units
    and ``actions = normalizer.unnormalize_action(x_K.clamp(-1, 1))``.

    Networks: ``model`` is the trained ε-network (the only one in ``state_dict`` and ``parameters()``).
    ``ddpm`` fine-tuning also uses ``base_model``, a frozen copy of ``model`` made by
    :meth:`freeze_base` when fine-tuning starts; it is kept outside the module tree, so it is never
    optimised, saved or loaded.
    """

    policy_type = "diffusion"
    # Config fields that are fine-tuning choices rather than architecture.
    FINETUNE_FIELDS: tuple[str, ...] = ("finetune_steps", "sigma_min", "eta")

    def __init__(self, obs_dim: int, action_dim: int, config: DiffusionPolicyConfig) -> None:
        super().__init__()
        self.obs_dim = obs_dim
        self.action_dim = action_dim
        self.config = config
        self.horizon = config.horizon
        self.num_steps = config.num_steps
        self.normalizer = Normalizer(obs_dim, action_dim)
        self.model = _BACKBONES[config.backbone](obs_dim, config.horizon, action_dim, config)
        object.__setattr__(self, "_base_model", None)  # plain attribute: see freeze_base

        alphas_cumprod, timesteps = _noise_schedule(config)
        if alphas_cumprod[-1] > _MAX_FINAL_ALPHA_BAR:
            raise ValueError(
                f"policy.beta_schedule={config.beta_schedule!r} with policy.train_steps={config.train_steps} keeps "
                f"alpha_bar_T={alphas_cumprod[-1].item():.3g} of the signal at the last timestep (must be <= "
                f"{_MAX_FINAL_ALPHA_BAR}), so sampling from pure noise would not match training. Use "
                "'squaredcos_cap_v2' or many more train_steps."
            )
        # Schedule tensors are recomputed from the config (persistent=False): checkpoints hold weights only.
        alpha_bar = alphas_cumprod[timesteps]
        # DDIM/DDPM's x_{-1} is the clean sample: alpha_bar_prev = 1 after the last step (set_alpha_to_one).
        alpha_bar_prev = torch.cat([alpha_bar[1:], torch.ones(1)])
        self.register_buffer("alphas_cumprod", alphas_cumprod, persistent=False)  # (T,)
        self.register_buffer("timesteps", timesteps, persistent=False)  # (K,) t_k, decreasing
        self.register_buffer("alpha_bar", alpha_bar, persistent=False)  # (K,) alpha_bar at t_k
        self.register_buffer("alpha_bar_prev", alpha_bar_prev, persistent=False)  # (K,) at t_{k+1}
        # The steps that are fine-tuned and scored: ddpm's last K', every ddim step.
        first_tuned = self.num_steps - config.finetune_steps if config.sampler == "ddpm" else 0
        self._step_is_stochastic = [k >= first_tuned for k in range(self.num_steps)]
        # DDPM's posterior is η-DDIM with η = 1 on consecutive timesteps (see _step).
        self._eta = 1.0 if config.sampler == "ddpm" else config.eta

    def configure_finetuning(self, settings: object) -> DiffusionPolicy:
        """A policy with the fine-tuning fields (``FINETUNE_FIELDS``) of a run's policy config and
        this one's weights (the schedule tensors derive from the config, so it is rebuilt)."""
        changes = {name: getattr(settings, name) for name in self.FINETUNE_FIELDS}
        if all(getattr(self.config, name) == value for name, value in changes.items()):
            return self
        policy = DiffusionPolicy(self.obs_dim, self.action_dim, dataclasses.replace(self.config, **changes))
        policy.load_state_dict(self.state_dict())
        if self.base_model is not None:
            object.__setattr__(policy, "_base_model", self.base_model)
        return policy.to(self.normalizer.obs_mean.device)

    # ---- frozen base network (DPPO's `actor` beside `actor_ft`) ----
    @property
    def base_model(self) -> nn.Module | None:
        """The frozen pretrained ε-network of ddpm's early steps (None before :meth:`freeze_base`)."""
        return self._base_model

    def freeze_base(self) -> None:
        """Snapshot ``model`` as the frozen base network; call it once, when fine-tuning starts.

        The copy is set with ``object.__setattr__`` so that it is not a submodule: it stays out of
        ``parameters()`` (no optimiser touches it), ``state_dict()`` (checkpoints stay the plain
        pretrained layout) and ``.to()`` (it follows the policy's device lazily in ``_early_net``).
        """
        base = copy.deepcopy(self.model).requires_grad_(False).eval()
        object.__setattr__(self, "_base_model", base)

    def _early_net(self, device: torch.device) -> nn.Module:
        """The network of ddpm's non-fine-tuned steps: the frozen base, or ``model`` before fine-tuning."""
        base = self._base_model
        if base is None:  # not fine-tuning yet: model is the pretrained network
            return self.model
        if next(base.parameters()).device != device:
            base.to(device)
        return base

    def stochastic_steps(self) -> torch.Tensor:
        """``(K,)`` bool: the steps that are fine-tuned and part of the likelihood."""
        return torch.tensor(self._step_is_stochastic, device=self.alpha_bar.device)

    # ---- the one place that defines the time grid, means and stds ----
    def predict_noise(
        self, x: torch.Tensor, timestep: torch.Tensor, obs_norm: torch.Tensor, net: nn.Module | None = None
    ) -> torch.Tensor:
        """``eps_theta``: ``x (N, H, A), timestep (N,) long in 0..T-1, obs_norm (N, obs_dim) -> (N, H, A)``."""
        net = self.model if net is None else net
        return net(x, timestep.float() / self.config.train_steps, obs_norm)

    def _step(
        self, x: torch.Tensor, k: torch.Tensor, obs_norm: torch.Tensor, eta: float, net: nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """η-DDIM step ``x_k -> x_{k+1}`` from timestep ``t_k`` to ``t_{k+1}``: ``(mean, sigma)``, each (N, H, A).

        With ``a = alpha_bar(t_k)``, ``a' = alpha_bar(t_{k+1})`` (1 after the last step)::

            x0    = (x - sqrt(1 - a) eps) / sqrt(a)            clipped to [-1, 1] if clip_sample,
            eps   = (x - sqrt(a) x0) / sqrt(1 - a)             re-derived from the clipped x0,
            sigma = eta * sqrt((1 - a') / (1 - a)) * sqrt(1 - a / a'),
            mean  = sqrt(a') x0 + sqrt(1 - a' - sigma^2) eps.

        On consecutive timesteps with eta = 1, sigma^2 is the DDPM posterior variance beta_tilde_t and
        the mean is the DDPM posterior mean (diffusers' DDPMScheduler.step) — so one formula serves both
        samplers. ``sigma`` is the scheme's raw std, *before* the ``sigma_min`` floor; the mean always
        uses the raw sigma (see :meth:`transition`).
        """
        a = self.alpha_bar[k][:, None, None]  # (N, 1, 1)
        a_prev = self.alpha_bar_prev[k][:, None, None]
        eps = self.predict_noise(x, self.timesteps[k], obs_norm, net)
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        if self.config.clip_sample:
            x0 = x0.clamp(-1.0, 1.0)
            eps = (x - a.sqrt() * x0) / (1 - a).sqrt()  # diffusers' use_clipped_model_output; DPPO does the same
        sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
        mean = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp_min(0).sqrt() * eps
        return mean, sigma.expand_as(mean)

    def transition(self, x: torch.Tensor, k: torch.Tensor, obs_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of a fine-tuned step ``x_{k+1} | x_k`` under ``model``.

        Args:
            x: ``(N, H, A)`` normalised units; k: ``(N,)`` long step index in ``0..K-1``; obs_norm: ``(N, obs_dim)``.

        Returns:
            ``(mean, std)``, each ``(N, H, A)``; ``std = max(sigma, sigma_min)``.

        The floor follows DPPO: it changes only the sampling noise and the likelihood, while the mean
        keeps the raw sigma of the η-DDIM update (DPPO's ``dir_xt_coef = sqrt(1 - a' - sigma^2)``). So
        the mean is exactly the base sampler's step and fine-tuning starts from the pretrained behaviour;
        the floor is extra exploration around it, not a different sampler. (Putting the floored std into
        the mean would change the pretrained DDIM means and, for DDPM, break the posterior formula.)
        """
        mean, sigma = self._step(x, k, obs_norm, self._eta, self.model)
        return mean, sigma.clamp_min(self.config.sigma_min)

    # ---- chain interface ----
    def sample(
        self, obs: torch.Tensor, deterministic: bool = False, generator: torch.Generator | None = None
    ) -> ChainSample:
        """Sample an action chunk. ``obs (B, obs_dim)`` in env units.

        Stochastic: fine-tuned steps draw from :meth:`transition` and are scored. ddpm's early steps run
        the frozen base network with its DDPM noise (std floored like every other step), as in DPPO;
        they shape the input distribution of the fine-tuned steps but are not part of the likelihood
        (``stochastic`` False, log_prob and std zero). The first stochastic call freezes the base if
        :meth:`freeze_base` was not called: that is the start of RL data collection.
        Deterministic: DDIM with η = 0 on the same grid (base network on ddpm's early steps once frozen),
        deterministic given ``x_0``. ``generator`` draws all noise (default: the global torch RNG).
        Noise is not clipped (DPPO clips it at ±3), so the likelihood is exact.
        """
        if not deterministic and self._base_model is None and not all(self._step_is_stochastic):
            self.freeze_base()
        obs_norm = self.normalizer.normalize_obs(obs)
        batch, device = obs.shape[0], obs.device
        x = torch.randn(batch, self.horizon, self.action_dim, device=device, generator=generator)
        chain, log_probs, stds = [x], [], []
        zeros = torch.zeros_like(x)
        for k in range(self.num_steps):
            step = torch.full((batch,), k, device=device, dtype=torch.long)
            tuned = self._step_is_stochastic[k]
            net = self.model if tuned else self._early_net(device)
            if deterministic:
                x, _ = self._step(x, step, obs_norm, 0.0, net)
                log_prob, std = zeros, zeros
            elif tuned:
                mean, std = self.transition(x, step, obs_norm)
                x = mean + std * torch.randn(mean.shape, device=device, generator=generator)
                log_prob = gaussian_log_prob(x, mean, std)
            else:
                mean, sigma = self._step(x, step, obs_norm, self._eta, net)
                x = mean + sigma.clamp_min(self.config.sigma_min) * torch.randn(
                    mean.shape, device=device, generator=generator
                )
                log_prob, std = zeros, zeros
            chain.append(x)
            log_probs.append(log_prob)
            stds.append(std)
        mask = torch.tensor([tuned and not deterministic for tuned in self._step_is_stochastic], device=device)
        # The clip to [-1, 1] acts on the executed action only; the likelihood is of the unclipped
        # chain, which is exact if the clip is seen as part of the environment.
        actions = self.normalizer.unnormalize_action(x.clamp(-1.0, 1.0))
        return ChainSample(
            actions=actions,
            chain=torch.stack(chain, 1),
            log_prob=torch.stack(log_probs, 1),
            std=torch.stack(stds, 1),
            stochastic=mask.expand(batch, self.num_steps).clone(),
        )

    def log_prob_and_entropy(
        self, obs: torch.Tensor, chain: torch.Tensor, stochastic: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Re-score a stored chain in one batched forward over its stochastic ``(b, k)`` pairs.

        Args:
            obs: ``(B, obs_dim)`` env units.
            chain: ``(B, K+1, H, A)`` as returned by :meth:`sample`.
            stochastic: ``(B, K)`` bool mask as returned by :meth:`sample`.

        Returns:
            ``(log_prob, entropy)``, each ``(B, K, H, A)`` element-wise, zero where ``stochastic`` is False.
        """
        first_tuned = self.num_steps - sum(self._step_is_stochastic)
        if stochastic.ndim == 2 and stochastic[:, :first_tuned].any():
            raise ValueError(
                f"stochastic marks a step before the {sum(self._step_is_stochastic)} fine-tuned ones; "
                "those steps run the frozen base network and have no likelihood."
            )
        return score_chain(self, obs, chain, stochastic)

    def pretrain_loss(self, obs: torch.Tensor, actions: torch.Tensor) -> dict[str, torch.Tensor]:
        """ε-prediction MSE on ``model``. ``obs (B, obs_dim)``, ``actions (B, H, A)`` env units.

        Timesteps are uniform over all T training timesteps (DDIM samples a subset of them).
        """
        x0 = self.normalizer.normalize_action(actions)
        t = torch.randint(0, self.config.train_steps, (x0.shape[0],), device=x0.device)
        eps = torch.randn_like(x0)
        a = self.alphas_cumprod[t][:, None, None]
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        loss = (self.predict_noise(x_t, t, self.normalizer.normalize_obs(obs)) - eps).pow(2).mean()
        return {"eps_prediction": loss}
