"""Rectified-flow policy with K Euler steps, made trainable by policy gradients through a noise scheme."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from policies.chain import ChainSample, gaussian_log_prob, score_chain
from policies.mlp import SinusoidalEmbedding, mlp
from policies.noise import SCHEMES, FlowNoiseConfig, StepInputs
from policies.normalizer import Normalizer


@dataclass
class FlowPolicyConfig:
    """Architecture of :class:`FlowPolicy`.

    Attributes:
        horizon: H, actions per predicted chunk.
        denoising_steps: K, Euler steps from noise (t=0) to action (t=1).
        hidden_dims: widths of the velocity MLP.
        time_embed_dim: size of the sinusoidal embedding of t (and of the step size d).
        noise: the noise scheme that makes the chain stochastic during RL fine-tuning.
        shortcut: a shortcut model (Frans et al. 2024): the velocity is also conditioned on the step
            size d and trained for self-consistency, so one model samples well at 1, 2, 4, ... steps;
            K (``denoising_steps``) is then a sampling choice, changeable at fine-tuning time.
        shortcut_levels: L, the smallest step size is 2^-L (K must be a power of two <= 2^L).
        shortcut_fraction: share of each pretraining batch spent on self-consistency targets.
    """

    horizon: int = 4
    denoising_steps: int = 4
    hidden_dims: list[int] = field(default_factory=lambda: [256, 256, 256])
    time_embed_dim: int = 16
    noise: FlowNoiseConfig = field(default_factory=FlowNoiseConfig)
    shortcut: bool = False
    shortcut_levels: int = 7
    shortcut_fraction: float = 0.25

    def __post_init__(self) -> None:
        if self.shortcut:
            k = self.denoising_steps
            if k & (k - 1) or k > 2**self.shortcut_levels:
                raise ValueError(
                    f"policy.denoising_steps={k}: a shortcut model samples with a power of two steps "
                    f"<= 2^policy.shortcut_levels = {2**self.shortcut_levels} (1, 2, 4, ...)."
                )
            if not 0.0 < self.shortcut_fraction < 1.0:
                raise ValueError(f"policy.shortcut_fraction must be in (0, 1), got {self.shortcut_fraction}.")
        for name in ("horizon", "denoising_steps", "time_embed_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"policy.{name} must be >= 1, got {getattr(self, name)}.")
        if self.noise.scheme == "flow_sde" and self.denoising_steps < 2:
            # sigma_t = a sqrt((1-t)/t) is infinite at t=0; with one step it would be taken at t=1, where it is 0.
            raise ValueError(
                f"policy.noise.scheme='flow_sde' needs policy.denoising_steps >= 2, got {self.denoising_steps}; "
                "use scheme 'reinflow' or 'flow_noise' for one-step flows."
            )
        if not self.hidden_dims or min(self.hidden_dims) < 1:
            raise ValueError(f"policy.hidden_dims must be a non-empty list of positive ints, got {self.hidden_dims}.")


class FlowPolicy(nn.Module):
    """Flow-matching policy ``pi(a_{1:H} | o)`` over action chunks.

    The velocity net ``v_theta(x, t, o)`` is an MLP on ``[o_norm, emb(t), x.flatten()]``. Sampling runs
    K Euler steps on the grid ``t_k = k / K``; the noise scheme (``policies.noise``) turns the steps
    it makes stochastic into Gaussians ``x_{k+1} ~ N(mean_k, std_k^2)`` with an exact log-probability.
    Observations and actions cross the API in env units; the chain lives in normalised units.
    """

    policy_type = "flow"

    @property
    def FINETUNE_FIELDS(self) -> tuple[str, ...]:
        """Config fields that are fine-tuning choices rather than architecture (a shortcut model's K too)."""
        return ("noise", "denoising_steps") if self.config.shortcut else ("noise",)

    def __init__(self, obs_dim: int, action_dim: int, config: FlowPolicyConfig) -> None:
        super().__init__()
        self.obs_dim = obs_dim
        self.action_dim = action_dim
        self.config = config
        self.horizon = config.horizon
        self.num_steps = config.denoising_steps
        chunk_dim = config.horizon * action_dim
        self.normalizer = Normalizer(obs_dim, action_dim)
        self.time_embed = SinusoidalEmbedding(config.time_embed_dim)
        step_size_dim = config.time_embed_dim if config.shortcut else 0
        self.velocity_net = mlp(
            obs_dim + config.time_embed_dim + step_size_dim + chunk_dim, config.hidden_dims, chunk_dim
        )
        self.noise = self._build_scheme(config.noise)

    def _build_scheme(self, config: FlowNoiseConfig) -> nn.Module:
        obs_time_dim = self.obs_dim + self.config.time_embed_dim
        return SCHEMES[config.scheme](obs_time_dim, self.config.hidden_dims[-1], self.horizon, self.action_dim, config)

    def configure_finetuning(self, settings: object) -> FlowPolicy:
        """Apply the fine-tuning fields (``FINETUNE_FIELDS``) of a run's policy config; returns the policy."""
        if self.config.shortcut and settings.denoising_steps != self.num_steps:
            self.config = dataclasses.replace(self.config, denoising_steps=settings.denoising_steps)
            self.num_steps = settings.denoising_steps
        self.configure_noise(settings.noise)
        return self

    def configure_noise(self, config: FlowNoiseConfig) -> None:
        """Switch the noise scheme (a fine-tuning choice, not part of the base model).

        The same scheme with the same head shape keeps a trained head's weights (new std bounds
        apply); anything else starts a fresh scheme.
        """
        old = self.config.noise
        if (config.scheme, config.hidden_dims) != (old.scheme, old.hidden_dims):
            self.noise = self._build_scheme(config).to(self.normalizer.obs_mean.device)
        else:
            fresh = self._build_scheme(config)
            fresh.load_state_dict(self.noise.state_dict())
            self.noise = fresh.to(self.normalizer.obs_mean.device)
        self.config = dataclasses.replace(self.config, noise=config)

    # ---- the one place that defines the chain's time grid, means and stds ----
    def time_grid(self) -> torch.Tensor:
        """``(K,)`` start times ``t_k = k / K`` of the Euler steps."""
        return torch.arange(self.num_steps, device=self.normalizer.obs_mean.device) / self.num_steps

    def velocity_and_features(
        self, x: torch.Tensor, t: torch.Tensor, obs_norm: torch.Tensor, step_size: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x (N, H, A), t (N,), obs_norm (N, obs_dim)`` -> velocity ``(N, H, A)``, the velocity
        net's last hidden features ``(N, F)`` and the ``[obs_norm, emb(t)]`` conditioning ``(N, obs_dim + E)``.

        A shortcut model also takes the step size ``step_size (N,)`` (default: the sampler's ``1/K``).
        """
        obs_time = torch.cat([obs_norm, self.time_embed(t)], dim=-1)
        inputs = [obs_time]
        if self.config.shortcut:
            step_size = torch.full_like(t, 1.0 / self.num_steps) if step_size is None else step_size
            inputs.append(self.time_embed(step_size))
        features = self.velocity_net[:-1](torch.cat([*inputs, x.flatten(1)], dim=-1))
        return self.velocity_net[-1](features).view_as(x), features, obs_time

    def velocity(
        self, x: torch.Tensor, t: torch.Tensor, obs_norm: torch.Tensor, step_size: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``v_theta``: ``x (N, H, A), t (N,), obs_norm (N, obs_dim) -> (N, H, A)``."""
        return self.velocity_and_features(x, t, obs_norm, step_size)[0]

    def step_inputs(self, x: torch.Tensor, k: torch.Tensor, obs_norm: torch.Tensor) -> StepInputs:
        """Everything a scheme needs for step ``k``: ``x (N, H, A), k (N,) long, obs_norm (N, obs_dim)``."""
        t = self.time_grid()[k]
        velocity, features, obs_time = self.velocity_and_features(x, t, obs_norm)
        return StepInputs(x, t, 1.0 / self.num_steps, velocity, obs_time, features)

    def transition(self, x: torch.Tensor, k: torch.Tensor, obs_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of a stochastic step ``x_{k+1} | x_k``.

        ``x (N, H, A), k (N,) long, obs_norm (N, obs_dim) -> ((N, H, A), (N, H, A))``.
        """
        return self.noise.mean_std(self.step_inputs(x, k, obs_norm))

    # ---- chain interface ----
    def sample(
        self, obs: torch.Tensor, deterministic: bool = False, generator: torch.Generator | None = None
    ) -> ChainSample:
        """Sample an action chunk. ``obs (B, obs_dim)`` in env units.

        Deterministic sampling is the plain Euler ODE (no step is stochastic), which is how the
        policy is evaluated and deployed; it is deterministic given ``x_0``. ``generator`` draws all
        noise (default: the global torch RNG); evaluation passes its own so that it never shifts the
        training RNG stream.
        """
        obs_norm = self.normalizer.normalize_obs(obs)
        return sample_flow_chain(self, obs_norm, obs.shape[0], deterministic, generator)

    def log_prob_and_entropy(
        self, obs: torch.Tensor, chain: torch.Tensor, stochastic: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Re-score a stored chain in one batched forward over its stochastic steps.

        Args:
            obs: ``(B, obs_dim)`` env units.
            chain: ``(B, K+1, H, A)`` as returned by :meth:`sample`.
            stochastic: ``(B, K)`` bool mask returned with the chain.

        Returns:
            ``(log_prob, entropy)``, each ``(B, K, H, A)`` element-wise, zero at deterministic steps.
        """
        return score_chain(self, obs, chain, stochastic)

    def pretrain_loss(self, obs: torch.Tensor, actions: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rectified-flow matching loss (plus, for a shortcut model, the self-consistency loss).

        ``obs (B, obs_dim)``, ``actions (B, H, A)`` env units.
        """
        x1 = self.normalizer.normalize_action(actions)
        obs_norm = self.normalizer.normalize_obs(obs)
        x0 = torch.randn_like(x1)
        if not self.config.shortcut:
            t = torch.rand(x1.shape[0], device=x1.device)
            x_t = (1 - t)[:, None, None] * x0 + t[:, None, None] * x1
            return {"flow_matching": (self.velocity(x_t, t, obs_norm) - (x1 - x0)).pow(2).mean()}
        # Shortcut: flow matching at step size 0 on most of the batch; on the rest, one step of size
        # 2d must equal two steps of size d (targets without gradient), d = 2^-(j+1), j < L.
        n_sc = max(1, int(self.config.shortcut_fraction * x1.shape[0]))
        fm, sc = slice(n_sc, None), slice(0, n_sc)
        t = torch.rand(x1.shape[0], device=x1.device)
        levels = self.config.shortcut_levels
        d = 0.5 ** (torch.randint(levels, (n_sc,), device=x1.device) + 1)  # (n_sc,) in {1/2, ..., 2^-L}
        t[sc] = torch.floor(t[sc] / (2 * d)) * (2 * d)  # on the grid of 2d, so t + 2d <= 1
        x_t = (1 - t)[:, None, None] * x0 + t[:, None, None] * x1
        zero = torch.zeros_like(t[fm])
        fm_loss = (self.velocity(x_t[fm], t[fm], obs_norm[fm], zero) - (x1[fm] - x0[fm])).pow(2).mean()
        with torch.no_grad():
            first = self.velocity(x_t[sc], t[sc], obs_norm[sc], d)
            midpoint = x_t[sc] + d[:, None, None] * first
            target = (first + self.velocity(midpoint, t[sc] + d, obs_norm[sc], d)) / 2
        sc_loss = (self.velocity(x_t[sc], t[sc], obs_norm[sc], 2 * d) - target).pow(2).mean()
        return {"flow_matching": fm_loss, "self_consistency": sc_loss}


def sample_flow_chain(
    policy: nn.Module,
    cond: Any,
    batch: int,
    deterministic: bool = False,
    generator: torch.Generator | None = None,
) -> ChainSample:
    """K Euler steps of a flow policy from ``x_0 ~ N(0, I)``, each made stochastic where the noise scheme says.

    The one sampling loop of every flow-matching policy (``FlowPolicy``, the VLA's action expert): ``policy``
    provides ``step_inputs(x (B,H,A), k (B,), cond) -> StepInputs``, ``noise`` (the scheme), ``num_steps``,
    ``horizon``, ``action_dim`` and ``normalizer``; ``cond`` is whatever its ``step_inputs`` conditions on
    (normalised observations, a VLA's cached prefix) for ``batch`` observations.
    """
    device = policy.normalizer.obs_mean.device
    x = torch.randn(batch, policy.horizon, policy.action_dim, device=device, generator=generator)
    if deterministic:
        stochastic = torch.zeros(batch, policy.num_steps, dtype=torch.bool, device=device)
    else:
        stochastic = policy.noise.stochastic_mask(batch, policy.num_steps, device, generator)  # (B, K)
    chain, log_probs, stds = [x], [], []
    for k in range(policy.num_steps):
        inputs = policy.step_inputs(x, torch.full((batch,), k, device=device, dtype=torch.long), cond)
        x_next = x + inputs.velocity * inputs.dt  # the ODE (Euler) step
        noisy = stochastic[:, k]  # (B,)
        log_prob, std = torch.zeros_like(x), torch.zeros_like(x)
        if noisy.any():
            mean, std_k = policy.noise.mean_std(inputs.select(noisy))
            x_noisy = mean + std_k * torch.randn(mean.shape, device=device, generator=generator)
            x_next[noisy] = x_noisy
            log_prob[noisy] = gaussian_log_prob(x_noisy, mean, std_k)
            std[noisy] = std_k
        x = x_next
        chain.append(x)
        log_probs.append(log_prob)
        stds.append(std)
    # The clip to [-1, 1] acts on the executed action only; the likelihood is of the unclipped
    # chain, which is exact if the clip is seen as part of the environment.
    actions = policy.normalizer.unnormalize_action(x.clamp(-1.0, 1.0))
    return ChainSample(
        actions=actions,
        chain=torch.stack(chain, 1),
        log_prob=torch.stack(log_probs, 1),
        std=torch.stack(stds, 1),
        stochastic=stochastic,
    )
