"""The arm model on the deployment side: joint states → the policy's ``state``, and action chunks → joint targets.

Both directions reuse :class:`envs.tabletop.robot.PandaArm` (its FK, ``ee_axis_angle`` and one-step IK
``delta_ee_to_joint_targets``) on a private model whose arm base sits where the tabletop scene puts it
(:data:`envs.tabletop.scene.ARM_BASE_POS`), so positions are in the frame the policy was trained in and the
assembled ``state`` is exactly the simulator's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import mujoco
import numpy as np

from envs.tabletop.robot import ARM_JOINTS, FINGER_JOINTS, PandaArm, add_panda
from envs.tabletop.scene import ARM_BASE_POS

ACTION_MODES: tuple[str, ...] = ("joint", "delta_ee")
STATE_DIM = 8  # tool position (3, m), tool axis-angle (3), two finger joints (2, m)


@dataclass(frozen=True)
class JointTarget:
    """One control step's command before it goes on the wire.

    Attributes:
        positions: (7,) arm joint position targets, rad.
        gripper: opening fraction in [0, 1] (1 open), or ``None`` to leave the gripper as it is.
    """

    positions: np.ndarray
    gripper: float | None = None


def gripper_fraction(action_entry: float) -> float:
    """The policy's gripper entry (-1 open … +1 close, as the env's) → opening fraction in [0, 1] (1 open)."""
    return 0.5 * (1.0 - float(np.clip(action_entry, -1.0, 1.0)))


class ArmKinematics:
    """The Panda model for deployment: FK for observations, IK for delta end-effector actions.

    Args:
        base_pos: (3,) position of the arm's base in the policy's world frame, m (the tabletop scene's by default).
        joint_names: the *robot's* names of the 7 arm joints in the model's order (``joint1`` … ``joint7``);
            e.g. ``panda_joint1`` … on a real Panda.
        finger_names: the robot's names of the two finger joints (m, 0 … 0.04 each).
        base_frame: the ``frame_id`` of the arm's base on the robot (poses sent to it are relative to the base;
            the base is not rotated in the policy's world frame).
    """

    def __init__(
        self,
        base_pos: Sequence[float] = ARM_BASE_POS,
        joint_names: Sequence[str] = ARM_JOINTS,
        finger_names: Sequence[str] = FINGER_JOINTS,
        base_frame: str = "panda_link0",
    ) -> None:
        if len(joint_names) != 7 or len(finger_names) != 2:
            raise ValueError(
                f"ArmKinematics: need 7 arm joint names and 2 finger joint names, got {list(joint_names)} "
                f"and {list(finger_names)}."
            )
        self.base_pos = np.array(base_pos, dtype=np.float64)
        self.base_frame = base_frame
        spec = mujoco.MjSpec()
        spec.modelname = "panda_deploy"
        spec.compiler.degree = False
        add_panda(spec, base_pos=tuple(float(x) for x in base_pos))
        self.model = spec.compile()
        self.data = mujoco.MjData(self.model)
        self.arm = PandaArm(self.model, self.data)
        self.joint_names = tuple(joint_names)
        self.finger_names = tuple(finger_names)

    def set_configuration(self, q: np.ndarray, fingers: np.ndarray | None = None) -> None:
        """Put the model at arm joints ``q`` (7,) rad and finger joints ``fingers`` (2,) m; runs kinematics."""
        self.data.qpos[self.arm.qpos_index] = q
        if fingers is not None:
            self.data.qpos[self.arm.finger_qpos_index] = fingers
        mujoco.mj_kinematics(self.model, self.data)

    def state(self, q: np.ndarray, fingers: np.ndarray) -> np.ndarray:
        """The policy's ``state`` (8,) float32 at arm joints ``q`` (7,) rad and fingers (2,) m: as TabletopEnv's."""
        self.set_configuration(q, fingers)
        state = np.empty(STATE_DIM, np.float32)
        state[:3] = self.data.site_xpos[self.arm.site_id]
        state[3:6] = self.arm.ee_axis_angle()
        state[6:] = self.data.qpos[self.arm.finger_qpos_index]
        return state

    def tool_position(self, q: np.ndarray) -> np.ndarray:
        """(3,) tool-centre-point position at ``q`` (7,), m, world frame (FK on scratch data)."""
        return self.arm.fk(np.asarray(q, dtype=np.float64))[0]

    def split_joint_state(self, names: Sequence[str], positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(q (7,), fingers (2,))`` from a joint state, after checking names and order.

        The arm joints must come first and in the model's order (a driver that reorders joints would send
        targets to the wrong motors); the finger joints may be anywhere after them.

        Raises:
            ValueError: naming the expected and the received joint names.
        """
        names = tuple(names)
        positions = np.asarray(positions, dtype=np.float64)
        if names[:7] != self.joint_names or any(f not in names[7:] for f in self.finger_names):
            raise ValueError(
                f"Joint state names/order mismatch: expected {list(self.joint_names)} first, in that order, then "
                f"{list(self.finger_names)}; received {list(names)}. Set joint_names/finger_names to the robot's "
                "names, or fix the driver's joint order."
            )
        if positions.shape != (len(names),):
            raise ValueError(f"Joint state has {len(names)} names but positions of shape {positions.shape}.")
        fingers = np.array([positions[names.index(f)] for f in self.finger_names])
        return positions[:7].copy(), fingers


class ActionAdapter:
    """The policy's actions (env units) → :class:`JointTarget` for the arm.

    Args:
        kinematics: the arm model.
        action_mode: ``"joint"`` (8-D: 7 absolute joint targets in rad, then the gripper entry) or ``"delta_ee"``
            (7-D LIBERO ``OSC_POSE``: ±0.05 m, ±0.5 rad per step, then the gripper entry), as the checkpoint's
            ``metadata["env_kwargs"]["action_mode"]``.
    """

    def __init__(self, kinematics: ArmKinematics, action_mode: str) -> None:
        if action_mode not in ACTION_MODES:
            raise ValueError(f"ActionAdapter: action_mode must be one of {ACTION_MODES}, got {action_mode!r}.")
        self.kinematics = kinematics
        self.action_mode = action_mode
        self.action_dim = 8 if action_mode == "joint" else 7

    def step(self, action: np.ndarray, q: np.ndarray) -> JointTarget:
        """One action (A,) → joint target, from arm joints ``q`` (7,) rad (used by ``delta_ee`` only).

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
            return JointTarget(np.full(7, np.nan), None)
        if self.action_mode == "joint":
            return JointTarget(action[:7].copy(), gripper_fraction(action[7]))
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
