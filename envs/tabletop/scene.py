"""A LIBERO-style tabletop scene built in code: a table, the Panda at its edge, free primitive objects.

Everything is :class:`mujoco.MjSpec` data and every entity is named, so task code reads physics by name:

- the table top is the collision *plane* ``table`` at height :data:`TABLE_HEIGHT` (a box table gives a
  resting cylinder a single contact and lets it sink; a plane gives it several, FACTS.md),
- the arm (``joint1`` … ``joint7``, ``ee_site``, ``wrist_cam``, …) stands on the table at
  :data:`ARM_BASE_POS`, facing +x,
- each free object ``<name>`` is a body with a free joint ``<name>_joint``: one geom ``<name>_geom``
  (box, cylinder, plate) or, for a bowl, a flat base ``<name>_geom`` and a ring of thin wall boxes
  ``<name>_wall<i>`` in the same body,
- a drawer ``<name>`` is a fixed cabinet (a mocap body, so a reset can move it, but contacts cannot) with
  a child body ``<name>_drawer`` on the slide joint ``<name>_slide`` (the opening, metres, 0 = closed)
  and a handle body ``<name>_handle`` (a bar on two posts) on its front, which faces the arm (-x in the
  cabinet's frame),
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
# The agent-view camera: world x, y and height above the table top (m); it looks at the arm over the table.
AGENTVIEW_POS = (0.75, 0.0, 0.55)
# Stiff contacts with a time constant ≥ 2·dt; MuJoCo's default 0.02 let a grasped can slip (FACTS.md).
OBJECT_SOLREF = (0.005, 1.0)
OBJECT_KINDS = ("box", "cylinder", "plate", "bowl", "drawer")
# Number of size entries each kind takes (see ObjectSpec).
_SIZE_ENTRIES = {"box": 3, "cylinder": 2, "plate": 2, "bowl": 2, "drawer": 3}

# Bowl: a flat cylindrical base plus BOWL_WALLS thin boxes on a regular polygon around it.
BOWL_WALLS = 8
BOWL_WALL_HALF_THICKNESS = 0.003
BOWL_BASE_HALF_THICKNESS = 0.004
BOWL_WALL_CLEARANCE = 0.002  # the walls stop this far above the table: the base is what stands on it

# Collision bits. Contacts dominate the step cost, and a bowl's walls touching the table (as soon as it tilts)
# would add up to four contacts per wall, so walls never collide with the table. A pair collides when
# (contype1 & conaffinity2) or (contype2 & conaffinity1): objects (1, 1) and the arm (2, 1, robot.py) meet
# the table (8, 3) as with MuJoCo's defaults, and bowl walls (4, 3) meet objects and the arm but not the table.
TABLE_CONTYPE, TABLE_CONAFFINITY = 8, 3
WALL_CONTYPE, WALL_CONAFFINITY = 4, 3
# Upright cylinders stand on a hidden box foot (see _add_support_foot) that meets only the table.
FOOT_CONTYPE, FOOT_CONAFFINITY = 0, 8
FOOT_DROP = 5e-5  # m: the foot's bottom reaches this far below the cylinder's bottom face
CYLINDER_TILT = 1e-6  # rad: the cylinder geom's fixed tilt in its body, away from MuJoCo's degenerate case
HIDDEN_GROUP = 3  # geom group the default renderer and segmentation leave out

# Drawer: cabinet panels, drawer panels and the handle, metres.
DRAWER_PANEL_HALF_THICKNESS = 0.005
DRAWER_GAP = 0.003  # between the drawer and the cabinet on every side, so they never rub
DRAWER_HANDLE_STANDOFF = 0.045  # drawer front face → handle bar centre, along the pull direction
DRAWER_HANDLE_HALF_SIZE = (0.006, 0.05, 0.008)  # bar: depth (pull direction), width, height
DRAWER_SLIDE_DAMPING = 10.0  # N·s/m: the drawer glides rather than rattles when pulled at ~0.4 m/s
DRAWER_SLIDE_FRICTION = 1.0  # N of dry friction, so a drawer stays where it was left
DRAWER_TRAVEL_FRACTION = 0.8  # the drawer opens up to this fraction of the cabinet's depth


@dataclass(frozen=True)
class ObjectSpec:
    """A task object built from a few primitive geoms.

    Args:
        name: body name; a free object's free joint is ``<name>_joint`` and its (first) geom ``<name>_geom``;
            a drawer's slide joint is ``<name>_slide`` (see the module docstring).
        kind: ``"box"`` (``size`` = 3 half-sizes), ``"cylinder"`` (a can; ``size`` = radius, half-height),
            ``"plate"`` (a flat cylinder; ``size`` = radius, half-height), ``"bowl"`` (an open container;
            ``size`` = outer radius, half-height) or ``"drawer"`` (a fixed cabinet with a drawer; ``size`` =
            the cabinet's half-depth along the pull direction, half-width, half-height).
        size: half-sizes in metres, as above.
        rgba: colour.
        mass: kg; ``None`` uses a density of 1000 kg/m³ (a drawer's cabinet is fixed and has no mass).
        rolling_friction: metres; > 0 adds rolling friction (``condim`` 6), so that a toppled can stops
            instead of rolling off the table's edge (the collision plane is infinite).
    """

    name: str
    kind: str
    size: tuple[float, ...]
    rgba: tuple[float, float, float, float] = (0.8, 0.8, 0.8, 1.0)
    mass: float | None = None
    rolling_friction: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in OBJECT_KINDS:
            raise ValueError(f"ObjectSpec {self.name!r}: kind must be one of {OBJECT_KINDS}, got {self.kind!r}.")
        if self.rolling_friction < 0.0:
            raise ValueError(f"ObjectSpec {self.name!r}: rolling_friction must be >= 0 m, got {self.rolling_friction}.")
        expected = _SIZE_ENTRIES[self.kind]
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
        return float(min(self.size[:2])) if self.kind in ("box", "drawer") else float(self.size[0])

    @property
    def is_free(self) -> bool:
        """Whether the object moves freely (a free joint ``<name>_joint``); a drawer's cabinet is fixed."""
        return self.kind != "drawer"

    @property
    def joint_names(self) -> tuple[str, ...]:
        """Names of the object's own 1-DoF joints, in observation order (a drawer's slide)."""
        return (f"{self.name}_slide",) if self.kind == "drawer" else ()

    @property
    def inner_radius(self) -> float:
        """A bowl's usable inner radius (metres): the polygon's apothem less the wall thickness."""
        self._require_kind("bowl", "inner_radius")
        return float(self.size[0]) - 2.0 * BOWL_WALL_HALF_THICKNESS

    @property
    def floor_height(self) -> float:
        """A bowl's floor (the base's top face) above its bottom, metres."""
        self._require_kind("bowl", "floor_height")
        return 2.0 * BOWL_BASE_HALF_THICKNESS

    @property
    def drawer_travel(self) -> float:
        """A drawer's full opening, metres (the slide joint's upper limit)."""
        self._require_kind("drawer", "drawer_travel")
        return DRAWER_TRAVEL_FRACTION * 2.0 * float(self.size[0])

    @property
    def handle_offset(self) -> np.ndarray:
        """(3,) a drawer's handle bar centre in the cabinet's frame when closed, metres."""
        self._require_kind("drawer", "handle_offset")
        front = -float(self.size[0]) - 2.0 * DRAWER_PANEL_HALF_THICKNESS  # outer face of the drawer front
        return np.array([front - DRAWER_HANDLE_STANDOFF, 0.0, 0.0])

    @property
    def bounding_radius(self) -> float:
        """Radius (m) of a vertical cylinder about the body's origin that holds the whole object (a drawer's
        cabinet and its handle, closed)."""
        if self.kind == "box":
            return math.hypot(self.size[0], self.size[1])
        if self.kind == "drawer":
            reach = (
                self.size[0] + 2.0 * DRAWER_PANEL_HALF_THICKNESS + DRAWER_HANDLE_STANDOFF + DRAWER_HANDLE_HALF_SIZE[0]
            )
            return math.hypot(reach, self.size[1])
        return float(self.size[0])

    def _require_kind(self, kind: str, what: str) -> None:
        if self.kind != kind:
            raise ValueError(f"ObjectSpec {self.name!r}: {what} is defined for a {kind}, not a {self.kind}.")


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


def _box(
    body: mujoco.MjsBody, name: str, pos: Sequence[float], size: Sequence[float], **kwargs: object
) -> mujoco.MjsGeom:
    """Add box geom ``name`` at ``pos`` (3,) with half-sizes ``size`` (3,), metres, in ``body``'s frame."""
    return body.add_geom(name=name, type=mujoco.mjtGeom.mjGEOM_BOX, pos=list(pos), size=list(size), **kwargs)


def _add_free_object(spec: mujoco.MjSpec, obj: ObjectSpec, pos: Sequence[float]) -> None:
    body = spec.worldbody.add_body(name=obj.name, pos=list(pos))
    body.add_freejoint(name=f"{obj.name}_joint")
    # Stiff contacts (FACTS.md) and torsional friction, which keeps a squeezed object from spinning in the grip.
    contact = {"rgba": list(obj.rgba), "solref": list(OBJECT_SOLREF), "condim": 4}
    if obj.rolling_friction > 0.0:
        contact |= {"condim": 6, "friction": [1.0, 0.005, obj.rolling_friction]}  # MuJoCo's defaults, more rolling
    if obj.kind == "box":
        geom = _box(body, f"{obj.name}_geom", (0.0, 0.0, 0.0), obj.size, **contact)
    elif obj.kind in ("cylinder", "plate"):
        geom = body.add_geom(
            name=f"{obj.name}_geom",
            type=mujoco.mjtGeom.mjGEOM_CYLINDER,
            size=[obj.size[0], obj.size[1], 0.0],
            **contact,
        )
    else:  # bowl
        radius, half_height = obj.size
        geom = body.add_geom(
            name=f"{obj.name}_geom",
            type=mujoco.mjtGeom.mjGEOM_CYLINDER,
            pos=[0.0, 0.0, -half_height + BOWL_BASE_HALF_THICKNESS],
            size=[radius, BOWL_BASE_HALF_THICKNESS, 0.0],
            **contact,
        )
        wall = BOWL_WALL_HALF_THICKNESS
        wall_bottom = -half_height + BOWL_WALL_CLEARANCE
        wall_half_height = (half_height - wall_bottom) / 2.0
        apothem = radius - wall
        half_length = apothem * math.tan(math.pi / BOWL_WALLS) + wall  # walls overlap at the corners: no gaps
        for i in range(BOWL_WALLS):
            angle = 2.0 * math.pi * i / BOWL_WALLS
            _box(
                body,
                f"{obj.name}_wall{i}",
                (apothem * math.cos(angle), apothem * math.sin(angle), wall_bottom + wall_half_height),
                (wall, half_length, wall_half_height),
                quat=yaw_quat(angle).tolist(),
                contype=WALL_CONTYPE,
                conaffinity=WALL_CONAFFINITY,
                **contact,
            )
    if obj.mass is not None:
        geom.mass = obj.mass  # the bowl's base carries the given mass; its walls add theirs by density
    if geom.type == mujoco.mjtGeom.mjGEOM_CYLINDER:
        _add_support_foot(body, obj.name, geom)


def _add_support_foot(body: mujoco.MjsBody, name: str, cylinder: mujoco.MjsGeom) -> None:
    """Stand ``cylinder`` on a hidden, massless box foot, and tilt it by ``CYLINDER_TILT`` in its body.

    Works around MuJoCo 3.3.0's plane-cylinder collision (``mjc_PlaneCylinder``): when the cylinder's axis is
    vertical to within rounding noise (a tilt of ~1e-16 rad, which an upright object resting on the table
    reaches after a few hundred steps) it normalises the tiny difference of two nearly equal vectors, whose
    rounding error points anywhere, and returns no contact or a centimetres-deep one: the object falls
    through the table or is shot off it (~1 in 20 idle 10 s episodes for the plate and the can). Here the
    foot, a box inscribed in the bottom disc reaching ``FOOT_DROP`` below it, is what rests on the table
    (box-plane contacts are robust), so an upright object settles with its *foot* flat, and the cylinder geom,
    tilted 1e-6 rad against the foot (8e-8 m at the rim), stays far from the degenerate case. A toppled can
    lies on its cylinder's side as before.
    """
    radius, half_height = cylinder.size[0], cylinder.size[1]
    cylinder.quat = [math.cos(CYLINDER_TILT / 2.0), math.sin(CYLINDER_TILT / 2.0), 0.0, 0.0]
    half_side = radius / math.sqrt(2.0)  # the square's corners on the disc's rim
    foot_half_height = 0.25 * half_height
    _box(
        body,
        f"{name}_foot",
        (cylinder.pos[0], cylinder.pos[1], cylinder.pos[2] - half_height - FOOT_DROP + foot_half_height),
        (half_side, half_side, foot_half_height),
        mass=0.0,
        contype=FOOT_CONTYPE,
        conaffinity=FOOT_CONAFFINITY,
        group=HIDDEN_GROUP,
        solref=list(OBJECT_SOLREF),
        condim=4,
    )


def _add_drawer(spec: mujoco.MjSpec, obj: ObjectSpec, pos: Sequence[float]) -> None:
    """A cabinet open at its front (-x), a drawer on a slide joint inside, and a handle bar on the drawer."""
    hx, hy, hz = obj.size
    w, gap = DRAWER_PANEL_HALF_THICKNESS, DRAWER_GAP
    # A mocap cabinet is fixed during an episode (contacts cannot move it), yet a reset can place it.
    cabinet = spec.worldbody.add_body(name=obj.name, pos=list(pos), mocap=True)
    panel = {"rgba": list(obj.rgba), "solref": list(OBJECT_SOLREF)}
    _box(cabinet, f"{obj.name}_geom", (0.0, 0.0, -hz + w), (hx, hy, w), **panel)  # bottom
    _box(cabinet, f"{obj.name}_top", (0.0, 0.0, hz - w), (hx, hy, w), **panel)
    _box(cabinet, f"{obj.name}_back", (hx - w, 0.0, 0.0), (w, hy, hz), **panel)
    for side, sign in (("left", 1.0), ("right", -1.0)):
        _box(cabinet, f"{obj.name}_{side}", (0.0, sign * (hy - w), 0.0), (hx, w, hz), **panel)

    drawer = cabinet.add_body(name=f"{obj.name}_drawer")
    drawer.add_joint(
        name=f"{obj.name}_slide",
        type=mujoco.mjtJoint.mjJNT_SLIDE,
        axis=[-1.0, 0.0, 0.0],  # positive opening pulls the drawer out of the front, toward the arm
        range=[0.0, obj.drawer_travel],
        limited=mujoco.mjtLimited.mjLIMITED_TRUE,
        damping=DRAWER_SLIDE_DAMPING,
        frictionloss=DRAWER_SLIDE_FRICTION,
        armature=0.01,
    )
    inner_hy, inner_hz = hy - 2.0 * w - gap, hz - 2.0 * w - gap  # the drawer box's half-width / half-height
    inner_depth = hx - w - gap / 2.0  # half-depth from the cabinet front to just before its back panel
    centre_x = -w - gap / 2.0
    face = {"rgba": [0.9 * c for c in obj.rgba[:3]] + [obj.rgba[3]], "solref": list(OBJECT_SOLREF)}
    # The front panel covers the whole cabinet opening, just outside it: a closed drawer looks shut.
    _box(drawer, f"{obj.name}_front", (-hx - w, 0.0, 0.0), (w, hy, hz), **face)
    _box(drawer, f"{obj.name}_floor", (centre_x, 0.0, -inner_hz + w), (inner_depth - w, inner_hy, w), **face)
    _box(drawer, f"{obj.name}_rear", (centre_x + inner_depth - w, 0.0, 0.0), (w, inner_hy, inner_hz), **face)
    for side, sign in (("left", 1.0), ("right", -1.0)):
        _box(
            drawer,
            f"{obj.name}_drawer_{side}",
            (centre_x, sign * (inner_hy - w), 0.0),
            (inner_depth - w, w, inner_hz),
            **face,
        )
    # The handle is its own (welded) body, so task code can read its position by name.
    handle = drawer.add_body(name=f"{obj.name}_handle", pos=list(obj.handle_offset))
    grip = {"rgba": [0.2, 0.2, 0.22, 1.0], "solref": list(OBJECT_SOLREF)}
    _box(handle, f"{obj.name}_handle_bar", (0.0, 0.0, 0.0), DRAWER_HANDLE_HALF_SIZE, **grip)
    standoff_half = DRAWER_HANDLE_STANDOFF / 2.0
    for i, y in enumerate((-0.8, 0.8)):
        _box(
            handle,
            f"{obj.name}_handle_post{i}",
            (standoff_half, y * DRAWER_HANDLE_HALF_SIZE[1], 0.0),
            (standoff_half, 0.004, 0.004),
            **grip,
        )
    # The drawer slides inside its cabinet: their panels must not collide (the joint range is the limit),
    # nor does the fixed cabinet need contacts with the fixed table.
    spec.add_exclude(bodyname1=obj.name, bodyname2=f"{obj.name}_drawer")
    spec.add_exclude(bodyname1="world", bodyname2=obj.name)
    spec.add_exclude(bodyname1="world", bodyname2=f"{obj.name}_drawer")
    spec.add_exclude(bodyname1=obj.name, bodyname2=f"{obj.name}_handle")


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
        contype=TABLE_CONTYPE,
        conaffinity=TABLE_CONAFFINITY,
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
    camera_pos = [AGENTVIEW_POS[0], AGENTVIEW_POS[1], table_height + AGENTVIEW_POS[2]]
    world.add_camera(
        name=AGENTVIEW_CAMERA,
        pos=camera_pos,
        quat=_look_at_quat(camera_pos, [-0.15, 0.0, table_height + 0.05]),
        fovy=55.0,
    )
    add_panda(spec, base_pos=tuple(arm_base_pos))
    for obj in objects:
        add = _add_free_object if obj.is_free else _add_drawer
        add(spec, obj, (0.0, 0.0, table_height + obj.half_height))
    return spec.compile()


def configure_render_scene(scene: mujoco.MjvScene) -> None:
    """Turn off a renderer's shadows, reflections and skybox (FACTS.md: ~6x faster on llvmpipe)."""
    scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
    scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
    scene.flags[mujoco.mjtRndFlag.mjRND_SKYBOX] = 0


def yaw_quat(yaw: float) -> np.ndarray:
    """(4,) wxyz rotation by ``yaw`` radians about world z."""
    return np.array([math.cos(yaw / 2.0), 0.0, 0.0, math.sin(yaw / 2.0)])
