"""Vectorised chunked envs."""

from __future__ import annotations

import gymnasium as gym

from envs.chunked import ChunkedEnv
from envs.registry import make_env


def make_vector_env(
    name: str, num_envs: int, horizon: int, act_steps: int, asynchronous: bool = False
) -> gym.vector.VectorEnv:
    """``num_envs`` chunked copies of env ``name``.

    Autoreset is SAME_STEP: when a sub-env ends, the returned observation is already the reset one
    and the true last observation is in ``info["final_obs"]`` (with ``info["_final_obs"]`` as mask),
    which is what truncation bootstrapping needs. Sync by default: on 2 cores Async was slower at every
    size we measured (FACTS.md); use it only when one step is expensive (cameras, LIBERO).
    """
    if num_envs < 1:
        raise ValueError(f"num_envs must be >= 1, got {num_envs}.")

    def thunk() -> gym.Env:
        return ChunkedEnv(make_env(name), horizon=horizon, act_steps=act_steps)

    cls = gym.vector.AsyncVectorEnv if asynchronous else gym.vector.SyncVectorEnv
    return cls([thunk] * num_envs, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
