"""A LIBERO-style tabletop scene built in code: a table, the Panda at its edge, free primitive objects.

Everything is :class:`mujoco.MjSpec` data and every entity is named, so task code reads physics by name:

- the table top is the collision *plane* ``table`` at height :data:`TABLE_HEIGHT` (a box table gives a
  resting cylinder a single contact and lets it sink; a plane gives it several, FACTS.md),
- the arm (``joint1`` … ``joint7``, ``ee_site``, ``wrist_cam``, …) stands on the table at
  :data:`ARM_BASE_POS`, facing +x,
- each object ``<name>`` is a body with a free joint ``<name>_joint`` and one geom ``<name>_geom``,
- the camera ``agentview`` looks at the table from the front (from +x, towards the robot).

Physics (FACTS.md, grasps that worked 50/50): dt 0.002 s with :data:`CONTROL_SUBSTEPS` = 25 substeps per
20 Hz control step, ``implicitfast``, object and table contacts stiff with ``solref`` 0.005 s (≥ 2·dt).
Rendering is tuned for CPU (llvmpipe): no anti-aliasing, shadows, reflections or skybox, a coarse grid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import mujoco
import numpy as np

from envs.tabletop.robot import add_panda

TABLE_HEIGHT = 0.8  # table top, metres above the floor
TABLE_HALF_SIZE = (0.5, 0.6)  # drawn extent of the table top (x, y); the collision plane is infinite
ARM_BASE_POS = (-0.55, 0.0, TABLE_HEIGHT)  # the arm's base on the table's -x edge, facing +x
TIMESTEP = 0.002
CONTROL_SUBSTEPS = 25  # 25 · 0.002 s = one 20 Hz control step
CONTROL_DT = TIMESTEP * CONTROL_SUBSTEPS
AGENTVIEW_CAMERA = "agentview"
# Stiff contacts with a time constant ≥ 2·dt; MuJoCo's default 0.02 let a grasped can slip (FACTS.md).
OBJECT_SOLREF = (0.005, 1.0)
OBJECT_KINDS = ("box", "cylinder", "plate")


@dataclass(frozen=True)
class ObjectSpec:
    """A free rigid object made of one primitive geom.

    Args:
        name: body name; its free joint is ``<name>_joint`` and its geom ``<name>_geom``.
        kind: ``"box"`` (``size`` = 3 half-sizes), ``"cylinder"`` (a can; ``size`` = radius, half-height)
            or ``"plate"`` (a flat cylinder; ``size`` = radius, half-height).
        size: half-sizes in metres, as above.
        rgba: colour.
        mass: kg; ``None`` uses a density of 1000 kg/m³.
    """

    name: str
    kind: str
    size: tuple[float, ...]
    rgba: tuple[float, float, float, float] = (0.8, 0.8, 0.8, 1.0)
    mass: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in OBJECT_KINDS:
            raise ValueError(f"ObjectSpec {self.name!r}: kind must be one of {OBJECT_KINDS}, got {self.kind!r}.")
        expected = 3 if self.kind == "box" else 2
        if len(self.size) != expected or min(self.size) <= 0.0:
            raise ValueError(
                f"ObjectSpec {self.name!r}: a {self.kind} needs {expected} positive half-sizes, got {self.size!r}."
            )

    @property
    def half_height(self) -> float:
        """Half the object's height when it rests upright (metres)."""
        return float(self.size[-1])

    @property
    def footprint_radius(self) -> float:
        """Radius of the circle inscribed in the object's top face (metres); ``on(x, self)`` uses it."""
        return float(min(self.size[:2])) if self.kind == "box" else float(self.size[0])


def _look_at_quat(pos: Sequence[float], target: Sequence[float]) -> list[float]:
    """wxyz orientation of a MuJoCo camera at ``pos`` looking at ``target`` with world +z up in the image."""
    forward = np.subtract(target, pos).astype(np.float64)
    forward /= np.linalg.norm(forward)
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    up = np.cross(right, forward)
    # A camera looks along its -z with +y up in the image and +x to the right.
    mat = np.stack([right, up, -forward], axis=1)
    quat = np.empty(4)
    mujoco.mju_mat2Quat(quat, mat.flatten())
    return quat.tolist()


def _add_object(spec: mujoco.MjSpec, obj: ObjectSpec, pos: Sequence[float]) -> None:
    body = spec.worldbody.add_body(name=obj.name, pos=list(pos))
    body.add_freejoint(name=f"{obj.name}_joint")
    geom = body.add_geom(
        name=f"{obj.name}_geom",
        rgba=list(obj.rgba),
        solref=list(OBJECT_SOLREF),
        condim=4,  # torsional friction keeps a squeezed object from spinning in the grip
    )
    if obj.kind == "box":
        geom.type = mujoco.mjtGeom.mjGEOM_BOX
        geom.size = list(obj.size)
    else:
        geom.type = mujoco.mjtGeom.mjGEOM_CYLINDER
        geom.size = [obj.size[0], obj.size[1], 0.0]
    if obj.mass is not None:
        geom.mass = obj.mass


def build_scene(
    objects: Sequence[ObjectSpec],
    *,
    timestep: float = TIMESTEP,
    table_height: float = TABLE_HEIGHT,
    arm_base_pos: Sequence[float] = ARM_BASE_POS,
) -> mujoco.MjModel:
    """Compile a tabletop scene with the arm and ``objects`` (each resting at the table centre until reset).

    Args:
        objects: the free objects; names must be unique and must not clash with the arm's names.
        timestep: physics step in seconds (the env runs ``CONTROL_SUBSTEPS`` of them per control step).
        table_height: z of the table top, metres.
        arm_base_pos: (3,) world position of the arm's base.

    Returns:
        The compiled model, with render settings tuned for fast offscreen CPU rendering (set on the model
        before any :class:`mujoco.Renderer` is created, as ``offsamples`` requires).
    """
    names = [obj.name for obj in objects]
    if len(set(names)) != len(names):
        raise ValueError(f"build_scene: object names must be unique, got {names}.")
    spec = mujoco.MjSpec()
    spec.modelname = "tabletop"
    spec.compiler.degree = False  # radians everywhere (MjSpec's default is degrees)
    spec.option.timestep = timestep
    spec.option.integrator = mujoco.mjtIntegrator.mjINT_IMPLICITFAST

    # Render settings: anti-aliasing, shadows, reflections and fine plane grids dominate CPU render time.
    spec.visual.quality.offsamples = 0
    spec.visual.quality.numslices = 12
    spec.visual.quality.numstacks = 6
    spec.visual.quality.shadowsize = 0
    spec.visual.headlight.ambient = [0.4, 0.4, 0.4]
    spec.visual.headlight.diffuse = [0.5, 0.5, 0.5]

    world = spec.worldbody
    # size[2] of a plane is its drawn grid spacing: one coarse cell per 0.5 m.
    world.add_geom(
        name="table",
        type=mujoco.mjtGeom.mjGEOM_PLANE,
        pos=[0.0, 0.0, table_height],
        size=[TABLE_HALF_SIZE[0], TABLE_HALF_SIZE[1], 0.5],
        rgba=[0.55, 0.45, 0.35, 1.0],
        solref=list(OBJECT_SOLREF),
    )
    # The table's body and the floor are drawn only (contype/conaffinity 0); nothing reaches them.
    world.add_geom(
        name="table_body",
        type=mujoco.mjtGeom.mjGEOM_BOX,
        pos=[0.0, 0.0, table_height / 2.0 - 0.001],
        size=[TABLE_HALF_SIZE[0], TABLE_HALF_SIZE[1], table_height / 2.0],
        rgba=[0.45, 0.35, 0.27, 1.0],
        contype=0,
        conaffinity=0,
    )
    world.add_geom(
        name="floor",
        type=mujoco.mjtGeom.mjGEOM_PLANE,
        size=[3.0, 3.0, 1.0],
        rgba=[0.3, 0.3, 0.32, 1.0],
        contype=0,
        conaffinity=0,
    )
    world.add_light(
        name="top", pos=[0.0, 0.0, table_height + 2.0], dir=[0.0, 0.0, -1.0], directional=True, castshadow=False
    )
    camera_pos = [0.75, 0.0, table_height + 0.55]
    world.add_camera(
        name=AGENTVIEW_CAMERA,
        pos=camera_pos,
        quat=_look_at_quat(camera_pos, [-0.15, 0.0, table_height + 0.05]),
        fovy=55.0,
    )
    add_panda(spec, base_pos=tuple(arm_base_pos))
    for obj in objects:
        _add_object(spec, obj, (0.0, 0.0, table_height + obj.half_height))
    return spec.compile()


def configure_render_scene(scene: mujoco.MjvScene) -> None:
    """Turn off a renderer's shadows, reflections and skybox (FACTS.md: ~6x faster on llvmpipe)."""
    scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
    scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
    scene.flags[mujoco.mjtRndFlag.mjRND_SKYBOX] = 0


def yaw_quat(yaw: float) -> np.ndarray:
    """(4,) wxyz rotation by ``yaw`` radians about world z."""
    return np.array([math.cos(yaw / 2.0), 0.0, 0.0, math.sin(yaw / 2.0)])
