"""The arm model on the deployment side: joint states → the policy's ``state``, and action chunks → joint targets.

Both directions run on a kinematic model of the robot's arm from :mod:`real_robot.arms` (the tabletop's Panda by
default, or a UR5e) whose base sits where the policy's world frame puts it (by default
:data:`envs.tabletop.scene.ARM_BASE_POS`, where the tabletop scene puts the Panda). They use that arm's
:class:`envs.tabletop.robot.SerialArm` — the simulator's own FK, ``ee_axis_angle`` and one-step IK
``delta_ee_to_joint_targets`` — so positions are in the frame the policy was trained in and, on the Panda, the
assembled ``state`` is exactly the simulator's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import mujoco
import numpy as np

from envs.tabletop.scene import ARM_BASE_POS
from real_robot.arms import ArmSpec, get_arm

ACTION_MODES: tuple[str, ...] = ("joint", "delta_ee")
STATE_DIM = 8  # tool position (3, m), tool axis-angle (3), two finger joints (2, m)


@dataclass(frozen=True)
class JointTarget:
    """One control step's command before it goes on the wire.

    Attributes:
        positions: (n,) arm joint position targets, rad (n = the arm's joint count: 7 Panda, 6 UR5e).
        gripper: opening fraction in [0, 1] (1 open), or ``None`` to leave the gripper as it is.
    """

    positions: np.ndarray
    gripper: float | None = None


def gripper_fraction(action_entry: float) -> float:
    """The policy's gripper entry (-1 open … +1 close, as the env's) → opening fraction in [0, 1] (1 open)."""
    return 0.5 * (1.0 - float(np.clip(action_entry, -1.0, 1.0)))


def check_action_mode(arm: str, action_mode: str) -> None:
    """Refuse an action mode the arm cannot execute.

    ``joint`` actions are the tabletop Panda's 7 joint targets: they mean nothing on another arm, so only
    ``delta_ee`` policies (tool-frame deltas, mapped through the arm's own IK) run elsewhere.

    Raises:
        ValueError: naming the arm, the action mode and what is allowed.
    """
    if action_mode not in ACTION_MODES:
        raise ValueError(f"action_mode must be one of {ACTION_MODES}, got {action_mode!r}.")
    spec = get_arm(arm)
    if action_mode == "joint" and not spec.joint_actions:
        raise ValueError(
            f"Arm {arm!r} cannot run a policy with action_mode='joint': its actions are the tabletop Panda's joint "
            f"targets. Deploy a policy trained with env.action_mode=delta_ee (tool-frame deltas, mapped through the "
            f"{arm} model's IK), or use robot.arm=panda."
        )


class ArmKinematics:
    """The robot's arm model for deployment: FK for observations, IK for delta end-effector actions.

    Args:
        base_pos: (3,) position of the arm's base in the policy's world frame, m (the tabletop scene's by default).
        joint_names: the *robot's* names of the arm's n joints in the model's order (default: the model's own;
            e.g. ``panda_joint1`` … on a real Panda, ``shoulder_pan_joint`` … on a UR).
        finger_names: the robot's names of the gripper joints (the Panda's two fingers, m, 0 … 0.04 each; the
            Robotiq 2F-85's ``finger_joint``, rad, 0 … 0.8 closed) (default: the model's own).
        base_frame: the ``frame_id`` of the arm's base on the robot (poses sent to it are relative to the base;
            the base is not rotated in the policy's world frame) (default: the arm's usual one).
        arm: which model, a key of :data:`real_robot.arms.ARMS` (``panda``, ``ur5e``).
        tool_offset: flange → tool centre point, m, for arms with a configurable tool (the UR5e; ``None``: the
            arm's default).
    """

    def __init__(
        self,
        base_pos: Sequence[float] = ARM_BASE_POS,
        joint_names: Sequence[str] | None = None,
        finger_names: Sequence[str] | None = None,
        base_frame: str | None = None,
        *,
        arm: str = "panda",
        tool_offset: float | None = None,
    ) -> None:
        self.spec: ArmSpec = get_arm(arm)
        joint_names = self.spec.joints if joint_names is None else tuple(joint_names)
        finger_names = self.spec.gripper_joints if finger_names is None else tuple(finger_names)
        if len(joint_names) != self.spec.n_joints or len(finger_names) != len(self.spec.gripper_joints):
            raise ValueError(
                f"ArmKinematics({arm}): need {self.spec.n_joints} arm joint names and {len(self.spec.gripper_joints)} "
                f"gripper joint name(s) (the model's {list(self.spec.joints)} and {list(self.spec.gripper_joints)}), "
                f"got {list(joint_names)} and {list(finger_names)}."
            )
        self.base_pos = np.array(base_pos, dtype=np.float64)
        self.base_frame = self.spec.base_frame if base_frame is None else base_frame
        self.model = self.spec.build(tuple(float(x) for x in base_pos), tool_offset).compile()
        self.data = mujoco.MjData(self.model)
        self.arm = self.spec.make_arm(self.model, self.data)
        gripper_ids = [mujoco.mj_name2id(self.model, mujoco.mjtObj.mjOBJ_JOINT, n) for n in self.spec.gripper_joints]
        self.gripper_qpos_index = self.model.jnt_qposadr[gripper_ids]
        self.joint_names = tuple(joint_names)
        self.finger_names = tuple(finger_names)

    @property
    def arm_name(self) -> str:
        """The registry name of the arm model (``panda``, ``ur5e``)."""
        return self.spec.name

    @property
    def n_joints(self) -> int:
        """n, the arm's joint count (7 Panda, 6 UR5e)."""
        return self.spec.n_joints

    def set_configuration(self, q: np.ndarray, fingers: np.ndarray | None = None) -> None:
        """Put the model at arm joints ``q`` (n,) rad and gripper joints ``fingers`` (as the robot reports them,
        one per finger name); runs kinematics."""
        self.data.qpos[self.arm.qpos_index] = q
        if fingers is not None:
            self.data.qpos[self.gripper_qpos_index] = fingers
        mujoco.mj_kinematics(self.model, self.data)

    def state(self, q: np.ndarray, fingers: np.ndarray) -> np.ndarray:
        """The policy's ``state`` (8,) float32 at arm joints ``q`` (n,) rad and gripper joints ``fingers``: as
        TabletopEnv's (tool position, m; tool axis-angle; two finger openings, m, 0 … 0.04)."""
        self.set_configuration(q, fingers)
        state = np.empty(STATE_DIM, np.float32)
        state[:3] = self.data.site_xpos[self.arm.site_id]
        state[3:6] = self.arm.ee_axis_angle()
        state[6:] = self.spec.finger_state(self.data.qpos[self.gripper_qpos_index])
        return state

    def tool_position(self, q: np.ndarray) -> np.ndarray:
        """(3,) tool-centre-point position at ``q`` (n,), m, world frame (FK on scratch data)."""
        return self.arm.fk(np.asarray(q, dtype=np.float64))[0]

    def split_joint_state(self, names: Sequence[str], positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(q (n,), fingers (len(finger_names),))`` from a joint state, after checking names and order.

        The arm joints must come first and in the model's order (a driver that reorders joints would send
        targets to the wrong motors); the finger joints may be anywhere after them.

        Raises:
            ValueError: naming the expected and the received joint names.
        """
        names = tuple(names)
        positions = np.asarray(positions, dtype=np.float64)
        n = self.n_joints
        if names[:n] != self.joint_names or any(f not in names[n:] for f in self.finger_names):
            raise ValueError(
                f"Joint state names/order mismatch: expected {list(self.joint_names)} first, in that order, then "
                f"{list(self.finger_names)}; received {list(names)}. Set joint_names/finger_names to the robot's "
                "names, or fix the driver's joint order."
            )
        if positions.shape != (len(names),):
            raise ValueError(f"Joint state has {len(names)} names but positions of shape {positions.shape}.")
        fingers = np.array([positions[names.index(f)] for f in self.finger_names])
        return positions[:n].copy(), fingers


class ActionAdapter:
    """The policy's actions (env units) → :class:`JointTarget` for the arm.

    Args:
        kinematics: the arm model.
        action_mode: ``"joint"`` (8-D: 7 absolute joint targets in rad, then the gripper entry; the Panda only) or
            ``"delta_ee"`` (7-D LIBERO ``OSC_POSE``: ±0.05 m, ±0.5 rad per step, then the gripper entry; any arm),
            as the checkpoint's ``metadata["env_kwargs"]["action_mode"]``.

    Raises:
        ValueError: an unknown action mode, or ``joint`` on an arm other than the Panda.
    """

    def __init__(self, kinematics: ArmKinematics, action_mode: str) -> None:
        check_action_mode(kinematics.arm_name, action_mode)
        self.kinematics = kinematics
        self.action_mode = action_mode
        # joint: the (Panda's) n joint targets + the gripper entry; delta_ee: LIBERO's 7-D OSC_POSE on any arm.
        self.action_dim = kinematics.n_joints + 1 if action_mode == "joint" else 7

    def step(self, action: np.ndarray, q: np.ndarray) -> JointTarget:
        """One action (A,) → joint target, from arm joints ``q`` (n,) rad (used by ``delta_ee`` only).

        Non-finite actions pass through as non-finite targets: the safety layer rejects them (and counts it);
        IK is never run on them.
        """
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (self.action_dim,):
            raise ValueError(
                f"ActionAdapter({self.action_mode}): expected an action of shape ({self.action_dim},), "
                f"got {action.shape}."
            )
        if not np.all(np.isfinite(action)):
            return JointTarget(np.full(self.kinematics.n_joints, np.nan), None)
        if self.action_mode == "joint":
            return JointTarget(action[:-1].copy(), gripper_fraction(action[-1]))
        # Delta end effector: the env's own mapping (one DLS IK step from q), not a second implementation.
        self.kinematics.set_configuration(q)
        q_target, gripper = self.kinematics.arm.delta_ee_to_joint_targets(action)
        return JointTarget(q_target, gripper)

    def chunk(self, actions: np.ndarray, q: np.ndarray) -> list[JointTarget]:
        """A chunk (H, A) → H joint targets. ``delta_ee`` steps chain: step k starts from target k-1 (open loop),
        which is what a whole trajectory needs; streaming instead calls :meth:`step` with the measured ``q``."""
        targets = []
        for action in np.asarray(actions, dtype=np.float64):
            target = self.step(action, q)
            if np.all(np.isfinite(target.positions)):
                q = target.positions
            targets.append(target)
        return targets
