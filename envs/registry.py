"""Registry of the environments robo_rlft trains on, under the ``robo_rlft/`` Gymnasium namespace."""

from __future__ import annotations

from typing import Any

import gymnasium as gym

# Short config name -> (our id, entry point, max episode steps). Locomotion uses Gymnasium's
# MuJoCo v5 tasks unchanged; registering them under our namespace gives every env one naming scheme.
LOCOMOTION: dict[str, tuple[str, str, int]] = {
    "hopper": ("robo_rlft/Hopper-v5", "gymnasium.envs.mujoco.hopper_v5:HopperEnv", 1000),
    "walker2d": ("robo_rlft/Walker2d-v5", "gymnasium.envs.mujoco.walker2d_v5:Walker2dEnv", 1000),
    "halfcheetah": ("robo_rlft/HalfCheetah-v5", "gymnasium.envs.mujoco.half_cheetah_v5:HalfCheetahEnv", 1000),
    "ant": ("robo_rlft/Ant-v5", "gymnasium.envs.mujoco.ant_v5:AntEnv", 1000),
    "humanoid": ("robo_rlft/Humanoid-v5", "gymnasium.envs.mujoco.humanoid_v5:HumanoidEnv", 1000),
}

ENV_IDS: dict[str, str] = {name: env_id for name, (env_id, _, _) in LOCOMOTION.items()}


def tabletop_env_ids() -> dict[str, str]:
    """Tabletop task name -> its id ``robo_rlft/Tabletop-<Task>-v0``."""
    from envs.tabletop.tasks import TASKS

    return {name: f"robo_rlft/Tabletop-{name}-v0" for name in TASKS}


def register_envs() -> None:
    """Register every env under ``robo_rlft/`` (idempotent)."""
    for env_id, entry_point, max_steps in LOCOMOTION.values():
        if env_id not in gym.registry:
            gym.register(id=env_id, entry_point=entry_point, max_episode_steps=max_steps)
    from envs.tabletop.tasks import TASKS

    for name, env_id in tabletop_env_ids().items():
        if env_id not in gym.registry:
            # The env truncates at the task horizon itself; the TimeLimit agrees with it.
            gym.register(
                id=env_id,
                entry_point="envs.tabletop.env:TabletopEnv",
                kwargs={"task": name},
                max_episode_steps=TASKS[name].horizon,
            )


def resolve_env_id(name: str) -> str:
    """Map a short name (``hopper``) or a full id (``robo_rlft/Hopper-v5``) to the registered id."""
    if name in ENV_IDS:
        return ENV_IDS[name]
    if name in ENV_IDS.values():
        return name
    raise ValueError(f"Unknown env {name!r}. Allowed: {sorted(ENV_IDS)} (or their ids {sorted(ENV_IDS.values())}).")


def make_env(name: str, **kwargs: Any) -> gym.Env:
    """Create one (un-chunked) environment by short name or id; ``kwargs`` go to ``gym.make``."""
    register_envs()
    return gym.make(resolve_env_id(name), **kwargs)
