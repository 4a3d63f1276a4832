"""The LIBERO adapter: argument checks and the missing-extra error (fast, no LIBERO needed), and the
observation/action contract on libero_spatial task 0 (slow, needs the ``libero`` extra)."""

from __future__ import annotations

import os
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest

from envs import make_env, register_envs, resolve_env_id
from envs.libero import (
    LIBERO_INSTALL,
    SUITES,
    LiberoEnv,
    LiberoNotInstalledError,
    configure_headless_rendering,
)
from envs.registry import LIBERO_ENV_ID

SUITE, TASK_ID = "libero_spatial", 0


def isolate_gl_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """Undo, after the test, whatever the import helper sets in ``MUJOCO_GL`` / ``PYOPENGL_PLATFORM``."""
    for var in ("MUJOCO_GL", "PYOPENGL_PLATFORM"):
        was_set = var in os.environ
        # setenv records the old value, or its absence, for undo (delenv of an unset name records nothing).
        monkeypatch.setenv(var, os.environ.get(var, ""))
        if not was_set:
            monkeypatch.delenv(var)


def hide_libero(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``libero`` and ``robosuite`` unimportable, even where the extra is installed and imported."""
    isolate_gl_backend(monkeypatch)  # the import helper picks a GL backend before it imports
    for name in [*sys.modules, "libero", "robosuite"]:
        if name.split(".")[0] in ("libero", "robosuite"):
            monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules: import raises ModuleNotFoundError


# -- fast: no LIBERO needed ---------------------------------------------------------------------------


def test_missing_extra_error_names_the_extra(monkeypatch):
    hide_libero(monkeypatch)
    with pytest.raises(LiberoNotInstalledError, match=r'pip install "robo-rlft\[libero\]"') as excinfo:
        LiberoEnv(SUITE, TASK_ID)
    assert isinstance(excinfo.value, ModuleNotFoundError) and isinstance(excinfo.value, ImportError)
    assert LIBERO_INSTALL in str(excinfo.value)
    # The same error through the registry, as the CLI builds the env.
    with pytest.raises(LiberoNotInstalledError, match=r"robo-rlft\[libero\]"):
        make_env(LIBERO_ENV_ID, suite=SUITE, task_id=TASK_ID)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"suite": "libero_nope"}, r"suite must be one of \['libero_10', 'libero_90', 'libero_goal'"),
        ({"task_id": 10}, r"task_id for libero_spatial must be an int in \[0, 10\), got 10"),
        ({"task_id": -1}, r"in \[0, 10\), got -1"),
        ({"task_id": "0"}, r"got '0'"),
        ({"suite": "libero_90", "task_id": 90}, r"task_id for libero_90 must be an int in \[0, 90\)"),
        ({"cameras": ("agentview", "left")}, r"cameras must be distinct names from \['agentview', 'wrist'\]"),
        ({"cameras": ("wrist", "wrist")}, r"cameras must be distinct"),
        ({"image_size": 8}, r"image_size must be in \[16, 480\] pixels, got 8"),
        ({"render_mode": "human"}, r"render_mode must be None or 'rgb_array'"),
        ({"max_episode_steps": 0}, r"max_episode_steps must be >= 1"),
    ],
)
def test_bad_arguments_are_rejected_before_importing_libero(monkeypatch, kwargs, message):
    hide_libero(monkeypatch)  # validation must not depend on the extra (nor cost a scene build)
    with pytest.raises(ValueError, match=message):
        LiberoEnv(**{"suite": SUITE, "task_id": TASK_ID, **kwargs})


def test_registered_without_importing_libero():
    register_envs()
    assert LIBERO_ENV_ID in gym.registry
    assert resolve_env_id(LIBERO_ENV_ID) == LIBERO_ENV_ID
    # A fresh interpreter: registering every env must not import LIBERO (it is an optional extra).
    code = "import sys, envs; assert not {'libero', 'robosuite'} & set(sys.modules), sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_headless_rendering_defaults_to_egl_only_when_unset(monkeypatch):
    isolate_gl_backend(monkeypatch)
    monkeypatch.delenv("MUJOCO_GL", raising=False)
    monkeypatch.delenv("PYOPENGL_PLATFORM", raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    configure_headless_rendering()
    assert os.environ["MUJOCO_GL"] == "egl" and os.environ["PYOPENGL_PLATFORM"] == "egl"
    monkeypatch.setenv("MUJOCO_GL", "osmesa")
    monkeypatch.delenv("PYOPENGL_PLATFORM")
    configure_headless_rendering()  # the user's choice stands
    assert os.environ["MUJOCO_GL"] == "osmesa" and "PYOPENGL_PLATFORM" not in os.environ


def test_suite_step_limits_are_liberos():
    assert {name: spec.max_steps for name, spec in SUITES.items()} == {
        "libero_spatial": 220,
        "libero_object": 280,
        "libero_goal": 300,
        "libero_10": 520,
        "libero_90": 400,
    }


# -- slow: the real benchmark (the `libero` extra; CI installs it) -------------------------------------


def check_step(env: LiberoEnv, action: np.ndarray) -> dict[str, np.ndarray]:
    obs, reward, terminated, truncated, info = env.step(action)
    assert env.observation_space.contains(obs)
    assert isinstance(reward, float) and reward in (0.0, 1.0)
    assert isinstance(terminated, bool) and isinstance(truncated, bool)
    assert isinstance(info["is_success"], bool) and terminated == info["is_success"]
    assert info["instruction"] == env.instruction
    return obs


@pytest.mark.slow
def test_libero_spatial_task0_observation_contract():
    env = LiberoEnv(SUITE, TASK_ID, cameras=("agentview", "wrist"), image_size=128)
    try:
        assert env.num_fixed_init_states == 50 and env.max_episode_steps == 220
        assert env.instruction == "pick up the black bowl between the plate and the ramekin and place it on the plate"
        assert env.action_space == gym.spaces.Box(-1.0, 1.0, (7,), np.float32)
        obs, info = env.reset(options={"init_state": 0})
        assert info == {"instruction": env.instruction, "init_state": 0, "is_success": False}
        assert env.observation_space.contains(obs)
        assert set(obs) == {"state", "object_state", "agentview_image", "wrist_image"}
        assert obs["state"].shape == (8,) and obs["state"].dtype == np.float32
        assert obs["object_state"].ndim == 1 and obs["object_state"].dtype == np.float32
        assert np.isfinite(obs["state"]).all() and np.isfinite(obs["object_state"]).all()
        for key in ("agentview_image", "wrist_image"):
            assert obs[key].shape == (128, 128, 3) and obs[key].dtype == np.uint8 and obs[key].std() > 10

        # state = [eef pos, eef axis-angle, fingers] from LIBERO's raw observation.
        raw = env._libero.env._get_observations()
        assert np.allclose(obs["state"][:3], raw["robot0_eef_pos"], atol=1e-6)
        assert np.allclose(obs["state"][6:], raw["robot0_gripper_qpos"], atol=1e-6)
        assert np.allclose(obs["object_state"], raw["object-state"], atol=1e-6)
        assert 3.0 < np.linalg.norm(obs["state"][3:6]) < 3.3  # the gripper points down: a ~π rotation

        # Right side up: robosuite's own frame is in OpenGL row order (bottom row first).
        from robosuite.utils.binding_utils import MjRenderContextOffscreen

        sim = env._libero.sim
        MjRenderContextOffscreen(sim, device_id=-1)  # the adapter never creates robosuite's context
        sim._render_context_offscreen.vopt.geomgroup[0] = 0  # as robosuite's envs: visual meshes only
        for camera, robosuite_name in (("agentview", "agentview"), ("wrist", "robot0_eye_in_hand")):
            frame = sim.render(camera_name=robosuite_name, width=128, height=128).astype(np.float64)
            ours = obs[f"{camera}_image"]
            flipped_error, raw_error = np.abs(ours - frame[::-1]).mean(), np.abs(ours - frame).mean()
            assert flipped_error < 2.0 and raw_error > 20.0, (camera, flipped_error, raw_error)

        # Zero and random actions keep the contract; the gripper's +1 closes and -1 opens.
        for _ in range(3):
            check_step(env, np.zeros(7, np.float32))
        env.action_space.seed(0)
        for _ in range(3):
            check_step(env, env.action_space.sample())
        width = obs["state"][6] - obs["state"][7]  # the fingers' joints move in opposite directions
        for _ in range(8):
            closed = check_step(env, np.array([0, 0, 0, 0, 0, 0, 1.0], np.float32))
        for _ in range(8):
            opened = check_step(env, np.array([0, 0, 0, 0, 0, 0, -1.0], np.float32))
        closed_width, open_width = closed["state"][6] - closed["state"][7], opened["state"][6] - opened["state"][7]
        assert closed_width < width - 0.01 and open_width > closed_width + 0.02, (width, closed_width, open_width)
    finally:
        env.close()


@pytest.mark.slow
def test_libero_fixed_init_state_is_one_scene():
    """Init state i is the same episode however the env got there: a reused env (after an episode that
    closed the gripper), a ``fixed_init_state`` seed, and a freshly built env agree exactly."""
    rng = np.random.default_rng(0)
    actions = rng.uniform(-1, 1, (12, 7)).astype(np.float32)
    actions[6:, 6] = 1.0  # close the gripper half-way through

    def rollout(env: gym.Env, **reset_kwargs) -> np.ndarray:
        obs, info = env.reset(**reset_kwargs)
        assert info["init_state"] == 3
        flat = [np.concatenate([obs["state"], obs["object_state"]])]
        for action in actions:
            obs = check_step(env, action)
            flat.append(np.concatenate([obs["state"], obs["object_state"]]))
        return np.stack(flat)  # (1 + steps, 8 + D)

    env = LiberoEnv(SUITE, TASK_ID)
    try:
        first = rollout(env, options={"init_state": 3})
        env.reset(options={"init_state": 7})
        for _ in range(20):
            env.step(np.append(rng.uniform(-1, 1, 6), 1.0).astype(np.float32))
        again = rollout(env, seed=53, options={"fixed_init_state": True})  # 53 % 50 == 3
        np.testing.assert_array_equal(first, again)

        # Without options the state is drawn from the env's RNG: same seed, same state.
        obs_a, info_a = env.reset(seed=11)
        obs_b, info_b = env.reset(seed=11)
        assert info_a["init_state"] == info_b["init_state"] and 0 <= info_a["init_state"] < 50
        np.testing.assert_array_equal(obs_a["object_state"], obs_b["object_state"])
    finally:
        env.close()

    # A fresh env through the registry (flat observations), as training builds it.
    fresh = make_env(LIBERO_ENV_ID, suite=SUITE, task_id=TASK_ID)
    try:
        obs, info = fresh.reset(options={"init_state": 3})
        assert info["init_state"] == 3 and obs.shape == (first.shape[1],) and obs.dtype == np.float32
        flat = [obs]
        for action in actions:
            obs, *_ = fresh.step(action)
            flat.append(obs)
        np.testing.assert_array_equal(first, np.stack(flat))
    finally:
        fresh.close()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*Box observation space (minimum|maximum) value is")
def test_libero_env_passes_gymnasium_and_stable_baselines3_env_checkers():
    import warnings

    from gymnasium.utils.env_checker import check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    env = LiberoEnv(SUITE, TASK_ID)
    try:
        check_env(env, skip_render_check=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sb3_check_env(env, warn=True)
        # robosuite's own import-time deprecation chatter is not about the env's contract.
        ours = [str(w.message) for w in caught if "robosuite" not in str(w.filename)]
        assert not ours, ours
    finally:
        env.close()
