"""The deployment core without ROS: safety layer, watchdog, e-stop latch, dry run, chunk execution, observations."""

from __future__ import annotations

import concurrent.futures
import subprocess
import sys
import threading

import mujoco
import numpy as np
import pytest

from envs.tabletop.env import TabletopEnv
from envs.tabletop.robot import ARM_JOINTS, FINGER_JOINTS, HOME_QPOS, Q_MAX, Q_MIN
from real_robot.adapters import ActionAdapter, ArmKinematics, JointTarget
from real_robot.loop import ControlLoop, LoopConfig
from real_robot.observation import ObservationAssembler, PolicyRunner
from real_robot.safety import SafetyLayer, SafetyLimits
from real_robot.transport import InMemoryTransport, JointState, ObjectState

NAMES = ARM_JOINTS + FINGER_JOINTS
WRIST = 6  # joint 7 turns the tool about its own axis: the tool position (workspace check) does not change
STEP = 0.001  # rad on joint 7 per chunk step of the fake policy
CALL = 0.01  # rad on joint 7 per chunk (call) of the fake policy


@pytest.fixture(scope="module")
def kinematics() -> ArmKinematics:
    return ArmKinematics()


class FakeClock:
    """Seconds that only move when slept."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class ManualExecutor(concurrent.futures.Executor):
    """Runs a submitted call at once (``immediate``) or when the test calls :meth:`finish`."""

    def __init__(self, immediate: bool = True) -> None:
        self.immediate = immediate
        self.queue: list[tuple[concurrent.futures.Future, object, tuple]] = []

    def submit(self, fn, /, *args, **kwargs):
        future: concurrent.futures.Future = concurrent.futures.Future()
        if self.immediate:
            future.set_result(fn(*args, **kwargs))
        else:
            self.queue.append((future, fn, args))
        return future

    def finish(self) -> None:
        for future, fn, args in self.queue:
            future.set_result(fn(*args))
        self.queue.clear()


class FakePolicy:
    """Joint-mode chunks (H, 8): home, with joint 7 at call·CALL + k·STEP; records when it was asked."""

    def __init__(self, loop_ref: list, horizon: int = 8, nan_at: int | None = None) -> None:
        self.horizon = horizon
        self.nan_at = nan_at
        self.calls = 0
        self.remaining_at_request: list[int] = []
        self.loop_ref = loop_ref

    def __call__(self, obs) -> np.ndarray:
        if self.loop_ref:
            self.remaining_at_request.append(self.loop_ref[0].remaining_steps)
        chunk = np.tile(np.append(HOME_QPOS, -1.0), (self.horizon, 1))
        chunk[:, WRIST] += self.calls * CALL + np.arange(self.horizon) * STEP
        if self.nan_at is not None:
            chunk[self.nan_at, 2] = np.nan
        self.calls += 1
        return chunk


def decode(positions: np.ndarray) -> tuple[int, int]:
    """(call, step) of a fake-policy command."""
    offset = round((positions[WRIST] - HOME_QPOS[WRIST]) / STEP)
    return offset // 10, offset % 10


def make_loop(kinematics, config=None, limits=None, executor=None, horizon=8, cameras=(), nan_at=None):
    clock = FakeClock()
    transport = InMemoryTransport(clock=clock)
    config = config or LoopConfig()
    limits = limits or SafetyLimits(dt=config.dt)
    loop_ref: list = []
    policy = FakePolicy(loop_ref, horizon, nan_at)
    loop = ControlLoop(
        transport,
        policy,
        ObservationAssembler(kinematics, cameras),
        ActionAdapter(kinematics, "joint"),
        SafetyLayer(limits, kinematics),
        config,
        clock=clock,
        sleep=clock.sleep,
        executor=executor or ManualExecutor(),
    )
    loop_ref.append(loop)
    return loop, transport, clock, policy


def robot_tick(loop, transport, clock, feed: bool = True):
    """A perfect robot: it is where the last command put it; then one tick and one period."""
    if feed:
        q = HOME_QPOS if loop.last_command is None else loop.last_command.positions
        transport.set_joint_state(NAMES, np.append(q, [0.04, 0.04]))
    command = loop.tick()
    clock.sleep(loop.config.dt)
    return command


# -- safety layer -------------------------------------------------------------------------------------------


def no_workspace(**kwargs) -> SafetyLimits:
    return SafetyLimits(workspace_min=None, workspace_max=None, **kwargs)


def test_position_limits_clamp(kinematics):
    safety = SafetyLayer(no_workspace(max_step=10.0, max_velocity=1000.0), kinematics)
    current = HOME_QPOS.copy()
    command = HOME_QPOS.copy()
    command[0] = Q_MAX[0] + 1.0
    command[3] = Q_MIN[3] - 1.0
    safe, interventions = safety.filter(JointTarget(command, 0.5), current)
    assert "position_limit" in interventions
    assert safe.positions[0] == pytest.approx(Q_MAX[0] - 0.02)
    assert safe.positions[3] == pytest.approx(Q_MIN[3] + 0.02)
    assert np.all(safe.positions >= safety.limits.q_min) and np.all(safe.positions <= safety.limits.q_max)
    assert safety.counts["position_limit"] == 1


def test_step_and_velocity_limits_scale_the_change(kinematics):
    direction = np.array([0.5, 0.2, 0.0, 0.0, 0.0, 0.0, -0.1])
    safety = SafetyLayer(no_workspace(max_step=0.1, max_velocity=1000.0), kinematics)
    safe, interventions = safety.filter(JointTarget(HOME_QPOS + direction), HOME_QPOS)
    assert interventions == ("step_limit",)
    change = safe.positions - HOME_QPOS
    assert np.abs(change).max() == pytest.approx(0.1)
    np.testing.assert_allclose(change, direction * 0.2)  # direction of motion kept
    # The next step limit counts from the previous command, not from the (lagging) measured position.
    safe2, _ = safety.filter(JointTarget(HOME_QPOS + direction), HOME_QPOS)
    assert np.abs(safe2.positions - HOME_QPOS).max() == pytest.approx(0.2)

    slow = SafetyLayer(no_workspace(max_step=10.0, max_velocity=1.0, dt=0.05), kinematics)
    safe, interventions = slow.filter(JointTarget(HOME_QPOS + direction), HOME_QPOS)
    assert interventions == ("velocity_limit",)
    assert np.abs(safe.positions - HOME_QPOS).max() == pytest.approx(0.05)  # 1 rad/s · 0.05 s


def test_workspace_clamps_back_to_the_box(kinematics):
    limits = SafetyLimits(
        max_step=10.0, max_velocity=1000.0, workspace_min=np.array([-1.0, -1.0, 1.2]), workspace_max=np.ones(3) * 2
    )
    safety = SafetyLayer(limits, kinematics)
    command = HOME_QPOS + np.array([0.0, 0.8, 0.0, 0.4, 0.0, 0.0, 0.0])
    assert kinematics.tool_position(command)[2] < 1.2
    safe, interventions = safety.filter(JointTarget(command), HOME_QPOS)
    assert interventions == ("workspace",)
    z = kinematics.tool_position(safe.positions)[2]
    assert 1.2 <= z < 1.205  # clamped to the boundary, along the segment home → command
    fraction = (safe.positions - HOME_QPOS)[1] / 0.8
    np.testing.assert_allclose(safe.positions, HOME_QPOS + fraction * (command - HOME_QPOS))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_commands_are_rejected(kinematics, bad):
    safety = SafetyLayer(SafetyLimits(), kinematics)
    current = HOME_QPOS + 0.01
    command = HOME_QPOS.copy()
    command[2] = bad
    safe, interventions = safety.filter(JointTarget(command, 1.0), current)
    assert interventions == ("nonfinite",)
    np.testing.assert_array_equal(safe.positions, current)
    assert safe.gripper is None
    safe, _ = safety.filter(JointTarget(HOME_QPOS, bad), current)  # a non-finite gripper too
    np.testing.assert_array_equal(safe.positions, current)
    assert safety.counts["nonfinite"] == 2
    # The adapters never run IK on a non-finite action; the safety layer then rejects it.
    target = ActionAdapter(kinematics, "delta_ee").step(np.array([bad, 0, 0, 0, 0, 0, 0.0]), HOME_QPOS)
    assert not np.all(np.isfinite(target.positions))


def test_nonfinite_policy_output_holds_in_the_loop(kinematics):
    loop, transport, clock, _ = make_loop(kinematics, LoopConfig(replan_margin=0), horizon=6, nan_at=3)
    for _ in range(3):
        robot_tick(loop, transport, clock)  # steps 0, 1, 2
    command = robot_tick(loop, transport, clock)  # step 3 is NaN
    np.testing.assert_array_equal(command.positions, transport.latest_joint_state().positions[:7])
    assert loop.status().interventions == {"nonfinite": 1}
    assert decode(robot_tick(loop, transport, clock).positions) == (0, 4)  # and the chunk goes on

    # A trajectory ends at the last point before the non-finite one.
    loop, transport, clock, _ = make_loop(kinematics, LoopConfig(output="trajectory"), horizon=6, nan_at=3)
    robot_tick(loop, transport, clock)
    points = transport.sent["trajectory"][0].points
    assert [decode(p.positions) for p in points] == [(0, 0), (0, 1), (0, 2)]


def test_joint_name_and_order_mismatch_names_both(kinematics):
    swapped = ("joint2", "joint1", *ARM_JOINTS[2:], *FINGER_JOINTS)
    with pytest.raises(ValueError, match="names/order mismatch") as error:
        kinematics.split_joint_state(swapped, np.zeros(9))
    assert str(list(ARM_JOINTS)) in str(error.value) and str(list(swapped)) in str(error.value)
    with pytest.raises(ValueError, match="panda_joint1"):
        kinematics.split_joint_state(tuple(f"panda_{n}" for n in NAMES), np.zeros(9))
    # The loop refuses to command a robot whose joints it cannot identify.
    loop, transport, _, _ = make_loop(kinematics)
    transport.set_joint_state(swapped, np.append(HOME_QPOS, [0.04, 0.04]))
    with pytest.raises(ValueError, match="received"):
        loop.tick()
    assert transport.sent["joint_command"] == []


# -- the loop -----------------------------------------------------------------------------------------------


def test_chunks_execute_in_order_and_replanning_overlaps_execution(kinematics):
    executor = ManualExecutor(immediate=False)
    loop, transport, clock, policy = make_loop(kinematics, LoopConfig(replan_margin=3), executor=executor)
    executed = []
    for _ in range(40):
        command = robot_tick(loop, transport, clock)
        if loop.ticks % 2 == 0:  # inference takes about two control periods
            executor.finish()
        if loop.ticks > 2:  # the first chunk arrives during tick 3 (it asked at tick 1, finished after tick 2)
            executed.append(decode(command.positions))
    assert policy.calls >= 5
    # Every request after the first was made while the running chunk still had steps left.
    assert all(r > 0 for r in policy.remaining_at_request[1:])
    assert loop.safety.counts["deadline_miss"] == 0
    # Within a chunk, steps run in order and none is repeated; chunks only move forward.
    assert executed == sorted(executed) and len(set(executed)) == len(executed)
    assert len({call for call, _ in executed}) >= 4
    status = loop.status()
    assert status.rate_hz == pytest.approx(20.0)
    assert "20.0 Hz" in status.line()


def test_trajectory_output_points_at_k_dt(kinematics):
    config = LoopConfig(output="trajectory", replan_margin=2)
    loop, transport, clock, _ = make_loop(kinematics, config, horizon=6)
    for _ in range(3):
        robot_tick(loop, transport, clock)
    trajectories = transport.sent["trajectory"]
    assert len(trajectories) == 1 and transport.sent["joint_command"] == []
    points = trajectories[0].points
    assert [p.time_from_start for p in points] == pytest.approx([k * config.dt for k in range(1, 7)])
    assert [decode(p.positions) for p in points] == [(0, k) for k in range(6)]
    assert trajectories[0].names == ARM_JOINTS
    assert points[0].gripper == 1.0  # the policy's -1 = open


def test_stale_observation_holds_within_two_periods(kinematics):
    loop, transport, clock, policy = make_loop(kinematics)
    for _ in range(5):
        robot_tick(loop, transport, clock)
    last_stamp = transport.latest_joint_state().stamp
    measured = transport.latest_joint_state().positions[:7]
    hold_time = calls = None
    for _ in range(6):
        now = clock()
        command = robot_tick(loop, transport, clock, feed=False)
        if hold_time is None and loop.safety.counts["stale_observation"] == 1:
            hold_time, calls = now, policy.calls
            np.testing.assert_array_equal(command.positions, measured)
    assert hold_time is not None
    # The first tick at which the joint state is older than stale_after (two periods) holds: one period later at most.
    assert hold_time - last_stamp <= loop.config.stale_limit + loop.config.dt + 1e-9
    assert loop.safety.counts["stale_observation"] >= 4  # and every tick after it, while stale
    assert policy.calls == calls  # no inference on stale data
    # Fresh observations again: the loop resumes.
    for _ in range(3):
        robot_tick(loop, transport, clock)
    assert decode(loop.last_command.positions) != decode(measured)


def test_stale_camera_image_holds(kinematics):
    loop, transport, clock, policy = make_loop(kinematics, cameras=("wrist",))
    transport.set_joint_state(NAMES, np.append(HOME_QPOS, [0.04, 0.04]))
    command = loop.tick()  # no image yet: hold, and no inference without the image
    np.testing.assert_array_equal(command.positions, HOME_QPOS)
    assert policy.calls == 0
    transport.set_image("wrist", np.zeros((8, 8, 3), np.uint8))
    for _ in range(2):
        robot_tick(loop, transport, clock)
    assert loop.safety.counts["stale_observation"] == 0
    for _ in range(2):  # joint states keep coming, the camera went quiet
        robot_tick(loop, transport, clock)
    assert loop.safety.counts["stale_observation"] >= 1


def test_policy_deadline_miss_holds(kinematics):
    executor = ManualExecutor(immediate=False)
    loop, transport, clock, _ = make_loop(kinematics, LoopConfig(replan_margin=1), executor=executor, horizon=4)
    robot_tick(loop, transport, clock)  # requests the first chunk; holds while waiting (no miss yet)
    assert loop.safety.counts["deadline_miss"] == 0
    executor.finish()
    for _ in range(3):  # steps 1-3 of chunk 0 (step 0 was due while it ran); chunk 1 is asked for, not answered
        robot_tick(loop, transport, clock)
    assert loop.safety.counts["deadline_miss"] == 0
    command = robot_tick(loop, transport, clock)
    assert loop.safety.counts["deadline_miss"] == 1
    np.testing.assert_array_equal(command.positions, transport.latest_joint_state().positions[:7])
    executor.finish()
    command = robot_tick(loop, transport, clock)
    assert decode(command.positions) == (1, 2)  # chunk 1 arrived: moving again, at the step due now


def test_estop_latches_until_explicit_reset(kinematics):
    loop, transport, clock, _ = make_loop(kinematics)
    for _ in range(3):
        robot_tick(loop, transport, clock)
    transport.trigger_estop("red button")
    assert loop.safety.engaged and loop.safety.estop_reason == "red button"
    for _ in range(10):  # fresh observations and a willing policy do not release it
        command = robot_tick(loop, transport, clock)
        np.testing.assert_array_equal(command.positions, transport.latest_joint_state().positions[:7])
    assert loop.safety.counts["estop"] == 10
    safe, interventions = loop.safety.filter(JointTarget(HOME_QPOS + 0.05), HOME_QPOS)
    assert interventions == ("estop",) and np.array_equal(safe.positions, HOME_QPOS)
    loop.trigger_estop("second")  # the API latches too; the first reason is kept
    assert loop.safety.estop_reason == "red button"
    loop.reset_estop()
    assert not loop.safety.engaged
    held = loop.last_command.positions.copy()
    for _ in range(3):
        command = robot_tick(loop, transport, clock)
    assert not np.array_equal(command.positions, held)


@pytest.mark.parametrize("output", ["stream", "trajectory", "pose"])
def test_dry_run_publishes_only_to_shadow_topics(kinematics, output):
    loop, transport, clock, _ = make_loop(kinematics, LoopConfig(dry_run=True, output=output))
    for _ in range(12):
        robot_tick(loop, transport, clock)
    transport.trigger_estop("test")
    robot_tick(loop, transport, clock)
    for channel in ("joint_command", "trajectory", "pose"):
        assert transport.sent[channel] == [], channel
    channel = {"stream": "joint_command", "trajectory": "trajectory", "pose": "pose"}[output]
    assert len(transport.sent["shadow/" + channel]) >= 2
    if output == "pose":  # the tool pose of the joint target, relative to the arm's base
        pose = transport.sent["shadow/pose"][-1]
        position = kinematics.tool_position(loop.last_command.positions) - kinematics.base_pos
        assert pose.frame_id == "panda_link0" and np.allclose(pose.position, position)
    assert "[DRY RUN]" in loop.status().line()


def test_delta_ee_adapter_is_the_env_mapping(kinematics):
    env = TabletopEnv(action_mode="delta_ee")
    env.reset(seed=3)
    action = np.array([0.5, -0.3, 0.2, 0.1, -0.2, 0.3, 1.0])
    expected_q, expected_gripper = env.arm.delta_ee_to_joint_targets(action)
    target = ActionAdapter(kinematics, "delta_ee").step(action, env.arm.q)
    np.testing.assert_allclose(target.positions, expected_q, atol=1e-9)
    assert target.gripper == expected_gripper == 0.0
    env.close()


def test_state_from_joint_states_equals_env_state(kinematics):
    env = TabletopEnv(action_mode="delta_ee")
    obs, _ = env.reset(seed=1)
    rng = np.random.default_rng(0)
    assembler = ObservationAssembler(kinematics, instruction=env.instruction)
    transport = InMemoryTransport()
    for step in range(5):
        positions = np.append(env.arm.q, env.data.qpos[env.arm.finger_qpos_index])
        transport.set_joint_state(NAMES, positions)
        robot_obs = assembler.assemble(transport.latest_joint_state(), {})
        if step > 0:
            # After mj_step the env's site pose is from the last physics substep's kinematics (2 ms old); with the
            # kinematics brought up to date, the env's state at this very configuration is ours exactly.
            np.testing.assert_allclose(robot_obs.state, obs["state"], atol=0.05)
            mujoco.mj_forward(env.model, env.data)
            obs = env._observation()
        np.testing.assert_allclose(robot_obs.state, obs["state"], atol=1e-6)
        assert robot_obs.instruction == env.instruction
        obs, *_ = env.step(rng.uniform(-1, 1, 7).astype(np.float32))
    env.close()


def test_flow_policy_drives_the_loop_on_a_worker_thread(kinematics, flow_policy_factory, tmp_path):
    from policies.checkpoint import save_policy

    policy = flow_policy_factory(obs_dim=8, action_dim=8, horizon=6)
    save_policy(policy, tmp_path / "ckpt", metadata={"env": "tabletop", "act_steps": 4})
    runner, metadata = PolicyRunner.from_checkpoint(tmp_path / "ckpt")
    assert runner.act_steps == metadata["act_steps"] == 4
    config = LoopConfig(rate_hz=50.0)
    transport = InMemoryTransport()
    loop = ControlLoop(
        transport,
        runner,
        ObservationAssembler(kinematics),
        ActionAdapter(kinematics, "joint"),
        SafetyLayer(SafetyLimits(dt=config.dt), kinematics),
        config,
    )
    transport.set_joint_state(NAMES, np.append(HOME_QPOS, [0.04, 0.04]))

    # The robot publishes joint states at 200 Hz on its own thread, as a driver would.
    stop = threading.Event()

    def publish():
        while not stop.is_set():
            q = HOME_QPOS if loop.last_command is None else loop.last_command.positions
            transport.set_joint_state(NAMES, np.append(q, [0.04, 0.04]))
            stop.wait(0.005)

    thread = threading.Thread(target=publish, daemon=True)
    thread.start()
    try:
        loop.run(max_ticks=30)
    finally:
        stop.set()
        thread.join()
        loop.close()
    sent = transport.sent["joint_command"]
    assert len(sent) == 30
    assert all(np.all(np.isfinite(c.positions)) for c in sent)
    status = loop.status()
    assert np.isfinite(status.inference_p50_ms)
    # Inference hides behind execution: at most the start-up wait, no missed deadlines on a tiny network.
    assert status.interventions.get("deadline_miss", 0) <= 2, status.line()
    assert status.ticks == 30


def test_core_imports_no_ros():
    """The core (and the CLI wiring) loads without ROS; in a fresh interpreter, since other tests load rclpy."""
    modules = "real_robot.loop, real_robot.safety, real_robot.observation, real_robot.sim_robot, real_robot.deploy"
    code = (
        f"import sys, {modules}\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('rclpy', 'rospy'))\n"
        "assert not loaded, loaded"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# -- operator control, perception input, in-tick wait ---------------------------------------------------------


def test_pause_holds_once_then_sends_nothing_and_resume_replans(kinematics):
    loop, transport, clock, policy = make_loop(kinematics, LoopConfig(replan_margin=0))
    for _ in range(3):
        robot_tick(loop, transport, clock)
    calls = policy.calls
    transport.send_control("pause")
    hold = robot_tick(loop, transport, clock)
    assert loop.paused and loop.status().paused
    np.testing.assert_array_equal(hold.positions, transport.latest_joint_state().positions[:7])
    sent = len(transport.sent["joint_command"])
    for _ in range(5):
        assert robot_tick(loop, transport, clock) is None
    assert len(transport.sent["joint_command"]) == sent and policy.calls == calls
    transport.send_control("resume")
    command = robot_tick(loop, transport, clock)
    assert not loop.paused and policy.calls == calls + 1
    assert decode(command.positions) == (calls, 0)  # a new chunk from its first step


def test_an_inference_started_before_a_pause_is_discarded(kinematics):
    executor = ManualExecutor(immediate=False)
    config = LoopConfig(replan_margin=0, inference_wait=0.0)
    loop, transport, clock, _ = make_loop(kinematics, config, executor=executor)
    robot_tick(loop, transport, clock)  # asks for chunk 0
    transport.send_control("pause")
    robot_tick(loop, transport, clock)
    executor.finish()  # chunk 0 arrives while paused: planned on the scene before the pause
    transport.send_control("resume")
    robot_tick(loop, transport, clock)  # asks for chunk 1
    executor.finish()
    command = robot_tick(loop, transport, clock)
    assert decode(command.positions)[0] == 1


def test_control_topic_releases_the_estop_and_ignores_unknown_commands(kinematics, caplog):
    loop, transport, _, _ = make_loop(kinematics)
    transport.trigger_estop("test")
    transport.send_control("go faster")
    assert loop.safety.engaged
    assert "Ignored control command 'go faster'" in caplog.text
    transport.send_control("resume")  # not a release
    assert loop.safety.engaged
    transport.send_control("reset_estop")
    assert not loop.safety.engaged


def test_a_fast_inference_starts_its_chunk_in_the_same_tick(kinematics):
    """When the chunk has run out, the tick waits briefly for the running inference instead of holding."""
    with concurrent.futures.ThreadPoolExecutor(1) as executor:
        loop, transport, clock, _ = make_loop(kinematics, LoopConfig(replan_margin=0), executor=executor)
        command = robot_tick(loop, transport, clock)
    assert decode(command.positions) == (0, 0)
    assert loop.safety.counts["deadline_miss"] == 0


def test_object_state_is_required_and_checked(kinematics):
    assembler = ObservationAssembler(kinematics, object_state_dim=3)
    joint_state = JointState(NAMES, np.append(HOME_QPOS, [0.04, 0.04]), stamp=1.0)
    assert assembler.missing_inputs({}, None) == ["object_state"]
    with pytest.raises(ValueError, match=r"object_state has shape \(2,\); the policy takes \(3,\)"):
        assembler.assemble(joint_state, {}, ObjectState(np.zeros(2), 1.0))
    obs = assembler.assemble(joint_state, {}, ObjectState(np.arange(3.0), 0.5))
    assert obs.stamp == 0.5 and obs.object_state.dtype == np.float32
