"""The message conversions shared by both ROS backends, without ROS: stand-in message classes with the same fields."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from real_robot import ros_messages as rm
from real_robot.transport import Image, JointState, PoseStamped, Topics


def _header() -> SimpleNamespace:
    return SimpleNamespace(stamp=None, frame_id="")


def _point() -> SimpleNamespace:
    return SimpleNamespace(x=0.0, y=0.0, z=0.0)


FAKE = rm.RosMessages(
    JointState=lambda: SimpleNamespace(header=_header(), name=[], position=[], velocity=[], effort=[]),
    Image=lambda: SimpleNamespace(header=_header(), height=0, width=0, encoding="", is_bigendian=0, step=0, data=b""),
    Float64MultiArray=lambda: SimpleNamespace(layout=None, data=[]),
    Float64=lambda: SimpleNamespace(data=0.0),
    String=lambda: SimpleNamespace(data=""),
    JointTrajectory=lambda: SimpleNamespace(header=_header(), joint_names=[], points=[]),
    JointTrajectoryPoint=lambda: SimpleNamespace(positions=[], time_from_start=None),
    PoseStamped=lambda: SimpleNamespace(
        header=_header(), pose=SimpleNamespace(position=_point(), orientation=SimpleNamespace(x=0.0, y=0.0, z=0.0, w=1))
    ),
    duration=lambda s: rm.split_seconds(s),
    seconds=lambda d: rm.join_seconds(*d),
    now_stamp=lambda: "now",
)


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [(0.0, (0, 0)), (0.05, (0, 50_000_000)), (1.5, (1, 500_000_000)), (0.9999999999, (1, 0)), (12.000000001, (12, 1))],
)
def test_split_seconds(seconds: float, expected: tuple[int, int]) -> None:
    assert rm.split_seconds(seconds) == expected


@pytest.mark.parametrize("seconds", [0.05, 0.1, 0.15, 0.123456789, 3.0, 1e-9])
def test_durations_with_nine_decimals_come_back_exactly(seconds: float) -> None:
    assert rm.join_seconds(*rm.split_seconds(seconds)) == seconds


@pytest.mark.parametrize("seconds", [-0.01, float("nan"), float("inf")])
def test_bad_durations_are_refused(seconds: float) -> None:
    with pytest.raises(ValueError, match="finite and >= 0"):
        rm.split_seconds(seconds)


def test_image_rows_with_padding_are_cropped() -> None:
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    padded = np.zeros((2, 12), np.uint8)  # step 12 > 3 px · 3 bytes
    padded[:, :9] = rgb.reshape(2, 9)
    msg = SimpleNamespace(height=2, width=3, encoding="rgb8", step=12, data=padded.tobytes())
    image = rm.image_from_msg(msg, stamp=4.0)
    np.testing.assert_array_equal(image.data, rgb)
    assert image.stamp == 4.0 and image.data.flags.owndata


@pytest.mark.parametrize(
    ("encoding", "step", "size", "match"),
    [
        ("mono8", 3, 6, "unsupported encoding 'mono8'"),
        ("16UC1", 6, 12, "unsupported encoding '16UC1'"),
        ("rgb8", 9, 17, "17 bytes do not hold 2 rows of step 9"),
        ("rgb8", 6, 12, "rows of step 6"),
    ],
)
def test_bad_images_name_the_problem(encoding: str, step: int, size: int, match: str) -> None:
    msg = SimpleNamespace(height=2, width=3, encoding=encoding, step=step, data=bytes(size))
    with pytest.raises(ValueError, match=match):
        rm.image_from_msg(msg, 0.0)


def test_image_to_msg_refuses_non_rgb_arrays() -> None:
    with pytest.raises(ValueError, match=r"expected \(H, W, 3\) uint8 RGB, got shape \(4, 4\)"):
        rm.image_to_msg(FAKE, Image(np.zeros((4, 4), np.uint8)))
    with pytest.raises(ValueError, match="dtype float32"):
        rm.image_to_msg(FAKE, Image(np.zeros((4, 4, 3), np.float32)))


def test_joint_state_length_mismatch_is_refused() -> None:
    msg = SimpleNamespace(name=["a", "b"], position=[1.0], velocity=[])
    with pytest.raises(ValueError, match="2 names but 1 positions"):
        rm.joint_state_from_msg(msg, 0.0)
    msg = SimpleNamespace(name=["a"], position=[1.0], velocity=[1.0, 2.0])
    with pytest.raises(ValueError, match="1 names but 2 velocities"):
        rm.joint_state_from_msg(msg, 0.0)
    state = rm.joint_state_from_msg(rm.joint_state_to_msg(FAKE, JointState(("a",), np.array([0.5]))), 2.0)
    assert state.velocities is None and state.stamp == 2.0


def test_pose_goes_on_the_wire_as_xyzw() -> None:
    msg = rm.pose_to_msg(FAKE, PoseStamped("base", np.array([1.0, 2.0, 3.0]), np.array([0.1, 0.2, 0.3, 0.4])))
    o = msg.pose.orientation
    assert (o.x, o.y, o.z, o.w) == (0.2, 0.3, 0.4, 0.1)
    assert msg.header.frame_id == "base" and msg.header.stamp == "now"
    with pytest.raises(ValueError, match=r"orientation \(4,\) wxyz, got \(3,\) and \(3,\)"):
        rm.pose_to_msg(FAKE, PoseStamped("base", np.zeros(3), np.zeros(3)))


def test_backends_import_without_ros() -> None:
    """The backend modules load without rclpy/rospy: they import them when an instance is created."""
    code = (
        "import sys, real_robot.ros1, real_robot.ros2\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('rclpy', 'rospy'))\n"
        "assert not loaded, loaded"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_missing_ros_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from real_robot.ros1 import Ros1Transport
    from real_robot.ros2 import Ros2RobotEndpoint

    monkeypatch.setitem(sys.modules, "rclpy", None)  # `import rclpy` now raises ImportError
    monkeypatch.setitem(sys.modules, "rospy", None)
    with pytest.raises(ImportError, match=r'pip install "robo_rlft\[ros2\]"'):
        Ros2RobotEndpoint(Topics())
    with pytest.raises(ImportError, match=r"python3-rospy.*--system-site-packages"):
        Ros1Transport(Topics())
