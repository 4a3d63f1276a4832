"""Tabletop tasks as data: objects, an instruction, an initial-layout sampler and a success predicate.

Success predicates are composed from small relations evaluated on named body positions
(``on(a, b)``, ``lifted(a, h)``, ``near(a, b, d)``; combine with ``&``, ``|`` and ``~``), so a new task
is a new :class:`TaskSpec` value in :data:`TASKS`, not a new env class.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Protocol

import numpy as np

from envs.tabletop.robot import HOME_QPOS
from envs.tabletop.scene import ObjectSpec

NUM_EVAL_INIT_STATES = 50


class SceneQuery(Protocol):
    """What relations read: positions of named bodies, the objects' shapes and the table height."""

    table_height: float

    def position(self, name: str) -> np.ndarray:
        """(3,) world position of body ``name``."""
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


@dataclass(frozen=True)
class Layout:
    """One initial state: the arm's joint positions and each object's (x, y, yaw), resting on the table."""

    arm_qpos: np.ndarray  # (7,) radians
    object_poses: Mapping[str, tuple[float, float, float]]


def sample_layout(
    rng: np.random.Generator,
    regions: Mapping[str, Region],
    min_separation: float,
    arm_noise: float = 0.02,
    max_tries: int = 1000,
) -> Layout:
    """Draw object poses uniformly in their regions, rejecting layouts with centres closer than ``min_separation``.

    The arm starts at :data:`HOME_QPOS` plus uniform joint noise of ±``arm_noise`` rad (as LIBERO's init
    states). Deterministic given ``rng``'s state.
    """
    arm_qpos = HOME_QPOS + rng.uniform(-arm_noise, arm_noise, size=HOME_QPOS.shape)
    for _ in range(max_tries):
        poses = {
            name: (
                float(rng.uniform(*region.x)),
                float(rng.uniform(*region.y)),
                float(rng.uniform(*region.yaw)),
            )
            for name, region in regions.items()
        }
        xy = np.array([pose[:2] for pose in poses.values()])
        gaps = np.linalg.norm(xy[:, None] - xy[None], axis=-1) + np.eye(len(xy)) * 1e9
        if gaps.min() >= min_separation:
            return Layout(arm_qpos, poses)
    raise RuntimeError(
        f"sample_layout: no layout with min_separation={min_separation} m found in {max_tries} tries; "
        "enlarge the regions or lower min_separation."
    )


# ---------------------------------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------------------------------

# Shaping: named, non-positive distance terms (metres) given the scene and the tool position (3,).
Shaping = Callable[[SceneQuery, np.ndarray], dict[str, float]]


@dataclass(frozen=True)
class TaskSpec:
    """A language-conditioned tabletop task.

    Args:
        name: CamelCase name; the env id is ``robo_rlft/Tabletop-<name>-v0``.
        instruction: the language instruction given to the policy.
        objects: the free objects in the scene.
        sample_init: draws a training :class:`Layout` from a generator.
        success: the success predicate.
        horizon: control steps (20 Hz) before truncation.
        eval_seed: seed of the generator that draws the fixed evaluation layouts.
        shaping: dense reward terms (used only when the env's ``reward_shaping`` is on).
    """

    name: str
    instruction: str
    objects: tuple[ObjectSpec, ...]
    sample_init: Callable[[np.random.Generator], Layout]
    success: Relation
    horizon: int
    eval_seed: int
    shaping: Shaping | None = field(default=None)

    def object_spec(self, name: str) -> ObjectSpec:
        for obj in self.objects:
            if obj.name == name:
                return obj
        raise KeyError(f"Task {self.name!r} has no object {name!r}; its objects are {[o.name for o in self.objects]}.")


RED_CUBE = ObjectSpec("cube", "box", (0.02, 0.02, 0.02), rgba=(0.85, 0.1, 0.1, 1.0))
PLATE = ObjectSpec("plate", "plate", (0.08, 0.006), rgba=(0.92, 0.92, 0.88, 1.0))

# In front of the arm (base at x = -0.55): 0.35 … 0.65 m out, ±0.2 m sideways, all reachable top-down.
WORKSPACE = Region(x=(-0.2, 0.1), y=(-0.2, 0.2))


def _pick_place_shaping(obj: str, target: str) -> Shaping:
    def terms(scene: SceneQuery, ee_pos: np.ndarray) -> dict[str, float]:
        pos = scene.position(obj)
        goal = scene.position(target).copy()
        goal[2] += scene.object_spec(target).half_height + scene.object_spec(obj).half_height
        return {
            "reach": -float(np.linalg.norm(ee_pos - pos)),
            "place": -float(np.linalg.norm(pos - goal)),
        }

    return terms


def _lift_shaping(obj: str, height: float) -> Shaping:
    def terms(scene: SceneQuery, ee_pos: np.ndarray) -> dict[str, float]:
        pos = scene.position(obj)
        lift = pos[2] - scene.object_spec(obj).half_height - scene.table_height
        return {"reach": -float(np.linalg.norm(ee_pos - pos)), "lift": -max(0.0, height - float(lift))}

    return terms


def _pick_cube_onto_plate_init(rng: np.random.Generator) -> Layout:
    # Plate radius 0.08 + cube half-diagonal 0.03 + a margin for the open fingers.
    return sample_layout(rng, {"cube": WORKSPACE, "plate": WORKSPACE}, min_separation=0.15)


def _lift_cube_init(rng: np.random.Generator) -> Layout:
    return sample_layout(rng, {"cube": WORKSPACE}, min_separation=0.0)


LIFT_HEIGHT = 0.1

TASKS: dict[str, TaskSpec] = {
    "PickCubeOntoPlate": TaskSpec(
        name="PickCubeOntoPlate",
        instruction="put the red cube on the plate",
        objects=(RED_CUBE, PLATE),
        sample_init=_pick_cube_onto_plate_init,
        success=on("cube", "plate"),
        horizon=300,
        eval_seed=1001,
        shaping=_pick_place_shaping("cube", "plate"),
    ),
    "LiftCube": TaskSpec(
        name="LiftCube",
        instruction="lift the red cube",
        objects=(RED_CUBE,),
        sample_init=_lift_cube_init,
        success=lifted("cube", LIFT_HEIGHT),
        horizon=150,
        eval_seed=1002,
        shaping=_lift_shaping("cube", LIFT_HEIGHT),
    ),
}


def get_task(task: str | TaskSpec) -> TaskSpec:
    """A task by name (or the :class:`TaskSpec` itself)."""
    if isinstance(task, TaskSpec):
        return task
    if task not in TASKS:
        raise ValueError(f"Unknown tabletop task {task!r}. Allowed: {sorted(TASKS)}.")
    return TASKS[task]


@cache
def _eval_layouts(name: str) -> tuple[Layout, ...]:
    task = TASKS[name]
    rng = np.random.default_rng(task.eval_seed)
    return tuple(task.sample_init(rng) for _ in range(NUM_EVAL_INIT_STATES))


def eval_layouts(task: str | TaskSpec) -> tuple[Layout, ...]:
    """The task's :data:`NUM_EVAL_INIT_STATES` fixed evaluation layouts, drawn from ``eval_seed`` (deterministic)."""
    spec = get_task(task)
    if TASKS.get(spec.name) is spec:
        return _eval_layouts(spec.name)
    rng = np.random.default_rng(spec.eval_seed)
    return tuple(spec.sample_init(rng) for _ in range(NUM_EVAL_INIT_STATES))
