"""ROS 1 backend (rospy): :class:`Ros1Transport` for the policy's side, :class:`Ros1RobotEndpoint` for the robot's.

rospy allows one node per process: the first instance initialises it (anonymous, so two processes never clash;
``disable_signals=True`` so Ctrl-C stays the application's) and every later one shares it. Each instance owns its
publishers and subscribers and ``close()`` unregisters only those; the node itself lives until the process exits
(rospy cannot initialise a node again after shutting one down, so stopping it when the last instance closes would
break every instance created after). The master is the environment's ``ROS_MASTER_URI``.

Callbacks run on rospy's receive threads (one per subscription); the shared logic in
:mod:`real_robot.ros_messages` locks its state.

rospy does not come from PyPI: it is part of a ROS 1 installation (Debian/Ubuntu packages ``python3-rospy``,
``python3-rosmaster``, ``python3-sensor-msgs`` …, or ROS Noetic), importable from that system's Python only; it is
imported when an instance is created, never at import time.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from real_robot.ros_messages import RosMessages, RosRobotEndpointBase, RosTransportBase, join_seconds, split_seconds
from real_robot.transport import Topics

logger = logging.getLogger(__name__)

_INSTALL_HINT = (
    "The ROS 1 backend needs rospy, which comes from the system, not from pip: install ROS Noetic or the "
    "Debian/Ubuntu packages (apt-get install python3-rospy python3-rosmaster python3-roslaunch python3-sensor-msgs "
    "python3-trajectory-msgs python3-std-msgs python3-geometry-msgs), then create the venv from that Python with "
    "system packages visible: /usr/bin/python3 -m venv --system-site-packages .venv-ros1 (without the ros2 extra, "
    "whose rosgraph_msgs shadows ROS 1's)."
)
_QUEUE_SIZE = 10  # commands, states and operator messages
# Cameras: keep only the newest image, and a receive buffer that holds whole images — with rospy's default 64 KiB
# buffer a large message is read in many chunks and the queue serves stale images (a long-standing rospy issue).
_IMAGE_BUFF_SIZE = 1 << 24
_node_lock = threading.Lock()


def _import_rospy() -> Any:
    try:
        import rospy
    except ImportError as error:
        raise ImportError(_INSTALL_HINT) from error
    return rospy


def ensure_node(name: str) -> None:
    """Initialise this process's rospy node (anonymous ``name``) unless it already is.

    Raises ``ConnectionError`` if no master answers at ``ROS_MASTER_URI`` (rospy would otherwise keep retrying in
    the background while every publish silently goes nowhere).
    """
    rospy = _import_rospy()
    import rosgraph

    with _node_lock:
        if rospy.core.is_initialized():
            return
        uri = os.environ.get("ROS_MASTER_URI", "")
        if not uri:
            raise ConnectionError("ROS_MASTER_URI is not set: export it (e.g. http://localhost:11311) or run roscore.")
        if not rosgraph.is_master_online(master_uri=uri):
            raise ConnectionError(f"No ROS master answers at ROS_MASTER_URI={uri}: start roscore (or fix the URI).")
        rospy.init_node(name, anonymous=True, disable_signals=True)


def ros1_messages() -> RosMessages:
    """The ROS 1 message classes, ``rospy.Duration`` and header stamps from ``rospy.Time.now()``."""
    rospy = _import_rospy()
    try:
        from geometry_msgs.msg import PoseStamped
        from sensor_msgs.msg import Image, JointState
        from std_msgs.msg import Float64, Float64MultiArray, String
        from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint
    except ImportError as error:
        raise ImportError(_INSTALL_HINT) from error

    def duration(seconds: float) -> Any:
        return rospy.Duration(*split_seconds(seconds))

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
        seconds=lambda d: join_seconds(d.secs, d.nsecs),
        now_stamp=rospy.Time.now,
    )


class Ros1Bus:
    """This instance's publishers and subscribers on the process's shared rospy node.

    Args:
        node_name: the node's name if this instance is the process's first (anonymised by rospy).
    """

    def __init__(self, node_name: str) -> None:
        self._rospy = _import_rospy()
        ensure_node(node_name)
        self._handles: list[Any] = []  # rospy.Publisher / rospy.Subscriber, unregistered by close()
        self._closed = False

    def publisher(self, topic: str, msg_type: type, *, sensor_data: bool = False) -> Callable[[Any], None]:
        # A queue makes publish() asynchronous (a slow subscriber cannot block the control loop); TCP_NODELAY
        # stops Nagle's algorithm from holding small messages back for up to 40 ms.
        publisher = self._rospy.Publisher(
            topic, msg_type, queue_size=1 if sensor_data else _QUEUE_SIZE, tcp_nodelay=True
        )
        self._handles.append(publisher)
        return publisher.publish

    def subscribe(
        self, topic: str, msg_type: type, callback: Callable[[Any], None], *, sensor_data: bool = False
    ) -> None:
        if sensor_data:
            subscriber = self._rospy.Subscriber(
                topic, msg_type, callback, queue_size=1, buff_size=_IMAGE_BUFF_SIZE, tcp_nodelay=True
            )
        else:
            subscriber = self._rospy.Subscriber(topic, msg_type, callback, queue_size=_QUEUE_SIZE, tcp_nodelay=True)
        self._handles.append(subscriber)

    def close(self) -> None:
        """Unregister this instance's publishers and subscribers (the node stays: see the module docstring)."""
        if self._closed:
            return
        self._closed = True
        for handle in self._handles:
            handle.unregister()
        self._handles.clear()


class Ros1Transport(RosTransportBase):
    """The policy's side over ROS 1 (:class:`~real_robot.transport.Transport`).

    Args:
        topics: topic names.
        clock: seconds; stamps incoming messages (use the control loop's clock).
        node_name: the rospy node's name, if this is the process's first ROS 1 instance.
    """

    def __init__(
        self, topics: Topics, *, clock: Callable[[], float] = time.monotonic, node_name: str = "robo_rlft_policy"
    ) -> None:
        bus = Ros1Bus(node_name)
        super().__init__(topics, ros1_messages(), bus, clock)


class Ros1RobotEndpoint(RosRobotEndpointBase):
    """The robot's side over ROS 1 (:class:`~real_robot.transport.RobotEndpoint`), for a simulated robot.

    Args:
        topics: topic names.
        clock: seconds; stamps incoming commands.
        node_name: the rospy node's name, if this is the process's first ROS 1 instance.
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
        bus = Ros1Bus(node_name)
        super().__init__(topics, ros1_messages(), bus, clock, joint_names)
