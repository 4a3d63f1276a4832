"""Noise schemes for flow policies: which Euler steps are stochastic, and their Gaussian transitions.

Every scheme maps one Euler step of the velocity field to a Gaussian ``x_{k+1} ~ N(mean, std^2)``
(DESIGN.md §3). Steps a scheme leaves deterministic follow the plain ODE and are not part of the
chain's likelihood.

- ``reinflow``: every step stochastic; Euler mean ``x + v dt``; std from a learned head on
  ``[obs, emb(t)]``.
- ``flow_noise``: every step stochastic; Euler mean; std from a learned head on the velocity
  net's last hidden features.
- ``flow_sde``: every step, or one random step per chain; Euler mean plus the score correction
  that keeps the flow's marginals; closed-form std ``a sqrt((1-t)/t) sqrt(dt)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from policies.mlp import mlp

FLOW_SCHEMES: tuple[str, ...] = ("reinflow", "flow_noise", "flow_sde")
SDE_STEP_MODES: tuple[str, ...] = ("all", "one")


@dataclass
class FlowNoiseConfig:
    """How a flow policy explores during RL fine-tuning. Stds are in normalised action units.

    Attributes:
        scheme: ``reinflow`` (ReinFlow), ``flow_noise`` (πRL's Flow-Noise) or ``flow_sde``
            (Flow-GRPO / πRL's Flow-SDE).
        sigma_min, sigma_max: bounds of the learned std (``reinflow``, ``flow_noise``).
        hidden_dims: widths of the learned std head (``reinflow``, ``flow_noise``).
        noise_level: ``a`` in ``sigma_t = a sqrt((1-t)/t)`` (``flow_sde``).
        sde_steps: ``all`` steps stochastic, or ``one`` random step per chain (``flow_sde``).
    """

    scheme: str = "reinflow"
    sigma_min: float = 0.05
    sigma_max: float = 0.15
    hidden_dims: list[int] = field(default_factory=lambda: [128, 128])
    noise_level: float = 0.3
    sde_steps: str = "all"

    def __post_init__(self) -> None:
        if self.scheme not in FLOW_SCHEMES:
            raise ValueError(f"policy.noise.scheme={self.scheme!r} is not allowed; choose one of {list(FLOW_SCHEMES)}.")
        if not 0 < self.sigma_min <= self.sigma_max:
            raise ValueError(
                f"policy.noise needs 0 < sigma_min <= sigma_max, got sigma_min={self.sigma_min}, "
                f"sigma_max={self.sigma_max}."
            )
        if self.noise_level <= 0:
            raise ValueError(f"policy.noise.noise_level must be > 0, got {self.noise_level}.")
        if self.sde_steps not in SDE_STEP_MODES:
            raise ValueError(
                f"policy.noise.sde_steps={self.sde_steps!r} is not allowed; choose one of {list(SDE_STEP_MODES)}."
            )


class BoundedStdHead(nn.Module):
    """Learned std: ``cond (N, C) -> std (N, H, A)`` squashed into ``[sigma_min, sigma_max]``.

    The sigmoid squash keeps log-probs finite (lower bound) and keeps exploration from wrecking the
    pretrained behaviour (upper bound). The head starts at the middle of the range.
    """

    def __init__(self, cond_dim: int, horizon: int, action_dim: int, config: FlowNoiseConfig) -> None:
        super().__init__()
        self.sigma_min, self.sigma_max = config.sigma_min, config.sigma_max
        self.horizon, self.action_dim = horizon, action_dim
        self.net = mlp(cond_dim, config.hidden_dims, horizon * action_dim)
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        squashed = torch.sigmoid(self.net(cond))
        return (self.sigma_min + (self.sigma_max - self.sigma_min) * squashed).view(-1, self.horizon, self.action_dim)


@dataclass
class StepInputs:
    """What a flow step offers a scheme; all rows ``N`` are (chain, step) pairs.

    Attributes:
        x: ``(N, H, A)`` current chain state ``x_k``.
        t: ``(N,)`` step start time ``t_k`` (0 = noise, 1 = data).
        dt: Euler step size ``1 / K``.
        velocity: ``(N, H, A)`` ``v_theta(x_k, t_k, o)``.
        obs_time: ``(N, obs_dim + E)`` normalised observation and time embedding.
        features: ``(N, F)`` the velocity net's last hidden layer.
    """

    x: torch.Tensor
    t: torch.Tensor
    dt: float
    velocity: torch.Tensor
    obs_time: torch.Tensor
    features: torch.Tensor

    def select(self, rows: torch.Tensor) -> StepInputs:
        """The inputs of the rows where the ``(N,)`` bool mask ``rows`` is true."""
        return StepInputs(
            self.x[rows], self.t[rows], self.dt, self.velocity[rows], self.obs_time[rows], self.features[rows]
        )


class FlowScheme(nn.Module):
    """Turns Euler steps into Gaussian transitions. Subclasses define ``mean_std``."""

    def stochastic_mask(self, batch: int, num_steps: int, device: torch.device, generator=None) -> torch.Tensor:
        """``(B, K)`` bool: which steps of each chain are stochastic (all, by default)."""
        return torch.ones(batch, num_steps, dtype=torch.bool, device=device)

    def mean_std(self, step: StepInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std ``(N, H, A)`` of ``x_{k+1}`` given the step's inputs."""
        raise NotImplementedError


class ReinFlowNoise(FlowScheme):
    """ReinFlow: Euler mean, learned std ``sigma_phi(t, o)`` on the observation and time embedding."""

    def __init__(self, obs_time_dim: int, feature_dim: int, horizon: int, action_dim: int, config: FlowNoiseConfig):
        super().__init__()
        self.std_head = BoundedStdHead(obs_time_dim, horizon, action_dim, config)

    def mean_std(self, step: StepInputs) -> tuple[torch.Tensor, torch.Tensor]:
        return step.x + step.velocity * step.dt, self.std_head(step.obs_time)


class FlowNoise(FlowScheme):
    """πRL's Flow-Noise: Euler mean, learned std on the velocity network's last hidden features.

    The features are detached: the noise head learns where to explore without pulling the velocity
    network toward features that suit the std.
    """

    def __init__(self, obs_time_dim: int, feature_dim: int, horizon: int, action_dim: int, config: FlowNoiseConfig):
        super().__init__()
        self.std_head = BoundedStdHead(feature_dim, horizon, action_dim, config)

    def mean_std(self, step: StepInputs) -> tuple[torch.Tensor, torch.Tensor]:
        return step.x + step.velocity * step.dt, self.std_head(step.features.detach())


class FlowSDE(FlowScheme):
    """Flow-GRPO's ODE-to-SDE conversion, which keeps the flow's marginals at every t.

    In the noise-level time ``tau = 1 - t`` the rectified flow has score
    ``-(x + (1 - tau) v') / tau`` with ``v' = -v``, and the SDE with diffusion ``sigma_tau`` and the
    same marginals steps ``tau -> tau - dt`` as

        x' = x - dt [v' + sigma^2 / (2 tau) (x + (1 - tau) v')] + sigma sqrt(dt) eps,
        sigma = a sqrt(tau / (1 - tau)).

    In our time ``t`` (0 = noise) that is ``mean = x + v dt - dt sigma^2 / (2 (1 - t)) (x - t v)``,
    ``std = sigma sqrt(dt)`` with ``sigma = a sqrt((1 - t) / t)``. At ``t = 0`` sigma is infinite, so
    (as Flow-GRPO does) it is evaluated at the next grid point ``t = dt``.
    """

    def __init__(self, obs_time_dim: int, feature_dim: int, horizon: int, action_dim: int, config: FlowNoiseConfig):
        super().__init__()
        self.noise_level = config.noise_level
        self.one_step = config.sde_steps == "one"

    def stochastic_mask(self, batch: int, num_steps: int, device: torch.device, generator=None) -> torch.Tensor:
        if not self.one_step:
            return super().stochastic_mask(batch, num_steps, device, generator)
        chosen = torch.randint(num_steps, (batch,), device=device, generator=generator)
        return nn.functional.one_hot(chosen, num_steps).bool()

    def mean_std(self, step: StepInputs) -> tuple[torch.Tensor, torch.Tensor]:
        t = step.t.clamp_min(step.dt)[:, None, None]  # (N, 1, 1)
        sigma_sq = self.noise_level**2 * (1 - t) / t
        mean = (
            step.x
            + step.velocity * step.dt
            - step.dt * sigma_sq / (2 * (1 - step.t[:, None, None])) * (step.x - step.t[:, None, None] * step.velocity)
        )
        return mean, (sigma_sq * step.dt).sqrt().expand_as(mean)


SCHEMES: dict[str, type[FlowScheme]] = {"reinflow": ReinFlowNoise, "flow_noise": FlowNoise, "flow_sde": FlowSDE}
