"""Observation and action normalisation, stored with every checkpoint."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

# Dimensions whose dataset range is (almost) zero are mapped to 0 rather than blown up.
_MIN_RANGE = 1e-6


class Normalizer(nn.Module):
    """Maps raw observations to z-scores and raw actions to ``[-1, 1]`` (per dimension).

    The statistics come from the demonstration dataset and live in buffers, so they travel with
    the policy's checkpoint and a deployed policy always sees inputs scaled as in training.
    """

    def __init__(self, obs_dim: int, action_dim: int) -> None:
        super().__init__()
        self.register_buffer("obs_mean", torch.zeros(obs_dim))
        self.register_buffer("obs_std", torch.ones(obs_dim))
        self.register_buffer("action_min", -torch.ones(action_dim))
        self.register_buffer("action_max", torch.ones(action_dim))

    @classmethod
    def from_stats(cls, stats: dict[str, np.ndarray]) -> Normalizer:
        """Build from ``obs_mean``, ``obs_std``, ``action_min``, ``action_max`` arrays."""
        missing = {"obs_mean", "obs_std", "action_min", "action_max"} - set(stats)
        if missing:
            raise KeyError(f"Normalisation stats lack keys {sorted(missing)}; got {sorted(stats)}.")
        norm = cls(len(stats["obs_mean"]), len(stats["action_min"]))
        for name in ("obs_mean", "obs_std", "action_min", "action_max"):
            getattr(norm, name).copy_(torch.as_tensor(np.asarray(stats[name]), dtype=torch.float32))
        return norm

    def normalize_obs(self, obs: torch.Tensor) -> torch.Tensor:
        return (obs - self.obs_mean) / self.obs_std

    def _action_scale(self) -> tuple[torch.Tensor, torch.Tensor]:
        center = (self.action_max + self.action_min) / 2
        half_range = ((self.action_max - self.action_min) / 2).clamp_min(_MIN_RANGE)
        return center, half_range

    def normalize_action(self, action: torch.Tensor) -> torch.Tensor:
        center, half_range = self._action_scale()
        return (action - center) / half_range

    def unnormalize_action(self, action: torch.Tensor) -> torch.Tensor:
        center, half_range = self._action_scale()
        return action * half_range + center
