"""Registry of the environments robo_rlft trains on, under the ``robo_rlft/`` Gymnasium namespace."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

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

# The LIBERO adapter: one id, the suite and task are ``gym.make`` kwargs (``suite``, ``task_id``). Registering
# it only names the entry point, so it works without the ``libero`` extra; constructing it needs the extra.
LIBERO_ENV_ID = "robo_rlft/Libero-v0"
# Several tabletop tasks in one env (``tasks=[...]``), one per episode (envs.tabletop.multitask).
TABLETOP_MULTITASK_ENV_ID = "robo_rlft/Tabletop-MultiTask-v0"


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
    if TABLETOP_MULTITASK_ENV_ID not in gym.registry:
        # No TimeLimit: each task env truncates at its own task's horizon.
        gym.register(id=TABLETOP_MULTITASK_ENV_ID, entry_point="envs.tabletop.multitask:MultiTaskTabletopEnv")
    if LIBERO_ENV_ID not in gym.registry:
        # No TimeLimit: the step limit depends on the suite, and the env truncates at it itself.
        gym.register(id=LIBERO_ENV_ID, entry_point="envs.libero:LiberoEnv")


def resolve_env_id(name: str) -> str:
    """Map a short name (``hopper``) or a full id (``robo_rlft/Hopper-v5``,
    ``robo_rlft/Tabletop-LiftCube-v0``, ``robo_rlft/Libero-v0``) to the registered id."""
    if name in ENV_IDS:
        return ENV_IDS[name]
    if name in (*ENV_IDS.values(), *tabletop_env_ids().values(), LIBERO_ENV_ID, TABLETOP_MULTITASK_ENV_ID):
        return name
    raise ValueError(
        f"Unknown env {name!r}. Allowed: {sorted(ENV_IDS)}, their ids {sorted(ENV_IDS.values())}, "
        f"a tabletop id {sorted(tabletop_env_ids().values())}, or {LIBERO_ENV_ID!r} (with suite=..., task_id=...)."
    )


class StateVectorObservation(gym.ObservationWrapper):
    """Dict observations (``state``, ``object_state``, images) -> the flat state vector
    ``[state, object_state]`` that state-based policies take; images are dropped."""

    KEYS = ("state", "object_state")

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        spaces = [env.observation_space[key] for key in self.KEYS if key in env.observation_space.spaces]
        self.observation_space = gym.spaces.Box(
            low=np.concatenate([sp.low for sp in spaces]).astype(np.float32),
            high=np.concatenate([sp.high for sp in spaces]).astype(np.float32),
            dtype=np.float32,
        )

    def observation(self, observation: dict[str, np.ndarray]) -> np.ndarray:
        return np.concatenate([observation[key] for key in self.KEYS if key in observation]).astype(np.float32)


def make_env(name: str, flatten: bool = True, **kwargs: Any) -> gym.Env:
    """Create one (un-chunked) environment by short name or id; ``kwargs`` go to ``gym.make``.

    With ``flatten`` (the default, what state-based policies take), envs with Dict observations (tabletop,
    LIBERO) come wrapped in :class:`StateVectorObservation`; ``flatten=False`` keeps the Dict (images and
    state, for image-based policies).
    """
    register_envs()
    env = gym.make(resolve_env_id(name), **kwargs)
    if flatten and isinstance(env.observation_space, gym.spaces.Dict):
        env = StateVectorObservation(env)
    return env
