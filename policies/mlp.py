"""Small building blocks shared by the policy and critic networks."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import nn


def mlp(in_dim: int, hidden_dims: Sequence[int], out_dim: int, activation: type[nn.Module] = nn.Mish) -> nn.Sequential:
    """``in_dim -> hidden_dims... -> out_dim`` with ``activation`` between layers (none after the last)."""
    layers: list[nn.Module] = []
    dims = [in_dim, *hidden_dims]
    for d_in, d_out in itertools.pairwise(dims):
        layers += [nn.Linear(d_in, d_out), activation()]
    layers.append(nn.Linear(dims[-1], out_dim))
    return nn.Sequential(*layers)


class SinusoidalEmbedding(nn.Module):
    """Transformer-style embedding of a scalar time ``t in [0, 1]``: ``(B,) -> (B, dim)``."""

    def __init__(self, dim: int, max_period: float = 100.0) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"time embedding dim must be even, got {dim}.")
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half) / max(half - 1, 1))
        self.register_buffer("freqs", freqs)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = t[:, None] * self.freqs[None, :] * 100.0
        return torch.cat([angles.sin(), angles.cos()], dim=-1)
