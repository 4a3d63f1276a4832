"""Action-chunk wrapper: one step of this env executes the first ``act_steps`` actions of a chunk."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np


class ChunkedEnv(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """Turn a per-step env into an env whose action is a chunk of shape ``(horizon, A)``.

    A chunk step executes the first ``act_steps`` rows, sums their rewards and stops early as soon
    as the inner env terminates or truncates. The observation returned is the one after the last
    executed step, so on truncation it is the true final observation (what the critic must bootstrap
    from); on termination no bootstrap is needed. ``info["executed_steps"]`` counts the env steps run,
    and, for envs that report ``is_success``, ``info["is_success"]`` is true if any executed step did.
    """

    def __init__(self, env: gym.Env, horizon: int, act_steps: int) -> None:
        gym.utils.RecordConstructorArgs.__init__(self, horizon=horizon, act_steps=act_steps)
        gym.Wrapper.__init__(self, env)
        if not isinstance(env.action_space, gym.spaces.Box) or len(env.action_space.shape) != 1:
            raise TypeError(f"ChunkedEnv needs a 1-D Box action space, got {env.action_space}.")
        if horizon < 1 or not 1 <= act_steps <= horizon:
            raise ValueError(
                f"Need horizon >= 1 and 1 <= act_steps <= horizon, got horizon={horizon}, act_steps={act_steps}."
            )
        self.horizon = horizon
        self.act_steps = act_steps
        low, high = env.action_space.low, env.action_space.high
        self.action_space = gym.spaces.Box(
            low=np.tile(low, (horizon, 1)), high=np.tile(high, (horizon, 1)), dtype=env.action_space.dtype
        )

    def step(self, action: np.ndarray) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        action = np.asarray(action)
        if action.shape != self.action_space.shape:
            raise ValueError(f"Expected an action chunk of shape {self.action_space.shape}, got {action.shape}.")
        total_reward = 0.0
        success: bool | None = None  # stays None for envs that define no success
        for i in range(self.act_steps):
            obs, reward, terminated, truncated, info = self.env.step(action[i])
            total_reward += float(reward)
            if "is_success" in info:
                success = bool(success) or bool(info["is_success"])
            if terminated or truncated:
                break
        info = dict(info)
        info["executed_steps"] = i + 1
        if success is not None:
            info["is_success"] = success
        return obs, total_reward, terminated, truncated, info
