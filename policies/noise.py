"""Noise schemes that turn a deterministic sampler into a chain with a known likelihood."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from policies.mlp import mlp


@dataclass
class ReinFlowNoiseConfig:
    """ReinFlow's learned exploration noise: ``sigma_phi(k, o)`` squashed into ``[sigma_min, sigma_max]``.

    Stds are in normalised action units (actions live in ``[-1, 1]``).
    """

    sigma_min: float = 0.05
    sigma_max: float = 0.15
    hidden_dims: list[int] = field(default_factory=lambda: [128, 128])

    def __post_init__(self) -> None:
        if not 0 < self.sigma_min <= self.sigma_max:
            raise ValueError(
                f"policy.noise needs 0 < sigma_min <= sigma_max, got sigma_min={self.sigma_min}, "
                f"sigma_max={self.sigma_max}."
            )


class ReinFlowNoise(nn.Module):
    """Learned std head: ``(cond (N, C)) -> std (N, H, A)`` in ``[sigma_min, sigma_max]``.

    ``cond`` is the normalised observation concatenated with the step's time embedding, so each
    denoising step can explore differently. A sigmoid squash keeps the std bounded: the lower bound
    keeps log-probs finite, the upper bound keeps exploration from wrecking the pretrained behaviour.
    """

    def __init__(self, cond_dim: int, horizon: int, action_dim: int, config: ReinFlowNoiseConfig) -> None:
        super().__init__()
        self.config = config
        self.horizon = horizon
        self.action_dim = action_dim
        self.net = mlp(cond_dim, config.hidden_dims, horizon * action_dim)
        # Start at the middle of the range: pretrained behaviour plus moderate exploration.
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        lo, hi = self.config.sigma_min, self.config.sigma_max
        squashed = torch.sigmoid(self.net(cond))
        return (lo + (hi - lo) * squashed).view(-1, self.horizon, self.action_dim)
