"""A Franka Panda-like 7-DoF arm with a parallel-jaw gripper, built in code from primitive geoms.

The kinematics are the real Panda's (Franka's published modified Denavit-Hartenberg table, flange
0.107 m beyond joint 7, hand yawed -45 degrees, tool centre point 0.1034 m beyond the flange) and so are
the joint limits; the links are capsules and boxes instead of meshes, so the model ships with the
package and builds in about a millisecond. Everything is looked up by name:

- joints ``joint1`` … ``joint7`` (hinges, radians) and ``finger_joint1/2`` (slides, 0 … 0.04 m each),
- actuators ``actuator1`` … ``actuator7`` (joint position servos) and ``gripper`` (a position servo on
  the finger tendon whose control is the opening of *one* finger, 0 … 0.04 m),
- sites ``ee_site`` (tool centre point, between the fingertips) and camera ``wrist_cam``,
- bodies ``link0`` … ``link7``, ``hand``, ``left_finger``, ``right_finger``,

all prefixed with the ``prefix`` given to :func:`add_panda`.

:class:`PandaArm` wraps a compiled model and its data: named accessors, damped-least-squares inverse
kinematics (one step per control step, or iterated to convergence on scratch data) and LIBERO's 7-D
delta end-effector action (robosuite ``OSC_POSE``: ±0.05 m and ±0.5 rad per control step, last
dimension -1 opens / +1 closes the gripper) mapped to joint position targets. Those three live in
:class:`SerialArm`, which knows an arm only by its joint and site names, so another arm's model (the UR5e of
``real_robot.arms``) shares the one implementation; :class:`PandaArm` adds the actuators and fingers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import mujoco
import numpy as np

# ---------------------------------------------------------------------------------------------------
# The real arm's numbers (Franka Emika Panda datasheet / franka_description)
# ---------------------------------------------------------------------------------------------------

ARM_JOINTS: tuple[str, ...] = tuple(f"joint{i}" for i in range(1, 8))
FINGER_JOINTS: tuple[str, str] = ("finger_joint1", "finger_joint2")
ARM_ACTUATORS: tuple[str, ...] = tuple(f"actuator{i}" for i in range(1, 8))
GRIPPER_ACTUATOR = "gripper"
EE_SITE = "ee_site"
WRIST_CAMERA = "wrist_cam"

Q_MIN = np.array([-2.8973, -1.7628, -2.8973, -3.0718, -2.8973, -0.0175, -2.8973])
Q_MAX = np.array([2.8973, 1.7628, 2.8973, -0.0698, 2.8973, 3.7525, 2.8973])
HOME_QPOS = np.array([0.0, -0.785, 0.0, -2.356, 0.0, 1.571, 0.785])

# Modified (Craig) DH rows (a_{i-1}, d_i, alpha_{i-1}) of joints 1..7: the child frame of joint i is
# RotX(alpha) · TransX(a) · TransZ(d) · RotZ(q_i) of its parent, so a body sits at
# pos = (a, 0, 0) + RotX(alpha)·(0, 0, d), quat = RotX(alpha), with its hinge along its own z.
_DH: tuple[tuple[float, float, float], ...] = (
    (0.0, 0.333, 0.0),
    (0.0, 0.0, -math.pi / 2),
    (0.0, 0.316, math.pi / 2),
    (0.0825, 0.0, math.pi / 2),
    (-0.0825, 0.384, -math.pi / 2),
    (0.0, 0.0, math.pi / 2),
    (0.088, 0.0, math.pi / 2),
)
FLANGE_OFFSET = 0.107  # joint-7 frame → flange, along z
HAND_YAW = -math.pi / 4  # the hand is mounted at -45 degrees about the flange z axis
TCP_OFFSET = 0.1034  # flange → tool centre point (between the fingertips), along z
FINGER_BASE = 0.0584  # flange → finger slide origin, along z
FINGER_MAX = 0.04  # each finger opens 0 … 0.04 m, so the jaw opens 0 … 0.08 m

# Link masses (kg) of franka_description; inertias follow from the primitive geoms.
_LINK_MASS = (0.63, 4.97, 0.65, 3.23, 3.59, 1.23, 1.67, 0.74)
_HAND_MASS = 0.73
_FINGER_MASS = 0.015

# Joint position servos. Stiffness as MuJoCo Menagerie's Panda. Its damping (kv = 450, time constant
# kv/kp = 0.1 s) lets a 20 Hz delta end-effector command move the tool only ~35 % of the commanded
# distance; kv = 100 / 40 (about critical; the wrist's higher ratio stops 12 N·m torque saturation from
# overshooting by ~35 %) moves it 85-95 %. Torque limits are the real arm's (87 N·m shoulder/elbow,
# 12 N·m wrist).
ARM_KP = np.array([4500.0, 4500.0, 4500.0, 4500.0, 2000.0, 2000.0, 2000.0])
ARM_KV = np.array([100.0, 100.0, 100.0, 100.0, 40.0, 40.0, 40.0])
ARM_TORQUE_LIMIT = np.array([87.0, 87.0, 87.0, 87.0, 12.0, 12.0, 12.0])
ARM_ARMATURE = 0.1

# Gripper (FACTS.md, grasps that worked): finger damping 100 N·s/m → free closing ≈ 0.2 m/s like a real
# Panda; tendon force limit 40 N → 20 N squeeze per pad; pads with priority, condim 4, friction 1.5.
GRIPPER_KP = 2000.0
GRIPPER_FORCE_LIMIT = 40.0
FINGER_DAMPING = 100.0
PAD_FRICTION = (1.5, 0.005, 0.0001)
PAD_SOLREF = (0.005, 1.0)  # stiff; MuJoCo raises the time constant to 2·timestep on coarser steps

# Collision bits: arm geoms (contype 2, conaffinity 1) touch default world geoms (1, 1) but never each
# other — arm self-collision is off.
ARM_CONTYPE = 2
ARM_CONAFFINITY = 1

# LIBERO / robosuite OSC_POSE delta limits per control step (20 Hz).
DELTA_POS_SCALE = 0.05
DELTA_ROT_SCALE = 0.5

_LINK_RGBA = (0.95, 0.95, 0.95, 1.0)
_JOINT_RGBA = (0.25, 0.25, 0.27, 1.0)
_PAD_RGBA = (0.1, 0.1, 0.1, 1.0)

# Primitive link shapes in each link's own (DH) frame: ("capsule", fromto, radius) or
# ("box", centre, half-sizes). Sizes follow the real links closely enough for collisions with a table
# and objects; they play no role in the kinematics.
_Shape = tuple[str, tuple[float, ...], tuple[float, ...]]
_LINK_SHAPES: tuple[tuple[_Shape, ...], ...] = (
    (("capsule", (0.0, 0.0, 0.06, 0.0, 0.0, 0.15), (0.07,)),),
    (("capsule", (0.0, 0.0, -0.19, 0.0, 0.0, 0.0), (0.06,)),),
    (
        ("capsule", (0.0, 0.0, -0.06, 0.0, 0.0, 0.06), (0.06,)),
        ("capsule", (0.0, 0.0, 0.0, 0.0, -0.19, 0.0), (0.06,)),
    ),
    (
        ("capsule", (0.0, 0.0, -0.12, 0.0, 0.0, 0.0), (0.06,)),
        ("capsule", (0.0, 0.0, 0.0, 0.0825, 0.0, 0.0), (0.06,)),
    ),
    (
        ("capsule", (0.0, 0.0, -0.06, 0.0, 0.0, 0.06), (0.06,)),
        ("capsule", (0.0, 0.0, 0.0, -0.0825, 0.1, 0.0), (0.06,)),
    ),
    (("capsule", (0.0, 0.0, -0.27, 0.0, 0.0, 0.0), (0.055,)),),
    (
        ("capsule", (0.0, 0.0, -0.04, 0.0, 0.0, 0.04), (0.055,)),
        ("capsule", (0.0, 0.0, 0.0, 0.088, 0.0, 0.0), (0.05,)),
    ),
    (("capsule", (0.0, 0.0, 0.0, 0.0, 0.0, 0.08), (0.045,)),),
)
_HAND_BOX = ((0.0, 0.0, 0.03), (0.025, 0.095, 0.028))
# In each finger's frame (slide along +y, opening): the body, then the pad whose inner face is at y = 0.
_FINGER_BOX = ((0.0, 0.014, 0.029), (0.009, 0.008, 0.029))
_PAD_BOX = ((0.0, 0.003, TCP_OFFSET - FINGER_BASE), (0.008, 0.003, 0.0125))


def _rot_x_quat(angle: float) -> list[float]:
    return [math.cos(angle / 2), math.sin(angle / 2), 0.0, 0.0]


def _rot_z_quat(angle: float) -> list[float]:
    return [math.cos(angle / 2), 0.0, 0.0, math.sin(angle / 2)]


def _shape_volume(shape: _Shape) -> float:
    kind, where, size = shape
    if kind == "capsule":
        length = float(np.linalg.norm(np.subtract(where[3:], where[:3])))
        radius = size[0]
        return math.pi * radius**2 * length + 4.0 / 3.0 * math.pi * radius**3
    return 8.0 * size[0] * size[1] * size[2]


def _add_shapes(body: mujoco.MjsBody, shapes: Sequence[_Shape], mass: float, rgba: Sequence[float]) -> None:
    """Add collision geoms to ``body``, sharing ``mass`` among them by volume."""
    volumes = [_shape_volume(s) for s in shapes]
    for (kind, where, size), volume in zip(shapes, volumes, strict=True):
        geom = body.add_geom(
            contype=ARM_CONTYPE,
            conaffinity=ARM_CONAFFINITY,
            mass=mass * volume / sum(volumes),
            rgba=list(rgba),
        )
        if kind == "capsule":
            geom.type = mujoco.mjtGeom.mjGEOM_CAPSULE
            geom.fromto = list(where)
            geom.size = [size[0], 0.0, 0.0]
        else:
            geom.type = mujoco.mjtGeom.mjGEOM_BOX
            geom.pos = list(where)
            geom.size = list(size)


def _position_servo(actuator: mujoco.MjsActuator, kp: float, kv: float, ctrlrange: Sequence[float]) -> None:
    """Make ``actuator`` a position servo: force = kp·(ctrl - q) - kv·q̇ (3.3.0 has no helper for this)."""
    actuator.gaintype = mujoco.mjtGain.mjGAIN_FIXED
    actuator.gainprm = [kp] + [0.0] * 9
    actuator.biastype = mujoco.mjtBias.mjBIAS_AFFINE
    actuator.biasprm = [0.0, -kp, -kv] + [0.0] * 7
    actuator.ctrlrange = list(ctrlrange)
    actuator.ctrllimited = mujoco.mjtLimited.mjLIMITED_TRUE


def build_panda_spec(degree: bool = False) -> mujoco.MjSpec:
    """The arm alone as an :class:`mujoco.MjSpec` whose world holds one body, ``link0`` at the origin.

    Args:
        degree: write hinge limits in degrees. An attached body is compiled with the *receiving* spec's
            ``compiler.degree`` (MuJoCo 3.3.0), so this must match the spec the arm ends up in;
            :func:`add_panda` takes care of it.
    """
    spec = mujoco.MjSpec()
    spec.modelname = "panda"
    # MjSpec's default is degrees, which would turn ±2.9 rad limits into ±0.05 rad.
    spec.compiler.degree = degree
    spec.compiler.autolimits = True
    angle = math.degrees if degree else float

    parent = spec.worldbody.add_body(name="link0")
    _add_shapes(parent, _LINK_SHAPES[0], _LINK_MASS[0], _JOINT_RGBA)
    for i, (a, d, alpha) in enumerate(_DH, start=1):
        pos = [a, -math.sin(alpha) * d, math.cos(alpha) * d]  # (a, 0, 0) + RotX(alpha)·(0, 0, d)
        body = parent.add_body(name=f"link{i}", pos=pos, quat=_rot_x_quat(alpha), gravcomp=1.0)
        body.add_joint(
            name=ARM_JOINTS[i - 1],
            type=mujoco.mjtJoint.mjJNT_HINGE,
            axis=[0.0, 0.0, 1.0],
            range=[angle(Q_MIN[i - 1]), angle(Q_MAX[i - 1])],
            limited=mujoco.mjtLimited.mjLIMITED_TRUE,
            armature=ARM_ARMATURE,
        )
        _add_shapes(body, _LINK_SHAPES[i], _LINK_MASS[i], _LINK_RGBA if i % 2 else _JOINT_RGBA)
        parent = body

    hand = parent.add_body(name="hand", pos=[0.0, 0.0, FLANGE_OFFSET], quat=_rot_z_quat(HAND_YAW), gravcomp=1.0)
    _add_shapes(hand, (("box", *_HAND_BOX),), _HAND_MASS, _LINK_RGBA)
    hand.add_site(name=EE_SITE, pos=[0.0, 0.0, TCP_OFFSET], size=[0.005, 0.0, 0.0], rgba=[1.0, 0.2, 0.2, 0.5])
    # Looks along the hand's +z (between the fingers), like robosuite's eye-in-hand camera.
    hand.add_camera(name=WRIST_CAMERA, pos=[0.06, 0.0, 0.0], quat=[0.0, 1.0, 0.0, 0.0], fovy=75.0)

    for name, joint_name, yaw in (("left_finger", FINGER_JOINTS[0], 0.0), ("right_finger", FINGER_JOINTS[1], math.pi)):
        finger = hand.add_body(name=name, pos=[0.0, 0.0, FINGER_BASE], quat=_rot_z_quat(yaw), gravcomp=1.0)
        finger.add_joint(
            name=joint_name,
            type=mujoco.mjtJoint.mjJNT_SLIDE,
            axis=[0.0, 1.0, 0.0],
            range=[0.0, FINGER_MAX],
            limited=mujoco.mjtLimited.mjLIMITED_TRUE,
            damping=FINGER_DAMPING,
            armature=0.01,
        )
        _add_shapes(finger, (("box", *_FINGER_BOX),), _FINGER_MASS * 0.8, _LINK_RGBA)
        finger.add_geom(
            name=f"{name}_pad",
            type=mujoco.mjtGeom.mjGEOM_BOX,
            pos=list(_PAD_BOX[0]),
            size=list(_PAD_BOX[1]),
            mass=_FINGER_MASS * 0.2,
            contype=ARM_CONTYPE,
            conaffinity=ARM_CONAFFINITY,
            # Priority makes the pad's contact parameters win over the object's: grip friction and a
            # stiff contact that does not let a squeezed object sink into the pads.
            priority=1,
            condim=4,
            friction=list(PAD_FRICTION),
            solref=list(PAD_SOLREF),
            rgba=list(_PAD_RGBA),
        )

    for i, name in enumerate(ARM_ACTUATORS):
        actuator = spec.add_actuator(name=name, target=ARM_JOINTS[i], trntype=mujoco.mjtTrn.mjTRN_JOINT)
        _position_servo(actuator, ARM_KP[i], ARM_KV[i], (Q_MIN[i], Q_MAX[i]))
        actuator.forcerange = [-ARM_TORQUE_LIMIT[i], ARM_TORQUE_LIMIT[i]]
        actuator.forcelimited = mujoco.mjtLimited.mjLIMITED_TRUE

    # The gripper servo drives the mean finger opening; the equality keeps the fingers symmetric so an
    # off-centre object is squeezed by both pads (a real Panda's fingers are geared together).
    tendon = spec.add_tendon(name="finger_split")
    for joint_name in FINGER_JOINTS:
        tendon.wrap_joint(joint_name, 0.5)
    gripper = spec.add_actuator(name=GRIPPER_ACTUATOR, target="finger_split", trntype=mujoco.mjtTrn.mjTRN_TENDON)
    _position_servo(gripper, GRIPPER_KP, 0.0, (0.0, FINGER_MAX))
    gripper.forcerange = [-GRIPPER_FORCE_LIMIT, GRIPPER_FORCE_LIMIT]
    gripper.forcelimited = mujoco.mjtLimited.mjLIMITED_TRUE
    spec.add_equality(
        name="finger_coupling", type=mujoco.mjtEq.mjEQ_JOINT, name1=FINGER_JOINTS[0], name2=FINGER_JOINTS[1]
    )
    return spec


def add_panda(
    parent: mujoco.MjSpec | mujoco.MjsBody,
    prefix: str = "",
    base_pos: Sequence[float] = (0.0, 0.0, 0.0),
    base_quat: Sequence[float] = (1.0, 0.0, 0.0, 0.0),
    *,
    spec: mujoco.MjSpec | None = None,
) -> mujoco.MjsBody:
    """Add the arm (with its actuators, tendon and finger coupling) to a scene under construction.

    Args:
        parent: an :class:`mujoco.MjSpec` (the arm goes on its world body) or a body of one.
        prefix: prepended to every name of the arm (``"left_"`` → ``left_joint1``, ``left_ee_site``);
            use distinct prefixes to add several arms.
        base_pos: (3,) position of the arm's base (``link0``) in ``parent``'s frame, metres.
        base_quat: (4,) orientation of the base, wxyz.
        spec: the spec ``parent`` belongs to, when ``parent`` is a body. MuJoCo compiles the attached arm
            with that spec's angle unit (``compiler.degree``, which defaults to degrees) and a body cannot
            tell which spec it is in; without ``spec`` the scene must compile in radians
            (``compiler.degree = False``). :class:`PandaArm` refuses a model whose limits came out wrong.

    Returns:
        The arm's base body in the scene's spec.

    Arm geoms use contype 2 / conaffinity 1: they collide with geoms left at MuJoCo's defaults (1 / 1)
    but not with each other.
    """
    if isinstance(parent, mujoco.MjSpec):
        spec, parent = parent, parent.worldbody
    if not isinstance(parent, mujoco.MjsBody):
        raise TypeError(f"add_panda: parent must be a mujoco.MjSpec or mujoco.MjsBody, got {type(parent).__name__}.")
    if len(base_pos) != 3 or len(base_quat) != 4:
        raise ValueError(f"add_panda: base_pos must have 3 and base_quat 4 entries, got {base_pos!r}, {base_quat!r}.")
    degree = bool(spec.compiler.degree) if spec is not None else False
    frame = parent.add_frame(pos=[float(x) for x in base_pos], quat=[float(x) for x in base_quat])
    return frame.attach_body(build_panda_spec(degree).worldbody.first_body(), prefix, "")


def build_panda_model(timestep: float = 0.002) -> mujoco.MjModel:
    """A standalone arm on a floor plane, compiled: the arm's base at the origin, a light, ``timestep`` s.

    Uses the ``implicitfast`` integrator (stable with stiff servos and damped fingers at dt 0.002-0.005).
    """
    if not 0.0 < timestep <= 0.01:
        raise ValueError(f"build_panda_model: timestep must be in (0, 0.01] s, got {timestep}.")
    spec = mujoco.MjSpec()
    spec.modelname = "panda_standalone"
    spec.compiler.degree = False
    spec.option.timestep = timestep
    spec.option.integrator = mujoco.mjtIntegrator.mjINT_IMPLICITFAST
    # size[2] of a plane is the spacing of its drawn grid: coarse, because a fine grid dominates CPU rendering.
    spec.worldbody.add_geom(
        name="floor", type=mujoco.mjtGeom.mjGEOM_PLANE, size=[2.0, 2.0, 0.5], rgba=[0.8, 0.8, 0.8, 1.0]
    )
    spec.worldbody.add_light(name="top", pos=[0.0, 0.0, 3.0], dir=[0.0, 0.0, -1.0], directional=True)
    add_panda(spec)
    return spec.compile()


# ---------------------------------------------------------------------------------------------------
# The arm at run time
# ---------------------------------------------------------------------------------------------------


class IKResult(NamedTuple):
    """Outcome of :meth:`PandaArm.ik_solve`."""

    q: np.ndarray  # (n,) joint positions, always within the limits
    pos_error: float  # metres, |target - reached|
    rot_error: float  # radians, angle between target and reached orientation (0 if position-only)
    success: bool  # both errors within the requested tolerances
    iterations: int  # DLS iterations used, over all restarts


def _as_slice(indices: np.ndarray) -> slice | np.ndarray:
    """A slice when ``indices`` are contiguous (cheaper to index with), else the index array."""
    if np.array_equal(indices, np.arange(indices[0], indices[0] + len(indices))):
        return slice(int(indices[0]), int(indices[0]) + len(indices))
    return indices


class SerialArm:
    """Named access, forward/inverse kinematics and delta end-effector mapping for any serial arm in a model.

    The arm is given by data: the names of its n hinge joints (base to tool) and of its tool site. This is the one
    implementation of the damped-least-squares IK and of LIBERO's ``OSC_POSE`` action mapping; :class:`PandaArm`
    adds the Panda's actuators and fingers, and ``real_robot.arms`` drives other arms (a UR5e) with it.

    Reads only the arm's own entries of ``data``; IK runs on a private scratch :class:`mujoco.MjData`.

    Args:
        model: a compiled model containing the arm.
        data: the data for ``model``.
        joints: the arm's n joint names in the model (without ``prefix``), base to tool.
        site: the tool-centre-point site's name (without ``prefix``).
        home: (n,) rad, the rest posture: IK's null-space pull goes toward it, and :meth:`ee_axis_angle` picks
            the quaternion sign on the side of the tool orientation there.
        prefix: the prefix the arm's names carry in ``model``.
    """

    # Appended to a missing-name error: how to build a model this class can read.
    build_hint = "Build the model with the arm's names and pass the prefix it was added with."

    def __init__(
        self,
        model: mujoco.MjModel,
        data: mujoco.MjData,
        joints: Sequence[str],
        site: str,
        home: np.ndarray,
        prefix: str = "",
    ) -> None:
        self.model = model
        self.data = data
        self.prefix = prefix
        self.joint_ids = np.array([self._require_id(mujoco.mjtObj.mjOBJ_JOINT, n, "joint") for n in joints])
        self.n_joints = len(self.joint_ids)
        home = np.asarray(home, dtype=np.float64)
        if home.shape != (self.n_joints,):
            raise ValueError(
                f"{type(self).__name__}: home must have one entry per joint, shape ({self.n_joints},); "
                f"got {home.shape}."
            )
        self.qpos_index = _as_slice(model.jnt_qposadr[self.joint_ids])
        self.dof_index = _as_slice(model.jnt_dofadr[self.joint_ids])
        self.site_id = self._require_id(mujoco.mjtObj.mjOBJ_SITE, site, "site")
        self.q_min = model.jnt_range[self.joint_ids, 0].copy()
        self.q_max = model.jnt_range[self.joint_ids, 1].copy()
        self.home = home.copy()

        # IK scratch space, allocated once.
        n = self.n_joints
        self._scratch = mujoco.MjData(model)
        self._jacp = np.zeros((3, model.nv))
        self._jacr = np.zeros((3, model.nv))
        self._jac = np.zeros((6, n))
        self._err = np.zeros(6)
        self._quat = np.zeros(4)
        self._quat_inv = np.zeros(4)
        self._quat_err = np.zeros(4)
        self._eye6 = np.eye(6)
        self._eye3 = np.eye(3)
        # The tool orientation at home; ee_axis_angle picks the quaternion sign on its side.
        self._home_tool_quat = self.fk(self.home)[1]

    def _require_id(self, obj: mujoco.mjtObj, name: str, kind: str) -> int:
        index = mujoco.mj_name2id(self.model, obj, self.prefix + name)
        if index < 0:
            raise KeyError(
                f"{type(self).__name__}: the model has no {kind} named {self.prefix + name!r}. {self.build_hint}"
            )
        return index

    # -- state ---------------------------------------------------------------------------------------

    @property
    def q(self) -> np.ndarray:
        """(n,) joint positions, radians (a copy)."""
        return self.data.qpos[self.qpos_index].copy()

    @property
    def qvel(self) -> np.ndarray:
        """(n,) joint velocities, rad/s (a copy)."""
        return self.data.qvel[self.dof_index].copy()

    def ee_pose(self) -> tuple[np.ndarray, np.ndarray]:
        """Tool-centre-point pose in the world frame: ``(pos (3,), quat (4,) wxyz)``.

        Read from ``data``'s last kinematics pass: exact after ``mj_forward``; after ``mj_step`` it is the
        pose before that step's integration (one physics step old), as for any MuJoCo site.
        """
        quat = np.empty(4)
        mujoco.mju_mat2Quat(quat, self.data.site_xmat[self.site_id])
        return self.data.site_xpos[self.site_id].copy(), quat

    def ee_axis_angle(self) -> np.ndarray:
        """(3,) tool orientation as an axis-angle vector (axis · angle, angle in [0, 2π)), continuous near home.

        A top-down tool is a rotation of about π, where the usual angle ≤ π convention flips the vector's
        sign under tiny wrist motions (a jump of 2π in the observation). Of q and -q (the same rotation)
        we take the one on the home orientation's side, so the vector is continuous over the workspace and,
        as robosuite's ``quat2axisangle`` of a continuous quaternion (LIBERO's ``ee_ori``), its angle may
        exceed π.
        """
        _, quat = self.ee_pose()
        if float(np.dot(quat, self._home_tool_quat)) < 0.0:
            quat = -quat
        sin_half = float(np.linalg.norm(quat[1:]))
        if sin_half < 1e-12:
            return np.zeros(3)
        return quat[1:] / sin_half * (2.0 * math.atan2(sin_half, quat[0]))

    # -- kinematics ----------------------------------------------------------------------------------

    def fk(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Tool pose ``(pos (3,), quat (4,) wxyz)`` at joint positions ``q`` (n,), computed on scratch data."""
        self._kinematics(np.asarray(q, dtype=np.float64), jacobian=False)
        mujoco.mju_mat2Quat(self._quat, self._scratch.site_xmat[self.site_id])
        return self._scratch.site_xpos[self.site_id].copy(), self._quat.copy()

    def _kinematics(self, q: np.ndarray | None, jacobian: bool = True) -> np.ndarray:
        """Scratch kinematics at ``q`` (the simulation's current state if None); returns q (n,)."""
        scratch = self._scratch
        scratch.qpos[:] = self.data.qpos  # the whole scene: the arm's base may ride on another body
        if q is not None:
            scratch.qpos[self.qpos_index] = q
        mujoco.mj_kinematics(self.model, scratch)
        if jacobian:
            mujoco.mj_comPos(self.model, scratch)  # cdof and subtree CoMs, which mj_jacSite needs
            mujoco.mj_jacSite(self.model, scratch, self._jacp, self._jacr, self.site_id)
            self._jac[:3] = self._jacp[:, self.dof_index]
            self._jac[3:] = self._jacr[:, self.dof_index]
        return scratch.qpos[self.qpos_index].copy()

    def _pose_error(self, target_pos: np.ndarray, target_quat: np.ndarray | None) -> np.ndarray:
        """(6,) [position error, world-frame rotation vector taking the current to the target orientation]."""
        err = self._err
        np.subtract(target_pos, self._scratch.site_xpos[self.site_id], out=err[:3])
        if target_quat is None:
            err[3:] = 0.0
            return err
        mujoco.mju_mat2Quat(self._quat, self._scratch.site_xmat[self.site_id])
        mujoco.mju_negQuat(self._quat_inv, self._quat)
        mujoco.mju_mulQuat(self._quat_err, target_quat, self._quat_inv)
        mujoco.mju_quat2Vel(err[3:], self._quat_err, 1.0)  # angle wrapped to (-π, π]
        return err

    def _dls_step(
        self,
        q: np.ndarray,
        err: np.ndarray,
        position_only: bool,
        damping: float,
        nullspace_gain: float,
        max_joint_step: float,
    ) -> np.ndarray:
        """One damped-least-squares step from ``q`` (n,) for task error ``err`` (6,), with ``self._jac`` at q.

        dq = Jᵀ(JJᵀ + λ²I)⁻¹ e + (I - J⁺J)·k(q_home - q), scaled so no joint moves more than
        ``max_joint_step``, and the result clipped to the joint limits.
        """
        jac = self._jac[:3] if position_only else self._jac
        e = err[:3] if position_only else err
        eye = self._eye3 if position_only else self._eye6
        pull = nullspace_gain * (self.home - q)
        dq = _dls(jac, e, pull, damping, eye)
        # Joints at a limit and pushed past it would be clipped back, and the rest of the arm would never
        # make up for them: lock them (zero their Jacobian columns) and solve once more.
        blocked = ((q <= self.q_min + 1e-6) & (dq < 0.0)) | ((q >= self.q_max - 1e-6) & (dq > 0.0))
        if blocked.any():
            jac = jac * ~blocked
            pull[blocked] = 0.0
            dq = _dls(jac, e, pull, damping, eye)
            dq[blocked] = 0.0
        largest = float(np.abs(dq).max())
        if largest > max_joint_step:
            dq *= max_joint_step / largest
        return np.clip(q + dq, self.q_min, self.q_max)

    def ik_step(
        self,
        target_pos: np.ndarray,
        target_quat: np.ndarray | None = None,
        q: np.ndarray | None = None,
        *,
        damping: float = 0.05,
        nullspace_gain: float = 0.05,
        max_joint_step: float = 0.3,
        max_pos_error: float = 0.1,
        max_rot_error: float = 0.5,
    ) -> np.ndarray:
        """One damped-least-squares IK step toward a tool pose; returns joint targets (n,) within the limits.

        Args:
            target_pos: (3,) world-frame tool-centre-point position, metres.
            target_quat: (4,) wxyz world-frame orientation; ``None`` solves for position only.
            q: (n,) joint positions to step from; ``None`` uses the simulation's current state.
            damping: λ of (JJᵀ + λ²I); larger is steadier near singularities but slower to converge.
            nullspace_gain: fraction of (home - q) pulled in the Jacobian's null space each step (keeps
                the redundant elbow near the home posture).
            max_joint_step: no joint moves more than this (radians) in one step; the step is scaled, not clipped
                per joint, so its direction is kept.
            max_pos_error: position error larger than this (m) is shortened to it (a bounded, straight step).
            max_rot_error: rotation error larger than this (rad) is shortened to it.
        """
        if target_quat is not None:
            target_quat = np.asarray(target_quat, dtype=np.float64)
        q = self._kinematics(q)
        err = self._pose_error(np.asarray(target_pos, dtype=np.float64), target_quat)
        _clip_norm(err[:3], max_pos_error)
        _clip_norm(err[3:], max_rot_error)
        return self._dls_step(q, err, target_quat is None, damping, nullspace_gain, max_joint_step)

    def ik_solve(
        self,
        target_pos: np.ndarray,
        target_quat: np.ndarray | None = None,
        q_init: np.ndarray | None = None,
        *,
        pos_tol: float = 5e-4,
        rot_tol: float = 5e-3,
        max_iters: int = 100,
        restarts: int = 10,
        seed: int = 0,
        damping: float = 0.02,
        nullspace_gain: float = 0.01,
        max_joint_step: float = 0.5,
    ) -> IKResult:
        """Iterate :meth:`ik_step` to convergence on scratch data (the simulation is not touched).

        Starts from ``q_init`` (default: the current joint positions); if that does not converge within
        ``max_iters``, restarts from up to ``restarts`` random in-limit configurations (drawn from a
        generator seeded with ``seed``, so the answer is deterministic) and returns the best attempt.
        """
        target_pos = np.asarray(target_pos, dtype=np.float64)
        if target_pos.shape != (3,):
            raise ValueError(f"ik_solve: target_pos must have shape (3,), got {target_pos.shape}.")
        if target_quat is not None:
            target_quat = np.asarray(target_quat, dtype=np.float64)
            if target_quat.shape != (4,):
                raise ValueError(f"ik_solve: target_quat must have shape (4,) wxyz, got {target_quat.shape}.")
        position_only = target_quat is None
        rng = np.random.default_rng(seed)
        best: IKResult | None = None
        total = 0
        for attempt in range(restarts + 1):
            if attempt == 0:
                q = self.q if q_init is None else np.asarray(q_init, dtype=np.float64)
            else:
                q = rng.uniform(self.q_min, self.q_max)
            q = np.clip(q, self.q_min, self.q_max)
            for iteration in range(max_iters + 1):
                self._kinematics(q)
                err = self._pose_error(target_pos, target_quat)
                pos_error = float(np.linalg.norm(err[:3]))
                rot_error = float(np.linalg.norm(err[3:]))
                if (pos_error <= pos_tol and rot_error <= rot_tol) or iteration == max_iters:
                    break
                total += 1
                _clip_norm(err[:3], 0.2)
                _clip_norm(err[3:], 1.0)
                q = self._dls_step(q, err, position_only, damping, nullspace_gain, max_joint_step)
            success = pos_error <= pos_tol and rot_error <= rot_tol
            score = pos_error + 0.1 * rot_error
            if best is None or success or score < best.pos_error + 0.1 * best.rot_error:
                best = IKResult(q.copy(), pos_error, rot_error, success, total)
            if success:
                break
        assert best is not None, "ik_solve: at least one attempt always runs"
        return best._replace(iterations=total)

    # -- LIBERO delta end-effector control -----------------------------------------------------------

    def delta_ee_to_joint_targets(
        self,
        action: np.ndarray,
        *,
        pos_scale: float = DELTA_POS_SCALE,
        rot_scale: float = DELTA_ROT_SCALE,
        damping: float = 0.05,
        nullspace_gain: float = 0.05,
        max_joint_step: float = 0.3,
    ) -> tuple[np.ndarray, float]:
        """Map a LIBERO / robosuite ``OSC_POSE`` action to joint position targets by one IK step.

        Args:
            action: (7,) in [-1, 1] (clipped): [dx, dy, dz] · ``pos_scale`` metres and [rx, ry, rz] ·
                ``rot_scale`` radians (world-frame axis-angle) from the *current* tool pose, then the
                gripper: -1 open, +1 close.

        Returns:
            ``(q_target (n,), gripper)``: joint targets within the limits and the gripper opening fraction
            in [0, 1] (1 open), ready for :meth:`set_joint_targets`.
        """
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (7,) or not np.all(np.isfinite(action)):
            raise ValueError(f"delta_ee_to_joint_targets: action must be a finite (7,) array, got {action!r}.")
        action = np.clip(action, -1.0, 1.0)
        q = self._kinematics(None)
        # Target pose = (pos + Δp, exp(Δr) ⊗ quat) from the current pose, so the task-space error of the
        # IK step is exactly (Δp, Δr): no need to form the target and difference it again.
        err = self._err
        err[:3] = action[:3] * pos_scale
        err[3:6] = action[3:6] * rot_scale
        q_target = self._dls_step(q, err, False, damping, nullspace_gain, max_joint_step)
        return q_target, 0.5 * (1.0 - float(action[6]))


class PandaArm(SerialArm):
    """Named access, inverse kinematics and delta end-effector control for an arm built by :func:`add_panda`.

    The kinematics, IK and delta end-effector mapping are :class:`SerialArm`'s (joints :data:`ARM_JOINTS`, site
    :data:`EE_SITE`, home :data:`HOME_QPOS`); this class adds the Panda's actuators and fingers.

    Reads and writes only the arm's own entries of ``data`` (other bodies in a scene are untouched).
    Inverse kinematics runs on a private scratch :class:`mujoco.MjData`, never on ``data``.

    Args:
        model: a compiled model containing the arm.
        data: the simulation's data for ``model``.
        prefix: the prefix the arm was added with.
    """

    build_hint = "Build it with add_panda()/build_panda_model() and pass the same prefix to PandaArm."

    def __init__(self, model: mujoco.MjModel, data: mujoco.MjData, prefix: str = "") -> None:
        super().__init__(model, data, ARM_JOINTS, EE_SITE, HOME_QPOS, prefix)
        finger_ids = np.array([self._require_id(mujoco.mjtObj.mjOBJ_JOINT, n, "joint") for n in FINGER_JOINTS])
        self.finger_qpos_index = model.jnt_qposadr[finger_ids]
        self.finger_dof_index = model.jnt_dofadr[finger_ids]
        self.actuator_index = _as_slice(
            np.array([self._require_id(mujoco.mjtObj.mjOBJ_ACTUATOR, n, "actuator") for n in ARM_ACTUATORS])
        )
        self.gripper_actuator = self._require_id(mujoco.mjtObj.mjOBJ_ACTUATOR, GRIPPER_ACTUATOR, "actuator")
        if not (np.allclose(self.q_min, Q_MIN, atol=1e-6) and np.allclose(self.q_max, Q_MAX, atol=1e-6)):
            raise ValueError(
                f"PandaArm: the model's joint limits {np.round(self.q_min, 4).tolist()} … "
                f"{np.round(self.q_max, 4).tolist()} are not the Panda's {Q_MIN.tolist()} … {Q_MAX.tolist()} rad. "
                "The scene was probably compiled in degrees: pass spec= to add_panda, or set "
                "spec.compiler.degree = False."
            )
        self.finger_max = float(model.jnt_range[finger_ids[0], 1])

    # -- state ---------------------------------------------------------------------------------------

    def gripper_width(self) -> float:
        """Distance between the finger pads, metres (0 … 0.08)."""
        return float(self.data.qpos[self.finger_qpos_index].sum())

    # -- commands ------------------------------------------------------------------------------------

    def set_joint_targets(
        self, q: np.ndarray, gripper: float | None = None, *, gripper_width: float | None = None
    ) -> None:
        """Write joint position targets (clipped to the limits) and, optionally, a gripper target.

        Args:
            q: (7,) joint targets, radians.
            gripper: opening fraction in [0, 1] (0 closed, 1 fully open); ``None`` keeps the current target.
            gripper_width: alternatively the jaw opening in metres (0 … 0.08).
        """
        q = np.asarray(q, dtype=np.float64)
        if q.shape != (7,):
            raise ValueError(f"set_joint_targets: q must have shape (7,), got {q.shape}.")
        self.data.ctrl[self.actuator_index] = np.clip(q, self.q_min, self.q_max)
        if gripper is not None and gripper_width is not None:
            raise ValueError("set_joint_targets: give gripper (fraction) or gripper_width (metres), not both.")
        if gripper is not None:
            self.data.ctrl[self.gripper_actuator] = float(np.clip(gripper, 0.0, 1.0)) * self.finger_max
        elif gripper_width is not None:
            self.data.ctrl[self.gripper_actuator] = float(np.clip(gripper_width / 2.0, 0.0, self.finger_max))

    def reset(self, qpos: np.ndarray | None = None, gripper: float = 1.0) -> None:
        """Put the arm at ``qpos`` (default :data:`HOME_QPOS`) at rest, targets there, and run ``mj_forward``.

        Args:
            qpos: (7,) joint positions, radians; must be within the limits.
            gripper: opening fraction in [0, 1] to start with (fingers placed there and commanded there).
        """
        q = self.home if qpos is None else np.asarray(qpos, dtype=np.float64)
        if q.shape != (7,):
            raise ValueError(f"reset: qpos must have shape (7,), got {q.shape}.")
        if np.any(q < self.q_min - 1e-9) or np.any(q > self.q_max + 1e-9):
            raise ValueError(f"reset: qpos {np.round(q, 4).tolist()} is outside the joint limits.")
        opening = float(np.clip(gripper, 0.0, 1.0)) * self.finger_max
        self.data.qpos[self.qpos_index] = q
        self.data.qvel[self.dof_index] = 0.0
        self.data.qpos[self.finger_qpos_index] = opening
        self.data.qvel[self.finger_dof_index] = 0.0
        self.set_joint_targets(q, gripper)
        mujoco.mj_forward(self.model, self.data)

    def apply_delta_ee(self, action: np.ndarray, **kwargs: float) -> None:
        """:meth:`delta_ee_to_joint_targets` followed by :meth:`set_joint_targets` (one control step's command)."""
        q_target, gripper = self.delta_ee_to_joint_targets(action, **kwargs)
        self.set_joint_targets(q_target, gripper)


def _dls(jac: np.ndarray, err: np.ndarray, pull: np.ndarray, damping: float, eye: np.ndarray) -> np.ndarray:
    """(n,) dq = J⁺e + (I - J⁺J)·pull with the damped pseudo-inverse J⁺ = Jᵀ(JJᵀ + λ²I)⁻¹; J is (m, n)."""
    gram = jac @ jac.T + (damping * damping) * eye
    # One solve for both the task step and the null-space projection: columns e and J·pull.
    sol = np.linalg.solve(gram, np.stack([err, jac @ pull], axis=1))  # (m, 2)
    return jac.T @ (sol[:, 0] - sol[:, 1]) + pull


def _clip_norm(vector: np.ndarray, limit: float) -> None:
    """Shorten ``vector`` in place to length ``limit`` if it is longer."""
    norm = float(np.linalg.norm(vector))
    if norm > limit:
        vector *= limit / norm
