"""Scripted experts that produce demonstrations in the env's own action space: a sequence of skills.

A task's expert follows its plan (``TaskSpec.plan``, a tuple of :class:`~envs.tabletop.tasks.Step`): each
step becomes a skill — :class:`PickPlace` (pick an object; put it on a target, in a bowl-like container, or
lift and hold it), :class:`Push` (push an object along the table toward a target) or :class:`MoveDrawer`
(hook the handle and pull a drawer open, or push it closed). A skill
is a small phase machine: each phase names a tool waypoint computed from the *current* scene (closed loop),
a gripper command and when the phase ends. :class:`SkillExpert` runs the skills in turn and turns the
current waypoint into an action.

The expert is privileged: it reads object poses from the simulation by name (not from the policy's
observation). Each control step it turns the current waypoint into LIBERO's delta end-effector action
(a saturated proportional step toward the waypoint pose, which the env's one-step IK then tracks), or,
for ``action_mode="joint"``, into joint targets by one IK step toward the same waypoint.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import mujoco
import numpy as np

from envs.tabletop.env import TabletopEnv
from envs.tabletop.robot import DELTA_POS_SCALE, DELTA_ROT_SCALE, FINGER_MAX, HOME_QPOS
from envs.tabletop.scene import DRAWER_HANDLE_HALF_SIZE
from envs.tabletop.tasks import Step

OPEN, CLOSE = -1.0, 1.0
# Half the span of the open jaws across their closing axis (pad gap 2·FINGER_MAX plus a finger's 22 mm), m.
OPEN_JAW_HALF_SPAN = FINGER_MAX + 0.025
# Horizontal tool error allowed while lowering into a container (the lower phase's tolerance, with margin), m.
PLACE_MARGIN = 0.015
# Closed fingers are this thick (m) along the hand's x axis: what hooks a drawer handle.
FINGER_HALF_THICKNESS = 0.009


@dataclass(frozen=True)
class _Phase:
    name: str
    gripper: float  # action entry: -1 open, +1 close
    tol: float  # metres; the phase ends once the tool is this close to its target (after min_steps)
    min_steps: int  # control steps to stay in the phase at least (gripper closing/opening)
    max_steps: int  # control steps before moving on regardless
    noisy: bool = True  # whether ``noise`` applies (not while the jaws close or open on the object)
    speed: float = 1.0  # largest position step as a fraction of the action's ±DELTA_POS_SCALE


def _yaw_turn(quat: np.ndarray, turn: float) -> np.ndarray:
    """(4,) wxyz: ``quat`` turned by ``turn`` radians about world z."""
    out = np.empty(4)
    mujoco.mju_mulQuat(out, np.array([math.cos(turn / 2), 0.0, 0.0, math.sin(turn / 2)]), quat)
    return out


def _yaw_of(quat: np.ndarray) -> float:
    """World yaw (rad) of a body whose orientation ``quat`` (wxyz) is a rotation about z."""
    return 2.0 * math.atan2(quat[3], quat[0])


def _wrap(angle: float, period: float) -> float:
    """``angle`` wrapped into [-period/2, period/2)."""
    return (angle + period / 2.0) % period - period / 2.0


class Skill:
    """A phase machine: waypoints from the current scene, a gripper command, and when each phase ends.

    Subclasses set ``phases`` and implement :meth:`_target` (and, for closed-loop recovery or early exits,
    :meth:`_transition`). ``turn`` sets the tool orientation the skill holds.
    """

    phases: tuple[_Phase, ...] = ()

    def __init__(self, expert: SkillExpert) -> None:
        self.expert = expert
        self.env = expert.env
        self.index = 0
        self.steps = 0
        self.turn = 0.0  # yaw (rad) of the held tool orientation relative to the home orientation
        self.hold_pos = np.zeros(3)

    @property
    def phase(self) -> _Phase:
        return self.phases[self.index]

    @property
    def quat(self) -> np.ndarray:
        """(4,) wxyz tool orientation the skill holds: the home orientation turned by ``turn`` about world z."""
        return _yaw_turn(self.expert.home_quat, self.turn)

    @property
    def jaw_yaw(self) -> float:
        """World yaw (rad) of the jaw (closing) axis at the held orientation."""
        return self.expert.finger_yaw + self.turn

    def start(self) -> None:
        self._enter(0)

    def _enter(self, index: int) -> None:
        self.index = index
        self.steps = 0
        if self.phase.name in ("close", "open", "release"):
            self.hold_pos = self.env.arm.ee_pose()[0]
        self._on_enter(self.phase.name)

    def _on_enter(self, name: str) -> None:
        """Hook for what a phase fixes when it starts (e.g. the grasp orientation)."""

    def target(self) -> np.ndarray:
        """(3,) tool target of the current phase."""
        return self._target(self.phase.name)

    def _target(self, name: str) -> np.ndarray:
        raise NotImplementedError

    def advance(self, ee_pos: np.ndarray) -> bool:
        """Move to the next phase when the current one is done; returns whether the whole skill is finished."""
        phase = self.phase
        done = self.steps >= phase.max_steps or (
            self.steps >= phase.min_steps and np.linalg.norm(self.target() - ee_pos) <= phase.tol
        )
        next_index = self._transition(phase.name, done)
        if next_index is None:
            return True
        if next_index != self.index:
            self._enter(next_index)
        self.steps += 1
        return False

    def _transition(self, name: str, done: bool) -> int | None:
        """Index of the phase to be in next (``None``: the skill is finished); by default the next phase when done."""
        if not done:
            return self.index
        return self.index + 1 if self.index + 1 < len(self.phases) else None


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
    _Phase("retreat", OPEN, 0.02, 0, 40),
)
_HOLD = (_Phase("hold", CLOSE, 0.0, 0, 10_000),)


class PickPlace(Skill):
    """Above the object → descend → close → lift → (above the target → lower → open → retreat) or hold.

    Closed loop: the approach follows the object's current pose, and if the object is not in the jaws
    after the lift (or drops while carried) the skill opens and starts over from above the object.

    On a flat target (plate) the object is lowered to 1 cm above its top face. Into a bowl-like container it
    is lowered to 1 cm above the floor when the open jaws fit inside the rim there, else released just above
    the rim. With an ``offset`` the hand first turns so its jaws open across the offset direction, away from
    whatever already stands at the container's centre.

    Args:
        expert: the expert this skill belongs to.
        obj: name of the object to pick.
        target: name of the object to put it on / in; ``None`` lifts and holds it (``LiftCube``).
        offset: (2,) world x, y offset (m) of the placement from the target's centre.
        lift_height: how high (m) above the object's resting centre the tool carries it.
    """

    def __init__(
        self,
        expert: SkillExpert,
        obj: str,
        target: str | None,
        offset: Sequence[float] = (0.0, 0.0),
        lift_height: float = 0.15,
    ) -> None:
        super().__init__(expert)
        self.obj = obj
        self.target_name = target
        self.offset = np.asarray(offset, dtype=np.float64)
        self.lift_height = lift_height
        self.phases = _PICK + (_PLACE if target is not None else _HOLD)
        self._obj_spec = self.env.object_spec(obj)
        self._obj_id = self.env.model.body(obj).id

    def _on_enter(self, name: str) -> None:
        if name == "above_object":
            self.turn = self._grasp_turn()
        elif name == "above_target" and np.any(self.offset):
            # Jaws across the offset: the open fingers then stay clear of an object at the target's centre.
            self.turn += _wrap(self._place_jaw_yaw() - self.jaw_yaw, math.pi)

    def _place_jaw_yaw(self) -> float:
        """World yaw (rad) the jaw axis should have when placing with an offset: across the offset."""
        return math.atan2(self.offset[1], self.offset[0]) + math.pi / 2

    def _grasp_turn(self) -> float:
        """Yaw turn (rad) of the hand from home that makes the jaws close on two opposite faces.

        A box is gripped across its narrow side (a square one across either pair of faces), a can from any
        side. Among the turns that grip, the one needing the least turning at the placement is taken (with an
        offset: jaws across it), so the hand barely turns while carrying; without an offset, the smallest.
        """
        spec = self._obj_spec
        # The jaw axis is the same every half turn: keep turns within ±90 degrees (the wrist's comfortable range).
        preferred = _wrap(self._place_jaw_yaw() - self.expert.finger_yaw, math.pi) if np.any(self.offset) else 0.0
        if spec.kind != "box":
            axis = self.env.data.xmat[self._obj_id].reshape(3, 3)[:, 2]
            if abs(axis[2]) < math.cos(math.pi / 4):
                # A toppled can lies on its side: close the jaws across it, perpendicular to its axis.
                return _wrap(math.atan2(axis[1], axis[0]) + math.pi / 2 - self.expert.finger_yaw, math.pi)
            return preferred
        obj_yaw = _yaw_of(self.env.data.xquat[self._obj_id])
        period = math.pi / 2 if math.isclose(spec.size[0], spec.size[1]) else math.pi
        # The grip turn nearest to the preferred one.
        return _wrap(preferred + _wrap(obj_yaw - self.expert.finger_yaw - preferred, period), math.pi)

    def _target(self, name: str) -> np.ndarray:
        env = self.env
        rest_z = env.table_height + self._obj_spec.half_height
        if name in ("close", "open"):
            return self.hold_pos
        if name in ("above_object", "descend", "lift", "hold"):
            pos = env.position(self.obj).copy()
            if name in ("lift", "hold"):
                pos[:2] = self.hold_pos[:2]
            # Grip 5 mm below the centre; a toppled can's centre is lower than its upright resting height.
            pos[2] = min(rest_z, pos[2]) - 0.005 if name == "descend" else rest_z + self.lift_height
            return pos
        assert self.target_name is not None, "place phases exist only with a target"
        goal = env.position(self.target_name).copy()
        goal[:2] += self.offset
        goal[2] += self._release_height() + self._obj_spec.half_height
        goal[2] += self.lift_height if name in ("above_target", "retreat") else 0.0
        return goal

    def _release_height(self) -> float:
        """Height (m) above the target's centre at which the object's bottom is released."""
        spec = self.env.object_spec(self.target_name)
        if spec.kind != "bowl":
            return spec.half_height + 0.01  # 1 cm above a flat target's top face
        reach = math.hypot(OPEN_JAW_HALF_SPAN, float(np.linalg.norm(self.offset))) + PLACE_MARGIN
        if reach <= spec.inner_radius:
            return -spec.half_height + spec.floor_height + 0.01  # the open jaws fit: 1 cm above the floor
        return spec.half_height + 0.005  # just above the rim, out of the way of the walls

    def _object_in_hand(self) -> bool:
        # Near the tool centre, whatever the height: lowered into a container, the object is held low.
        return bool(np.linalg.norm(self.env.position(self.obj) - self.env.arm.ee_pose()[0]) < 0.04)

    def _transition(self, name: str, done: bool) -> int | None:
        if name in ("above_target", "lower") and not self._object_in_hand():
            return 0  # dropped: start over (above_object is OPEN, so the jaws reopen on the way)
        if done and name == "lift" and not self._object_in_hand():
            return 0  # missed the grasp: start over
        if name == "hold":
            return self.index  # lift-only: hold until the episode ends
        return super()._transition(name, done)


class Push(Skill):
    """Push an object along the table toward a target with the closed fingers, then back off.

    Behind the object (seen from the target) above it → down to the table → push toward the target until
    the object is ``within`` m of it → up. The push direction is fixed when the approach starts; the fingers
    follow the object's current position along it (closed loop), and if the object slides more than
    ``MAX_OFF_LINE`` off the line the skill backs off upward and approaches it again from behind.

    Args:
        expert: the expert this skill belongs to.
        obj: the object to push.
        target: the object to push it toward.
        within: stop once ``obj``'s centre is this close (m) to ``target``'s (aim a little closer).
        clearance: how high (m) above the table the approach and the retreat go.
    """

    MAX_OFF_LINE = 0.02  # m of sideways drift from the push line before re-approaching
    BEHIND = 0.015  # m between the fingers and the object's back face at the start of the push
    FINGER_HALF_DEPTH = 0.009  # the closed fingers' half-thickness along the push direction, m

    def __init__(self, expert: SkillExpert, obj: str, target: str, within: float, clearance: float = 0.12) -> None:
        super().__init__(expert)
        self.obj = obj
        self.target_name = target
        self.within = within
        self.clearance = clearance
        self.phases = (
            _Phase("above_behind", CLOSE, 0.01, 0, 60),
            _Phase("down_behind", CLOSE, 0.006, 0, 40),
            _Phase("push", CLOSE, 0.0, 0, 150, speed=0.3),  # ≈ 0.3 m/s: the object slides, it is not struck
            _Phase("release", CLOSE, 0.02, 0, 30),
        )
        self._spec = self.env.object_spec(obj)
        self._line_start = np.zeros(2)
        self._direction = np.zeros(2)
        self._retry = False

    def _to_target(self) -> tuple[np.ndarray, float]:
        """(2,) unit direction from the object to the target, and their distance (m), in the table plane."""
        delta = self.env.position(self.target_name)[:2] - self.env.position(self.obj)[:2]
        distance = float(np.linalg.norm(delta))
        return delta / max(distance, 1e-9), distance

    def _on_enter(self, name: str) -> None:
        if name == "above_behind":
            # Fix the push line now; the fingers' wide side (the jaw axis) across it.
            self._direction, _ = self._to_target()
            self._line_start = self.env.position(self.obj)[:2].copy()
            wanted = math.atan2(self._direction[1], self._direction[0]) + math.pi / 2
            self.turn = _wrap(wanted - self.expert.finger_yaw, math.pi)

    def _target(self, name: str) -> np.ndarray:
        env = self.env
        if name == "release":
            return self.hold_pos + np.array([0.0, 0.0, self.clearance])
        pos = env.position(self.obj)
        # Half the object's extent along the push direction, at most (a box's half-diagonal, a can's radius).
        reach = self._spec.bounding_radius if self._spec.kind == "box" else self._spec.footprint_radius
        point = np.empty(3)
        back_off = reach + self.FINGER_HALF_DEPTH + (self.BEHIND if name != "push" else -0.02)
        point[:2] = pos[:2] - self._direction * back_off
        # Fingertips (13 mm below the tool centre) about a third of the way up the object.
        point[2] = env.table_height + 0.013 + 0.6 * self._spec.half_height
        if name == "above_behind":
            point[2] = env.table_height + self.clearance
        return point

    def _transition(self, name: str, done: bool) -> int | None:
        if name == "push":
            _, distance = self._to_target()
            offset = self.env.position(self.obj)[:2] - self._line_start
            off_line = abs(offset[0] * self._direction[1] - offset[1] * self._direction[0])
            if off_line > self.MAX_OFF_LINE and distance > self.within:
                self._retry = True  # slid off the line: back off upward, then approach it again from behind
                return self.index + 1
            done = done or distance <= self.within - 0.01
        if name == "release" and done and self._retry:
            self._retry = False
            return 0
        return super()._transition(name, done)


class MoveDrawer(Skill):
    """Hook a drawer's handle with the closed fingers and pull it open, or push it closed, then back off.

    The hand turns so its jaw axis runs along the handle bar (the fingers' thin side faces the pull
    direction). To open, the fingers go down between the bar and the drawer front and pull toward the arm;
    to close, they go down on the arm's side of the bar and push. The pull / push phase ends as soon as the
    drawer's opening reaches the goal (read from its slide joint), so it is closed-loop on the drawer.

    Args:
        expert: the expert this skill belongs to.
        drawer: the drawer object's name.
        goal_opening: metres of opening to reach (``> current`` pulls, ``< current`` pushes).
        clearance: how high (m) above the handle the approach and the retreat go.
    """

    def __init__(self, expert: SkillExpert, drawer: str, goal_opening: float, clearance: float = 0.1) -> None:
        super().__init__(expert)
        self.drawer = drawer
        self.goal_opening = goal_opening
        self.clearance = clearance
        self.opening = goal_opening > 0.0
        act = "pull" if self.opening else "push"
        self.phases = (
            _Phase("above_handle", CLOSE, 0.01, 0, 80),
            _Phase("to_handle", CLOSE, 0.006, 0, 40),
            _Phase(act, CLOSE, 0.005, 0, 80, speed=0.4),  # ≈ 0.4 m/s, so the handle is dragged, not struck
            _Phase("release", CLOSE, 0.02, 0, 30),
        )
        self._slide = f"{drawer}_slide"
        self._cabinet_id = self.env.model.body(drawer).id

    def _pull_dir(self) -> np.ndarray:
        """(3,) unit world direction in which the drawer opens (the cabinet's -x axis)."""
        return -self.env.data.xmat[self._cabinet_id].reshape(3, 3)[:, 0]

    def _on_enter(self, name: str) -> None:
        if name == "above_handle":
            # Jaw axis along the bar: perpendicular to the pull direction.
            pull = self._pull_dir()
            wanted = math.atan2(pull[1], pull[0]) + math.pi / 2
            self.turn = _wrap(wanted - self.expert.finger_yaw, math.pi)

    def _contact_point(self, opening: float) -> np.ndarray:
        """(3,) tool position touching the bar from the side that moves the drawer, at ``opening`` m."""
        env = self.env
        pull = self._pull_dir()
        handle = env.position(f"{self.drawer}_handle")
        current = env.joint_position(self._slide)
        bar = handle + pull * (opening - current)  # the bar's centre at that opening
        # Fingers 2 mm clear of the bar: behind it (in the gap to the drawer front, where the hand, 25 mm
        # either side of the tool, still clears the front) to pull, in front of it to push.
        offset = DRAWER_HANDLE_HALF_SIZE[0] + FINGER_HALF_THICKNESS + 0.002
        return bar - pull * offset if self.opening else bar + pull * offset

    def _target(self, name: str) -> np.ndarray:
        if name == "release":
            return self.hold_pos + np.array([0.0, 0.0, self.clearance])
        current = self.env.joint_position(self._slide)
        if name in ("above_handle", "to_handle"):
            point = self._contact_point(current)
            if name == "above_handle":
                point[2] += self.clearance
            return point
        # Aim past the goal (a pull by 2 cm more, a push 1.5 cm into the closed position): the phase ends on
        # the drawer's opening, and the servo's lag would otherwise stop it short.
        overshoot = 0.02 if self.opening else -0.015
        return self._contact_point(self.goal_opening + overshoot)

    def _transition(self, name: str, done: bool) -> int | None:
        if name in ("pull", "push"):
            current = self.env.joint_position(self._slide)
            reached = current >= self.goal_opening if self.opening else current <= self.goal_opening
            done = done or reached
        return super()._transition(name, done)


class SkillExpert:
    """Runs a sequence of skills and turns the current skill's waypoint into an action.

    Args:
        env: the (unwrapped) tabletop env to act in.
        plan: the steps, in order (``TaskSpec.plan``).
        noise: standard deviation of Gaussian noise added to the arm part of each action (in action units,
            so 0.1 is 5 mm / 0.05 rad per step), except while the jaws close or open; then clipped to the
            action space. 0 gives the clean demonstration.
        seed: seed of the expert's own noise generator (the env's ``np_random`` is never touched).
    """

    def __init__(self, env: TabletopEnv, plan: Sequence[Step], noise: float = 0.0, seed: int | None = None) -> None:
        if noise < 0.0 or not math.isfinite(noise):
            raise ValueError(f"SkillExpert: noise must be a finite value >= 0, got {noise}.")
        if not plan:
            raise ValueError(f"SkillExpert: the plan of task {env.task.name!r} is empty; give at least one Step.")
        self.env = env
        self.noise = noise
        self.rng = np.random.default_rng(seed)
        self.home_quat = env.arm.fk(HOME_QPOS)[1]
        home_mat = np.empty(9)
        mujoco.mju_quat2Mat(home_mat, self.home_quat)
        self.finger_yaw = math.atan2(home_mat[4], home_mat[1])  # world yaw of the hand's y (jaw) axis at home
        self.skills: list[Skill] = [self._make_skill(step) for step in plan]
        self._current = -1

    def _make_skill(self, step: Step) -> Skill:
        if step.skill == "pick_place":
            return PickPlace(self, step.obj, step.target, step.offset)
        if step.skill == "push":
            return Push(self, step.obj, step.target, step.within)
        # A drawer (TaskSpec checks the kind). The goals sit safely inside the tasks' open / closed thresholds.
        goal = 0.85 * self.env.object_spec(step.obj).drawer_travel if step.skill == "open_drawer" else 0.0
        return MoveDrawer(self, step.obj, goal)

    @property
    def phase(self) -> str:
        """``<skill index>:<phase name>`` of the current phase (for logs and tests)."""
        if self._current < 0:
            return "not reset"
        return f"{self._current}:{self.skills[self._current].phase.name}"

    def reset(self) -> None:
        """Start a new episode (call after ``env.reset``)."""
        self._current = 0
        self.skills[0].start()

    def act(self) -> np.ndarray:
        """The next action in the env's action space (float32)."""
        if self._current < 0:
            raise RuntimeError("SkillExpert.act: call reset() after env.reset() first.")
        env = self.env
        ee_pos, ee_quat = env.arm.ee_pose()
        skill = self.skills[self._current]
        finished = skill.advance(ee_pos)
        if finished and self._current + 1 < len(self.skills):
            self._current += 1
            skill = self.skills[self._current]
            skill.start()
            skill.advance(ee_pos)
        # A finished last skill keeps its last waypoint (hovering clear of the scene) until the episode ends.
        phase = skill.phase
        target = skill.target()

        if env.action_mode == "delta_ee":
            action = np.zeros(7)
            action[:3] = np.clip((target - ee_pos) / DELTA_POS_SCALE, -phase.speed, phase.speed)
            rot_err = np.empty(3)
            quat_err = np.empty(4)
            ee_inv = np.empty(4)
            mujoco.mju_negQuat(ee_inv, ee_quat)
            mujoco.mju_mulQuat(quat_err, skill.quat, ee_inv)
            mujoco.mju_quat2Vel(rot_err, quat_err, 1.0)
            action[3:6] = np.clip(rot_err / DELTA_ROT_SCALE, -1.0, 1.0)
            if self.noise > 0.0 and phase.noisy:
                action[:6] += self.rng.normal(0.0, self.noise, 6)
            action[6] = phase.gripper
        else:
            q_target = env.arm.ik_step(target, skill.quat, max_pos_error=DELTA_POS_SCALE * phase.speed)
            if self.noise > 0.0 and phase.noisy:
                q_target = q_target + self.rng.normal(0.0, self.noise * 0.05, 7)
            action = np.append(q_target, phase.gripper)
        space = env.action_space
        return np.clip(action, space.low, space.high).astype(np.float32)


class PickPlaceExpert(SkillExpert):
    """A one-skill :class:`SkillExpert`: pick ``obj`` and put it on / in ``target`` (``None``: lift and hold)."""

    def __init__(
        self,
        env: TabletopEnv,
        obj: str = "cube",
        target: str | None = "plate",
        noise: float = 0.0,
        seed: int | None = None,
    ) -> None:
        super().__init__(env, (Step("pick_place", obj, target),), noise=noise, seed=seed)


def expert_for(env: TabletopEnv, noise: float = 0.0, seed: int | None = None) -> SkillExpert:
    """The scripted expert of ``env``'s task, built from its plan (``TaskSpec.plan``)."""
    if not env.task.plan:
        raise ValueError(f"expert_for: task {env.task.name!r} has no plan (TaskSpec.plan) to script an expert from.")
    return SkillExpert(env, env.task.plan, noise=noise, seed=seed)


def rollout_expert(
    env: TabletopEnv, expert: SkillExpert, *, seed: int | None = None, init_state: int | None = None
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
