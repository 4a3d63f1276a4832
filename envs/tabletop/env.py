"""The tabletop Gymnasium env: one :class:`~envs.tabletop.tasks.TaskSpec`, the Panda, 20 Hz control.

Observation (a ``Dict`` of ``Box`` spaces; every key named):

- ``state`` (8,) float32: tool position (3, m, world), tool orientation as axis-angle (3), the two
  finger joints (2, m) — LIBERO's ``ee_pos``, ``ee_ori``, ``gripper_states``,
- ``object_state`` (7·n + k,) float32: for each task object in ``task.objects`` order, its body's position
  (3, m, world) and wxyz quaternion (4) — for a drawer, its fixed cabinet's pose — then the positions of the
  objects' k own joints in ``task.joint_names`` order (each drawer's opening, m, 0 = closed),
- with ``cameras``: ``agentview_image`` and/or ``wrist_image``, uint8 (H, W, 3), right side up.

Actions: ``action_mode="delta_ee"`` is LIBERO's 7-D ``OSC_POSE`` action in [-1, 1] (±0.05 m, ±0.5 rad
per step, last entry -1 open / +1 close); ``"joint"`` is 8-D: absolute joint targets (rad, within the
limits) and the same gripper entry.

The instruction is ``env.instruction`` and ``info["instruction"]``. It is not an observation key:
Gymnasium's ``Text`` space has no ``dtype``/shape, which breaks vector envs, ``check_env``'s
determinism checks and every batching code path; a fixed string per env belongs in ``info``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import gymnasium as gym
import mujoco
import numpy as np

from envs.tabletop.robot import Q_MAX, Q_MIN, WRIST_CAMERA, PandaArm
from envs.tabletop.scene import (
    AGENTVIEW_CAMERA,
    CONTROL_DT,
    CONTROL_SUBSTEPS,
    TABLE_HEIGHT,
    ObjectSpec,
    build_scene,
    configure_render_scene,
    yaw_quat,
)
from envs.tabletop.tasks import NUM_EVAL_INIT_STATES, Layout, TaskSpec, eval_layouts, get_task

ACTION_MODES = ("delta_ee", "joint")
OBS_MODES = ("state",)
CAMERAS = {"agentview": AGENTVIEW_CAMERA, "wrist": WRIST_CAMERA}


class TabletopEnv(gym.Env):
    """A LIBERO-style language-conditioned tabletop task.

    Args:
        task: a task name from :data:`envs.tabletop.tasks.TASKS` or a :class:`TaskSpec`.
        action_mode: ``"delta_ee"`` (7-D, LIBERO) or ``"joint"`` (8-D absolute joint targets + gripper).
        obs_mode: ``"state"`` (the only mode so far; cameras add images to it).
        cameras: any of ``"agentview"``, ``"wrist"``; each adds ``<camera>_image`` to the observation.
        image_size: height and width of camera images, pixels.
        reward_shaping: add the task's dense distance terms to the sparse success reward.
        max_episode_steps: truncate after this many steps (default: the task's horizon).
        render_mode: ``None`` or ``"rgb_array"`` (the agent view at ``image_size``).

    ``reset(options={"init_state": i})`` starts from the i-th of the task's 50 fixed evaluation states;
    without it the initial state is drawn from ``self.np_random``.
    """

    # Fixed evaluation init states (LIBERO-style); ``robo_rlft.evaluation`` evaluates on them.
    num_fixed_init_states = NUM_EVAL_INIT_STATES

    metadata: ClassVar[dict[str, Any]] = {"render_modes": ["rgb_array"], "render_fps": round(1.0 / CONTROL_DT)}

    def __init__(
        self,
        task: str | TaskSpec = "PickCubeOntoPlate",
        action_mode: str = "delta_ee",
        obs_mode: str = "state",
        cameras: Sequence[str] = (),
        image_size: int = 128,
        reward_shaping: bool = False,
        max_episode_steps: int | None = None,
        render_mode: str | None = None,
    ) -> None:
        self.task = get_task(task)
        if action_mode not in ACTION_MODES:
            raise ValueError(f"TabletopEnv: action_mode must be one of {ACTION_MODES}, got {action_mode!r}.")
        if obs_mode not in OBS_MODES:
            raise ValueError(f"TabletopEnv: obs_mode must be one of {OBS_MODES}, got {obs_mode!r}.")
        cameras = check_image_options("TabletopEnv", cameras, CAMERAS, image_size, render_mode, self.metadata)
        self.action_mode = action_mode
        self.obs_mode = obs_mode
        self.cameras = cameras
        self.image_size = image_size
        self.reward_shaping = reward_shaping
        self.max_episode_steps = self.task.horizon if max_episode_steps is None else int(max_episode_steps)
        if self.max_episode_steps < 1:
            raise ValueError(f"TabletopEnv: max_episode_steps must be >= 1, got {max_episode_steps}.")
        self.render_mode = render_mode
        self.instruction = self.task.instruction
        self.table_height = TABLE_HEIGHT

        self.model = build_scene(self.task.objects)
        self.data = mujoco.MjData(self.model)
        self.arm = PandaArm(self.model, self.data)
        self._object_specs: dict[str, ObjectSpec] = {obj.name: obj for obj in self.task.objects}
        self._body_ids = {obj.name: self.model.body(obj.name).id for obj in self.task.objects}
        self._object_body_ids = np.array([self._body_ids[obj.name] for obj in self.task.objects])
        # Free objects are placed through their free joint's qpos, fixed ones (a drawer's cabinet) as mocap bodies.
        self._object_qpos_adr = {
            obj.name: int(self.model.joint(f"{obj.name}_joint").qposadr[0]) for obj in self.task.objects if obj.is_free
        }
        self._mocap_ids = {
            obj.name: int(self.model.body_mocapid[self._body_ids[obj.name]])
            for obj in self.task.objects
            if not obj.is_free
        }
        self._joint_qpos_adr = {name: int(self.model.joint(name).qposadr[0]) for name in self.task.joint_names}
        self._joint_qpos_index = np.array(list(self._joint_qpos_adr.values()), dtype=int)
        self._renderer: mujoco.Renderer | None = None
        self._steps = 0

        if action_mode == "delta_ee":
            self.action_space = gym.spaces.Box(-1.0, 1.0, (7,), np.float32)
        else:
            low = np.append(Q_MIN, -1.0).astype(np.float32)
            high = np.append(Q_MAX, 1.0).astype(np.float32)
            self.action_space = gym.spaces.Box(low, high, (8,), np.float32)
        spaces: dict[str, gym.spaces.Space] = {
            "state": gym.spaces.Box(-np.inf, np.inf, (8,), np.float32),
            "object_state": gym.spaces.Box(-np.inf, np.inf, (self.object_state_size,), np.float32),
        }
        for camera in cameras:
            spaces[f"{camera}_image"] = gym.spaces.Box(0, 255, (image_size, image_size, 3), np.uint8)
        self.observation_space = gym.spaces.Dict(spaces)

    # -- SceneQuery (what the task's relations read) --------------------------------------------------

    @property
    def object_state_size(self) -> int:
        """Length of ``object_state``: 7 per task object plus one per object joint (a fixed function of the task)."""
        return 7 * len(self.task.objects) + len(self.task.joint_names)

    def position(self, name: str) -> np.ndarray:
        """(3,) world position of body ``name`` (from the last kinematics pass), e.g. an object or ``drawer_handle``."""
        body_id = self._body_ids.get(name)
        if body_id is None:
            body_id = self._body_ids[name] = self.model.body(name).id  # raises KeyError naming a missing body
        return self.data.xpos[body_id]

    def joint_position(self, name: str) -> float:
        """Position of the object joint ``name`` (a drawer's ``<drawer>_slide``: its opening in metres)."""
        if name not in self._joint_qpos_adr:
            raise KeyError(
                f"Task {self.task.name!r} has no object joint {name!r}; it has {list(self._joint_qpos_adr)}."
            )
        return float(self.data.qpos[self._joint_qpos_adr[name]])

    def object_spec(self, name: str) -> ObjectSpec:
        return self._object_specs[name]

    # -- Gymnasium API --------------------------------------------------------------------------------

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[dict, dict]:
        super().reset(seed=seed)
        options = options or {}
        init_state = options.get("init_state")
        if init_state is None and options.get("fixed_init_state"):
            # Vector envs share one options dict: the per-env seed then picks the fixed state.
            if seed is None:
                raise ValueError("reset: options['fixed_init_state'] needs a seed (the fixed state's index).")
            init_state = seed % NUM_EVAL_INIT_STATES
        if init_state is None:
            layout = self.task.sample_init(self.np_random)
        else:
            if not isinstance(init_state, int | np.integer) or not 0 <= init_state < NUM_EVAL_INIT_STATES:
                raise ValueError(
                    f"reset: options['init_state'] must be an int in [0, {NUM_EVAL_INIT_STATES}), got {init_state!r}."
                )
            layout = eval_layouts(self.task)[int(init_state)]
        self._apply_layout(layout)
        self._steps = 0
        info = {"instruction": self.instruction, "init_state": init_state, "is_success": self._success()}
        return self._observation(), info

    def step(self, action: np.ndarray) -> tuple[dict, float, bool, bool, dict]:
        self.apply_action(action)
        self.advance(CONTROL_SUBSTEPS)
        return self.finish_step()

    # A control step in parts, for a simulated robot that runs in real time and takes a new command at any
    # physics substep (real_robot.sim_robot): step() is exactly these three calls.

    def apply_action(self, action: np.ndarray) -> None:
        """Set the servo targets from ``action`` (the action space's shape); no physics runs."""
        action = np.asarray(action, dtype=np.float64)
        if action.shape != self.action_space.shape:
            raise ValueError(f"step: expected an action of shape {self.action_space.shape}, got {action.shape}.")
        if self.action_mode == "delta_ee":
            self.arm.apply_delta_ee(action)
        else:
            gripper = 0.5 * (1.0 - float(np.clip(action[7], -1.0, 1.0)))  # -1 open → 1 (fully open)
            self.arm.set_joint_targets(action[:7], gripper)

    def advance(self, substeps: int) -> None:
        """Run ``substeps`` physics steps (of ``CONTROL_SUBSTEPS`` per control step) toward the current targets."""
        mujoco.mj_step(self.model, self.data, nstep=substeps)

    def finish_step(self) -> tuple[dict, float, bool, bool, dict]:
        """Count one control step and return what ``step`` returns for it."""
        self._steps += 1
        success = self._success()
        info: dict[str, Any] = {"instruction": self.instruction, "is_success": success}
        reward = 1.0 if success else 0.0
        info["reward_success"] = reward
        if self.task.shaping is not None:
            for term, value in self.task.shaping(self, self.data.site_xpos[self.arm.site_id]).items():
                info[f"reward_{term}"] = value
                if self.reward_shaping:
                    reward += value
        # Success ends the episode (no bootstrap needed); the horizon truncates it (a learner must
        # bootstrap from the returned observation, which is the true final one).
        terminated = success
        truncated = not terminated and self._steps >= self.max_episode_steps
        return self._observation(), reward, terminated, truncated, info

    def render(self) -> np.ndarray | None:
        if self.render_mode != "rgb_array":
            return None
        return self._render(AGENTVIEW_CAMERA)

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None

    # -- internals ------------------------------------------------------------------------------------

    def _apply_layout(self, layout: Layout) -> None:
        mujoco.mj_resetData(self.model, self.data)
        for name, (x, y, yaw) in layout.object_poses.items():
            z = self.table_height + self._object_specs[name].half_height
            if name in self._mocap_ids:
                self.data.mocap_pos[self._mocap_ids[name]] = (x, y, z)
                self.data.mocap_quat[self._mocap_ids[name]] = yaw_quat(yaw)
            else:
                adr = self._object_qpos_adr[name]
                self.data.qpos[adr : adr + 3] = (x, y, z)
                self.data.qpos[adr + 3 : adr + 7] = yaw_quat(yaw)
        for name, value in layout.joint_positions.items():
            self.data.qpos[self._joint_qpos_adr[name]] = value
        self.arm.reset(np.clip(layout.arm_qpos, self.arm.q_min, self.arm.q_max), gripper=1.0)  # runs mj_forward

    def _success(self) -> bool:
        return self.task.success(self)

    def object_state(self) -> np.ndarray:
        """The observation's ``object_state`` now: (7·n + k,) float32, object poses then object joints."""
        ids = self._object_body_ids
        poses = np.concatenate([self.data.xpos[ids], self.data.xquat[ids]], axis=1)  # (n, 7)
        joints = self.data.qpos[self._joint_qpos_index]  # (k,)
        return np.concatenate([poses.ravel(), joints]).astype(np.float32)

    def _observation(self) -> dict[str, np.ndarray]:
        state = np.empty(8, np.float32)
        state[:3] = self.data.site_xpos[self.arm.site_id]
        state[3:6] = self.arm.ee_axis_angle()
        state[6:] = self.data.qpos[self.arm.finger_qpos_index]
        obs = {"state": state, "object_state": self.object_state()}
        for camera in self.cameras:
            obs[f"{camera}_image"] = self._render(CAMERAS[camera])
        return obs

    def _render(self, camera: str) -> np.ndarray:
        if self._renderer is None:
            self._renderer = make_renderer(self.model, self.image_size, self.image_size)
            configure_render_scene(self._renderer.scene)
        # Renderers update from the last kinematics pass; after mj_step that is one substep old (2 ms).
        self._renderer.update_scene(self.data, camera=camera)
        return self._renderer.render().copy()  # (H, W, 3) uint8, row 0 at the top


def check_image_options(
    env_name: str,
    cameras: Sequence[str],
    allowed: Mapping[str, str],
    image_size: int,
    render_mode: str | None,
    metadata: Mapping[str, Any],
) -> tuple[str, ...]:
    """Validate a camera env's ``cameras`` (distinct keys of ``allowed``), ``image_size`` (16 … 480 px: the
    offscreen buffer the scenes declare) and ``render_mode``; returns the cameras as a tuple."""
    cameras = tuple(cameras)
    unknown = [c for c in cameras if c not in allowed]
    if unknown or len(set(cameras)) != len(cameras):
        raise ValueError(f"{env_name}: cameras must be distinct names from {sorted(allowed)}, got {cameras}.")
    if not 16 <= image_size <= 480:
        raise ValueError(f"{env_name}: image_size must be in [16, 480] pixels, got {image_size}.")
    if render_mode not in (None, *metadata["render_modes"]):
        raise ValueError(f"{env_name}: render_mode must be None or 'rgb_array', got {render_mode!r}.")
    return cameras


def make_renderer(model: mujoco.MjModel, height: int, width: int) -> mujoco.Renderer:
    """A :class:`mujoco.Renderer` on the OpenGL backend ``MUJOCO_GL`` names *now*.

    ``mujoco`` fixes its backend when first imported, so ``MUJOCO_GL=egl`` set later (a test's
    monkeypatch, a CLI flag) would be ignored and GLFW would fail without a display. Gymnasium's MuJoCo
    renderer reads ``MUJOCO_GL`` at render time; this does the same by handing ``mujoco.Renderer`` the
    chosen context class for the duration of its construction.
    """
    backend = os.environ.get("MUJOCO_GL", "").lower().strip()
    if backend == "egl":
        from mujoco.egl import GLContext
    elif backend == "osmesa":
        from mujoco.osmesa import GLContext
    else:
        return mujoco.Renderer(model, height, width)
    module = mujoco.gl_context
    previous = module.GLContext
    module.GLContext = GLContext
    try:
        return mujoco.Renderer(model, height, width)
    finally:
        module.GLContext = previous
