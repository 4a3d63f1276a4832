"""State-value critics V(o)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from policies.mlp import mlp


@dataclass
class CriticConfig:
    """Critic network shape."""

    hidden_dims: tuple[int, ...] = (256, 256, 256)


class ValueCritic(nn.Module):
    """MLP value function ``(B, D) -> (B,)`` on ``robo_rlft.observations.ObservationAdapter.critic_features``: the
    *normalised* observation of a state policy (D = obs_dim), a VLA's pooled features and normalised state."""

    def __init__(self, obs_dim: int, config: CriticConfig) -> None:
        """``obs_dim``: D, the size of the critic's input."""
        super().__init__()
        self.net = mlp(obs_dim, config.hidden_dims, 1, activation=nn.Mish)

    def forward(self, obs_normalized: torch.Tensor) -> torch.Tensor:
        return self.net(obs_normalized).squeeze(-1)
