"""What the control loop reads from and writes to a robot, as plain dataclasses shaped like ROS messages.

A backend (ROS 2 through rclpy, ROS 1 through rospy, or in memory) implements :class:`Transport` for the
policy's side and :class:`RobotEndpoint` for the robot's side (the simulated robot uses it); its only job is
converting these dataclasses to and from the messages on the :class:`Topics`. Nothing here imports ROS.

Times (``stamp``) are seconds on the *control loop's clock* (the clock the loop was built with): a backend
stamps a message with that clock when it receives it, so staleness is measured without trusting the robot
PC's clock to agree with ours.

Dry run: every ``publish_*`` takes ``shadow=True``, which a backend sends to a shadow topic (e.g.
``~/shadow/commands``) that no controller listens to, never to the real one.
"""

from __future__ import annotations

import json
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
# Operator commands on the control topic: pause/resume the policy (e.g. while the scene is reset) and release
# the e-stop latch (the only way besides the API).
CONTROL_COMMANDS: tuple[str, ...] = ("pause", "resume", "reset_estop")


@dataclass
class Topics:
    """ROS topic names, one per stream (message types in brackets); also the ``robot.topics`` config section.

    Attributes:
        joint_states: robot → policy [``sensor_msgs/JointState``].
        cameras: camera name (as the policy calls it) → image topic [``sensor_msgs/Image``, ``rgb8``].
        object_state: perception → policy [``std_msgs/Float64MultiArray``]: the object part of a state policy's
            observation (what the simulator calls ``object_state``), for policies that take it.
        commands: policy → position controller [``std_msgs/Float64MultiArray``]: 7 joint targets, rad.
        trajectory: policy → trajectory controller [``trajectory_msgs/JointTrajectory``].
        pose: policy → Cartesian impedance controller [``geometry_msgs/PoseStamped``].
        gripper: policy → gripper [``std_msgs/Float64``]: opening fraction in [0, 1], 1 open.
        estop: operator → policy [``std_msgs/String``]: any message engages the e-stop latch (the text is the
            reason).
        control: operator → policy [``std_msgs/String``]: one of :data:`CONTROL_COMMANDS`.
        episode: simulated robot → anyone [``std_msgs/String``]: a JSON :class:`EpisodeReport` per finished
            episode.
        shadow_prefix: dry run publishes the command topics under this prefix instead (e.g.
            ``/robo_rlft/shadow/forward_position_controller/commands``), which no controller listens to.
    """

    joint_states: str = "/joint_states"
    cameras: dict[str, str] = field(default_factory=dict)
    object_state: str = "/robo_rlft/object_state"
    commands: str = "/forward_position_controller/commands"
    trajectory: str = "/joint_trajectory_controller/joint_trajectory"
    pose: str = "/cartesian_impedance_controller/equilibrium_pose"
    gripper: str = "/robo_rlft/gripper"
    estop: str = "/robo_rlft/estop"
    control: str = "/robo_rlft/control"
    episode: str = "/robo_rlft/episode"
    shadow_prefix: str = "/robo_rlft/shadow"

    def __post_init__(self) -> None:
        for name in (
            "joint_states",
            "object_state",
            "commands",
            "trajectory",
            "pose",
            "gripper",
            "estop",
            "control",
            "episode",
            "shadow_prefix",
        ):
            _check_topic(name, getattr(self, name))
        for camera, topic in self.cameras.items():
            _check_topic(f"cameras.{camera}", topic)

    def command_topic(self, topic: str, shadow: bool) -> str:
        """``topic``, or its shadow twin in dry run."""
        return self.shadow_prefix + topic if shadow else topic


def _check_topic(name: str, topic: str) -> None:
    if not isinstance(topic, str) or not topic.startswith("/") or " " in topic:
        raise ValueError(f"Topics.{name}: a topic name must be absolute (start with '/'), got {topic!r}.")


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
class ObjectState:
    """``std_msgs/Float64MultiArray`` from a perception system: the policy's ``object_state`` (K,)."""

    values: np.ndarray
    stamp: float = 0.0


@dataclass(frozen=True)
class EpisodeReport:
    """What the simulated robot reports when an episode ends (JSON on ``Topics.episode``).

    Attributes:
        episode: 0-based index of the episode in this run.
        init_state: index of the fixed initial state it started from (``None``: a random layout).
        success: whether the task was completed.
        steps: control steps it ran.
    """

    episode: int
    init_state: int | None
    success: bool
    steps: int

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_json(cls, text: str) -> EpisodeReport:
        return cls(**json.loads(text))


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

    def latest_object_state(self) -> ObjectState | None:
        """The newest perception output, or ``None`` before the first."""
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

    def on_control(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(command)`` for each message on the control topic (any thread), unvalidated."""
        ...

    def close(self) -> None:
        """Release the backend (idempotent)."""
        ...


@runtime_checkable
class RobotEndpoint(Protocol):
    """The robot's side of the same topics: what a (simulated) robot publishes and the newest commands it got.

    Received commands are stamped with the endpoint's clock on reception, like :class:`Transport`'s messages.
    """

    def publish_joint_state(self, state: JointState) -> None: ...

    def publish_image(self, camera: str, image: Image) -> None: ...

    def publish_object_state(self, state: ObjectState) -> None: ...

    def publish_control(self, command: str) -> None:
        """An operator command (:data:`CONTROL_COMMANDS`) to the policy side."""
        ...

    def publish_estop(self, reason: str) -> None:
        """Engage the policy side's e-stop latch."""
        ...

    def publish_episode(self, report: EpisodeReport) -> None: ...

    def latest_joint_command(self) -> JointCommand | None:
        """The newest streamed command (``names`` are the controller's, ``gripper`` ``None``), or ``None``."""
        ...

    def latest_trajectory(self) -> JointTrajectory | None:
        """The newest trajectory (points' ``gripper`` ``None``), or ``None``."""
        ...

    def latest_gripper(self) -> tuple[float, float] | None:
        """``(opening fraction, stamp)`` of the newest gripper command, or ``None``."""
        ...

    def close(self) -> None: ...


@dataclass
class InMemoryTransport:
    """A :class:`Transport` in memory: tests (and an in-process simulated robot) feed it and read what was sent.

    Feed it with :meth:`set_joint_state` / :meth:`set_image` / :meth:`set_object_state` / :meth:`trigger_estop` /
    :meth:`send_control`; everything published is appended to ``sent[channel]`` (channels :data:`CHANNELS`, or
    ``"shadow/" + channel`` in dry run).

    Args:
        clock: seconds; stamps incoming messages (use the control loop's clock).
    """

    clock: Callable[[], float] = time.monotonic
    sent: dict[str, list] = field(
        default_factory=lambda: {c: [] for c in CHANNELS + tuple(SHADOW_PREFIX + c for c in CHANNELS)}
    )
    _joint_state: JointState | None = None
    _images: dict[str, Image] = field(default_factory=dict)
    _object_state: ObjectState | None = None
    _estop_callbacks: list[Callable[[str], None]] = field(default_factory=list)
    _control_callbacks: list[Callable[[str], None]] = field(default_factory=list)
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

    def set_object_state(self, values: np.ndarray) -> None:
        """Receive a perception output now."""
        with self._lock:
            self._object_state = ObjectState(np.asarray(values, dtype=np.float64).copy(), self.clock())

    def trigger_estop(self, reason: str = "e-stop topic") -> None:
        """An e-stop message arrives."""
        for callback in list(self._estop_callbacks):
            callback(reason)

    def send_control(self, command: str) -> None:
        """A control-topic message arrives."""
        for callback in list(self._control_callbacks):
            callback(command)

    def latest_joint_state(self) -> JointState | None:
        with self._lock:
            return self._joint_state

    def latest_images(self) -> dict[str, Image]:
        with self._lock:
            return dict(self._images)

    def latest_object_state(self) -> ObjectState | None:
        with self._lock:
            return self._object_state

    def publish_joint_command(self, command: JointCommand, *, shadow: bool = False) -> None:
        self._append(JOINT_COMMAND, command, shadow)

    def publish_trajectory(self, trajectory: JointTrajectory, *, shadow: bool = False) -> None:
        self._append(TRAJECTORY, trajectory, shadow)

    def publish_pose(self, pose: PoseStamped, *, shadow: bool = False) -> None:
        self._append(POSE, pose, shadow)

    def on_estop(self, callback: Callable[[str], None]) -> None:
        self._estop_callbacks.append(callback)

    def on_control(self, callback: Callable[[str], None]) -> None:
        self._control_callbacks.append(callback)

    def close(self) -> None:
        pass

    def _append(self, channel: str, message: object, shadow: bool) -> None:
        with self._lock:
            self.sent[SHADOW_PREFIX + channel if shadow else channel].append(message)


@dataclass
class InMemoryRobot:
    """The :class:`RobotEndpoint` of an :class:`InMemoryTransport`: what one publishes the other receives.

    Used to run the simulated robot in the same process as the control loop (tests, no ROS). Commands are
    returned as sent (their stamps are the sender's, which is the same clock in one process).
    """

    transport: InMemoryTransport
    episodes: list[EpisodeReport] = field(default_factory=list)

    def publish_joint_state(self, state: JointState) -> None:
        self.transport.set_joint_state(state.names, state.positions, state.velocities)

    def publish_image(self, camera: str, image: Image) -> None:
        self.transport.set_image(camera, image.data)

    def publish_object_state(self, state: ObjectState) -> None:
        self.transport.set_object_state(state.values)

    def publish_control(self, command: str) -> None:
        self.transport.send_control(command)

    def publish_estop(self, reason: str) -> None:
        self.transport.trigger_estop(reason)

    def publish_episode(self, report: EpisodeReport) -> None:
        self.episodes.append(report)

    def latest_joint_command(self) -> JointCommand | None:
        return self._latest(JOINT_COMMAND)

    def latest_trajectory(self) -> JointTrajectory | None:
        return self._latest(TRAJECTORY)

    def latest_gripper(self) -> tuple[float, float] | None:
        """The gripper of the newest command or trajectory that carried one."""
        with self.transport._lock:
            sent = self.transport.sent[JOINT_COMMAND] + self.transport.sent[TRAJECTORY]
        stamped = [(m.stamp, m.gripper if isinstance(m, JointCommand) else m.points[0].gripper) for m in sent]
        stamped = [(stamp, g) for stamp, g in stamped if g is not None]
        if not stamped:
            return None
        stamp, gripper = max(stamped, key=lambda pair: pair[0])
        return gripper, stamp

    def close(self) -> None:
        pass

    def _latest(self, channel: str):
        with self.transport._lock:
            sent = self.transport.sent[channel]
            return sent[-1] if sent else None
