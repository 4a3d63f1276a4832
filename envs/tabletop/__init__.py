"""Tabletop manipulation: a Franka Panda-like arm built from primitive geoms, usable on its own.

The robot model (:mod:`envs.tabletop.robot`) is importable without the tasks, so the deployment path
can reuse its kinematics, inverse kinematics and delta end-effector controller.
"""

from envs.tabletop.robot import (
    HOME_QPOS,
    Q_MAX,
    Q_MIN,
    IKResult,
    PandaArm,
    add_panda,
    build_panda_model,
    build_panda_spec,
)

__all__ = [
    "HOME_QPOS",
    "Q_MAX",
    "Q_MIN",
    "IKResult",
    "PandaArm",
    "add_panda",
    "build_panda_model",
    "build_panda_spec",
]
