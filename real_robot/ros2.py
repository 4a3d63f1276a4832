"""ROS 2 backend (rclpy): :class:`Ros2Transport` for the policy's side, :class:`Ros2RobotEndpoint` for the robot's.

Each instance owns its own ``rclpy.Context``, node and single-threaded executor spinning on a daemon thread, so
several can live in one process (a policy and a simulated robot in tests) and be closed independently. Message
conversion and the semantics (stamps on reception, image encodings, gripper topic, shadow topics) are shared with
ROS 1 in :mod:`real_robot.ros_messages`.

rclpy comes from the ``ros2`` extra (``pip install "robo_rlft[ros2]"``: the PyPI builds of ROS 2 Kilted) or from a
sourced ROS 2 install; it is imported when an instance is created, never at import time.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from real_robot.ros_messages import RosMessages, RosRobotEndpointBase, RosTransportBase, join_seconds, split_seconds
from real_robot.transport import Topics

logger = logging.getLogger(__name__)

_INSTALL_HINT = (
    'The ROS 2 backend needs rclpy and the message packages: pip install "robo_rlft[ros2]" '
    "(or source a ROS 2 installation)."
)
_QUEUE_DEPTH = 10  # commands, states and operator messages: reliable, a few in flight at most
# Buses not closed yet: closed at interpreter exit in the safe order, in case the application forgot to.
_open_buses: weakref.WeakSet[Ros2Bus] = weakref.WeakSet()


def _import_rclpy() -> Any:
    try:
        import rclpy
    except ImportError as error:
        raise ImportError(_INSTALL_HINT) from error
    return rclpy


def ros2_messages(node: Any) -> RosMessages:
    """The ROS 2 message classes, ``builtin_interfaces/Duration`` and header stamps from ``node``'s clock."""
    try:
        from builtin_interfaces.msg import Duration
        from geometry_msgs.msg import PoseStamped
        from sensor_msgs.msg import Image, JointState
        from std_msgs.msg import Float64, Float64MultiArray, String
        from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint
    except ImportError as error:
        raise ImportError(_INSTALL_HINT) from error

    def duration(seconds: float) -> Any:
        sec, nanosec = split_seconds(seconds)
        return Duration(sec=sec, nanosec=nanosec)

    return RosMessages(
        JointState=JointState,
        Image=Image,
        Float64MultiArray=Float64MultiArray,
        Float64=Float64,
        String=String,
        JointTrajectory=JointTrajectory,
        JointTrajectoryPoint=JointTrajectoryPoint,
        PoseStamped=PoseStamped,
        duration=duration,
        seconds=lambda d: join_seconds(d.sec, d.nanosec),
        now_stamp=lambda: node.get_clock().now().to_msg(),
    )


class Ros2Bus:
    """One rclpy node in its own context, spun by a single-threaded executor on a daemon thread.

    Single-threaded on purpose: callbacks never run concurrently with each other, so the backends' state only needs
    a lock against the control loop's thread.

    Args:
        node_name: the node's name.
    """

    def __init__(self, node_name: str) -> None:
        rclpy = _import_rclpy()
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import qos_profile_sensor_data

        self._sensor_qos = qos_profile_sensor_data
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        try:
            self.node = rclpy.create_node(node_name, context=self.context)
        except Exception as error:  # e.g. rclpy's InvalidNodeNameException: name the value and the rule
            self.context.try_shutdown()
            raise ValueError(
                f"ROS 2 node_name {node_name!r} is invalid: use letters, digits and underscores, not starting with a "
                f"digit ({error})."
            ) from error
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self._closed = False
        self._thread = threading.Thread(target=self._spin, name=f"ros2-{node_name}", daemon=True)
        self._thread.start()
        _open_buses.add(self)

    def publisher(self, topic: str, msg_type: type, *, sensor_data: bool = False) -> Callable[[Any], None]:
        qos = self._sensor_qos if sensor_data else _QUEUE_DEPTH
        return self.node.create_publisher(msg_type, topic, qos).publish

    def subscribe(
        self, topic: str, msg_type: type, callback: Callable[[Any], None], *, sensor_data: bool = False
    ) -> None:
        # Cameras publish best effort; a reliable subscription would not match them (FACTS.md, ROS).
        qos = self._sensor_qos if sensor_data else _QUEUE_DEPTH
        self.node.create_subscription(msg_type, topic, callback, qos)

    def close(self) -> None:
        """Shut down in the only order that does not abort the process at exit (exit 134, FACTS.md): shut the
        context down (which wakes and ends the executor's spin), join the spin thread, then destroy the node."""
        if self._closed:
            return
        self._closed = True
        _open_buses.discard(self)
        self.context.try_shutdown()
        if threading.current_thread() is self._thread:
            return  # closed from a callback: spin() ends when it returns; the node goes with the process
        self._thread.join(timeout=5.0)
        if self._thread.is_alive():
            logger.warning("The ROS 2 executor thread of %s did not stop within 5 s.", self.node.get_name())
        self.executor.shutdown(timeout_sec=1.0)
        self.node.destroy_node()

    def _spin(self) -> None:
        from rclpy.executors import ExternalShutdownException, ShutdownException

        # close() shuts the context down, which ends spin() with one of these: the normal way out.
        with contextlib.suppress(ExternalShutdownException, ShutdownException):
            self.executor.spin()


@atexit.register
def _close_open_buses() -> None:
    for bus in list(_open_buses):
        bus.close()


def _open(node_name: str) -> tuple[Ros2Bus, RosMessages]:
    """A running bus and the message namespace bound to its node (the bus is closed if the latter fails)."""
    bus = Ros2Bus(node_name)
    try:
        return bus, ros2_messages(bus.node)
    except BaseException:
        bus.close()
        raise


class Ros2Transport(RosTransportBase):
    """The policy's side over ROS 2 (:class:`~real_robot.transport.Transport`).

    Args:
        topics: topic names.
        clock: seconds; stamps incoming messages (use the control loop's clock).
        node_name: the rclpy node's name.
    """

    def __init__(
        self, topics: Topics, *, clock: Callable[[], float] = time.monotonic, node_name: str = "robo_rlft_policy"
    ) -> None:
        bus, ros = _open(node_name)
        self.node = bus.node
        super().__init__(topics, ros, bus, clock)


class Ros2RobotEndpoint(RosRobotEndpointBase):
    """The robot's side over ROS 2 (:class:`~real_robot.transport.RobotEndpoint`), for a simulated robot.

    Args:
        topics: topic names.
        clock: seconds; stamps incoming commands.
        node_name: the rclpy node's name.
        joint_names: the position controller's joint order, given to received commands (the wire has no names).
    """

    def __init__(
        self,
        topics: Topics,
        *,
        clock: Callable[[], float] = time.monotonic,
        node_name: str = "robo_rlft_robot",
        joint_names: Sequence[str] = (),
    ) -> None:
        bus, ros = _open(node_name)
        self.node = bus.node
        super().__init__(topics, ros, bus, clock, joint_names)
