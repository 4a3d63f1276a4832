"""The arms a deployed policy can drive: a registry of kinematic models, by name (``robot.arm``).

A tabletop policy trained with ``action_mode=delta_ee`` observes an 8-D ``state`` (tool position in the world
frame, tool axis-angle, two finger openings) and acts in LIBERO's 7-D delta end-effector space. Both are
independent of the arm once the tool frame is the same, so such a policy drives any arm through that arm's own
FK and IK. Each entry here is such a model:

- ``panda``: the tabletop's own Franka Panda (:func:`envs.tabletop.robot.add_panda`), exactly the simulator's
  arm. It alone can also run ``joint`` policies (their actions are Panda joint targets).
- ``ur5e``: a Universal Robots UR5e with a Robotiq 2F-85, built here from UR's published DH parameters. Its tool
  frame is turned about the flange axis so that the tool pointing straight down has the orientation of the
  Panda's tool at its home pose: the policy's axis-angle then means the same on both arms.

Both models share one implementation of FK, DLS IK and the delta end-effector mapping
(:class:`envs.tabletop.robot.SerialArm`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import mujoco
import numpy as np

from envs.tabletop.robot import (
    ARM_JOINTS,
    FINGER_JOINTS,
    FINGER_MAX,
    Q_MAX,
    Q_MIN,
    PandaArm,
    SerialArm,
    add_panda,
)

# ---------------------------------------------------------------------------------------------------
# UR5e (Universal Robots' published DH parameters) with a Robotiq 2F-85
# ---------------------------------------------------------------------------------------------------

# Named as ur_robot_driver publishes them on /joint_states.
UR5E_JOINTS: tuple[str, ...] = (
    "shoulder_pan_joint",
    "shoulder_lift_joint",
    "elbow_joint",
    "wrist_1_joint",
    "wrist_2_joint",
    "wrist_3_joint",
)
# The Robotiq 2F-85's one actuated joint, as robotiq_description names it: 0 open … 0.8 rad closed.
ROBOTIQ_JOINT = "finger_joint"
ROBOTIQ_CLOSED = 0.8
UR5E_TOOL_SITE = "tool_site"

# Standard DH rows (d_i, a_i, alpha_i) of joints 1..6: frame i = frame i-1 · RotZ(q_i) · TransZ(d) · TransX(a) ·
# RotX(alpha). In MuJoCo the body holding hinge i is frame i-1 (hinge along its z) and the next body sits at
# pos (a, 0, d), quat RotX(alpha) in it.
_UR5E_DH: tuple[tuple[float, float, float], ...] = (
    (0.1625, 0.0, math.pi / 2),
    (0.0, -0.425, 0.0),
    (0.0, -0.3922, 0.0),
    (0.1333, 0.0, math.pi / 2),
    (0.0997, 0.0, -math.pi / 2),
    (0.0996, 0.0, 0.0),
)
_UR5E_LINKS: tuple[str, ...] = (
    "shoulder_link",
    "upper_arm_link",
    "forearm_link",
    "wrist_1_link",
    "wrist_2_link",
    "wrist_3_link",
)
# ±2π on every joint but the elbow, whose links would collide beyond ±π (UR5e datasheet).
UR5E_Q_MAX = np.array([2 * math.pi, 2 * math.pi, math.pi, 2 * math.pi, 2 * math.pi, 2 * math.pi])
UR5E_Q_MIN = -UR5E_Q_MAX
# UR's usual "tool down" posture: upper arm up, forearm level, tool pointing straight down, in front of the base.
UR5E_HOME = np.array([0.0, -math.pi / 2, math.pi / 2, -math.pi / 2, -math.pi / 2, 0.0])
# Flange → tool centre point of a Robotiq 2F-85 on its coupling (between the fingertips), m.
UR5E_TOOL_OFFSET = 0.15
# The tool frame in the flange frame (tool0, z out of the flange): RotZ(-π/2). At UR5E_HOME the flange's axes are
# x = -y_world, y = -x_world, z = -z_world, so RotZ(-π/2) makes the tool x = +x_world, y = -y_world, z = -z_world:
# the Panda's tool at home (quat (0, 1, 0, 0) wxyz, up to HOME_QPOS's rounding of π/4 on joint 7). The Panda's
# jaws close along its tool y axis, so here they should close along tool0's x axis.
UR5E_TOOL_QUAT = (math.sqrt(0.5), 0.0, 0.0, -math.sqrt(0.5))

# The model's DH frames are the controller's ``base`` frame; ROS's ``base_link`` (whose x the arm reaches along at
# q = 0, the frame policies' world is aligned with) is turned π about z from it (ur_description's
# base_link → base_link_inertia).
_UR5E_BASE_YAW = math.pi

# Primitive link shapes in each link's (DH) frame, (fromto, radius); they only draw the arm, the model is kinematic.
_UR5E_SHAPES: tuple[tuple[tuple[float, ...], float], ...] = (
    ((0.0, 0.0, 0.0, 0.0, 0.0, 0.1625), 0.06),
    ((0.0, 0.0, 0.0, -0.425, 0.0, 0.0), 0.055),
    ((0.0, 0.0, 0.0, -0.3922, 0.0, 0.0), 0.045),
    ((0.0, 0.0, 0.0, 0.0, 0.0, 0.1333), 0.04),
    ((0.0, 0.0, 0.0, 0.0, 0.0, 0.0997), 0.04),
    ((0.0, 0.0, 0.0, 0.0, 0.0, 0.0996), 0.04),
)


def _rot_quat(axis: int, angle: float) -> list[float]:
    """wxyz quaternion of a rotation by ``angle`` rad about coordinate axis ``axis`` (0 x, 1 y, 2 z)."""
    quat = [math.cos(angle / 2), 0.0, 0.0, 0.0]
    quat[1 + axis] = math.sin(angle / 2)
    return quat


def _capsule(body: mujoco.MjsBody, fromto: Sequence[float], radius: float) -> None:
    # contype/conaffinity 0: a kinematic model for FK/IK, nothing collides.
    body.add_geom(
        type=mujoco.mjtGeom.mjGEOM_CAPSULE,
        fromto=list(fromto),
        size=[radius, 0.0, 0.0],
        contype=0,
        conaffinity=0,
        rgba=[0.6, 0.65, 0.7, 1.0],
    )


def build_ur5e_spec(
    base_pos: Sequence[float] = (0.0, 0.0, 0.0), tool_offset: float = UR5E_TOOL_OFFSET
) -> mujoco.MjSpec:
    """A kinematic UR5e with a Robotiq 2F-85 as an :class:`mujoco.MjSpec`, in radians.

    Names: joints :data:`UR5E_JOINTS` and :data:`ROBOTIQ_JOINT` (0 … 0.8 rad, open … closed), bodies
    ``base_link``, ``shoulder_link`` … ``wrist_3_link`` (the DH frames), ``tool0`` (the flange) and
    ``robotiq_85_base_link``, site :data:`UR5E_TOOL_SITE` (the tool centre point, oriented by
    :data:`UR5E_TOOL_QUAT`).

    Args:
        base_pos: (3,) position of ``base_link`` in the world (the policy's frame), m; the base is not rotated.
        tool_offset: flange → tool centre point along the flange axis, m (0.15 for a 2F-85 on its coupling).
    """
    if len(base_pos) != 3:
        raise ValueError(f"build_ur5e_spec: base_pos must be (x, y, z) in metres, got {list(base_pos)}.")
    if not 0.0 <= tool_offset <= 0.5:
        raise ValueError(f"build_ur5e_spec: tool_offset must be in [0, 0.5] m from the flange, got {tool_offset}.")
    spec = mujoco.MjSpec()
    spec.modelname = "ur5e_deploy"
    spec.compiler.degree = False  # MjSpec's default is degrees: ±2π would become ±0.11 rad
    base = spec.worldbody.add_body(name="base_link", pos=[float(x) for x in base_pos])
    base.add_geom(
        type=mujoco.mjtGeom.mjGEOM_CYLINDER, size=[0.075, 0.04, 0.0], pos=[0.0, 0.0, 0.04], contype=0, conaffinity=0
    )
    parent = base
    pos, quat = [0.0, 0.0, 0.0], _rot_quat(2, _UR5E_BASE_YAW)
    for name, joint, (d, a, alpha), shape, low, high in zip(
        _UR5E_LINKS, UR5E_JOINTS, _UR5E_DH, _UR5E_SHAPES, UR5E_Q_MIN, UR5E_Q_MAX, strict=True
    ):
        body = parent.add_body(name=name, pos=pos, quat=quat)
        body.add_joint(
            name=joint,
            type=mujoco.mjtJoint.mjJNT_HINGE,
            axis=[0.0, 0.0, 1.0],
            range=[float(low), float(high)],
            limited=mujoco.mjtLimited.mjLIMITED_TRUE,
        )
        _capsule(body, *shape)
        parent = body
        pos, quat = [a, 0.0, d], _rot_quat(0, alpha)  # where the next DH frame sits in this one

    flange = parent.add_body(name="tool0", pos=pos, quat=quat)
    gripper = flange.add_body(name="robotiq_85_base_link")
    _capsule(gripper, (0.0, 0.0, 0.0, 0.0, 0.0, 0.09), 0.04)
    # One hinge stands for the 2F-85's linkage: the policy only needs how far the jaws are open.
    knuckle = gripper.add_body(name="left_outer_knuckle", pos=[0.0, 0.0, 0.09])
    knuckle.add_joint(
        name=ROBOTIQ_JOINT,
        type=mujoco.mjtJoint.mjJNT_HINGE,
        axis=[0.0, 1.0, 0.0],
        range=[0.0, ROBOTIQ_CLOSED],
        limited=mujoco.mjtLimited.mjLIMITED_TRUE,
    )
    _capsule(knuckle, (0.0, 0.0, 0.0, 0.0, 0.0, 0.05), 0.01)
    flange.add_site(name=UR5E_TOOL_SITE, pos=[0.0, 0.0, tool_offset], quat=list(UR5E_TOOL_QUAT), size=[0.005, 0.0, 0.0])
    return spec


def robotiq_to_fingers(finger_joint: np.ndarray) -> np.ndarray:
    """The 2F-85's ``finger_joint`` (1,) rad (0 open … 0.8 closed) → the policy's two finger entries (2,) m.

    The policy saw the Panda's fingers, 0 … 0.04 m each, 0.04 open. The jaws' opening *fraction* is what carries
    over (the gripper command is a fraction too), so it maps linearly, clipped to the joint's range.
    """
    opening = 1.0 - np.clip(float(np.asarray(finger_joint).reshape(-1)[0]) / ROBOTIQ_CLOSED, 0.0, 1.0)
    return np.full(2, FINGER_MAX * opening)


# ---------------------------------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArmSpec:
    """One arm the deployment side can drive.

    Attributes:
        name: the registry key (``robot.arm``).
        joints: the model's n arm joint names, base to tool (the robot's names map onto them in this order).
        gripper_joints: the model's gripper joint names (the robot's ``finger_names`` map onto them).
        q_min, q_max: (n,) joint position limits, rad.
        base_frame: the driver's ``frame_id`` of the arm's base.
        joint_actions: whether the tabletop's ``joint`` action-mode policies can drive it: their actions are the
            Panda's joint targets, so only the Panda.
        build: ``build(base_pos (3,) m, tool_offset m | None) -> MjSpec``; ``None`` keeps the arm's own tool.
        make_arm: ``make_arm(model, data) -> SerialArm`` for the compiled model.
        finger_state: the robot's gripper joint positions (len(gripper_joints),) → the policy's two finger
            entries (2,) m, 0 … 0.04 each.
    """

    name: str
    joints: tuple[str, ...]
    gripper_joints: tuple[str, ...]
    q_min: np.ndarray
    q_max: np.ndarray
    base_frame: str
    joint_actions: bool
    build: Callable[[Sequence[float], float | None], mujoco.MjSpec]
    make_arm: Callable[[mujoco.MjModel, mujoco.MjData], SerialArm]
    finger_state: Callable[[np.ndarray], np.ndarray]

    @property
    def n_joints(self) -> int:
        """n, the arm's joint count."""
        return len(self.joints)


def _build_panda(base_pos: Sequence[float], tool_offset: float | None) -> mujoco.MjSpec:
    if tool_offset is not None:
        raise ValueError(
            f"arm 'panda': the tool is the Panda hand's, fixed; tool_offset must be None, got {tool_offset}."
        )
    spec = mujoco.MjSpec()
    spec.modelname = "panda_deploy"
    spec.compiler.degree = False
    add_panda(spec, base_pos=tuple(float(x) for x in base_pos))
    return spec


def _build_ur5e(base_pos: Sequence[float], tool_offset: float | None) -> mujoco.MjSpec:
    return build_ur5e_spec(base_pos, UR5E_TOOL_OFFSET if tool_offset is None else tool_offset)


def _make_ur5e_arm(model: mujoco.MjModel, data: mujoco.MjData) -> SerialArm:
    return SerialArm(model, data, UR5E_JOINTS, UR5E_TOOL_SITE, UR5E_HOME)


ARMS: dict[str, ArmSpec] = {
    "panda": ArmSpec(
        name="panda",
        joints=ARM_JOINTS,
        gripper_joints=FINGER_JOINTS,
        q_min=Q_MIN,
        q_max=Q_MAX,
        base_frame="panda_link0",
        joint_actions=True,
        build=_build_panda,
        make_arm=PandaArm,
        # The Panda's finger joints are the policy's finger entries.
        finger_state=lambda fingers: np.asarray(fingers, dtype=np.float64).copy(),
    ),
    "ur5e": ArmSpec(
        name="ur5e",
        joints=UR5E_JOINTS,
        gripper_joints=(ROBOTIQ_JOINT,),
        q_min=UR5E_Q_MIN,
        q_max=UR5E_Q_MAX,
        base_frame="base_link",
        joint_actions=False,
        build=_build_ur5e,
        make_arm=_make_ur5e_arm,
        finger_state=robotiq_to_fingers,
    ),
}
ARM_NAMES: tuple[str, ...] = tuple(ARMS)


def get_arm(name: str) -> ArmSpec:
    """The registry entry ``name``; raises ``ValueError`` naming the allowed arms."""
    if name not in ARMS:
        raise ValueError(f"Unknown arm {name!r}; choose one of {list(ARM_NAMES)}.")
    return ARMS[name]
