"""Gymnasium environments and wrappers, usable without the rest of robo_rlft."""

from envs.chunked import ChunkedEnv
from envs.registry import ENV_IDS, make_env, register_envs, resolve_env_id
from envs.vector import make_vector_env, step_info_value

register_envs()

__all__ = [
    "ENV_IDS",
    "ChunkedEnv",
    "make_env",
    "make_vector_env",
    "register_envs",
    "resolve_env_id",
    "step_info_value",
]
