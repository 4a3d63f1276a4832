"""Wiring for the CLI: a robot config + a checkpoint → a running :class:`~real_robot.loop.ControlLoop`, and a
robot config + a tabletop task → a running :class:`~real_robot.sim_robot.SimRobot`.

The config objects are :class:`robo_rlft.config.RobotConfig` (``configs/robot/``); this module only reads their
fields, so the deployment package stays usable without the CLI.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from real_robot.adapters import ActionAdapter, ArmKinematics, check_action_mode
from real_robot.loop import ControlLoop, LoopConfig
from real_robot.observation import ObservationAssembler, PolicyRunner
from real_robot.safety import SafetyLayer, SafetyLimits
from real_robot.sim_robot import SimRobot, SimRobotConfig
from real_robot.transport import RobotEndpoint, Topics, Transport

logger = logging.getLogger(__name__)

TRANSPORTS: tuple[str, ...] = ("ros2", "ros1")


def make_transport(kind: str, topics: Topics, clock: Callable[[], float] = time.monotonic) -> Transport:
    """The policy side of backend ``kind`` (``ros2`` or ``ros1``); imports ROS only here."""
    if kind == "ros2":
        from real_robot.ros2 import Ros2Transport

        return Ros2Transport(topics, clock=clock)
    if kind == "ros1":
        from real_robot.ros1 import Ros1Transport

        return Ros1Transport(topics, clock=clock)
    raise ValueError(f"Unknown robot.transport {kind!r}; choose one of {list(TRANSPORTS)}.")


def make_robot_endpoint(kind: str, topics: Topics, clock: Callable[[], float] = time.monotonic) -> RobotEndpoint:
    """The robot side of backend ``kind`` (for the simulated robot)."""
    if kind == "ros2":
        from real_robot.ros2 import Ros2RobotEndpoint

        return Ros2RobotEndpoint(topics, clock=clock)
    if kind == "ros1":
        from real_robot.ros1 import Ros1RobotEndpoint

        return Ros1RobotEndpoint(topics, clock=clock)
    raise ValueError(f"Unknown robot.transport {kind!r}; choose one of {list(TRANSPORTS)}.")


def kinematics_from(robot: Any) -> ArmKinematics:
    """The model of ``robot.arm`` with the robot's joint names and base."""
    kwargs: dict[str, Any] = {}
    if robot.base_pos is not None:
        kwargs["base_pos"] = tuple(robot.base_pos)
    return ArmKinematics(
        joint_names=tuple(robot.joint_names),
        finger_names=tuple(robot.finger_names),
        base_frame=robot.base_frame,
        arm=robot.arm,
        **kwargs,
    )


def safety_limits_from(robot: Any) -> SafetyLimits:
    """:class:`SafetyLimits` for ``robot.arm``'s joint limits at the robot's rate, with the config's overrides
    (``None`` keeps the default; an empty workspace disables the box)."""
    overrides: dict[str, Any] = {"dt": 1.0 / robot.rate_hz}
    for name in ("max_step", "max_velocity"):
        if getattr(robot, name) is not None:
            overrides[name] = getattr(robot, name)
    if robot.workspace_min is not None or robot.workspace_max is not None:
        if not robot.workspace_min and not robot.workspace_max:
            overrides.update(workspace_min=None, workspace_max=None)
        else:
            overrides.update(
                workspace_min=np.asarray(robot.workspace_min, dtype=np.float64),
                workspace_max=np.asarray(robot.workspace_max, dtype=np.float64),
            )
    return SafetyLimits.for_arm(robot.arm, **overrides)


def task_instruction(metadata: dict[str, Any]) -> str:
    """The instruction of the task a checkpoint was trained on (``""`` if it has none)."""
    from envs.registry import tabletop_env_ids
    from envs.tabletop.tasks import TASKS

    by_id = {env_id: task for task, env_id in tabletop_env_ids().items()}
    task = by_id.get(metadata.get("env", ""))
    return TASKS[task].instruction if task is not None else ""


@dataclass
class Deployment:
    """A control loop with everything it was built from (so the CLI can report and close it)."""

    loop: ControlLoop
    transport: Transport
    runner: PolicyRunner
    metadata: dict[str, Any]

    def run(self, duration: float | None, status_every: float, stop: threading.Event | None = None) -> None:
        """Tick until ``duration`` s have passed, ``stop`` is set, or Ctrl-C (which returns normally)."""
        max_ticks = None if duration is None else max(1, round(duration * self.loop.config.rate_hz))
        try:
            self.loop.run(max_ticks=max_ticks, stop=stop, status_every=status_every)
        except KeyboardInterrupt:
            logger.info("Interrupted: stopping the control loop.")

    def close(self) -> None:
        self.loop.close()
        self.transport.close()


def build_deployment(
    robot: Any,
    checkpoint: str | Path,
    *,
    instruction: str | None = None,
    transport: Transport | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Deployment:
    """Load ``checkpoint`` and wire it to ``robot`` (a :class:`robo_rlft.config.RobotConfig`).

    Args:
        transport: use this backend instead of building ``robot.transport``'s (tests pass an in-memory one).

    Raises:
        ValueError: the checkpoint does not fit the robot (a ``joint`` action-mode policy on an arm other than the
            Panda it was trained on, cameras the robot does not publish).
    """
    runner, metadata = PolicyRunner.from_checkpoint(checkpoint)
    env_kwargs = metadata.get("env_kwargs", {})
    action_mode = env_kwargs.get("action_mode", "delta_ee")
    check_action_mode(robot.arm, action_mode)  # before any transport is opened
    cameras: tuple[str, ...] = tuple(runner.policy.config.cameras) if runner.kind == "vla" else ()
    missing = [c for c in cameras if c not in robot.topics.cameras]
    if missing:
        raise ValueError(
            f"The policy takes images of cameras {list(cameras)} but robot.topics.cameras has no topic for {missing}; "
            f"add robot.topics.cameras.{missing[0]}=/your/image/topic."
        )
    kinematics = kinematics_from(robot)
    assembler = ObservationAssembler(
        kinematics,
        cameras=cameras,
        instruction=task_instruction(metadata) if instruction is None else instruction,
        object_state_dim=runner.object_state_dim,
    )
    transport = transport or make_transport(robot.transport, robot.topics, clock)
    try:
        loop = ControlLoop(
            transport,
            runner,
            assembler,
            ActionAdapter(kinematics, action_mode),
            SafetyLayer(safety_limits_from(robot), kinematics),
            LoopConfig(
                rate_hz=robot.rate_hz,
                stale_after=robot.stale_after,
                replan_margin=robot.replan_margin,
                output=robot.output,
                dry_run=robot.dry_run,
            ),
            clock=clock,
        )
    except Exception:
        transport.close()
        raise
    logger.info(
        "Deploying %s (%s policy, action mode %s, act_steps %s) on %s over %s at %.0f Hz%s; instruction %r.",
        checkpoint,
        runner.kind,
        action_mode,
        runner.act_steps,
        robot.name,
        robot.transport,
        robot.rate_hz,
        " [DRY RUN: shadow topics only]" if robot.dry_run else "",
        assembler.instruction,
    )
    return Deployment(loop, transport, runner, metadata)


def build_sim_robot(
    robot: Any,
    env_id: str,
    env_kwargs: dict[str, Any],
    *,
    settle_ticks: int = 5,
    start_timeout: float = 60.0,
    endpoint: RobotEndpoint | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> SimRobot:
    """A tabletop task (``env_id`` with ``env_kwargs``) behind ``robot``'s topics: the env takes joint targets and
    renders the robot's cameras (``robot.topics.cameras``) at ``env_kwargs["image_size"]`` (default 128 px)."""
    from envs import make_env

    kwargs = {k: v for k, v in env_kwargs.items() if k not in ("cameras", "image_size")}
    kwargs["action_mode"] = "joint"  # a robot executes joint targets; a delta_ee policy's IK runs in deploy
    if robot.topics.cameras:
        kwargs.update(cameras=list(robot.topics.cameras), image_size=env_kwargs.get("image_size", 128))
    env = make_env(env_id, flatten=False, **kwargs)
    config = SimRobotConfig(
        rate_hz=robot.rate_hz,
        joint_names=tuple(robot.joint_names),
        finger_names=tuple(robot.finger_names),
        settle_ticks=settle_ticks,
        start_timeout=start_timeout,
    )
    endpoint = endpoint or make_robot_endpoint(robot.transport, robot.topics, clock)
    return SimRobot(env, endpoint, config, clock=clock)
