"""Advantage estimation and reward scaling, shared by the on-policy algorithms."""

from __future__ import annotations

import numpy as np
import torch


def compute_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    next_values: torch.Tensor,
    episode_ends: torch.Tensor,
    gamma: float,
    gae_lambda: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over a rollout of ``T`` steps in ``N`` envs.

    Args:
        rewards: ``(T, N)`` reward of each (chunk) step.
        values: ``(T, N)`` ``V(o_t)``.
        next_values: ``(T, N)`` the value to bootstrap from after step t: ``V(o_{t+1})`` when the
            episode goes on, ``V(final_obs)`` when it was *truncated* (time limit: the state was not
            terminal, so its value is real), and ``0`` when it *terminated*.
        episode_ends: ``(T, N)`` 1.0 where an episode ended (terminated or truncated) at step t,
            which stops the advantage recursion from leaking into the next episode.
        gamma, gae_lambda: discount and GAE parameter.

    Returns:
        ``(advantages, returns)``, each ``(T, N)``; ``returns = advantages + values``.
    """
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[0])
    for t in reversed(range(rewards.shape[0])):
        delta = rewards[t] + gamma * next_values[t] - values[t]
        last = delta + gamma * gae_lambda * (1.0 - episode_ends[t]) * last
        advantages[t] = last
    return advantages, advantages + values


class RunningRewardScaler:
    """Divides rewards by the running std of the discounted return (as in PPO's reference code).

    The scale is a running estimate over all rewards seen, so it is part of the training state and
    is saved and restored on resume.
    """

    def __init__(self, num_envs: int, gamma: float, epsilon: float = 1e-8) -> None:
        self.gamma = gamma
        self.epsilon = epsilon
        self.discounted_return = np.zeros(num_envs)
        self.mean, self.var, self.count = 0.0, 1.0, epsilon

    def __call__(self, rewards: np.ndarray, episode_ends: np.ndarray) -> np.ndarray:
        """Update with ``rewards (N,)`` and return them scaled; ``episode_ends (N,)`` resets the return."""
        self.discounted_return = self.discounted_return * self.gamma + rewards
        self._update(self.discounted_return)
        self.discounted_return[episode_ends] = 0.0
        return rewards / np.sqrt(self.var + self.epsilon)

    def reset(self) -> None:
        self.discounted_return[:] = 0.0

    def _update(self, x: np.ndarray) -> None:
        # Chan et al.'s parallel update of mean and variance.
        batch_mean, batch_var, batch_count = float(np.mean(x)), float(np.var(x)), x.shape[0]
        delta = batch_mean - self.mean
        total = self.count + batch_count
        self.mean += delta * batch_count / total
        m2 = self.var * self.count + batch_var * batch_count + delta**2 * self.count * batch_count / total
        self.var = m2 / total
        self.count = total

    def state_dict(self) -> dict[str, float | list[float]]:
        return {
            "mean": self.mean,
            "var": self.var,
            "count": self.count,
            "discounted_return": self.discounted_return.tolist(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = state["mean"], state["var"], state["count"]
        self.discounted_return = np.asarray(state["discounted_return"], dtype=np.float64)
