"""The primitive-geom Panda: the real arm's kinematics and limits, servos, IK and LIBERO delta-EE control."""

from __future__ import annotations

import math
import time

import mujoco
import numpy as np
import pytest

from envs.tabletop.robot import HOME_QPOS, PandaArm, add_panda, build_panda_model

# Franka's published modified-DH table (a_{i-1}, d_i, alpha_{i-1}), written out here independently of
# the model code so the test checks the built model against the real arm, not against itself.
PANDA_DH = [
    (0.0, 0.333, 0.0),
    (0.0, 0.0, -math.pi / 2),
    (0.0, 0.316, math.pi / 2),
    (0.0825, 0.0, math.pi / 2),
    (-0.0825, 0.384, -math.pi / 2),
    (0.0, 0.0, math.pi / 2),
    (0.088, 0.0, math.pi / 2),
]
PANDA_Q_MIN = np.array([-2.8973, -1.7628, -2.8973, -3.0718, -2.8973, -0.0175, -2.8973])
PANDA_Q_MAX = np.array([2.8973, 1.7628, 2.8973, -0.0698, 2.8973, 3.7525, 2.8973])
CONTROL_SUBSTEPS = 25  # 0.05 s (20 Hz) of physics at dt 0.002


def mdh(a: float, d: float, alpha: float, theta: float) -> np.ndarray:
    """Craig's modified-DH link transform RotX(alpha)·TransX(a)·RotZ(theta)·TransZ(d), (4, 4)."""
    ca, sa, ct, st = math.cos(alpha), math.sin(alpha), math.cos(theta), math.sin(theta)
    return np.array(
        [
            [ct, -st, 0.0, a],
            [st * ca, ct * ca, -sa, -d * sa],
            [st * sa, ct * sa, ca, d * ca],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )


def panda_fk(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(flange (4, 4), TCP (4, 4)) in the base frame: flange d = 0.107, hand yaw -45°, TCP 0.1034 beyond it."""
    transform = np.eye(4)
    for (a, d, alpha), theta in zip(PANDA_DH, q, strict=True):
        transform = transform @ mdh(a, d, alpha, theta)
    flange = transform @ mdh(0.0, 0.107, 0.0, 0.0)
    tcp = flange @ mdh(0.0, 0.0, 0.0, -math.pi / 4) @ mdh(0.0, 0.1034, 0.0, 0.0)
    return flange, tcp


def rotation_angle(quat_a: np.ndarray, quat_b: np.ndarray) -> float:
    """Angle (rad) of the rotation between two wxyz quaternions."""
    return 2.0 * math.acos(min(1.0, abs(float(np.dot(quat_a, quat_b)))))


@pytest.fixture()
def arm() -> PandaArm:
    model = build_panda_model(timestep=0.002)
    panda = PandaArm(model, mujoco.MjData(model))
    panda.reset()
    return panda


def run_control_steps(arm: PandaArm, action: np.ndarray, steps: int) -> None:
    for _ in range(steps):
        arm.apply_delta_ee(action)
        mujoco.mj_step(arm.model, arm.data, nstep=CONTROL_SUBSTEPS)
    mujoco.mj_forward(arm.model, arm.data)


# -- the real arm's kinematics and limits --------------------------------------------------------------


def test_forward_kinematics_match_the_panda_dh_table(arm):
    rng = np.random.default_rng(0)
    worst_pos, worst_rot = 0.0, 0.0
    for _ in range(25):
        q = rng.uniform(PANDA_Q_MIN, PANDA_Q_MAX)
        arm.reset(q)
        flange, tcp = panda_fk(q)
        hand = arm.data.body("hand")
        site = arm.data.site("ee_site")
        worst_pos = max(
            worst_pos,
            float(np.abs(hand.xpos - flange[:3, 3]).max()),
            float(np.abs(site.xpos - tcp[:3, 3]).max()),
        )
        worst_rot = max(worst_rot, float(np.abs(site.xmat.reshape(3, 3) - tcp[:3, :3]).max()))
        pos, quat = arm.ee_pose()
        np.testing.assert_allclose(pos, tcp[:3, 3], atol=1e-4)
        expected_quat = np.empty(4)
        mujoco.mju_mat2Quat(expected_quat, tcp[:3, :3].flatten())
        assert rotation_angle(quat, expected_quat) < 1e-4
        axis_angle = arm.ee_axis_angle()
        as_quat = np.empty(4)
        mujoco.mju_axisAngle2Quat(as_quat, axis_angle / np.linalg.norm(axis_angle), np.linalg.norm(axis_angle))
        assert rotation_angle(as_quat, quat) < 1e-6  # the same rotation as the tool's
    assert worst_pos < 1e-4, f"flange/TCP position off the DH table by {worst_pos} m"
    assert worst_rot < 1e-6, f"TCP orientation off the DH table by {worst_rot}"


def scene_with_arm_on_a_body(pass_spec: bool) -> mujoco.MjModel:
    spec = mujoco.MjSpec()  # compiler.degree left at its default (True): the arm must stay in radians
    spec.worldbody.add_geom(type=mujoco.mjtGeom.mjGEOM_PLANE, size=[1.0, 1.0, 0.5])
    table = spec.worldbody.add_body(name="table_top", pos=[0.1, 0.0, 0.0])
    yaw = math.pi / 2
    add_panda(
        table,
        prefix="r_",
        base_pos=(0.0, 0.2, 0.3),
        base_quat=(math.cos(yaw / 2), 0.0, 0.0, math.sin(yaw / 2)),
        spec=spec if pass_spec else None,
    )
    return spec.compile()


def test_a_scene_compiled_in_degrees_without_the_spec_is_refused():
    model = scene_with_arm_on_a_body(pass_spec=False)
    with pytest.raises(ValueError, match=r"compiler\.degree = False"):
        PandaArm(model, mujoco.MjData(model), prefix="r_")


def test_added_to_a_scene_with_a_prefix_an_offset_base_and_degree_units():
    model = scene_with_arm_on_a_body(pass_spec=True)
    arm = PandaArm(model, mujoco.MjData(model), prefix="r_")
    np.testing.assert_allclose(arm.q_min, PANDA_Q_MIN)
    np.testing.assert_allclose(arm.q_max, PANDA_Q_MAX)
    assert model.actuator("r_gripper").id == arm.gripper_actuator

    q = np.array([0.3, -0.5, 0.2, -2.0, 0.4, 1.8, -0.6])
    arm.reset(q)
    base = np.eye(4)
    base[:3, :3] = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    base[:3, 3] = [0.1, 0.2, 0.3]
    _, tcp = panda_fk(q)
    np.testing.assert_allclose(arm.ee_pose()[0], (base @ tcp)[:3, 3], atol=1e-4)
    with pytest.raises(KeyError, match="joint1"):
        PandaArm(model, mujoco.MjData(model))  # wrong prefix: names are looked up, never guessed


def test_joint_limits_are_the_panda_limits_in_radians(arm):
    model = arm.model
    ranges = np.array([model.joint(f"joint{i}").range for i in range(1, 8)])
    np.testing.assert_allclose(ranges[:, 0], PANDA_Q_MIN)
    np.testing.assert_allclose(ranges[:, 1], PANDA_Q_MAX)
    assert all(model.joint(f"joint{i}").limited for i in range(1, 8))
    np.testing.assert_allclose(model.joint("finger_joint1").range, [0.0, 0.04])
    np.testing.assert_allclose(model.joint("finger_joint2").range, [0.0, 0.04])
    np.testing.assert_allclose([model.actuator(f"actuator{i}").ctrlrange for i in range(1, 8)], ranges)


def test_position_servos_hold_home_under_gravity(arm):
    assert arm.model.opt.gravity[2] < 0.0
    assert all(arm.model.body_gravcomp[arm.model.body(f"link{i}").id] == 1.0 for i in range(1, 8))
    mujoco.mj_step(arm.model, arm.data, nstep=1000)  # 2 s
    assert np.abs(arm.q - HOME_QPOS).max() < 0.01
    assert np.abs(arm.qvel).max() < 1e-3


def test_simulation_runs_1000_steps_without_warnings(arm):
    for _ in range(1000):
        mujoco.mj_step(arm.model, arm.data)
    assert not arm.data.warning.number.any(), {
        mujoco.mjtWarning(i).name: int(n) for i, n in enumerate(arm.data.warning.number) if n
    }
    assert np.all(np.isfinite(arm.data.qpos))


def test_building_the_standalone_model_is_fast():
    times = []
    for _ in range(5):
        start = time.perf_counter()
        build_panda_model()
        times.append(time.perf_counter() - start)
    assert np.median(times) < 0.05, f"median build time {np.median(times) * 1e3:.1f} ms"


# -- inverse kinematics --------------------------------------------------------------------------------


def test_ik_solve_reaches_random_reachable_targets_within_limits(arm):
    rng = np.random.default_rng(1)
    qpos_before = arm.data.qpos.copy()
    site_before = arm.data.site_xpos.copy()
    reached = 0
    for _ in range(50):
        target_pos, target_quat = arm.fk(rng.uniform(PANDA_Q_MIN, PANDA_Q_MAX))
        result = arm.ik_solve(target_pos, target_quat)
        assert np.all(result.q >= PANDA_Q_MIN) and np.all(result.q <= PANDA_Q_MAX), result.q
        pos, quat = arm.fk(result.q)  # the reported residual is the real one
        assert abs(np.linalg.norm(pos - target_pos) - result.pos_error) < 1e-9
        ok = np.linalg.norm(pos - target_pos) < 2e-3 and rotation_angle(quat, target_quat) < 0.02
        assert ok or not result.success, result  # success is never claimed wrongly
        reached += ok
    assert reached >= 48, f"IK reached {reached}/50 targets"
    np.testing.assert_array_equal(arm.data.qpos, qpos_before)  # solved on scratch data
    np.testing.assert_array_equal(arm.data.site_xpos, site_before)


def test_ik_step_is_bounded_within_limits_and_cheap(arm):
    rng = np.random.default_rng(2)
    for _ in range(20):
        q = rng.uniform(PANDA_Q_MIN, PANDA_Q_MAX)
        target_pos, target_quat = arm.fk(rng.uniform(PANDA_Q_MIN, PANDA_Q_MAX))
        q_next = arm.ik_step(target_pos, target_quat, q, max_joint_step=0.2)
        assert np.abs(q_next - q).max() <= 0.2 + 1e-9
        assert np.all(q_next >= PANDA_Q_MIN) and np.all(q_next <= PANDA_Q_MAX)

    pos, quat = arm.ee_pose()
    target = pos + np.array([0.02, -0.01, 0.01])
    times = []
    for _ in range(200):
        start = time.perf_counter()
        arm.ik_step(target, quat)
        times.append(time.perf_counter() - start)
    assert np.median(times) < 3e-4, f"ik_step median {np.median(times) * 1e3:.3f} ms"
    # A few steps from the current state converge on a nearby target.
    q = arm.q
    for _ in range(10):
        q = arm.ik_step(target, quat, q)
    reached, reached_quat = arm.fk(q)
    assert np.linalg.norm(reached - target) < 1e-3 and rotation_angle(reached_quat, quat) < 1e-2
    # Position-only IK ignores orientation.
    result = arm.ik_solve(target + np.array([0.0, 0.1, -0.1]))
    assert result.success and result.rot_error == 0.0
    assert np.linalg.norm(arm.fk(result.q)[0] - target - np.array([0.0, 0.1, -0.1])) < 1e-3


# -- LIBERO delta end-effector control ----------------------------------------------------------------


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_delta_ee_translation_moves_the_tool_by_the_commanded_amount(arm, axis):
    start_pos, start_quat = arm.ee_pose()
    action = np.zeros(7)
    action[axis] = 0.5
    action[6] = -1.0
    run_control_steps(arm, action, 10)
    moved = arm.ee_pose()[0] - start_pos
    commanded = 10 * 0.5 * 0.05
    assert 0.7 * commanded < moved[axis] < 1.3 * commanded, moved
    assert np.abs(np.delete(moved, axis)).max() < 0.15 * commanded, moved
    assert rotation_angle(arm.ee_pose()[1], start_quat) < 0.1


def test_delta_ee_rotation_turns_the_tool_by_the_commanded_angle(arm):
    start_pos, start_quat = arm.ee_pose()
    run_control_steps(arm, np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.5, -1.0]), 5)
    pos, quat = arm.ee_pose()
    commanded = 5 * 0.5 * 0.5
    assert 0.7 * commanded < rotation_angle(quat, start_quat) < 1.3 * commanded
    assert np.linalg.norm(pos - start_pos) < 0.02


def test_gripper_action_closes_and_opens_the_fingers(arm):
    open_width = arm.gripper_width()
    run_control_steps(arm, np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]), 10)
    closed_width = arm.gripper_width()
    run_control_steps(arm, np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0]), 10)
    reopened_width = arm.gripper_width()
    assert open_width - closed_width > 0.7 * 0.08
    assert reopened_width - closed_width > 0.7 * 0.08
    finger_q = arm.data.qpos[arm.finger_qpos_index]
    assert abs(finger_q[0] - finger_q[1]) < 1e-3  # the equality keeps the fingers symmetric


def test_delta_ee_rejects_malformed_actions(arm):
    with pytest.raises(ValueError, match=r"\(7,\)"):
        arm.delta_ee_to_joint_targets(np.zeros(6))
    with pytest.raises(ValueError, match="finite"):
        arm.delta_ee_to_joint_targets(np.full(7, np.nan))
    q_target, gripper = arm.delta_ee_to_joint_targets(np.full(7, 5.0))  # clipped to [-1, 1]
    assert gripper == 0.0 and np.all(q_target >= PANDA_Q_MIN) and np.all(q_target <= PANDA_Q_MAX)


def test_tool_axis_angle_is_continuous_through_the_top_down_pose():
    """A top-down tool is a rotation of ~π: small wrist turns about it must move the axis-angle observation
    a little, not flip its sign (a 2π jump that wrecks observation statistics and policies)."""
    model = build_panda_model()
    data = mujoco.MjData(model)
    arm = PandaArm(model, data)
    for joint in (4, 5, 6):  # sweep each wrist joint through home in 0.01 rad steps
        previous = None
        for angle in np.linspace(-0.3, 0.3, 61):
            q = HOME_QPOS.copy()
            q[joint] += angle
            arm.reset(q)
            axis_angle = arm.ee_axis_angle()
            if previous is not None:
                assert np.linalg.norm(axis_angle - previous) < 0.05, (joint, angle, axis_angle, previous)
            previous = axis_angle
