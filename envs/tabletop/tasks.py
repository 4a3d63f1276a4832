"""Tabletop tasks as data: objects, an instruction, an initial-layout sampler and a success predicate.

Success predicates are composed from small relations evaluated on named body positions and joint positions
(``on(a, b)``, ``in_(a, container)``, ``lifted(a, h)``, ``near(a, b, d)``, ``open_(drawer, d)``; combine
with ``&``, ``|`` and ``~``), so a new task is a new :class:`TaskSpec` value in :data:`TASKS`, not a new env
class.

Tasks come in four suites along LIBERO's axes (:data:`SUITES`, :func:`tasks_in_suite`):

- ``spatial``: the same objects (two identical cubes, a plate, a bowl) in different layouts; the cube to
  move is named by a spatial relation ("the cube on the left", "the cube next to the bowl"),
- ``object``: the same basket, different objects to put in it (a can, a block, a cube); and ``LiftCube``,
- ``goal``: the same scene (a cube, a plate, a bowl, a drawer), different goals (put the cube in the bowl,
  push it to the plate, open or close the drawer); and ``PickCubeOntoPlate`` (cube and plate only),
- ``long``: two stages in one episode (both cubes on the plate, the can and the cube in the basket, the cube
  in the bowl and the drawer closed).

The scripted experts (``envs.tabletop.expert``) follow each task's ``plan`` of skills.

Each task's 50 fixed evaluation init states ship with the package as
``envs/tabletop/init_states/<Task>.npz`` (as LIBERO's ``.init`` files), generated once from the task's
``eval_seed`` by ``python -m envs.tabletop.tasks --write-init-states``; a test checks the files still
equal what the seeds give. Training init states are drawn from the env's generator.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Protocol

import numpy as np

from envs.tabletop.robot import HOME_QPOS
from envs.tabletop.scene import AGENTVIEW_POS, ObjectSpec

NUM_EVAL_INIT_STATES = 50
SUITES = ("spatial", "object", "goal", "long")
INIT_STATES_DIR = Path(__file__).parent / "init_states"


class SceneQuery(Protocol):
    """What relations read: positions of named bodies, joint positions, the objects' shapes, the table height."""

    table_height: float

    def position(self, name: str) -> np.ndarray:
        """(3,) world position of body ``name``."""
        ...

    def joint_position(self, name: str) -> float:
        """Position of the 1-DoF joint ``name`` (metres for a slide, e.g. a drawer's opening)."""
        ...

    def object_spec(self, name: str) -> ObjectSpec:
        """The :class:`ObjectSpec` of object ``name``."""
        ...


# ---------------------------------------------------------------------------------------------------
# Relations
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Relation:
    """A named boolean predicate on a scene; ``a & b``, ``a | b`` and ``~a`` compose relations."""

    fn: Callable[[SceneQuery], bool]
    description: str

    def __call__(self, scene: SceneQuery) -> bool:
        return bool(self.fn(scene))

    def __and__(self, other: Relation) -> Relation:
        return Relation(lambda s: self(s) and other(s), f"({self.description} and {other.description})")

    def __or__(self, other: Relation) -> Relation:
        return Relation(lambda s: self(s) or other(s), f"({self.description} or {other.description})")

    def __invert__(self) -> Relation:
        return Relation(lambda s: not self(s), f"not {self.description}")


def on(a: str, b: str, z_tol: float = 0.01) -> Relation:
    """``a`` rests on ``b``: a's centre is over b's top face and a's bottom is within ``z_tol`` m of it.

    Uses the objects' upright half-heights, so a toppled ``a`` does not count as placed.
    """

    def holds(scene: SceneQuery) -> bool:
        pos_a, pos_b = scene.position(a), scene.position(b)
        spec_a, spec_b = scene.object_spec(a), scene.object_spec(b)
        if math.hypot(pos_a[0] - pos_b[0], pos_a[1] - pos_b[1]) > spec_b.footprint_radius:
            return False
        gap = (pos_a[2] - spec_a.half_height) - (pos_b[2] + spec_b.half_height)
        return abs(gap) <= z_tol

    return Relation(holds, f"on({a}, {b})")


def lifted(a: str, height: float) -> Relation:
    """The bottom of ``a`` (upright) is at least ``height`` m above the table."""

    def holds(scene: SceneQuery) -> bool:
        return scene.position(a)[2] - scene.object_spec(a).half_height - scene.table_height >= height

    return Relation(holds, f"lifted({a}, {height})")


def in_(a: str, container: str) -> Relation:
    """``a`` rests inside the bowl-like ``container``: its centre is within the container's inner radius
    (horizontally) and between the container's floor and its rim plus half of ``a``'s height.

    A toppled ``a`` still counts (a can lying in a basket is in it); ``a`` held above the rim does not.
    """

    def holds(scene: SceneQuery) -> bool:
        pos_a, pos_c = scene.position(a), scene.position(container)
        spec_a, spec_c = scene.object_spec(a), scene.object_spec(container)
        if math.hypot(pos_a[0] - pos_c[0], pos_a[1] - pos_c[1]) > spec_c.inner_radius:
            return False
        bottom_c = pos_c[2] - spec_c.half_height
        floor, rim = bottom_c + spec_c.floor_height, pos_c[2] + spec_c.half_height
        return floor <= pos_a[2] <= rim + 0.5 * spec_a.half_height

    return Relation(holds, f"in({a}, {container})")


def open_(drawer: str, min_opening: float) -> Relation:
    """The drawer ``drawer`` is pulled out at least ``min_opening`` m (its joint ``<drawer>_slide``).

    ``~open_(drawer, d)`` says it is closed to within ``d``.
    """

    def holds(scene: SceneQuery) -> bool:
        return scene.joint_position(f"{drawer}_slide") >= min_opening

    return Relation(holds, f"open({drawer}, {min_opening})")


def near(a: str, b: str, dist: float) -> Relation:
    """The centres of ``a`` and ``b`` are within ``dist`` m of each other."""

    def holds(scene: SceneQuery) -> bool:
        return float(np.linalg.norm(scene.position(a) - scene.position(b))) <= dist

    return Relation(holds, f"near({a}, {b}, {dist})")


# ---------------------------------------------------------------------------------------------------
# Initial layouts
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Region:
    """Where an object's centre may start on the table (world x, y in metres) and its yaw range (rad)."""

    x: tuple[float, float]
    y: tuple[float, float]
    yaw: tuple[float, float] = (-math.pi, math.pi)


SEQUENTIAL_TRIES = 100  # draws of one object in sample_layout(sequential=True) before the layout starts over
Pose = tuple[float, float, float]  # x, y (m, world) and yaw (rad) of an object resting on the table


@dataclass(frozen=True)
class Layout:
    """One initial state: the arm's joint positions, each object's (x, y, yaw) resting on the table, and the
    positions of the objects' own joints (a drawer's opening, metres) by joint name."""

    arm_qpos: np.ndarray  # (7,) radians
    object_poses: Mapping[str, Pose]
    joint_positions: Mapping[str, float] = field(default_factory=dict)


def sample_layout(
    rng: np.random.Generator,
    regions: Mapping[str, Region],
    min_separation: float,
    arm_noise: float = 0.02,
    max_tries: int = 1000,
    *,
    radii: Mapping[str, float] | None = None,
    constraint: Callable[[Mapping[str, Pose]], bool] | None = None,
    joints: Mapping[str, tuple[float, float]] | None = None,
    sequential: bool = False,
) -> Layout:
    """Draw object poses uniformly in their regions, rejecting layouts whose objects are too close.

    The arm starts at :data:`HOME_QPOS` plus uniform joint noise of ±``arm_noise`` rad (as LIBERO's init
    states). Deterministic given ``rng``'s state.

    Args:
        rng: the generator every draw comes from.
        regions: object name -> where its centre may start.
        min_separation: centres closer than this (m) are rejected.
        arm_noise: half-width of the uniform joint noise, radians.
        max_tries: rejected draws (of a whole layout; with ``sequential`` also of each object) before giving up.
        radii: object name -> clearance radius (m); two objects must also be at least the sum of their radii
            apart (large objects such as a drawer's cabinet need more room than ``min_separation``).
        constraint: an extra test on the drawn poses (e.g. "cube_a is left of cube_b"); draws failing it are
            rejected.
        joints: joint name -> (low, high) range its position is drawn from, after the poses.
        sequential: place the objects one at a time, largest radius first, redrawing only the one that does
            not fit beside those already placed (up to ``SEQUENTIAL_TRIES`` times): far fewer draws than
            redrawing whole layouts when large objects crowd the table, and nearly (not exactly) uniform over
            the valid layouts. Off: every draw is a whole layout.
    """
    arm_qpos = HOME_QPOS + rng.uniform(-arm_noise, arm_noise, size=HOME_QPOS.shape)
    names = list(regions)
    radius = np.array([(radii or {}).get(name, 0.0) for name in names])
    # Pairwise required distance; the diagonal is never binding.
    required = np.maximum(min_separation, radius[:, None] + radius[None]) - np.eye(len(names)) * 1e9

    def draw(region: Region) -> Pose:
        return float(rng.uniform(*region.x)), float(rng.uniform(*region.y)), float(rng.uniform(*region.yaw))

    for _ in range(max_tries):
        if sequential:
            placed: dict[int, Pose] = {}
            for i in np.argsort(-radius, kind="stable"):  # the largest objects first, while there is room
                for _ in range(SEQUENTIAL_TRIES):
                    pose = draw(regions[names[i]])
                    if all(math.dist(pose[:2], other[:2]) >= required[i, j] for j, other in placed.items()):
                        placed[int(i)] = pose
                        break
                else:
                    break  # this object found no room beside the others: start the layout over
            poses = {names[i]: placed[i] for i in sorted(placed)}
            fits = len(poses) == len(regions)
        else:
            poses = {name: draw(region) for name, region in regions.items()}
            xy = np.array([pose[:2] for pose in poses.values()])
            gaps = np.linalg.norm(xy[:, None] - xy[None], axis=-1) + np.eye(len(xy)) * 1e9
            fits = gaps.min() >= min_separation and bool(np.all(gaps >= required))
        if fits and (constraint is None or constraint(poses)):
            joint_positions = {name: float(rng.uniform(*bounds)) for name, bounds in (joints or {}).items()}
            return Layout(arm_qpos, poses, joint_positions)
    raise RuntimeError(
        f"sample_layout: no layout with min_separation={min_separation} m found in {max_tries} tries; "
        "enlarge the regions or lower min_separation."
    )


# ---------------------------------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------------------------------

# Shaping: named, non-positive distance terms (metres) given the scene and the tool position (3,).
Shaping = Callable[[SceneQuery, np.ndarray], dict[str, float]]

SKILLS = ("pick_place", "push", "open_drawer", "close_drawer")


@dataclass(frozen=True)
class Step:
    """One step of a task's scripted-expert plan (``envs.tabletop.expert`` turns it into a skill).

    Args:
        skill: ``"pick_place"`` (pick ``obj``; put it on or, for a bowl, in ``target``; ``target=None``
            lifts and holds it), ``"push"`` (push ``obj`` along the table toward ``target``),
            ``"open_drawer"`` or ``"close_drawer"`` (``obj`` is the drawer).
        obj: the object the skill acts on.
        target: where ``pick_place`` puts ``obj`` / toward which ``push`` pushes it.
        offset: (2,) world x, y offset (m) of the placement from ``target``'s centre (two cubes on one plate).
        within: ``push`` stops once ``obj``'s centre is this close (m) to ``target``'s.
    """

    skill: str
    obj: str
    target: str | None = None
    offset: tuple[float, float] = (0.0, 0.0)
    within: float = 0.0

    def __post_init__(self) -> None:
        if self.skill not in SKILLS:
            raise ValueError(f"Step: skill must be one of {SKILLS}, got {self.skill!r}.")
        if self.skill == "push" and (self.target is None or self.within <= 0.0):
            raise ValueError(f"Step: a push needs a target and within > 0 m, got {self.target!r}, {self.within}.")


@dataclass(frozen=True)
class TaskSpec:
    """A language-conditioned tabletop task.

    Args:
        name: CamelCase name; the env id is ``robo_rlft/Tabletop-<name>-v0``.
        instruction: the language instruction given to the policy.
        objects: the task objects in the scene (their order is the order of ``object_state``).
        sample_init: draws a training :class:`Layout` from a generator.
        success: the success predicate.
        horizon: control steps (20 Hz) before truncation.
        eval_seed: seed of the generator that drew the fixed evaluation layouts.
        suite: one of :data:`SUITES`.
        shaping: dense reward terms (used only when the env's ``reward_shaping`` is on).
        plan: the scripted expert's steps (``envs.tabletop.expert.expert_for``).
    """

    name: str
    instruction: str
    objects: tuple[ObjectSpec, ...]
    sample_init: Callable[[np.random.Generator], Layout]
    success: Relation
    horizon: int
    eval_seed: int
    suite: str
    shaping: Shaping | None = field(default=None)
    plan: tuple[Step, ...] = ()

    def __post_init__(self) -> None:
        if self.suite not in SUITES:
            raise ValueError(f"TaskSpec {self.name!r}: suite must be one of {SUITES}, got {self.suite!r}.")
        if self.horizon < 1:
            raise ValueError(f"TaskSpec {self.name!r}: horizon must be >= 1 control step, got {self.horizon}.")
        names = [obj.name for obj in self.objects]
        if len(set(names)) != len(names):
            raise ValueError(f"TaskSpec {self.name!r}: object names must be unique, got {names}.")
        kinds = {obj.name: obj.kind for obj in self.objects}
        for step in self.plan:
            for name in (step.obj, step.target):
                if name is not None and name not in names:
                    raise ValueError(f"TaskSpec {self.name!r}: plan step {step} names {name!r}, not in {names}.")
            if (step.skill in ("open_drawer", "close_drawer")) != (kinds[step.obj] == "drawer"):
                raise ValueError(
                    f"TaskSpec {self.name!r}: plan step {step} acts on a {kinds[step.obj]}; open_drawer and "
                    "close_drawer take a drawer, the other skills a free object."
                )

    def object_spec(self, name: str) -> ObjectSpec:
        for obj in self.objects:
            if obj.name == name:
                return obj
        raise KeyError(f"Task {self.name!r} has no object {name!r}; its objects are {[o.name for o in self.objects]}.")

    @property
    def joint_names(self) -> tuple[str, ...]:
        """The objects' own joints (drawer slides), in ``object_state`` order."""
        return tuple(joint for obj in self.objects for joint in obj.joint_names)


# -- objects ----------------------------------------------------------------------------------------

RED = (0.85, 0.1, 0.1, 1.0)
RED_CUBE = ObjectSpec("cube", "box", (0.02, 0.02, 0.02), rgba=RED)
PLATE = ObjectSpec("plate", "plate", (0.08, 0.006), rgba=(0.92, 0.92, 0.88, 1.0))
BOWL = ObjectSpec("bowl", "bowl", (0.08, 0.02), rgba=(0.25, 0.45, 0.9, 1.0))
BASKET = ObjectSpec("basket", "bowl", (0.1, 0.03), rgba=(0.75, 0.6, 0.35, 1.0))
CAN = ObjectSpec("can", "cylinder", (0.025, 0.05), rgba=(0.85, 0.75, 0.15, 1.0), rolling_friction=0.002)
BLOCK = ObjectSpec("block", "box", (0.016, 0.03, 0.025), rgba=(0.15, 0.65, 0.25, 1.0))
DRAWER = ObjectSpec("drawer", "drawer", (0.09, 0.1, 0.06), rgba=(0.82, 0.82, 0.86, 1.0))
# Two cubes that look alike: the spatial suite names the one to move by where it is.
CUBE_A = ObjectSpec("cube_a", "box", (0.02, 0.02, 0.02), rgba=RED)
CUBE_B = ObjectSpec("cube_b", "box", (0.02, 0.02, 0.02), rgba=RED)

# -- regions ----------------------------------------------------------------------------------------

# In front of the arm (base at x = -0.55): 0.35 … 0.65 m out, ±0.2 m sideways, all reachable top-down.
WORKSPACE = Region(x=(-0.2, 0.1), y=(-0.2, 0.2))
# Beside a drawer on the arm's left (+y): the rest of the table, within 0.7 m of the arm's base.
BESIDE_DRAWER = Region(x=(-0.2, 0.08), y=(-0.27, 0.07))
# The cabinet faces the arm (yaw 0: its drawer pulls out toward -x); on the left, so that nothing the
# camera must see stands behind it and its open drawer stays clear of the other objects.
DRAWER_REGION = Region(x=(0.0, 0.06), y=(0.27, 0.31), yaw=(0.0, 0.0))
# Clearance radii (m) for sample_layout: footprint plus room for the open fingers (0.03) around a grasp.
RADII = {
    **dict.fromkeys(("cube", "cube_a", "cube_b", "can", "block"), 0.06),
    "plate": 0.09,
    "bowl": 0.1,
    "basket": 0.115,
    "drawer": 0.17,  # the cabinet, its handle and the room to pull the drawer out
}
LIFT_HEIGHT = 0.1
DRAWER_OPEN = 0.08  # m: "open" means pulled out at least this far (of DRAWER.drawer_travel = 0.144 m)
DRAWER_CLOSED = 0.01  # m: "closed" means pushed in to within this
PUSH_WITHIN = 0.13  # m between centres: a cube this close to the plate's centre is 3 cm from its rim


def _pick_cube_onto_plate_init(rng: np.random.Generator) -> Layout:
    # Plate radius 0.08 + cube half-diagonal 0.03 + a margin for the open fingers.
    return sample_layout(rng, {"cube": WORKSPACE, "plate": WORKSPACE}, min_separation=0.15)


def _lift_cube_init(rng: np.random.Generator) -> Layout:
    return sample_layout(rng, {"cube": WORKSPACE}, min_separation=0.0)


Constraint = Callable[[Mapping[str, Pose]], bool]


def unoccluded(objects: Sequence[ObjectSpec], margin: float = 0.03, min_angular_radius: float = 0.03) -> Constraint:
    """A layout constraint: every object is seen whole, and not too small, by the agent-view camera
    (:data:`AGENTVIEW_POS`).

    Seen from above the camera, each object covers a bearing interval of half-width ``radius / distance``
    (its angular radius, at least ``min_angular_radius`` rad: a 4 cm cube then spans >= 15 px of a 96 px
    image). Object T hides part of a farther object O when their intervals overlap (give or take ``margin``
    rad) and O stands within the "shadow" of T's top, i.e. the sight line over T comes down to the table only
    past O's near side. Conservative: a far object passing it is seen whole.
    """
    specs = {obj.name: obj for obj in objects}
    cam_x, cam_y, cam_h = AGENTVIEW_POS

    def holds(poses: Mapping[str, Pose]) -> bool:
        polar = {
            name: (math.hypot(x - cam_x, y - cam_y), math.atan2(y - cam_y, x - cam_x))
            for name, (x, y, _) in poses.items()
        }
        if any(specs[name].bounding_radius < min_angular_radius * d for name, (d, _) in polar.items()):
            return False
        for near_name, (d_near, bearing_near) in polar.items():
            near = specs[near_name]
            for far_name, (d_far, bearing_far) in polar.items():
                if far_name == near_name or d_far <= d_near:
                    continue
                far = specs[far_name]
                apart = abs((bearing_near - bearing_far + math.pi) % (2.0 * math.pi) - math.pi)
                if apart > near.bounding_radius / d_near + far.bounding_radius / d_far + margin:
                    continue
                # Distance at which the sight line over the near object's far top edge comes down to the table:
                # the far object is (partly) hidden if its near side starts before that.
                drop = cam_h / (cam_h - 2.0 * near.half_height)
                if d_far - far.bounding_radius < (d_near + near.bounding_radius) * drop:
                    return False
        return True

    return holds


def _all_of(*constraints: Constraint | None) -> Constraint:
    """A constraint that holds when every given one does (``None`` entries are skipped)."""
    active = [c for c in constraints if c is not None]
    return lambda poses: all(c(poses) for c in active)


def _layout_sampler(
    objects: Sequence[ObjectSpec],
    regions: Mapping[str, Region],
    constraint: Constraint | None = None,
    joints: Mapping[str, tuple[float, float]] | None = None,
) -> Callable[[np.random.Generator], Layout]:
    """A ``sample_init`` that places ``objects`` in ``regions`` with the :data:`RADII` clearances, every one
    visible from the agent-view camera (:func:`unoccluded`) and meeting ``constraint``."""
    if set(regions) != {obj.name for obj in objects}:
        raise ValueError(f"_layout_sampler: regions {sorted(regions)} must name exactly the objects {objects}.")
    full_constraint = _all_of(constraint, unoccluded(objects))  # the task's own (cheaper, stricter) test first

    def sample(rng: np.random.Generator) -> Layout:
        return sample_layout(
            rng,
            regions,
            min_separation=0.0,
            radii=RADII,
            constraint=full_constraint,
            joints=joints,
            max_tries=10_000,
            sequential=True,
        )

    return sample


def _left_of(a: str, b: str, margin: float = 0.08) -> Constraint:
    """``a`` is at least ``margin`` m further to the arm's left (+y) than ``b``."""
    return lambda poses: poses[a][1] >= poses[b][1] + margin


def _next_to(a: str, other: str, landmark: str, within: float = 0.2, margin: float = 0.1) -> Constraint:
    """``a`` is within ``within`` m of ``landmark`` and ``other`` at least ``margin`` m further from it."""

    def holds(poses: Mapping[str, Pose]) -> bool:
        da = math.dist(poses[a][:2], poses[landmark][:2])
        return da <= within and math.dist(poses[other][:2], poses[landmark][:2]) >= da + margin

    return holds


def _clear_push(obj: str, target: str, within: float, lane: float = 0.12, run_up: float = 0.08) -> Constraint:
    """``obj`` starts more than ``within`` + 5 cm from ``target``, and the lane along which it is pushed (from
    ``run_up`` m behind it, where the fingers start, to ``target``) is ``lane`` m clear of every other object."""

    def holds(poses: Mapping[str, Pose]) -> bool:
        start, goal = np.array(poses[obj][:2]), np.array(poses[target][:2])
        length = float(np.linalg.norm(goal - start))
        if length < within + 0.05:
            return False
        direction = (goal - start) / length
        behind = start - run_up * direction
        for name, pose in poses.items():
            if name in (obj, target):
                continue
            # Distance from the other object's centre to the segment behind -> goal.
            rel = np.array(pose[:2]) - behind
            along = float(np.clip(rel @ direction, 0.0, length + run_up))
            if float(np.linalg.norm(rel - along * direction)) < lane + RADII.get(name, 0.0) - 0.06:
                return False
        return True

    return holds


# -- shaping ----------------------------------------------------------------------------------------


def _place_goal(scene: SceneQuery, obj: str, target: str) -> np.ndarray:
    """(3,) where ``obj``'s centre rests when placed on ``target`` (or, for a bowl, on its floor)."""
    goal = scene.position(target).copy()
    spec_t = scene.object_spec(target)
    top = -spec_t.half_height + spec_t.floor_height if spec_t.kind == "bowl" else spec_t.half_height
    goal[2] += top + scene.object_spec(obj).half_height
    return goal


def _pick_place_shaping(obj: str, target: str) -> Shaping:
    def terms(scene: SceneQuery, ee_pos: np.ndarray) -> dict[str, float]:
        pos = scene.position(obj)
        return {
            "reach": -float(np.linalg.norm(ee_pos - pos)),
            "place": -float(np.linalg.norm(pos - _place_goal(scene, obj, target))),
        }

    return terms


def _lift_shaping(obj: str, height: float) -> Shaping:
    def terms(scene: SceneQuery, ee_pos: np.ndarray) -> dict[str, float]:
        pos = scene.position(obj)
        lift = pos[2] - scene.object_spec(obj).half_height - scene.table_height
        return {"reach": -float(np.linalg.norm(ee_pos - pos)), "lift": -max(0.0, height - float(lift))}

    return terms


def _drawer_shaping(drawer: str, goal_opening: float) -> Shaping:
    """Reach the handle; move the opening toward ``goal_opening`` (only the shortfall past it counts)."""
    opening_sign = 1.0 if goal_opening > 0.0 else -1.0

    def terms(scene: SceneQuery, ee_pos: np.ndarray) -> dict[str, float]:
        handle = scene.position(f"{drawer}_handle")
        shortfall = opening_sign * (goal_opening - scene.joint_position(f"{drawer}_slide"))
        return {"reach": -float(np.linalg.norm(ee_pos - handle)), "drawer": -max(0.0, shortfall)}

    return terms


def _push_shaping(obj: str, target: str, within: float) -> Shaping:
    """Reach the object; bring it within ``within`` m of the target (only the shortfall counts)."""

    def terms(scene: SceneQuery, ee_pos: np.ndarray) -> dict[str, float]:
        pos = scene.position(obj)
        distance = float(np.linalg.norm(pos[:2] - scene.position(target)[:2]))
        return {"reach": -float(np.linalg.norm(ee_pos - pos)), "push": -max(0.0, distance - within)}

    return terms


def _staged_shaping(*stages: tuple[Relation, Shaping]) -> Shaping:
    """Shaping of a multi-stage task: stage i's terms (named ``<term>_<i>``) count until its relation holds,
    then they are 0, so a finished stage stops pulling the tool back to it."""

    def terms(scene: SceneQuery, ee_pos: np.ndarray) -> dict[str, float]:
        out: dict[str, float] = {}
        for i, (done, shaping) in enumerate(stages, start=1):
            stage_terms = shaping(scene, ee_pos)
            finished = done(scene)
            out |= {f"{term}_{i}": 0.0 if finished else value for term, value in stage_terms.items()}
        return out

    return terms


# -- task factories ---------------------------------------------------------------------------------


def _placement(obj: str, target: str, objects: Sequence[ObjectSpec]) -> Relation:
    """``in_`` for a bowl-like target, ``on`` otherwise."""
    kind = next(o.kind for o in objects if o.name == target)
    return in_(obj, target) if kind == "bowl" else on(obj, target)


def _pick_place_task(
    name: str,
    instruction: str,
    objects: tuple[ObjectSpec, ...],
    obj: str,
    target: str,
    sample_init: Callable[[np.random.Generator], Layout],
    eval_seed: int,
    suite: str,
    horizon: int = 300,
) -> TaskSpec:
    """A one-stage task: put ``obj`` on / in ``target``."""
    return TaskSpec(
        name=name,
        instruction=instruction,
        objects=objects,
        sample_init=sample_init,
        success=_placement(obj, target, objects),
        horizon=horizon,
        eval_seed=eval_seed,
        suite=suite,
        shaping=_pick_place_shaping(obj, target),
        plan=(Step("pick_place", obj, target),),
    )


SPATIAL_OBJECTS = (CUBE_A, CUBE_B, PLATE, BOWL)
SPATIAL_REGIONS = {name: WORKSPACE for name in ("cube_a", "cube_b", "plate", "bowl")}
OBJECT_OBJECTS = (CAN, BLOCK, RED_CUBE, BASKET)
OBJECT_REGIONS = {name: WORKSPACE for name in ("can", "block", "cube", "basket")}
GOAL_OBJECTS = (RED_CUBE, PLATE, BOWL, DRAWER)
GOAL_REGIONS = {"cube": BESIDE_DRAWER, "plate": BESIDE_DRAWER, "bowl": BESIDE_DRAWER, "drawer": DRAWER_REGION}
DRAWER_CLOSED_INIT = {"drawer_slide": (0.0, 0.0)}
DRAWER_OPEN_INIT = {"drawer_slide": (0.1, DRAWER.drawer_travel)}
PUT_IN_BOWL_AND_CLOSE = in_("cube", "bowl")
DRAWER_IS_CLOSED = ~open_("drawer", DRAWER_CLOSED)

_TASK_LIST: tuple[TaskSpec, ...] = (
    # -- spatial: same objects, the cube to move named by where it is --------------------------------
    _pick_place_task(
        "PutLeftCubeOnPlate",
        "put the cube on the left on the plate",
        SPATIAL_OBJECTS,
        "cube_a",
        "plate",
        _layout_sampler(SPATIAL_OBJECTS, SPATIAL_REGIONS, _left_of("cube_a", "cube_b")),
        eval_seed=2001,
        suite="spatial",
    ),
    _pick_place_task(
        "PutRightCubeInBowl",
        "put the cube on the right in the bowl",
        SPATIAL_OBJECTS,
        "cube_a",
        "bowl",
        _layout_sampler(SPATIAL_OBJECTS, SPATIAL_REGIONS, _left_of("cube_b", "cube_a")),
        eval_seed=2002,
        suite="spatial",
    ),
    _pick_place_task(
        "PutCubeNextToBowlOnPlate",
        "put the cube next to the bowl on the plate",
        SPATIAL_OBJECTS,
        "cube_a",
        "plate",
        _layout_sampler(SPATIAL_OBJECTS, SPATIAL_REGIONS, _next_to("cube_a", "cube_b", "bowl")),
        eval_seed=2003,
        suite="spatial",
    ),
    _pick_place_task(
        "PutCubeNextToPlateInBowl",
        "put the cube next to the plate in the bowl",
        SPATIAL_OBJECTS,
        "cube_a",
        "bowl",
        _layout_sampler(SPATIAL_OBJECTS, SPATIAL_REGIONS, _next_to("cube_a", "cube_b", "plate")),
        eval_seed=2004,
        suite="spatial",
    ),
    # -- object: the same basket, different objects -------------------------------------------------
    TaskSpec(
        name="LiftCube",
        instruction="lift the red cube",
        objects=(RED_CUBE,),
        sample_init=_lift_cube_init,
        success=lifted("cube", LIFT_HEIGHT),
        horizon=150,
        eval_seed=1002,
        suite="object",
        shaping=_lift_shaping("cube", LIFT_HEIGHT),
        plan=(Step("pick_place", "cube", None),),
    ),
    _pick_place_task(
        "PutCanInBasket",
        "put the can in the basket",
        OBJECT_OBJECTS,
        "can",
        "basket",
        _layout_sampler(OBJECT_OBJECTS, OBJECT_REGIONS),
        eval_seed=3001,
        suite="object",
    ),
    _pick_place_task(
        "PutBlockInBasket",
        "put the green block in the basket",
        OBJECT_OBJECTS,
        "block",
        "basket",
        _layout_sampler(OBJECT_OBJECTS, OBJECT_REGIONS),
        eval_seed=3002,
        suite="object",
    ),
    _pick_place_task(
        "PutCubeInBasket",
        "put the red cube in the basket",
        OBJECT_OBJECTS,
        "cube",
        "basket",
        _layout_sampler(OBJECT_OBJECTS, OBJECT_REGIONS),
        eval_seed=3003,
        suite="object",
    ),
    # -- goal: the same scene, different goals -------------------------------------------------------
    TaskSpec(
        name="PickCubeOntoPlate",
        instruction="put the red cube on the plate",
        objects=(RED_CUBE, PLATE),
        sample_init=_pick_cube_onto_plate_init,
        success=on("cube", "plate"),
        horizon=300,
        eval_seed=1001,
        suite="goal",
        shaping=_pick_place_shaping("cube", "plate"),
        plan=(Step("pick_place", "cube", "plate"),),
    ),
    _pick_place_task(
        "PutCubeInBowl",
        "put the red cube in the bowl",
        GOAL_OBJECTS,
        "cube",
        "bowl",
        _layout_sampler(GOAL_OBJECTS, GOAL_REGIONS, joints=DRAWER_CLOSED_INIT),
        eval_seed=4001,
        suite="goal",
    ),
    TaskSpec(
        name="PushCubeToPlate",
        instruction="push the red cube to the plate",
        objects=GOAL_OBJECTS,
        sample_init=_layout_sampler(
            GOAL_OBJECTS, GOAL_REGIONS, _clear_push("cube", "plate", PUSH_WITHIN), joints=DRAWER_CLOSED_INIT
        ),
        # Pushed, not carried: the cube stays on the table.
        success=near("cube", "plate", PUSH_WITHIN) & ~lifted("cube", 0.01),
        horizon=300,
        eval_seed=4004,
        suite="goal",
        shaping=_push_shaping("cube", "plate", PUSH_WITHIN),
        plan=(Step("push", "cube", "plate", within=PUSH_WITHIN),),
    ),
    TaskSpec(
        name="OpenDrawer",
        instruction="open the drawer",
        objects=GOAL_OBJECTS,
        sample_init=_layout_sampler(GOAL_OBJECTS, GOAL_REGIONS, joints=DRAWER_CLOSED_INIT),
        success=open_("drawer", DRAWER_OPEN),
        horizon=200,
        eval_seed=4002,
        suite="goal",
        shaping=_drawer_shaping("drawer", DRAWER_OPEN),
        plan=(Step("open_drawer", "drawer"),),
    ),
    TaskSpec(
        name="CloseDrawer",
        instruction="close the drawer",
        objects=GOAL_OBJECTS,
        sample_init=_layout_sampler(GOAL_OBJECTS, GOAL_REGIONS, joints=DRAWER_OPEN_INIT),
        success=DRAWER_IS_CLOSED,
        horizon=200,
        eval_seed=4003,
        suite="goal",
        shaping=_drawer_shaping("drawer", -DRAWER_CLOSED),
        plan=(Step("close_drawer", "drawer"),),
    ),
    # -- long: two stages ----------------------------------------------------------------------------
    TaskSpec(
        name="PutBothCubesOnPlate",
        instruction="put both cubes on the plate",
        objects=(CUBE_A, CUBE_B, PLATE),
        sample_init=_layout_sampler(
            (CUBE_A, CUBE_B, PLATE), {name: WORKSPACE for name in ("cube_a", "cube_b", "plate")}
        ),
        success=on("cube_a", "plate") & on("cube_b", "plate"),
        horizon=600,
        eval_seed=5001,
        suite="long",
        shaping=_staged_shaping(
            (on("cube_a", "plate"), _pick_place_shaping("cube_a", "plate")),
            (on("cube_b", "plate"), _pick_place_shaping("cube_b", "plate")),
        ),
        # Side by side on the plate (radius 0.08): 0.04 m either side of its centre, along x, so the jaws
        # (across the offset) keep their home direction.
        plan=(Step("pick_place", "cube_a", "plate", (0.04, 0.0)), Step("pick_place", "cube_b", "plate", (-0.04, 0.0))),
    ),
    TaskSpec(
        name="PutCanAndCubeInBasket",
        instruction="put the can and the red cube in the basket",
        objects=OBJECT_OBJECTS,
        sample_init=_layout_sampler(OBJECT_OBJECTS, OBJECT_REGIONS),
        success=in_("can", "basket") & in_("cube", "basket"),
        horizon=600,
        eval_seed=5002,
        suite="long",
        shaping=_staged_shaping(
            (in_("can", "basket"), _pick_place_shaping("can", "basket")),
            (in_("cube", "basket"), _pick_place_shaping("cube", "basket")),
        ),
        plan=(Step("pick_place", "can", "basket", (0.04, 0.0)), Step("pick_place", "cube", "basket", (-0.04, 0.0))),
    ),
    TaskSpec(
        name="PutCubeInBowlAndCloseDrawer",
        instruction="put the red cube in the bowl and close the drawer",
        objects=GOAL_OBJECTS,
        sample_init=_layout_sampler(GOAL_OBJECTS, GOAL_REGIONS, joints=DRAWER_OPEN_INIT),
        success=in_("cube", "bowl") & DRAWER_IS_CLOSED,
        horizon=500,
        eval_seed=5003,
        suite="long",
        shaping=_staged_shaping(
            (in_("cube", "bowl"), _pick_place_shaping("cube", "bowl")),
            (DRAWER_IS_CLOSED, _drawer_shaping("drawer", -DRAWER_CLOSED)),
        ),
        plan=(Step("pick_place", "cube", "bowl"), Step("close_drawer", "drawer")),
    ),
)

TASKS: dict[str, TaskSpec] = {task.name: task for task in _TASK_LIST}


def get_task(task: str | TaskSpec) -> TaskSpec:
    """A task by name (or the :class:`TaskSpec` itself)."""
    if isinstance(task, TaskSpec):
        return task
    if task not in TASKS:
        raise ValueError(f"Unknown tabletop task {task!r}. Allowed: {sorted(TASKS)}.")
    return TASKS[task]


def tasks_in_suite(suite: str) -> tuple[TaskSpec, ...]:
    """The tasks of one suite (``spatial``, ``object``, ``goal`` or ``long``), in :data:`TASKS` order."""
    if suite not in SUITES:
        raise ValueError(f"tasks_in_suite: suite must be one of {SUITES}, got {suite!r}.")
    return tuple(task for task in TASKS.values() if task.suite == suite)


# ---------------------------------------------------------------------------------------------------
# Fixed evaluation init states (shipped as .npz files)
# ---------------------------------------------------------------------------------------------------


def draw_eval_layouts(task: str | TaskSpec) -> tuple[Layout, ...]:
    """The task's :data:`NUM_EVAL_INIT_STATES` evaluation layouts drawn afresh from its ``eval_seed``."""
    spec = get_task(task)
    rng = np.random.default_rng(spec.eval_seed)
    return tuple(spec.sample_init(rng) for _ in range(NUM_EVAL_INIT_STATES))


def init_states_path(task: str | TaskSpec) -> Path:
    """Where a registered task's fixed init states are stored: ``envs/tabletop/init_states/<Task>.npz``."""
    return INIT_STATES_DIR / f"{get_task(task).name}.npz"


def layouts_to_arrays(task: TaskSpec, layouts: Sequence[Layout]) -> dict[str, np.ndarray]:
    """Layouts as plain arrays (no pickle): ``arm_qpos`` (N, 7) rad, ``object_poses`` (N, n_objects, 3) as
    x, y (m), yaw (rad) in ``task.objects`` order, ``joint_qpos`` (N, n_joints) in ``task.joint_names``
    order, and the names ``object_names`` (n_objects,) and ``joint_names`` (n_joints,)."""
    objects = [obj.name for obj in task.objects]
    joints = list(task.joint_names)
    return {
        "arm_qpos": np.array([layout.arm_qpos for layout in layouts], dtype=np.float64),
        "object_poses": np.array(
            [[layout.object_poses[name] for name in objects] for layout in layouts], dtype=np.float64
        ).reshape(len(layouts), len(objects), 3),
        "joint_qpos": np.array(
            [[layout.joint_positions.get(name, 0.0) for name in joints] for layout in layouts], dtype=np.float64
        ).reshape(len(layouts), len(joints)),
        "object_names": np.array(objects, dtype=str),
        "joint_names": np.array(joints, dtype=str),
    }


def layouts_from_arrays(task: TaskSpec, arrays: Mapping[str, np.ndarray]) -> tuple[Layout, ...]:
    """Inverse of :func:`layouts_to_arrays`; checks the names match ``task``'s objects and joints."""
    objects, joints = [obj.name for obj in task.objects], list(task.joint_names)
    if list(arrays["object_names"]) != objects or list(arrays["joint_names"]) != joints:
        raise ValueError(
            f"Init states of {task.name!r} are for objects {list(arrays['object_names'])} and joints "
            f"{list(arrays['joint_names'])}, but the task has {objects} and {joints}; regenerate them with "
            "`python -m envs.tabletop.tasks --write-init-states`."
        )
    return tuple(
        Layout(
            np.array(arm_qpos),
            {name: (float(x), float(y), float(yaw)) for name, (x, y, yaw) in zip(objects, poses, strict=True)},
            {name: float(q) for name, q in zip(joints, joint_qpos, strict=True)},
        )
        for arm_qpos, poses, joint_qpos in zip(
            arrays["arm_qpos"], arrays["object_poses"], arrays["joint_qpos"], strict=True
        )
    )


@cache
def _load_eval_layouts(name: str) -> tuple[Layout, ...]:
    task = TASKS[name]
    path = init_states_path(task)
    if not path.exists():
        raise FileNotFoundError(
            f"No fixed init states for task {name!r} at {path}; generate them with "
            "`python -m envs.tabletop.tasks --write-init-states`."
        )
    with np.load(path, allow_pickle=False) as arrays:
        layouts = layouts_from_arrays(task, arrays)
    if len(layouts) != NUM_EVAL_INIT_STATES:
        raise ValueError(f"{path} holds {len(layouts)} init states, expected {NUM_EVAL_INIT_STATES}.")
    return layouts


def eval_layouts(task: str | TaskSpec) -> tuple[Layout, ...]:
    """The task's :data:`NUM_EVAL_INIT_STATES` fixed evaluation layouts.

    A registered task's come from its shipped file (:func:`init_states_path`); any other :class:`TaskSpec`'s
    are drawn from its ``eval_seed`` (deterministic).
    """
    spec = get_task(task)
    if TASKS.get(spec.name) is spec:
        return _load_eval_layouts(spec.name)
    return draw_eval_layouts(spec)


def write_init_states(names: Sequence[str] | None = None) -> list[Path]:
    """Draw every (or each named) registered task's evaluation layouts from its seed and save them."""
    INIT_STATES_DIR.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names or list(TASKS):
        task = get_task(name)
        path = init_states_path(task)
        np.savez(path, **layouts_to_arrays(task, draw_eval_layouts(task)))
        paths.append(path)
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Tabletop tasks: write the fixed evaluation init states.")
    parser.add_argument(
        "--write-init-states", action="store_true", help="(re)generate envs/tabletop/init_states/<Task>.npz"
    )
    parser.add_argument("--tasks", nargs="*", default=None, help="only these tasks (default: all)")
    args = parser.parse_args(argv)
    if not args.write_init_states:
        parser.error("nothing to do: pass --write-init-states")
    for path in write_init_states(args.tasks):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
