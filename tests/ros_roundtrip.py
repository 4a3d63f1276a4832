"""Round-trip tests shared by the ROS backends: a transport (policy side) and a robot endpoint in one process.

Not collected by itself; ``tests/test_ros2_transport.py`` and ``tests/ros1/test_ros1_transport.py`` import these
tests and provide the ``ros_backend`` fixture (a :class:`RosBackend`), so both ROS versions are held to the same
behaviour — the behaviour of :class:`real_robot.transport.InMemoryTransport`.

Every wait polls with a deadline. A message published before the subscriber is matched (discovery in ROS 2, the
TCP connection in ROS 1) is lost, so waits re-publish until the message is seen instead of sleeping first.
"""

from __future__ import annotations

import itertools
import logging
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pytest

from real_robot.ros_messages import image_to_msg
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

DEADLINE = 5.0  # s, for a round trip that includes discovery (tens of ms on loopback; slack for a busy CI box)
FIRST_MESSAGE_DEADLINE = 2.0  # s, from creating both sides to the first message received
ARM = tuple(f"panda_joint{i}" for i in range(1, 8))
FINGERS = ("panda_finger_joint1", "panda_finger_joint2")
_topic_ids = itertools.count()


@dataclass(frozen=True)
class RosBackend:
    """One ROS version's classes (what the ``ros_backend`` fixture gives)."""

    module: str  # e.g. "real_robot.ros2"
    transport: type
    robot: type


class OffsetClock:
    """``time.monotonic() + 1000 s``: stamps from it can be told apart from header stamps (wall time) and from a
    backend that ignored the injected clock."""

    def __call__(self) -> float:
        return time.monotonic() + 1000.0


@dataclass
class Pair:
    topics: Topics
    transport: Any
    robot: Any
    clock: OffsetClock


def make_topics() -> Topics:
    """Topics under a prefix unique to this process and test, so tests (and parallel sessions) never cross-talk."""
    prefix = f"/rt{os.getpid()}_{next(_topic_ids)}"
    return Topics(
        joint_states=f"{prefix}/joint_states",
        cameras={"agentview": f"{prefix}/agentview/image_raw", "wrist": f"{prefix}/wrist/image_raw"},
        object_state=f"{prefix}/object_state",
        commands=f"{prefix}/forward_position_controller/commands",
        trajectory=f"{prefix}/joint_trajectory_controller/joint_trajectory",
        pose=f"{prefix}/cartesian_impedance_controller/equilibrium_pose",
        gripper=f"{prefix}/gripper",
        estop=f"{prefix}/estop",
        control=f"{prefix}/control",
        episode=f"{prefix}/episode",
        shadow_prefix=f"{prefix}/shadow",
    )


def wait_until(
    condition: Callable[[], Any],
    publish: Callable[[], None] | None = None,
    timeout: float = DEADLINE,
    period: float = 0.02,
    what: str = "the message",
) -> Any:
    """Poll ``condition()`` until truthy (returned); call ``publish()`` every ``period`` s meanwhile."""
    end = time.monotonic() + timeout
    next_publish = 0.0
    while True:
        value = condition()
        if value:
            return value
        now = time.monotonic()
        if now > end:
            pytest.fail(f"{what} did not arrive within {timeout} s")
        if publish is not None and now >= next_publish:
            publish()
            next_publish = now + period
        time.sleep(0.002)


@pytest.fixture
def pair(ros_backend: RosBackend) -> Iterator[Pair]:
    topics = make_topics()
    clock = OffsetClock()
    transport = ros_backend.transport(topics, clock=clock)
    robot = ros_backend.robot(topics, clock=clock, joint_names=ARM)
    yield Pair(topics, transport, robot, clock)
    robot.close()
    transport.close()


def _assert_received_between(stamp: float, before: float, pair: Pair) -> None:
    assert before <= stamp <= pair.clock(), f"stamp {stamp} is not the injected clock's reception time (≥ {before})"


# -- robot → policy -----------------------------------------------------------------------------------------


def test_joint_state_round_trip(pair: Pair) -> None:
    names = ARM + FINGERS
    positions = np.array([0.1, -0.785398163397, 1e-300, -2.356, np.pi, 1.571, 0.785, 0.04, 0.0399999])
    velocities = np.linspace(-1.0, 1.0, 9) / 3.0
    before = pair.clock()
    state = wait_until(
        pair.transport.latest_joint_state,
        lambda: pair.robot.publish_joint_state(JointState(names, positions, velocities, stamp=-5.0)),
    )
    assert state.names == names
    np.testing.assert_array_equal(state.positions, positions)  # float64 on the wire: bit-exact
    np.testing.assert_array_equal(state.velocities, velocities)
    _assert_received_between(state.stamp, before, pair)

    # No velocities → an empty velocity array on the wire → None again.
    received = wait_until(
        lambda: (s := pair.transport.latest_joint_state()).velocities is None and s,
        lambda: pair.robot.publish_joint_state(JointState(names, positions + 1.0)),
    )
    np.testing.assert_array_equal(received.positions, positions + 1.0)


def test_images_round_trip_and_other_encodings_are_converted(pair: Pair) -> None:
    rng = np.random.default_rng(0)
    agentview = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    wrist = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    before = pair.clock()

    def publish() -> None:
        pair.robot.publish_image("agentview", Image(agentview))
        pair.robot.publish_image("wrist", Image(wrist))

    images = wait_until(lambda: len(pair.transport.latest_images()) == 2 and pair.transport.latest_images(), publish)
    np.testing.assert_array_equal(images["agentview"].data, agentview)
    np.testing.assert_array_equal(images["wrist"].data, wrist)
    assert images["agentview"].data.dtype == np.uint8
    _assert_received_between(images["agentview"].stamp, before, pair)

    # A camera driver publishing bgr8 / rgba8 / bgra8: the policy still gets RGB (H, W, 3).
    raw = pair.robot.bus.publisher(pair.topics.cameras["wrist"], pair.robot.ros.Image, sensor_data=True)
    for encoding, to_wire in (
        ("bgr8", lambda rgb: rgb[:, :, ::-1]),
        ("rgba8", lambda rgb: np.concatenate([rgb, np.full((*rgb.shape[:2], 1), 7, np.uint8)], axis=2)),
        ("bgra8", lambda rgb: np.concatenate([rgb[:, :, ::-1], np.full((*rgb.shape[:2], 1), 7, np.uint8)], axis=2)),
    ):
        rgb = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
        wire = np.ascontiguousarray(to_wire(rgb))
        msg = image_to_msg(pair.robot.ros, Image(rgb))
        msg.encoding, msg.step, msg.data = encoding, wire.shape[1] * wire.shape[2], wire.tobytes()
        received = wait_until(
            lambda rgb=rgb: np.array_equal(pair.transport.latest_images()["wrist"].data, rgb),
            lambda msg=msg: raw(msg),
            what=f"the {encoding} image",
        )
        assert received


def test_unsupported_encoding_is_dropped_and_logged_once(pair: Pair, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="real_robot.ros_messages")
    topic = pair.topics.cameras["agentview"]
    raw = pair.robot.bus.publisher(topic, pair.robot.ros.Image, sensor_data=True)
    mono = image_to_msg(pair.robot.ros, Image(np.zeros((4, 4, 3), np.uint8)))
    mono.encoding, mono.step, mono.data = "mono8", 4, bytes(16)

    def errors() -> list[logging.LogRecord]:
        return [r for r in caplog.records if "mono8" in r.getMessage()]

    wait_until(errors, lambda: raw(mono), what="the error about mono8")
    # More of the same, then a good image from the same publisher (in order): the bad ones were dropped silently.
    good = np.full((4, 4, 3), 9, np.uint8)

    def publish() -> None:
        for _ in range(3):
            raw(mono)
        raw(image_to_msg(pair.robot.ros, Image(good)))

    wait_until(lambda: "agentview" in pair.transport.latest_images(), publish, what="the rgb8 image")
    np.testing.assert_array_equal(pair.transport.latest_images()["agentview"].data, good)
    assert len(errors()) == 1, [r.getMessage() for r in errors()]
    assert topic in errors()[0].getMessage()


def test_object_state_round_trip(pair: Pair) -> None:
    values = np.array([0.5, -0.25, 0.0125, 1.0, 0.0, 0.0, 0.0, 1 / 3])
    before = pair.clock()
    state = wait_until(pair.transport.latest_object_state, lambda: pair.robot.publish_object_state(ObjectState(values)))
    np.testing.assert_array_equal(state.values, values)
    _assert_received_between(state.stamp, before, pair)


def test_estop_control_and_episode_reach_the_callbacks(pair: Pair) -> None:
    reasons: list[str] = []
    commands: list[str] = []
    episodes: list[EpisodeReport] = []

    def broken_listener(reason: str) -> None:
        raise RuntimeError("a listener bug")

    pair.transport.on_estop(broken_listener)  # must not keep the e-stop from the next listener (the safety layer)
    pair.transport.on_estop(reasons.append)
    pair.transport.on_control(commands.append)
    pair.transport.on_episode(episodes.append)
    report = EpisodeReport(episode=3, init_state=None, success=True, steps=117)

    def publish() -> None:
        pair.robot.publish_estop("operator pressed the button")
        pair.robot.publish_control("pause")
        pair.robot.publish_episode(report)

    wait_until(lambda: reasons and commands and episodes, publish, what="e-stop, control and episode")
    assert set(reasons) == {"operator pressed the button"}
    assert set(commands) == {"pause"}
    assert set(episodes) == {report}


# -- policy → robot -----------------------------------------------------------------------------------------


def test_joint_command_and_gripper_round_trip(pair: Pair) -> None:
    positions = np.array([0.0, -0.785, 0.1, -2.356, 1e-9, 1.571, 0.785])
    before = pair.clock()
    wait_until(
        lambda: pair.robot.latest_joint_command() and pair.robot.latest_gripper(),
        lambda: pair.transport.publish_joint_command(JointCommand(ARM[::-1], positions, gripper=0.25, stamp=-1.0)),
    )
    command = pair.robot.latest_joint_command()
    assert command.names == ARM  # the controller's (the endpoint's), never on the wire
    np.testing.assert_array_equal(command.positions, positions)
    assert command.gripper is None
    _assert_received_between(command.stamp, before, pair)
    opening, stamp = pair.robot.latest_gripper()
    assert opening == 0.25
    _assert_received_between(stamp, before, pair)


def test_trajectory_round_trip(pair: Pair) -> None:
    dt = 0.05
    # k·dt as the control loop computes it (3·0.05 = 0.15000000000000002), and awkward durations around a second.
    times = [k * dt for k in range(1, 5)] + [0.999999999, 1.0, 12.5]
    rng = np.random.default_rng(1)
    points = tuple(
        TrajectoryPoint(rng.uniform(-1, 1, 7), t, gripper=1.0 if k == 0 else 0.0) for k, t in enumerate(times)
    )
    before = pair.clock()
    trajectory = wait_until(
        lambda: pair.robot.latest_trajectory() and pair.robot.latest_gripper() and pair.robot.latest_trajectory(),
        lambda: pair.transport.publish_trajectory(JointTrajectory(ARM, points, stamp=-1.0)),
    )
    assert trajectory.names == ARM
    assert len(trajectory.points) == len(points)
    for sent, got in zip(points, trajectory.points, strict=True):
        np.testing.assert_array_equal(got.positions, sent.positions)
        # Duration has nanosecond resolution; times with ≤ 9 decimals come back as the very same float.
        assert got.time_from_start == pytest.approx(sent.time_from_start, abs=1e-9)
        assert got.time_from_start == round(sent.time_from_start, 9)
        assert got.gripper is None
    _assert_received_between(trajectory.stamp, before, pair)
    assert pair.robot.latest_gripper()[0] == 1.0  # the first point's
    assert pair.robot.latest_trajectory() is trajectory  # same object until a new one arrives


def test_pose_round_trip_keeps_the_quaternion_order(pair: Pair) -> None:
    quat_wxyz = np.array([0.9, 0.1, -0.2, 0.3])
    quat_wxyz /= np.linalg.norm(quat_wxyz)
    position = np.array([0.45, -0.125, 0.3])
    wire: list[Any] = []
    pair.robot.bus.subscribe(pair.topics.pose, pair.robot.ros.PoseStamped, wire.append)
    before = pair.clock()
    pose = wait_until(
        lambda: wire and pair.robot.latest_pose(),
        lambda: pair.transport.publish_pose(PoseStamped("panda_link0", position, quat_wxyz, stamp=-1.0)),
    )
    assert pose.frame_id == "panda_link0"
    np.testing.assert_array_equal(pose.position, position)
    np.testing.assert_array_equal(pose.orientation, quat_wxyz)
    _assert_received_between(pose.stamp, before, pair)
    o = wire[0].pose.orientation  # ROS is xyzw: each component by name
    assert (o.w, o.x, o.y, o.z) == tuple(quat_wxyz)


def test_dry_run_publishes_only_on_the_shadow_topics(pair: Pair, ros_backend: RosBackend) -> None:
    topics = pair.topics
    # A second robot endpoint whose command topics are the shadow ones: it sees what dry run sends.
    shadow_topics = replace(
        topics,
        **{name: topics.command_topic(getattr(topics, name), True) for name in ("commands", "trajectory", "pose")},
        gripper=topics.command_topic(topics.gripper, True),
    )
    shadow = ros_backend.robot(shadow_topics, clock=pair.clock, joint_names=ARM, node_name="robo_rlft_shadow")
    try:

        def publish_all(value: float, dry_run: bool) -> Callable[[], None]:
            q = np.full(7, value)

            def publish() -> None:
                pair.transport.publish_joint_command(JointCommand(ARM, q, gripper=value), shadow=dry_run)
                pair.transport.publish_trajectory(JointTrajectory(ARM, (TrajectoryPoint(q, 0.05),)), shadow=dry_run)
                pair.transport.publish_pose(PoseStamped("base", q[:3], np.array([1.0, 0, 0, 0])), shadow=dry_run)

            return publish

        def got_all(robot: Any, value: float) -> bool:
            command, trajectory, pose = robot.latest_joint_command(), robot.latest_trajectory(), robot.latest_pose()
            gripper = robot.latest_gripper()
            return bool(
                command is not None
                and command.positions[0] == value
                and trajectory is not None
                and trajectory.points[0].positions[0] == value
                and pose is not None
                and pose.position[0] == value
                and gripper is not None
                and gripper[0] == value
            )

        # The real topics first, so the real subscriptions are surely matched when dry run starts.
        wait_until(lambda: got_all(pair.robot, 0.25), publish_all(0.25, False), what="the real commands")
        wait_until(lambda: got_all(shadow, 0.75), publish_all(0.75, True), what="the shadow commands")
        # Keep dry-running for a while: nothing may reach the real topics (copies of the real messages sent while
        # waiting may still land, hence values, not identity).
        end = time.monotonic() + 0.3
        while time.monotonic() < end:
            publish_all(0.75, True)()
            time.sleep(0.02)
        assert got_all(pair.robot, 0.25), "a dry-run message reached a real command topic"
        assert shadow.latest_joint_command().positions[0] == 0.75
    finally:
        shadow.close()


def test_first_message_arrives_within_the_deadline(ros_backend: RosBackend) -> None:
    topics = make_topics()
    start = time.monotonic()
    transport = ros_backend.transport(topics)
    robot = ros_backend.robot(topics)
    try:
        state = JointState(ARM, np.zeros(7))
        wait_until(
            transport.latest_joint_state,
            lambda: robot.publish_joint_state(state),
            timeout=FIRST_MESSAGE_DEADLINE - (time.monotonic() - start),
            what="the first joint state",
        )
    finally:
        robot.close()
        transport.close()


def test_close_is_idempotent_and_publishing_after_it_raises(pair: Pair) -> None:
    pair.transport.close()
    pair.transport.close()
    pair.robot.close()
    with pytest.raises(RuntimeError, match="after close"):
        pair.transport.publish_joint_command(JointCommand(ARM, np.zeros(7)))
    with pytest.raises(RuntimeError, match="after close"):
        pair.robot.publish_estop("late")


_EXIT_SCRIPT = """
import time
import numpy as np
from real_robot.transport import JointState, Topics
from {module} import {transport}, {robot}

topics = Topics(joint_states="/exit_check_{tag}/joint_states")
transport, robot = {transport}(topics), {robot}(topics)
end = time.monotonic() + 5.0
while transport.latest_joint_state() is None and time.monotonic() < end:
    robot.publish_joint_state(JointState(("a",), np.ones(1)))
    time.sleep(0.02)
assert transport.latest_joint_state() is not None, "no message exchanged"
if {close}:
    robot.close()
    transport.close()
print("exchanged")
"""


@pytest.mark.parametrize("close", [True, False], ids=["closed", "left_open"])
def test_process_exits_with_code_0(ros_backend: RosBackend, close: bool) -> None:
    """Shutting down in the wrong order aborts the interpreter at exit (code 134 in ROS 2); left open, the backend
    must close itself at exit."""
    script = textwrap.dedent(_EXIT_SCRIPT).format(
        module=ros_backend.module,
        transport=ros_backend.transport.__name__,
        robot=ros_backend.robot.__name__,
        tag=f"{os.getpid()}_{close}",
        close=close,
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"exit code {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "exchanged" in result.stdout
