"""The ROS 2 backend over loopback: a Ros2Transport and a Ros2RobotEndpoint in one process (the shared round-trip
tests of ``tests/ros_roundtrip.py``), on a DDS domain of this test session's own."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from ros_roundtrip import *  # noqa: F403 — the shared round-trip tests and their `pair` fixture, run over ROS 2
from ros_roundtrip import RosBackend


@pytest.fixture(scope="module")
def ros_backend() -> Iterator[RosBackend]:
    pytest.importorskip("rclpy", reason='the ROS 2 backend needs the ros2 extra: pip install "robo_rlft[ros2]"')
    with pytest.MonkeyPatch.context() as env:
        # Default discovery multicasts on every interface (FACTS.md): stay on loopback, and on a domain of our own
        # so concurrent test sessions on this machine never see each other. Read by rmw when a context starts,
        # and inherited by the subprocess tests.
        env.setenv("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
        env.setenv("ROS_DOMAIN_ID", str(1 + os.getpid() % 100))  # 1 … 100 (Fast DDS on Linux allows 0 … 101)
        from real_robot.ros2 import Ros2RobotEndpoint, Ros2Transport

        yield RosBackend("real_robot.ros2", Ros2Transport, Ros2RobotEndpoint)


@pytest.mark.filterwarnings("ignore:Failed to fini rosout publisher:RuntimeWarning")  # rclpy, on the failed node
def test_invalid_node_name_names_the_value(ros_backend: RosBackend) -> None:
    from real_robot.transport import Topics

    with pytest.raises(ValueError, match="node_name 'bad name' is invalid"):
        ros_backend.transport(Topics(), node_name="bad name")
