"""The arm registry of the deployment side: the UR5e model (DH kinematics, tool frame aligned with the Panda's, FK/IK
through the shared implementation) and a delta_ee tabletop policy deployed on it in memory."""

from __future__ import annotations

import concurrent.futures
import math

import numpy as np
import pytest

from envs.registry import tabletop_env_ids
from envs.tabletop.robot import HOME_QPOS
from envs.tabletop.scene import ARM_BASE_POS
from real_robot.adapters import ActionAdapter, ArmKinematics, JointTarget
from real_robot.arms import ARM_NAMES, ROBOTIQ_CLOSED, UR5E_HOME, UR5E_JOINTS, UR5E_Q_MAX, UR5E_Q_MIN
from real_robot.deploy import build_deployment
from real_robot.observation import ObservationAssembler
from real_robot.safety import SafetyLayer, SafetyLimits
from real_robot.transport import InMemoryTransport, JointState
from robo_rlft.cli import ConfigError, compose_config

# UR5e's published standard DH table (d, a, alpha), written out here independently of the model code.
UR5E_DH = [
    (0.1625, 0.0, math.pi / 2),
    (0.0, -0.425, 0.0),
    (0.0, -0.3922, 0.0),
    (0.1333, 0.0, math.pi / 2),
    (0.0997, 0.0, -math.pi / 2),
    (0.0996, 0.0, 0.0),
]
TOOL_OFFSET = 0.15
UR_NAMES = (*UR5E_JOINTS, "finger_joint")
OPEN = 0.0  # finger_joint, rad: the 2F-85 open


@pytest.fixture(scope="module")
def ur() -> ArmKinematics:
    return ArmKinematics(arm="ur5e")


@pytest.fixture(scope="module")
def panda() -> ArmKinematics:
    return ArmKinematics(arm="panda")


def _dh(theta: float, d: float, a: float, alpha: float) -> np.ndarray:
    ct, st, ca, sa = math.cos(theta), math.sin(theta), math.cos(alpha), math.sin(alpha)
    return np.array([[ct, -st * ca, st * sa, a * ct], [st, ct * ca, -ct * sa, a * st], [0, sa, ca, d], [0, 0, 0, 1]])


def ur_flange(q: np.ndarray) -> np.ndarray:
    """(4, 4) tool0 pose in base_link (the DH base frame turned π about z, as ur_description), base at the origin."""
    pose = np.diag([-1.0, -1.0, 1.0, 1.0])
    for theta, (d, a, alpha) in zip(q, UR5E_DH, strict=True):
        pose = pose @ _dh(theta, d, a, alpha)
    return pose


def _same_rotation(quat_a: np.ndarray, quat_b: np.ndarray, atol: float) -> None:
    """Quaternions q and -q are one rotation: compare on the same sign."""
    sign = 1.0 if float(np.dot(quat_a, quat_b)) >= 0.0 else -1.0
    np.testing.assert_allclose(sign * quat_a, quat_b, atol=atol)


# -- the UR5e model ----------------------------------------------------------------------------------------


def test_registry_has_both_arms_and_their_joint_counts(ur, panda):
    assert set(ARM_NAMES) == {"panda", "ur5e"}
    assert (panda.n_joints, ur.n_joints) == (7, 6)
    assert ur.joint_names == UR5E_JOINTS and ur.finger_names == ("finger_joint",)
    np.testing.assert_allclose(ur.arm.q_min, [-2 * math.pi] * 2 + [-math.pi] + [-2 * math.pi] * 3)
    np.testing.assert_allclose(ur.arm.q_max, -ur.arm.q_min)
    with pytest.raises(ValueError, match=r"ur5e.*6 arm joint names"):
        ArmKinematics(arm="ur5e", joint_names=[f"j{i}" for i in range(7)])
    with pytest.raises(ValueError, match=r"Unknown arm 'kuka'.*panda.*ur5e"):
        ArmKinematics(arm="kuka")


def test_ur_forward_kinematics_match_the_dh_table(ur):
    rng = np.random.default_rng(0)
    base = np.asarray(ARM_BASE_POS)
    # q = 0, UR's published numbers: the flange 0.8172 m out along base_link x, 0.2329 m to the side, 0.0628 m up.
    np.testing.assert_allclose(ur_flange(np.zeros(6))[:3, 3], [0.8172, 0.2329, 0.0628], atol=1e-9)
    for _ in range(20):
        q = rng.uniform(UR5E_Q_MIN, UR5E_Q_MAX)
        flange = ur_flange(q)
        tool = flange[:3, 3] + TOOL_OFFSET * flange[:3, 2] + base
        np.testing.assert_allclose(ur.tool_position(q), tool, atol=1e-9)
        ur.set_configuration(q)
        np.testing.assert_allclose(ur.data.body("tool0").xpos, flange[:3, 3] + base, atol=1e-9)
        np.testing.assert_allclose(ur.data.body("tool0").xmat.reshape(3, 3), flange[:3, :3], atol=1e-9)


def test_ur_tool_offset_is_configurable():
    longer = ArmKinematics(arm="ur5e", tool_offset=0.2)
    flange = ur_flange(UR5E_HOME)
    np.testing.assert_allclose(
        longer.tool_position(UR5E_HOME), flange[:3, 3] + 0.2 * flange[:3, 2] + np.asarray(ARM_BASE_POS), atol=1e-9
    )
    with pytest.raises(ValueError, match="tool_offset must be in"):
        ArmKinematics(arm="ur5e", tool_offset=-0.1)
    with pytest.raises(ValueError, match="Panda hand's"):
        ArmKinematics(arm="panda", tool_offset=0.2)


def test_ur_tool_pointing_down_has_the_panda_home_orientation(ur, panda):
    """The frame alignment that makes a delta_ee policy's axis-angle mean the same on both arms: the UR's tool
    pointing straight down (UR5E_HOME, wrist_3 turned by the Panda home's 0.785-vs-π/4 rounding of joint 7) has the
    Panda home tool quaternion, and so the same ``state`` orientation."""
    panda_quat = panda.arm.fk(HOME_QPOS)[1]
    q = UR5E_HOME.copy()
    q[5] += HOME_QPOS[6] - math.pi / 4  # wrist_3 and the Panda's joint 7 both turn the tool about the vertical
    ur_quat = ur.arm.fk(q)[1]
    _same_rotation(ur_quat, panda_quat, atol=1e-6)
    # The tool really points straight down there (tool z = -world z), and the policy sees one orientation.
    assert ur_flange(UR5E_HOME)[2, 2] == pytest.approx(-1.0, abs=1e-12)
    ur_state = ur.state(q, np.array([OPEN]))
    panda_state = panda.state(HOME_QPOS, np.array([0.04, 0.04]))
    np.testing.assert_allclose(ur_state[3:6], panda_state[3:6], atol=1e-6)
    np.testing.assert_allclose(ur_state[6:], panda_state[6:], atol=1e-7)  # both open


def test_ur_ee_axis_angle_is_continuous_around_top_down(ur):
    """The top-down tool is a rotation of π, where the usual axis-angle flips sign under tiny motions; the shared
    ``ee_axis_angle`` keeps it continuous on the UR too (steps of 0.01 rad → observation steps of about as much)."""
    for joint, span in ((5, 1.5), (4, 0.6), (3, 0.6), (0, 0.6)):
        previous = None
        for angle in np.arange(-span, span, 0.01):
            q = UR5E_HOME.copy()
            q[joint] += angle
            rotvec = ur.state(q, np.array([OPEN]))[3:6].astype(np.float64)
            if previous is not None:
                assert np.linalg.norm(rotvec - previous) < 0.05, (joint, angle, rotvec, previous)
            previous = rotvec


def test_ur_gripper_maps_to_the_policy_finger_entries(ur):
    for finger_joint, each in ((0.0, 0.04), (ROBOTIQ_CLOSED / 2, 0.02), (ROBOTIQ_CLOSED, 0.0), (0.85, 0.0)):
        np.testing.assert_allclose(ur.state(UR5E_HOME, np.array([finger_joint]))[6:], [each, each], atol=1e-7)


@pytest.mark.parametrize(
    "offset", [np.zeros(6), np.array([0.4, 0.2, -0.3, 0.2, 0.3, -0.5]), np.array([-0.6, -0.3, 0.4, -0.3, -0.4, 1.0])]
)
def test_ur_delta_ee_action_moves_the_tool_by_the_commanded_delta(ur, offset):
    """One IK step of a LIBERO OSC_POSE action (0.05 m, 0.5 rad per unit) moves the tool by the commanded delta to
    within 10 % (damping's shortfall, as on the Panda), along and about every world axis, from several configurations;
    a rotation turns the tool about its centre point, which hardly moves."""
    adapter = ActionAdapter(ur, "delta_ee")
    q = UR5E_HOME + offset
    start_pos, start_quat = ur.arm.fk(q)
    for axis in range(3):
        for sign in (-1.0, 1.0):
            move = np.zeros(7)
            move[axis], move[6] = 0.5 * sign, 1.0  # 25 mm, and close the gripper
            target = adapter.step(move, q)
            assert target.positions.shape == (6,) and target.gripper == 0.0
            pos, _ = ur.arm.fk(target.positions)
            assert np.linalg.norm(pos - start_pos - move[:3] * 0.05) < 0.1 * 0.025

            turn = np.zeros(7)
            turn[3 + axis] = 0.2 * sign  # 0.1 rad
            pos, quat = ur.arm.fk(adapter.step(turn, q).positions)
            # The rotation made, in the world frame (quat = exp(made) ⊗ start_quat), vs the commanded rotation vector.
            made = _quat_to_rotvec(_quat_mul(quat, _quat_conj(start_quat)))
            assert np.linalg.norm(made - turn[3:6] * 0.5) < 0.1 * 0.1
            assert np.linalg.norm(pos - start_pos) < 3e-3


def _quat_conj(quat: np.ndarray) -> np.ndarray:
    return quat * np.array([1.0, -1.0, -1.0, -1.0])


def _quat_mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    w1, x1, y1, z1 = a
    w2, x2, y2, z2 = b
    return np.array(
        [
            w1 * w2 - x1 * x2 - y1 * y2 - z1 * z2,
            w1 * x2 + x1 * w2 + y1 * z2 - z1 * y2,
            w1 * y2 - x1 * z2 + y1 * w2 + z1 * x2,
            w1 * z2 + x1 * y2 - y1 * x2 + z1 * w2,
        ]
    )


def _quat_to_rotvec(quat: np.ndarray) -> np.ndarray:
    quat = quat if quat[0] >= 0.0 else -quat
    sin_half = float(np.linalg.norm(quat[1:]))
    return quat[1:] / max(sin_half, 1e-12) * 2.0 * math.atan2(sin_half, quat[0])


def test_observation_state_position_is_the_ur_forward_kinematics(ur):
    assembler = ObservationAssembler(ur)
    rng = np.random.default_rng(2)
    for _ in range(5):
        q = UR5E_HOME + rng.uniform(-0.5, 0.5, 6)
        obs = assembler.assemble(JointState(UR_NAMES, np.append(q, 0.2)), {})
        np.testing.assert_allclose(obs.state[:3], ur.arm.fk(q)[0], atol=1e-6)  # float32 state
        np.testing.assert_allclose(obs.joint_positions, q)
        np.testing.assert_allclose(obs.state[6:], [0.03, 0.03], atol=1e-7)
    with pytest.raises(ValueError, match=r"shoulder_pan_joint"):  # the Panda's names on a UR model
        assembler.assemble(JointState(tuple(f"panda_joint{i}" for i in range(1, 8)), np.zeros(7)), {})


def test_safety_limits_follow_the_arm(ur):
    limits = SafetyLimits.for_arm("ur5e", dt=0.05)
    np.testing.assert_allclose(limits.q_max, UR5E_Q_MAX - 0.02)
    with pytest.raises(ValueError, match=r"7 joints.*'ur5e' has 6.*for_arm"):
        SafetyLayer(SafetyLimits(), ur)
    safety = SafetyLayer(limits, ur)
    safe, interventions = safety.filter(JointTarget(UR5E_HOME + 0.05), UR5E_HOME)
    assert safe.positions.shape == (6,) and "nonfinite" not in interventions
    _, interventions = safety.filter(JointTarget(np.zeros(7)), UR5E_HOME)  # a Panda-sized command
    assert interventions == ("nonfinite",)


# -- the preset and a deployment in memory ---------------------------------------------------------------------


def test_ur_preset_composes_and_validates_joint_counts():
    robot = compose_config(["robot=ur_ros2"]).robot
    assert robot.arm == "ur5e" and robot.output == "trajectory" and robot.base_frame == "base_link"
    assert tuple(robot.joint_names) == UR5E_JOINTS and list(robot.finger_names) == ["finger_joint"]
    assert robot.topics.trajectory == "/scaled_joint_trajectory_controller/joint_trajectory"
    with pytest.raises(ConfigError, match=r"robot.arm=panda needs 7 robot.joint_names and 2"):
        compose_config(["robot=ur_ros2", "robot.arm=panda"])
    with pytest.raises(ConfigError, match=r"robot.arm='kuka' is not allowed"):
        compose_config(["robot=ur_ros2", "robot.arm=kuka"])


def _save_tabletop_checkpoint(flow_policy_factory, path, action_mode: str, action_dim: int):
    from policies.checkpoint import save_policy

    policy = flow_policy_factory(obs_dim=8, action_dim=action_dim, horizon=6)
    env_id = tabletop_env_ids()["LiftCube"]
    metadata = {"env": env_id, "env_kwargs": {"action_mode": action_mode}, "act_steps": 4}
    save_policy(policy, path, metadata)
    return path


class _Immediate(concurrent.futures.Executor):
    """Runs inference synchronously (no threads in the test)."""

    def submit(self, fn, /, *args, **kwargs):
        future: concurrent.futures.Future = concurrent.futures.Future()
        future.set_result(fn(*args, **kwargs))
        return future


def test_delta_ee_policy_deploys_on_the_ur_and_sends_6_joint_commands(flow_policy_factory, tmp_path):
    checkpoint = _save_tabletop_checkpoint(flow_policy_factory, tmp_path / "delta_ee", "delta_ee", 7)
    robot = compose_config(["robot=ur_ros2"]).robot
    clock = [0.0]
    transport = InMemoryTransport(clock=lambda: clock[0])
    deployment = build_deployment(robot, checkpoint, transport=transport, clock=lambda: clock[0])
    loop = deployment.loop
    loop.executor, loop._owns_executor = _Immediate(), False
    q = UR5E_HOME.copy()
    try:
        for _ in range(12):
            # A perfect robot: it is where the last command put it.
            transport.set_joint_state(UR_NAMES, np.append(q, OPEN))
            command = loop.tick()
            if command is not None:
                q = command.positions
            clock[0] += loop.config.dt
    finally:
        deployment.close()
    trajectories = transport.sent["trajectory"]
    assert trajectories, "no trajectory was sent"
    limits = loop.safety.limits
    for trajectory in trajectories:
        assert tuple(trajectory.names) == UR5E_JOINTS
        for point in trajectory.points:
            assert point.positions.shape == (6,)
            assert np.all(np.isfinite(point.positions))
            assert np.all(point.positions >= limits.q_min) and np.all(point.positions <= limits.q_max)
    assert not np.allclose(q, UR5E_HOME), "the arm never moved"
    assert loop.status().interventions.get("nonfinite", 0) == 0


def test_joint_mode_checkpoint_is_refused_on_the_ur(flow_policy_factory, tmp_path):
    checkpoint = _save_tabletop_checkpoint(flow_policy_factory, tmp_path / "joint", "joint", 8)
    robot = compose_config(["robot=ur_ros2"]).robot
    transport = InMemoryTransport()
    with pytest.raises(ValueError, match=r"'ur5e'.*action_mode='joint'.*delta_ee"):
        build_deployment(robot, checkpoint, transport=transport)
    with pytest.raises(ValueError, match=r"'ur5e'.*action_mode='joint'"):
        ActionAdapter(ArmKinematics(arm="ur5e"), "joint")
