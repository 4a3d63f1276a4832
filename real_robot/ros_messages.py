"""Our message dataclasses ↔ ROS messages, and the transport logic both ROS backends share — written once.

ROS 1 and ROS 2 messages have the same fields; what differs (where the message classes live, the ``Duration``
type, how a header is stamped) comes in as a :class:`RosMessages` namespace, and how topics are published and
subscribed comes in as a :class:`RosBus`. :mod:`real_robot.ros2` and :mod:`real_robot.ros1` provide both and
subclass :class:`RosTransportBase` / :class:`RosRobotEndpointBase`, which implement
:class:`~real_robot.transport.Transport` / :class:`~real_robot.transport.RobotEndpoint` with the semantics of
:class:`~real_robot.transport.InMemoryTransport`:

- every received message is stamped with the backend's ``clock`` on reception (header stamps are ignored: the
  robot PC's clock need not agree with ours);
- images arrive as ``rgb8`` (H, W, 3) uint8; ``bgr8`` / ``rgba8`` / ``bgra8`` are converted, other encodings are
  refused (logged once per topic and encoding, message dropped);
- a command's gripper opening (a :class:`~real_robot.transport.JointCommand`'s, a trajectory's first point's) is
  also published on ``Topics.gripper`` as ``std_msgs/Float64``;
- dry run (``shadow=True``) publishes every command topic under ``Topics.shadow_prefix`` and never on the real one.

No ROS import here (the package's core stays importable without ROS).
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, Self

import numpy as np

from real_robot.transport import (
    EpisodeReport,
    Image,
    JointCommand,
    JointState,
    JointTrajectory,
    ObjectState,
    PoseStamped,
    Topics,
    TrajectoryPoint,
)

logger = logging.getLogger(__name__)

# Image encodings we accept → (channels, channel order that gives RGB). Everything else is refused: guessing a
# layout (e.g. bayer, 16-bit depth, yuv) would feed the policy garbage that looks like an image.
IMAGE_ENCODINGS: dict[str, tuple[int, tuple[int, int, int]]] = {
    "rgb8": (3, (0, 1, 2)),
    "bgr8": (3, (2, 1, 0)),
    "rgba8": (4, (0, 1, 2)),
    "bgra8": (4, (2, 1, 0)),
}


@dataclass(frozen=True)
class RosMessages:
    """What differs between ROS versions for the conversions: message classes and time handling.

    Attributes:
        JointState, Image: ``sensor_msgs`` classes.
        Float64MultiArray, Float64, String: ``std_msgs`` classes.
        JointTrajectory, JointTrajectoryPoint: ``trajectory_msgs`` classes.
        PoseStamped: ``geometry_msgs`` class.
        duration: seconds (float, ≥ 0) → the version's ``Duration`` (``builtin_interfaces/Duration`` in ROS 2,
            ``rospy.Duration`` in ROS 1).
        seconds: a ``Duration`` → seconds (float).
        now_stamp: the header stamp for an outgoing message (the node's clock now).
    """

    JointState: type
    Image: type
    Float64MultiArray: type
    Float64: type
    String: type
    JointTrajectory: type
    JointTrajectoryPoint: type
    PoseStamped: type
    duration: Callable[[float], Any]
    seconds: Callable[[Any], float]
    now_stamp: Callable[[], Any]


def split_seconds(seconds: float) -> tuple[int, int]:
    """Seconds → ``(sec, nanosec)`` with ``0 <= nanosec < 1e9``, rounded to the nearest nanosecond.

    Raises ``ValueError`` for a negative or non-finite duration (a trajectory point's ``time_from_start``).
    """
    if not math.isfinite(seconds) or seconds < 0.0:
        raise ValueError(f"A duration must be finite and >= 0 s, got {seconds!r}.")
    sec = math.floor(seconds)
    nanosec = round((seconds - sec) * 1e9)
    if nanosec >= 1_000_000_000:  # 0.9999999999 s rounds up to the next second
        sec, nanosec = sec + 1, nanosec - 1_000_000_000
    return int(sec), int(nanosec)


def join_seconds(sec: int, nanosec: int) -> float:
    """``(sec, nanosec)`` → seconds. Division (not ``* 1e-9``) is correctly rounded, so a time with at most 9
    decimals (e.g. 0.05 s) comes back as exactly the float it was sent as."""
    return sec + nanosec / 1e9


# -- conversions: robot → policy ----------------------------------------------------------------------------


def joint_state_to_msg(ros: RosMessages, state: JointState) -> Any:
    """:class:`JointState` → ``sensor_msgs/JointState`` (header stamped now; no efforts)."""
    msg = ros.JointState()
    msg.header.stamp = ros.now_stamp()
    msg.name = list(state.names)
    msg.position = np.asarray(state.positions, dtype=np.float64).tolist()
    msg.velocity = [] if state.velocities is None else np.asarray(state.velocities, dtype=np.float64).tolist()
    return msg


def joint_state_from_msg(msg: Any, stamp: float) -> JointState:
    """``sensor_msgs/JointState`` → :class:`JointState` stamped ``stamp``; an empty ``velocity`` → ``None``.

    Raises ``ValueError`` if ``position`` (or a non-empty ``velocity``) does not have one entry per name.
    """
    names = tuple(msg.name)
    positions = np.array(msg.position, dtype=np.float64)  # (N,)
    if positions.shape != (len(names),):
        raise ValueError(f"JointState: {len(names)} names but {positions.shape[0]} positions.")
    velocities = np.array(msg.velocity, dtype=np.float64) if len(msg.velocity) else None  # (N,)
    if velocities is not None and velocities.shape != (len(names),):
        raise ValueError(f"JointState: {len(names)} names but {velocities.shape[0]} velocities.")
    return JointState(names, positions, velocities, stamp)


def image_to_msg(ros: RosMessages, image: Image, frame_id: str = "") -> Any:
    """:class:`Image` (H, W, 3) uint8 RGB → ``sensor_msgs/Image`` ``rgb8``. Raises ``ValueError`` on another shape
    or dtype."""
    data = np.asarray(image.data)
    if data.ndim != 3 or data.shape[2] != 3 or data.dtype != np.uint8:
        raise ValueError(f"Image: expected (H, W, 3) uint8 RGB, got shape {data.shape} dtype {data.dtype}.")
    msg = ros.Image()
    msg.header.stamp = ros.now_stamp()
    msg.header.frame_id = frame_id
    msg.height, msg.width = int(data.shape[0]), int(data.shape[1])
    msg.encoding = "rgb8"
    msg.is_bigendian = 0
    msg.step = 3 * msg.width  # bytes per row
    msg.data = np.ascontiguousarray(data).tobytes()
    return msg


def image_from_msg(msg: Any, stamp: float) -> Image:
    """``sensor_msgs/Image`` → :class:`Image` (H, W, 3) uint8 RGB stamped ``stamp``.

    Honours ``step`` (rows may be padded). Raises ``ValueError`` for an encoding not in :data:`IMAGE_ENCODINGS`
    or a buffer that does not match ``height × step``.
    """
    encoding = str(msg.encoding).lower()
    if encoding not in IMAGE_ENCODINGS:
        raise ValueError(
            f"Image: unsupported encoding {msg.encoding!r}; expected one of {sorted(IMAGE_ENCODINGS)} "
            "(configure the camera driver for rgb8)."
        )
    channels, order = IMAGE_ENCODINGS[encoding]
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    buffer = np.frombuffer(msg.data, dtype=np.uint8)  # bytes (ROS 1) or array('B') (ROS 2), no copy
    if step < width * channels or buffer.size != height * step:
        raise ValueError(
            f"Image: {buffer.size} bytes do not hold {height} rows of step {step} for {width} px of "
            f"{encoding} ({channels} bytes per px)."
        )
    pixels = buffer.reshape(height, step)[:, : width * channels].reshape(height, width, channels)
    # Fancy indexing copies, so the array owns its memory (the message buffer may be reused by the middleware).
    rgb = pixels[:, :, list(order)] if order != (0, 1, 2) or channels != 3 else pixels.copy()
    return Image(rgb, stamp)


def object_state_to_msg(ros: RosMessages, state: ObjectState) -> Any:
    """:class:`ObjectState` → ``std_msgs/Float64MultiArray`` (values only, empty layout)."""
    msg = ros.Float64MultiArray()
    msg.data = np.asarray(state.values, dtype=np.float64).ravel().tolist()
    return msg


def object_state_from_msg(msg: Any, stamp: float) -> ObjectState:
    """``std_msgs/Float64MultiArray`` → :class:`ObjectState` (K,) stamped ``stamp``."""
    return ObjectState(np.array(msg.data, dtype=np.float64), stamp)


def string_to_msg(ros: RosMessages, text: str) -> Any:
    """Text → ``std_msgs/String`` (e-stop reason, control command, episode JSON)."""
    msg = ros.String()
    msg.data = str(text)
    return msg


# -- conversions: policy → robot ----------------------------------------------------------------------------


def joint_command_to_msg(ros: RosMessages, command: JointCommand) -> Any:
    """:class:`JointCommand` → ``std_msgs/Float64MultiArray`` of its positions (rad). The joint names are not
    on the wire (a position controller has its own joint order); the gripper goes to its own topic."""
    msg = ros.Float64MultiArray()
    msg.data = np.asarray(command.positions, dtype=np.float64).ravel().tolist()
    return msg


def joint_command_from_msg(msg: Any, names: tuple[str, ...], stamp: float) -> JointCommand:
    """``std_msgs/Float64MultiArray`` → :class:`JointCommand` with the controller's ``names``, ``gripper=None``."""
    return JointCommand(names, np.array(msg.data, dtype=np.float64), None, stamp)


def gripper_to_msg(ros: RosMessages, opening: float) -> Any:
    """Gripper opening fraction in [0, 1] (1 open) → ``std_msgs/Float64``."""
    msg = ros.Float64()
    msg.data = float(opening)
    return msg


def trajectory_to_msg(ros: RosMessages, trajectory: JointTrajectory) -> Any:
    """:class:`JointTrajectory` → ``trajectory_msgs/JointTrajectory`` (header stamped now, which a
    JointTrajectoryController reads as "start now"; points' gripper openings are not on the wire)."""
    msg = ros.JointTrajectory()
    msg.header.stamp = ros.now_stamp()
    msg.joint_names = list(trajectory.names)
    points = []
    for point in trajectory.points:
        ros_point = ros.JointTrajectoryPoint()
        ros_point.positions = np.asarray(point.positions, dtype=np.float64).ravel().tolist()
        ros_point.time_from_start = ros.duration(point.time_from_start)
        points.append(ros_point)
    msg.points = points
    return msg


def trajectory_from_msg(ros: RosMessages, msg: Any, stamp: float) -> JointTrajectory:
    """``trajectory_msgs/JointTrajectory`` → :class:`JointTrajectory` stamped ``stamp`` (points' gripper ``None``)."""
    points = tuple(
        TrajectoryPoint(np.array(p.positions, dtype=np.float64), ros.seconds(p.time_from_start)) for p in msg.points
    )
    return JointTrajectory(tuple(msg.joint_names), points, stamp)


def pose_to_msg(ros: RosMessages, pose: PoseStamped) -> Any:
    """:class:`PoseStamped` → ``geometry_msgs/PoseStamped``; the quaternion goes from our wxyz to ROS's xyzw."""
    position = np.asarray(pose.position, dtype=np.float64)
    quat = np.asarray(pose.orientation, dtype=np.float64)
    if position.shape != (3,) or quat.shape != (4,):
        raise ValueError(
            f"PoseStamped: expected position (3,) and orientation (4,) wxyz, got {position.shape} and {quat.shape}."
        )
    msg = ros.PoseStamped()
    msg.header.stamp = ros.now_stamp()
    msg.header.frame_id = pose.frame_id
    msg.pose.position.x, msg.pose.position.y, msg.pose.position.z = (float(v) for v in position)
    o = msg.pose.orientation
    o.w, o.x, o.y, o.z = (float(v) for v in quat)
    return msg


def pose_from_msg(msg: Any, stamp: float) -> PoseStamped:
    """``geometry_msgs/PoseStamped`` → :class:`PoseStamped` (orientation wxyz) stamped ``stamp``."""
    p, o = msg.pose.position, msg.pose.orientation
    return PoseStamped(
        msg.header.frame_id,
        np.array([p.x, p.y, p.z], dtype=np.float64),
        np.array([o.w, o.x, o.y, o.z], dtype=np.float64),
        stamp,
    )


# -- the shared backend -------------------------------------------------------------------------------------


class RosBus(Protocol):
    """How a backend publishes and subscribes (one node of one ROS version).

    ``sensor_data``: the stream is a camera's (best effort, shallow queue, large messages) — ROS 2's sensor-data
    QoS, ROS 1's big receive buffer.
    """

    def publisher(self, topic: str, msg_type: type, *, sensor_data: bool = False) -> Callable[[Any], None]:
        """Create a publisher now; returns its ``publish(msg)``."""
        ...

    def subscribe(
        self, topic: str, msg_type: type, callback: Callable[[Any], None], *, sensor_data: bool = False
    ) -> None:
        """Call ``callback(msg)`` (on the backend's spin thread) for each message on ``topic``."""
        ...

    def close(self) -> None:
        """Remove every publisher and subscription and stop spinning (idempotent)."""
        ...


class _Receiver:
    """Stamps and converts incoming messages; a conversion error is logged once per (topic, error kind) and the
    message dropped (a misconfigured camera would otherwise log 30 times a second)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self._logged: set[tuple[str, str]] = set()

    def convert(self, topic: str, convert: Callable[[Any, float], Any], msg: Any) -> Any | None:
        stamp = self.clock()  # first: the reception time, before any conversion work
        try:
            return convert(msg, stamp)
        except (ValueError, TypeError) as error:
            key = (topic, str(error).split(";")[0][:80])
            if key not in self._logged:
                self._logged.add(key)
                logger.error("Dropped a message on %s (logged once): %s", topic, error)
            return None


def _call_all(callbacks: list[Callable[[Any], None]], argument: Any, what: str) -> None:
    """Call every callback; one that raises is logged and does not stop the others (an e-stop must still reach the
    safety layer if another listener fails) nor the backend's spin thread (an exception there would end all
    reception in ROS 2)."""
    for callback in callbacks:
        try:
            callback(argument)
        except Exception:
            logger.exception("A %s callback raised; the other callbacks still ran.", what)


def _guarded(topic: str, callback: Callable[[Any], None]) -> Callable[[Any], None]:
    """``callback`` with any exception logged instead of raised into the spin thread."""

    def guarded(msg: Any) -> None:
        try:
            callback(msg)
        except Exception:
            logger.exception("Handling a message on %s failed; message dropped.", topic)

    return guarded


class _RosSide:
    """What both sides share: the topics, the message classes, the bus, reception stamping, and the lifecycle
    (``close()`` is idempotent; publishing after it raises)."""

    def __init__(self, topics: Topics, ros: RosMessages, bus: RosBus, clock: Callable[[], float]) -> None:
        self.topics = topics
        self.ros = ros
        self.bus = bus
        self._receiver = _Receiver(clock)
        self._lock = threading.Lock()
        self._closed = False

    def close(self) -> None:
        """Remove publishers and subscriptions and stop the node (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.bus.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{type(self).__name__}: publish after close().")


class RosTransportBase(_RosSide):
    """The policy side (:class:`~real_robot.transport.Transport`) over a :class:`RosBus`.

    Publishers are created at start, the shadow ones included: a publisher created at its first message loses
    that message (the subscriber is not discovered yet), so lazy creation would silently drop the first commands
    of a dry run; idle publishers cost nothing.

    Beyond the protocol, :meth:`on_episode` delivers the simulated robot's :class:`EpisodeReport`\\ s.
    ``ros`` and ``bus`` stay public for tools that need a stream the dataclasses do not cover (e.g. tests that
    publish a ``bgr8`` image).

    Args:
        topics: topic names.
        ros: the ROS version's message classes.
        bus: the ROS version's node.
        clock: seconds; stamps incoming messages (use the control loop's clock).
    """

    def __init__(self, topics: Topics, ros: RosMessages, bus: RosBus, clock: Callable[[], float]) -> None:
        super().__init__(topics, ros, bus, clock)
        self._joint_state: JointState | None = None
        self._images: dict[str, Image] = {}
        self._object_state: ObjectState | None = None
        self._estop_callbacks: list[Callable[[str], None]] = []
        self._control_callbacks: list[Callable[[str], None]] = []
        self._episode_callbacks: list[Callable[[EpisodeReport], None]] = []
        try:
            self._publish: dict[str, Callable[[Any], None]] = {}
            for shadow in (False, True):
                for topic, msg_type in (
                    (topics.commands, ros.Float64MultiArray),
                    (topics.trajectory, ros.JointTrajectory),
                    (topics.pose, ros.PoseStamped),
                    (topics.gripper, ros.Float64),
                ):
                    name = topics.command_topic(topic, shadow)
                    self._publish[name] = bus.publisher(name, msg_type)
            subscriptions = [
                (topics.joint_states, ros.JointState, self._on_joint_state, False),
                *(
                    (topic, ros.Image, self._image_callback(camera, topic), True)
                    for camera, topic in topics.cameras.items()
                ),
                (topics.object_state, ros.Float64MultiArray, self._on_object_state, False),
                (topics.estop, ros.String, self._on_estop, False),
                (topics.control, ros.String, self._on_control, False),
                (topics.episode, ros.String, self._on_episode, False),
            ]
            for topic, msg_type, callback, sensor_data in subscriptions:
                bus.subscribe(topic, msg_type, _guarded(topic, callback), sensor_data=sensor_data)
        except BaseException:
            bus.close()
            raise

    # -- Transport ------------------------------------------------------------------------------------------

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
        self._send(self.topics.commands, joint_command_to_msg(self.ros, command), shadow)
        if command.gripper is not None:
            self._send(self.topics.gripper, gripper_to_msg(self.ros, command.gripper), shadow)

    def publish_trajectory(self, trajectory: JointTrajectory, *, shadow: bool = False) -> None:
        self._send(self.topics.trajectory, trajectory_to_msg(self.ros, trajectory), shadow)
        if trajectory.points and trajectory.points[0].gripper is not None:
            self._send(self.topics.gripper, gripper_to_msg(self.ros, trajectory.points[0].gripper), shadow)

    def publish_pose(self, pose: PoseStamped, *, shadow: bool = False) -> None:
        self._send(self.topics.pose, pose_to_msg(self.ros, pose), shadow)

    def on_estop(self, callback: Callable[[str], None]) -> None:
        with self._lock:
            self._estop_callbacks.append(callback)

    def on_control(self, callback: Callable[[str], None]) -> None:
        with self._lock:
            self._control_callbacks.append(callback)

    def on_episode(self, callback: Callable[[EpisodeReport], None]) -> None:
        """Call ``callback(report)`` (on the spin thread) for each episode the simulated robot reports."""
        with self._lock:
            self._episode_callbacks.append(callback)

    # -- internals (callbacks run on the backend's spin thread) ---------------------------------------------

    def _send(self, topic: str, msg: Any, shadow: bool) -> None:
        self._check_open()
        self._publish[self.topics.command_topic(topic, shadow)](msg)

    def _on_joint_state(self, msg: Any) -> None:
        state = self._receiver.convert(self.topics.joint_states, joint_state_from_msg, msg)
        if state is not None:
            with self._lock:
                self._joint_state = state

    def _image_callback(self, camera: str, topic: str) -> Callable[[Any], None]:
        def on_image(msg: Any) -> None:
            image = self._receiver.convert(topic, image_from_msg, msg)
            if image is not None:
                with self._lock:
                    self._images[camera] = image

        return on_image

    def _on_object_state(self, msg: Any) -> None:
        state = self._receiver.convert(self.topics.object_state, object_state_from_msg, msg)
        if state is not None:
            with self._lock:
                self._object_state = state

    def _on_estop(self, msg: Any) -> None:
        with self._lock:
            callbacks = list(self._estop_callbacks)
        _call_all(callbacks, str(msg.data), "e-stop")

    def _on_control(self, msg: Any) -> None:
        with self._lock:
            callbacks = list(self._control_callbacks)
        _call_all(callbacks, str(msg.data), "control")

    def _on_episode(self, msg: Any) -> None:
        report = self._receiver.convert(self.topics.episode, _episode_from_msg, msg)
        if report is None:
            return
        with self._lock:
            callbacks = list(self._episode_callbacks)
        _call_all(callbacks, report, "episode")


def _episode_from_msg(msg: Any, stamp: float) -> EpisodeReport:
    try:
        return EpisodeReport.from_json(msg.data)
    except (ValueError, TypeError, KeyError) as error:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"EpisodeReport: not a report's JSON ({error}): {msg.data[:200]!r}") from error


class RosRobotEndpointBase(_RosSide):
    """The robot side (:class:`~real_robot.transport.RobotEndpoint`) over a :class:`RosBus`: publishes what a robot
    (and its cameras, perception, operator) would, and keeps the newest command received on the *real* command
    topics (never the shadow ones — like a controller).

    Beyond the protocol, :meth:`latest_pose` gives the newest Cartesian equilibrium pose.
    ``ros`` and ``bus`` stay public, as on :class:`RosTransportBase`.

    Args:
        topics: topic names.
        ros: the ROS version's message classes.
        bus: the ROS version's node.
        clock: seconds; stamps incoming commands.
        joint_names: the position controller's joints in its order: a ``Float64MultiArray`` carries no names, so
            received :class:`JointCommand`\\ s get these (``()`` if not given).
    """

    def __init__(
        self,
        topics: Topics,
        ros: RosMessages,
        bus: RosBus,
        clock: Callable[[], float],
        joint_names: Sequence[str] = (),
    ) -> None:
        super().__init__(topics, ros, bus, clock)
        self.joint_names = tuple(joint_names)
        self._command: JointCommand | None = None
        self._trajectory: JointTrajectory | None = None
        self._pose: PoseStamped | None = None
        self._gripper: tuple[float, float] | None = None
        try:
            self._publish_joint_state = bus.publisher(topics.joint_states, ros.JointState)
            self._publish_images = {
                camera: bus.publisher(topic, ros.Image, sensor_data=True) for camera, topic in topics.cameras.items()
            }
            self._publish_object_state = bus.publisher(topics.object_state, ros.Float64MultiArray)
            self._publish_estop = bus.publisher(topics.estop, ros.String)
            self._publish_control = bus.publisher(topics.control, ros.String)
            self._publish_episode = bus.publisher(topics.episode, ros.String)
            for topic, msg_type, callback in (
                (topics.commands, ros.Float64MultiArray, self._on_command),
                (topics.trajectory, ros.JointTrajectory, self._on_trajectory),
                (topics.pose, ros.PoseStamped, self._on_pose),
                (topics.gripper, ros.Float64, self._on_gripper),
            ):
                bus.subscribe(topic, msg_type, _guarded(topic, callback))
        except BaseException:
            bus.close()
            raise

    # -- RobotEndpoint --------------------------------------------------------------------------------------

    def publish_joint_state(self, state: JointState) -> None:
        self._check_open()
        self._publish_joint_state(joint_state_to_msg(self.ros, state))

    def publish_image(self, camera: str, image: Image) -> None:
        self._check_open()
        if camera not in self._publish_images:
            raise KeyError(
                f"publish_image: unknown camera {camera!r}; Topics.cameras has {sorted(self._publish_images)}."
            )
        self._publish_images[camera](image_to_msg(self.ros, image, frame_id=camera))

    def publish_object_state(self, state: ObjectState) -> None:
        self._check_open()
        self._publish_object_state(object_state_to_msg(self.ros, state))

    def publish_control(self, command: str) -> None:
        self._check_open()
        self._publish_control(string_to_msg(self.ros, command))

    def publish_estop(self, reason: str) -> None:
        self._check_open()
        self._publish_estop(string_to_msg(self.ros, reason))

    def publish_episode(self, report: EpisodeReport) -> None:
        self._check_open()
        self._publish_episode(string_to_msg(self.ros, report.to_json()))

    def latest_joint_command(self) -> JointCommand | None:
        with self._lock:
            return self._command

    def latest_trajectory(self) -> JointTrajectory | None:
        # The same object until a new trajectory arrives (the simulated robot tells a new one by identity).
        with self._lock:
            return self._trajectory

    def latest_gripper(self) -> tuple[float, float] | None:
        with self._lock:
            return self._gripper

    def latest_pose(self) -> PoseStamped | None:
        """The newest equilibrium pose received (orientation wxyz), or ``None``."""
        with self._lock:
            return self._pose

    # -- internals (callbacks run on the backend's spin thread) ---------------------------------------------

    def _on_command(self, msg: Any) -> None:
        command = self._receiver.convert(
            self.topics.commands, lambda m, stamp: joint_command_from_msg(m, self.joint_names, stamp), msg
        )
        if command is not None:
            with self._lock:
                self._command = command

    def _on_trajectory(self, msg: Any) -> None:
        trajectory = self._receiver.convert(
            self.topics.trajectory, lambda m, stamp: trajectory_from_msg(self.ros, m, stamp), msg
        )
        if trajectory is not None:
            with self._lock:
                self._trajectory = trajectory

    def _on_pose(self, msg: Any) -> None:
        pose = self._receiver.convert(self.topics.pose, pose_from_msg, msg)
        if pose is not None:
            with self._lock:
                self._pose = pose

    def _on_gripper(self, msg: Any) -> None:
        gripper = self._receiver.convert(self.topics.gripper, lambda m, stamp: (float(m.data), stamp), msg)
        if gripper is not None:
            with self._lock:
                self._gripper = gripper
