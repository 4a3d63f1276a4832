"""The ROS 1 backend through a private roscore: a Ros1Transport and a Ros1RobotEndpoint in one process (the shared
round-trip tests of ``tests/ros_roundtrip.py``; rospy's one node per process serves both)."""

from __future__ import annotations

import pytest
from ros_roundtrip import *  # noqa: F403 — the shared round-trip tests and their `pair` fixture, run over ROS 1
from ros_roundtrip import RosBackend

from real_robot.ros1 import Ros1RobotEndpoint, Ros1Transport

# rospy (Debian's build) still calls Condition.notifyAll(); one warning per message is noise, not a finding.
pytestmark = pytest.mark.filterwarnings("ignore:notifyAll:DeprecationWarning")


@pytest.fixture(scope="module")
def ros_backend() -> RosBackend:
    return RosBackend("real_robot.ros1", Ros1Transport, Ros1RobotEndpoint)
