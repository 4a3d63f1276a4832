"""Vectorised chunked envs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import gymnasium as gym
import numpy as np

from envs.chunked import ChunkedEnv
from envs.registry import make_env


def make_vector_env(
    name: str,
    num_envs: int,
    horizon: int,
    act_steps: int,
    asynchronous: bool = False,
    env_kwargs: Mapping[str, Any] | None = None,
    flatten: bool = True,
) -> gym.vector.VectorEnv:
    """``num_envs`` chunked copies of env ``name``, each made with ``make_env(name, flatten, **env_kwargs)``
    (``flatten=False`` keeps Dict observations, see :func:`envs.make_env`).

    Autoreset is SAME_STEP: when a sub-env ends, the returned observation is already the reset one
    and the true last observation is in ``info["final_obs"]`` (with ``info["_final_obs"]`` as mask),
    which is what truncation bootstrapping needs. Sync by default: on 2 cores Async was slower at every
    size we measured (FACTS.md); use it only when one step is expensive (cameras, LIBERO).
    """
    if num_envs < 1:
        raise ValueError(f"num_envs must be >= 1, got {num_envs}.")

    def thunk() -> gym.Env:
        return ChunkedEnv(make_env(name, flatten=flatten, **(env_kwargs or {})), horizon=horizon, act_steps=act_steps)

    cls = gym.vector.AsyncVectorEnv if asynchronous else gym.vector.SyncVectorEnv
    return cls([thunk] * num_envs, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)


def step_info_value(info: dict[str, Any], key: str, ended: np.ndarray, default: float = 0.0) -> np.ndarray:
    """Per-env ``info[key]`` of the step just taken, shape ``(N,)``.

    With SAME_STEP autoreset, an env that ended has already been reset: its ``info`` is the reset
    info and the values of the step that ended it are in ``info["final_info"]``.
    """
    values = np.asarray(info.get(key, np.full(len(ended), default)))
    final = info.get("final_info", {})
    if key in final:
        values = np.where(ended, np.asarray(final[key]), values)
    return values
