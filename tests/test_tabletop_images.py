"""Tabletop images: every object of every task is visible from the agent view at every fixed init state."""

from __future__ import annotations

import mujoco
import numpy as np
import pytest

from envs.tabletop.env import TabletopEnv, make_renderer
from envs.tabletop.scene import AGENTVIEW_CAMERA, configure_render_scene
from envs.tabletop.tasks import NUM_EVAL_INIT_STATES, TASKS

IMAGE_SIZE = 128  # the default camera size
MIN_PIXELS = 12  # a 4 cm cube at the far edge of the workspace, face-on, covers ~22 px at this size


@pytest.fixture()
def gl(monkeypatch):
    monkeypatch.setenv("MUJOCO_GL", "egl")


def visible_pixels(env: TabletopEnv, renderer: mujoco.Renderer) -> dict[str, int]:
    """Pixels of each task object in the agent view's segmentation (geoms of the object's body tree)."""
    renderer.update_scene(env.data, camera=AGENTVIEW_CAMERA)
    segmentation = renderer.render()  # (H, W, 2): object id, object type
    model = env.model
    geoms = segmentation[..., 0][segmentation[..., 1] == mujoco.mjtObj.mjOBJ_GEOM]
    roots = model.body_rootid[model.geom_bodyid[geoms]]  # the top-level body each pixel's geom hangs from
    counts = {}
    for obj in env.task.objects:
        counts[obj.name] = int((roots == model.body(obj.name).id).sum())
    return counts


@pytest.mark.parametrize("task", sorted(TASKS))
def test_every_object_is_visible_at_every_fixed_init_state(gl, task):
    env = TabletopEnv(task)
    renderer = make_renderer(env.model, IMAGE_SIZE, IMAGE_SIZE)
    configure_render_scene(renderer.scene)
    renderer.enable_segmentation_rendering()
    try:
        hidden = []
        for state in range(NUM_EVAL_INIT_STATES):
            env.reset(options={"init_state": state})
            hidden += [(state, name, n) for name, n in visible_pixels(env, renderer).items() if n < MIN_PIXELS]
        assert not hidden, f"{task}: objects (init state, name, pixels) not visible: {hidden}"
    finally:
        renderer.close()
        env.close()


def test_the_segmentation_check_can_fail(gl):
    """Move the object under the table: its pixel count drops to zero, so the check above is not vacuous."""
    env = TabletopEnv("LiftCube")
    renderer = make_renderer(env.model, IMAGE_SIZE, IMAGE_SIZE)
    configure_render_scene(renderer.scene)
    renderer.enable_segmentation_rendering()
    try:
        env.reset(options={"init_state": 0})
        assert visible_pixels(env, renderer)["cube"] >= MIN_PIXELS
        adr = env.model.joint("cube_joint").qposadr[0]
        env.data.qpos[adr + 2] = 0.3  # below the table top (z = 0.8)
        mujoco.mj_forward(env.model, env.data)
        assert visible_pixels(env, renderer)["cube"] == 0
    finally:
        renderer.close()
        env.close()


def test_camera_images_are_right_side_up(gl):
    """The table (brown, lower half) is below the horizon: the image's bottom rows are table, not sky."""
    env = TabletopEnv("LiftCube", cameras=("agentview",), image_size=64)
    try:
        obs, _ = env.reset(options={"init_state": 0})
        image = obs["agentview_image"].astype(float)
        bottom, top = image[-8:].mean((0, 1)), image[:8].mean((0, 1))
        table = np.array([0.55, 0.45, 0.35])

        def closeness(rgb):
            return -np.abs(rgb / max(rgb.max(), 1e-6) - table / table.max()).sum()

        assert closeness(bottom) > closeness(top), (bottom, top)
    finally:
        env.close()
