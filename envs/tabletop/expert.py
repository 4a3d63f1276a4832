"""Scripted waypoint experts that produce demonstrations in the env's own action space.

The expert is privileged: it reads object poses from the simulation by name (not from the policy's
observation). Each control step it turns the current waypoint into LIBERO's delta end-effector action
(a saturated proportional step toward the waypoint pose, which the env's one-step IK then tracks), or,
for ``action_mode="joint"``, into joint targets by one IK step toward the same waypoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mujoco
import numpy as np

from envs.tabletop.env import TabletopEnv
from envs.tabletop.robot import DELTA_POS_SCALE, DELTA_ROT_SCALE, HOME_QPOS

OPEN, CLOSE = -1.0, 1.0


@dataclass(frozen=True)
class _Phase:
    name: str
    gripper: float  # action entry: -1 open, +1 close
    tol: float  # metres; the phase ends once the tool is this close to its target (after min_steps)
    min_steps: int  # control steps to stay in the phase at least (gripper closing/opening)
    max_steps: int  # control steps before moving on regardless
    noisy: bool = True  # whether ``noise`` applies (not while the jaws close or open on the object)


_PICK = (
    _Phase("above_object", OPEN, 0.008, 0, 60),
    _Phase("descend", OPEN, 0.006, 0, 40),
    _Phase("close", CLOSE, math.inf, 8, 8, noisy=False),
    _Phase("lift", CLOSE, 0.015, 0, 40),
)
_PLACE = (
    _Phase("above_target", CLOSE, 0.01, 0, 60),
    _Phase("lower", CLOSE, 0.006, 0, 40),
    _Phase("open", OPEN, math.inf, 6, 6, noisy=False),
    _Phase("retreat", OPEN, 0.0, 0, 10_000),
)
_HOLD = (_Phase("hold", CLOSE, 0.0, 0, 10_000),)


class PickPlaceExpert:
    """Above the object → descend → close → lift → (above the target → lower → open → retreat).

    Closed loop: the approach follows the object's current pose, and if the object is not in the jaws
    after the lift (or drops while carried) the expert opens and starts over from above the object.

    Args:
        env: the (unwrapped) tabletop env to act in.
        obj: name of the object to pick.
        target: name of the object to place it on; ``None`` only lifts and holds (``LiftCube``).
        noise: standard deviation of Gaussian noise added to the arm part of each action (in action units,
            so 0.1 is 5 mm / 0.05 rad per step), except while the jaws close or open; then clipped to the
            action space. 0 gives the clean demonstration.
        seed: seed of the expert's own noise generator (the env's ``np_random`` is never touched).
        lift_height: how high (m) above the object's resting centre the tool carries it.
    """

    def __init__(
        self,
        env: TabletopEnv,
        obj: str = "cube",
        target: str | None = "plate",
        noise: float = 0.0,
        seed: int | None = None,
        lift_height: float = 0.15,
    ) -> None:
        if noise < 0.0:
            raise ValueError(f"PickPlaceExpert: noise must be >= 0, got {noise}.")
        self.env = env
        self.obj = obj
        self.target = target
        self.noise = noise
        self.lift_height = lift_height
        self.rng = np.random.default_rng(seed)
        self._phases = _PICK + (_PLACE if target is not None else _HOLD)
        self._home_quat = env.arm.fk(HOME_QPOS)[1]
        home_mat = np.empty(9)
        mujoco.mju_quat2Mat(home_mat, self._home_quat)
        self._finger_yaw = math.atan2(home_mat[4], home_mat[1])  # world yaw of the hand's y (jaw) axis
        self._obj_id = env.model.body(obj).id
        self._phase = -1
        self._phase_steps = 0
        self._hold_pos = np.zeros(3)
        self._grasp_quat = self._home_quat.copy()

    @property
    def phase(self) -> str:
        return self._phases[self._phase].name if self._phase >= 0 else "not reset"

    def reset(self) -> None:
        """Start a new episode (call after ``env.reset``)."""
        self._enter(0)

    def _enter(self, phase: int) -> None:
        self._phase = phase
        self._phase_steps = 0
        name = self._phases[phase].name
        if name == "above_object":
            # Turn the hand about world z so the jaws close on two opposite faces: the smallest turn that
            # brings the jaw axis to a multiple of 90 degrees from the object's yaw.
            quat = self.env.data.xquat[self._obj_id]
            obj_yaw = 2.0 * math.atan2(quat[3], quat[0])
            turn = (obj_yaw - self._finger_yaw + math.pi / 4) % (math.pi / 2) - math.pi / 4
            turn_quat = np.array([math.cos(turn / 2), 0.0, 0.0, math.sin(turn / 2)])
            mujoco.mju_mulQuat(self._grasp_quat, turn_quat, self._home_quat)
        if name in ("close", "open"):
            self._hold_pos = self.env.arm.ee_pose()[0]

    def _target(self, name: str) -> np.ndarray:
        """(3,) tool target of phase ``name`` from the current scene."""
        env = self.env
        rest_z = env.table_height + env.object_spec(self.obj).half_height
        if name in ("close", "open"):
            return self._hold_pos
        if name in ("above_object", "descend", "lift", "hold"):
            pos = env.position(self.obj).copy()
            if name == "lift" or name == "hold":
                pos[:2] = self._hold_pos[:2]
            pos[2] = rest_z - 0.005 if name == "descend" else rest_z + self.lift_height
            return pos
        assert self.target is not None, "place phases exist only with a target"
        goal = env.position(self.target).copy()
        goal[2] += env.object_spec(self.target).half_height + env.object_spec(self.obj).half_height
        goal[2] += 0.01 if name == "lower" else self.lift_height
        return goal

    def _object_in_hand(self) -> bool:
        env = self.env
        lifted = env.position(self.obj)[2] - env.object_spec(self.obj).half_height - env.table_height > 0.02
        near = np.linalg.norm(env.position(self.obj) - env.arm.ee_pose()[0]) < 0.04
        return bool(lifted and near)

    def act(self) -> np.ndarray:
        """The next action in the env's action space (float32)."""
        if self._phase < 0:
            raise RuntimeError("PickPlaceExpert.act: call reset() after env.reset() first.")
        env = self.env
        ee_pos, ee_quat = env.arm.ee_pose()
        phase = self._phases[self._phase]
        done = self._phase_steps >= phase.max_steps or (
            self._phase_steps >= phase.min_steps and np.linalg.norm(self._target(phase.name) - ee_pos) <= phase.tol
        )
        if phase.name in ("above_target", "lower") and not self._object_in_hand():
            self._enter(0)  # dropped: start over
        elif done and phase.name == "lift" and not self._object_in_hand():
            self._enter(0)  # missed the grasp: start over
        elif done and self._phase < len(self._phases) - 1:
            self._enter(self._phase + 1)
        phase = self._phases[self._phase]
        self._phase_steps += 1
        target = self._target(phase.name)
        gripper = phase.gripper  # above_object is OPEN, so a retry reopens the jaws before re-approaching

        if env.action_mode == "delta_ee":
            action = np.zeros(7)
            action[:3] = (target - ee_pos) / DELTA_POS_SCALE
            rot_err = np.empty(3)
            quat_err = np.empty(4)
            ee_inv = np.empty(4)
            mujoco.mju_negQuat(ee_inv, ee_quat)
            mujoco.mju_mulQuat(quat_err, self._grasp_quat, ee_inv)
            mujoco.mju_quat2Vel(rot_err, quat_err, 1.0)
            action[3:6] = rot_err / DELTA_ROT_SCALE
            action[:6] = np.clip(action[:6], -1.0, 1.0)
            if self.noise > 0.0 and phase.noisy:
                action[:6] += self.rng.normal(0.0, self.noise, 6)
            action[6] = gripper
        else:
            q_target = env.arm.ik_step(target, self._grasp_quat, max_pos_error=DELTA_POS_SCALE)
            if self.noise > 0.0 and phase.noisy:
                q_target = q_target + self.rng.normal(0.0, self.noise * 0.05, 7)
            action = np.append(q_target, gripper)
        space = env.action_space
        return np.clip(action, space.low, space.high).astype(np.float32)


def expert_for(env: TabletopEnv, noise: float = 0.0, seed: int | None = None) -> PickPlaceExpert:
    """The scripted expert of ``env``'s task."""
    name = env.task.name
    if name == "PickCubeOntoPlate":
        return PickPlaceExpert(env, "cube", "plate", noise=noise, seed=seed)
    if name == "LiftCube":
        return PickPlaceExpert(env, "cube", None, noise=noise, seed=seed)
    raise ValueError(f"expert_for: no scripted expert for task {name!r}; available: PickCubeOntoPlate, LiftCube.")


def rollout_expert(
    env: TabletopEnv, expert: PickPlaceExpert, *, seed: int | None = None, init_state: int | None = None
) -> tuple[bool, int]:
    """Run one expert episode; returns (success, steps)."""
    options = None if init_state is None else {"init_state": init_state}
    env.reset(seed=seed, options=options)
    expert.reset()
    for step in range(1, env.max_episode_steps + 1):
        _, _, terminated, truncated, info = env.step(expert.act())
        if terminated or truncated:
            return bool(info["is_success"]), step
    return False, env.max_episode_steps
