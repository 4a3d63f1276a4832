"""What the control loop reads from and writes to a robot, as plain dataclasses shaped like ROS messages.

A backend (ROS 2 through rclpy, ROS 1 through rospy, or an in-process simulated robot) implements
:class:`Transport`; its only job is converting these dataclasses to and from ``sensor_msgs/JointState``,
``sensor_msgs/Image``, ``std_msgs/Float64MultiArray``, ``trajectory_msgs/JointTrajectory`` and
``geometry_msgs/PoseStamped``. Nothing here imports ROS.

Times (``stamp``) are seconds on the *control loop's clock* (the clock the loop was built with): a backend
stamps a message with that clock when it receives it, so staleness is measured without trusting the robot
PC's clock to agree with ours.

Dry run: every ``publish_*`` takes ``shadow=True``, which a backend sends to a shadow topic (e.g.
``~/shadow/commands``) that no controller listens to, never to the real one.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

# Channel names of :class:`InMemoryTransport` (a ROS backend maps them to topics).
JOINT_COMMAND = "joint_command"
TRAJECTORY = "trajectory"
POSE = "pose"
SHADOW_PREFIX = "shadow/"
CHANNELS: tuple[str, ...] = (JOINT_COMMAND, TRAJECTORY, POSE)


@dataclass(frozen=True)
class JointState:
    """``sensor_msgs/JointState``: ``names`` and ``positions`` (rad or m) in the robot driver's order."""

    names: tuple[str, ...]
    positions: np.ndarray  # (N,)
    velocities: np.ndarray | None = None  # (N,) rad/s or m/s
    stamp: float = 0.0  # s, loop clock, at reception


@dataclass(frozen=True)
class Image:
    """``sensor_msgs/Image`` with ``encoding="rgb8"``: ``data`` (H, W, 3) uint8, right side up."""

    data: np.ndarray
    stamp: float = 0.0


@dataclass(frozen=True)
class JointCommand:
    """One control step's target: ``std_msgs/Float64MultiArray`` of ``positions`` for a position controller.

    Attributes:
        names: the arm joints ``positions`` refer to, in the controller's order.
        positions: (7,) joint position targets, rad.
        gripper: opening fraction in [0, 1] (1 open) for the gripper's own action/topic; ``None`` = unchanged.
        stamp: s, loop clock, when the command was sent.
    """

    names: tuple[str, ...]
    positions: np.ndarray
    gripper: float | None = None
    stamp: float = 0.0


@dataclass(frozen=True)
class TrajectoryPoint:
    """``trajectory_msgs/JointTrajectoryPoint``: positions (7,) rad reached at ``time_from_start`` s."""

    positions: np.ndarray
    time_from_start: float
    gripper: float | None = None  # opening fraction in [0, 1]; sent to the gripper separately


@dataclass(frozen=True)
class JointTrajectory:
    """``trajectory_msgs/JointTrajectory``; a new one replaces the rest of the running one (ros2_control JTC)."""

    names: tuple[str, ...]
    points: tuple[TrajectoryPoint, ...]
    stamp: float = 0.0


@dataclass(frozen=True)
class PoseStamped:
    """``geometry_msgs/PoseStamped``: tool-centre-point equilibrium pose for a Cartesian impedance controller."""

    frame_id: str
    position: np.ndarray  # (3,) m
    orientation: np.ndarray  # (4,) wxyz (ROS messages are xyzw: the backend reorders)
    stamp: float = 0.0


@runtime_checkable
class Transport(Protocol):
    """What a robot backend provides to :class:`real_robot.loop.ControlLoop`."""

    def latest_joint_state(self) -> JointState | None:
        """The newest joint state received, or ``None`` before the first."""
        ...

    def latest_images(self) -> dict[str, Image]:
        """The newest image of each camera (camera name → image); empty without cameras."""
        ...

    def publish_joint_command(self, command: JointCommand, *, shadow: bool = False) -> None:
        """Stream one target (``Float64MultiArray`` on ``/<controller>/commands``), or to the shadow topic."""
        ...

    def publish_trajectory(self, trajectory: JointTrajectory, *, shadow: bool = False) -> None:
        """Send a trajectory (``/<controller>/joint_trajectory``), or to the shadow topic."""
        ...

    def publish_pose(self, pose: PoseStamped, *, shadow: bool = False) -> None:
        """Send an equilibrium pose (Cartesian impedance), or to the shadow topic."""
        ...

    def on_estop(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(reason)`` whenever an e-stop message arrives (any thread)."""
        ...


@dataclass
class InMemoryTransport:
    """A :class:`Transport` in memory: tests (and an in-process simulated robot) feed it and read what was sent.

    Feed it with :meth:`set_joint_state` / :meth:`set_image` / :meth:`trigger_estop`; everything published is
    appended to ``sent[channel]`` (channels :data:`CHANNELS`, or ``"shadow/" + channel`` in dry run).

    Args:
        clock: seconds; stamps incoming messages (use the control loop's clock).
    """

    clock: Callable[[], float] = time.monotonic
    sent: dict[str, list] = field(
        default_factory=lambda: {c: [] for c in CHANNELS + tuple(SHADOW_PREFIX + c for c in CHANNELS)}
    )
    _joint_state: JointState | None = None
    _images: dict[str, Image] = field(default_factory=dict)
    _estop_callbacks: list[Callable[[str], None]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def set_joint_state(
        self, names: tuple[str, ...], positions: np.ndarray, velocities: np.ndarray | None = None
    ) -> None:
        """Receive a joint state now (stamped with ``clock()``)."""
        state = JointState(tuple(names), np.asarray(positions, dtype=np.float64).copy(), velocities, self.clock())
        with self._lock:
            self._joint_state = state

    def set_image(self, camera: str, data: np.ndarray) -> None:
        """Receive camera ``camera``'s image now."""
        with self._lock:
            self._images[camera] = Image(np.asarray(data), self.clock())

    def trigger_estop(self, reason: str = "e-stop topic") -> None:
        """An e-stop message arrives."""
        for callback in list(self._estop_callbacks):
            callback(reason)

    def latest_joint_state(self) -> JointState | None:
        with self._lock:
            return self._joint_state

    def latest_images(self) -> dict[str, Image]:
        with self._lock:
            return dict(self._images)

    def publish_joint_command(self, command: JointCommand, *, shadow: bool = False) -> None:
        self._append(JOINT_COMMAND, command, shadow)

    def publish_trajectory(self, trajectory: JointTrajectory, *, shadow: bool = False) -> None:
        self._append(TRAJECTORY, trajectory, shadow)

    def publish_pose(self, pose: PoseStamped, *, shadow: bool = False) -> None:
        self._append(POSE, pose, shadow)

    def on_estop(self, callback: Callable[[str], None]) -> None:
        self._estop_callbacks.append(callback)

    def _append(self, channel: str, message: object, shadow: bool) -> None:
        with self._lock:
            self.sent[SHADOW_PREFIX + channel if shadow else channel].append(message)
