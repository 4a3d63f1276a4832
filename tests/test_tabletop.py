"""The LIBERO-style tabletop suite: env contract, determinism, fixed init states, expert, speed, images."""

from __future__ import annotations

import time

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from envs.tabletop.env import TabletopEnv
from envs.tabletop.expert import expert_for, rollout_expert
from envs.tabletop.tasks import NUM_EVAL_INIT_STATES, TASKS, eval_layouts, lifted, near, on


@pytest.fixture()
def gl(monkeypatch):
    """Headless offscreen rendering (set before the first Renderer is created)."""
    monkeypatch.setenv("MUJOCO_GL", "egl")


def _assert_obs_ok(env: TabletopEnv, obs: dict) -> None:
    assert env.observation_space.contains(obs), {k: (v.shape, v.dtype) for k, v in obs.items()}
    for key, value in obs.items():
        assert np.isfinite(value).all(), key


def _rollout(env: TabletopEnv, seed: int, steps: int) -> list[np.ndarray]:
    obs, _ = env.reset(seed=seed)
    env.action_space.seed(seed)
    out = [np.concatenate([obs["state"], obs["object_state"]])]
    for _ in range(steps):
        obs, reward, terminated, truncated, _ = env.step(env.action_space.sample())
        _assert_obs_ok(env, obs)
        out.append(np.concatenate([obs["state"], obs["object_state"], [reward]]))
        if terminated or truncated:
            break
    return out


@pytest.mark.filterwarnings("ignore:.*Box observation space (minimum|maximum) value is")
@pytest.mark.filterwarnings("ignore:.*symmetric and normalized space")
@pytest.mark.parametrize("task", sorted(TASKS))
@pytest.mark.parametrize("action_mode", ["delta_ee", "joint"])
def test_env_passes_checker_is_seeded_and_finite(task, action_mode):
    env, other = TabletopEnv(task, action_mode=action_mode), TabletopEnv(task, action_mode=action_mode)
    try:
        check_env(env, skip_render_check=True)
        first, second = _rollout(env, 7, 30), _rollout(other, 7, 30)
        assert len(first) == len(second)
        for a, b in zip(first, second, strict=True):
            np.testing.assert_array_equal(a, b)
        obs_a, info = env.reset(seed=1)
        obs_b, _ = env.reset(seed=2)
        assert not np.array_equal(obs_a["object_state"], obs_b["object_state"]), "reset must randomise"
        assert info["instruction"] == env.instruction == TASKS[task].instruction
        assert obs_a["state"].shape == (8,)
        # 7 (position, quaternion) per object, then one entry per object joint (a drawer's opening).
        assert obs_a["object_state"].shape == (7 * len(TASKS[task].objects) + len(TASKS[task].joint_names),)
    finally:
        env.close()
        other.close()


@pytest.mark.filterwarnings("ignore:.*Box observation space (minimum|maximum) value is")
@pytest.mark.filterwarnings("ignore:.*not having a spec")
def test_env_with_cameras_passes_checker(gl):
    env = TabletopEnv(cameras=("agentview", "wrist"), image_size=64, render_mode="rgb_array")
    try:
        check_env(env)
        obs, _ = env.reset(seed=0)
        assert obs["agentview_image"].shape == (64, 64, 3) and obs["agentview_image"].dtype == np.uint8
        assert env.render().shape == (64, 64, 3)
    finally:
        env.close()


def test_images_are_right_side_up_and_show_the_cube(gl):
    env = TabletopEnv(cameras=("agentview", "wrist"), image_size=128)
    try:
        obs, _ = env.reset(options={"init_state": 0})
        image = obs["agentview_image"].astype(int)
        # The table (brown: r > g > b) fills the lower part of the agent view; above it is the dark backdrop.
        tableish = (image[..., 0] > image[..., 2] + 20) & (image[..., 0] > 80)
        lower, upper = tableish[80:].mean(), tableish[:30].mean()
        assert lower > 0.5 and upper < 0.2, (lower, upper)
        for key in ("agentview_image", "wrist_image"):
            img = obs[key].astype(int)
            red = (img[..., 0] > 150) & (img[..., 1] < 80) & (img[..., 2] < 80)
            assert red.sum() >= 4, f"no red cube pixels in {key}"
    finally:
        env.close()


def test_fixed_init_states_are_deterministic_distinct_and_used():
    for task in TASKS:
        layouts = eval_layouts(task)
        assert len(layouts) == NUM_EVAL_INIT_STATES
        poses = np.array([[p for pose in layout.object_poses.values() for p in pose] for layout in layouts])
        assert len(np.unique(poses.round(6), axis=0)) == NUM_EVAL_INIT_STATES, "init states must be distinct"
    env = TabletopEnv()
    obs_a, info = env.reset(seed=123, options={"init_state": 3})
    obs_b, _ = env.reset(seed=456, options={"init_state": 3})  # the seed does not matter for a fixed state
    np.testing.assert_array_equal(obs_a["object_state"], obs_b["object_state"])
    np.testing.assert_array_equal(obs_a["state"], obs_b["state"])
    assert info["init_state"] == 3
    cube_xy = obs_a["object_state"][:2]
    np.testing.assert_allclose(cube_xy, eval_layouts("PickCubeOntoPlate")[3].object_poses["cube"][:2], atol=1e-6)
    with pytest.raises(ValueError, match="init_state"):
        env.reset(options={"init_state": NUM_EVAL_INIT_STATES})


def test_a_step_in_slices_equals_step():
    """The simulated robot's sliced control step (apply_action, advance in parts, finish_step) is exactly step()."""
    whole = TabletopEnv("LiftCube", action_mode="joint")
    sliced = TabletopEnv("LiftCube", action_mode="joint")
    whole.reset(options={"init_state": 3})
    sliced.reset(options={"init_state": 3})
    rng = np.random.default_rng(0)
    for _ in range(5):
        action = np.append(whole.arm.q + rng.normal(0, 0.05, 7), rng.uniform(-1, 1))
        expected = whole.step(action.astype(np.float32))
        sliced.apply_action(action.astype(np.float32))
        for _ in range(5):
            sliced.advance(5)
        got = sliced.finish_step()
        np.testing.assert_array_equal(got[0]["state"], expected[0]["state"])
        np.testing.assert_array_equal(got[0]["object_state"], expected[0]["object_state"])
        np.testing.assert_array_equal(sliced.object_state(), expected[0]["object_state"])
        assert got[1:4] == expected[1:4]


def test_constructor_validates_arguments():
    with pytest.raises(ValueError, match="action_mode"):
        TabletopEnv(action_mode="osc")
    with pytest.raises(ValueError, match="cameras"):
        TabletopEnv(cameras=("frontview",))
    with pytest.raises(ValueError, match="Unknown tabletop task"):
        TabletopEnv("StackBlocks")


class _Scene:
    table_height = 0.8

    def __init__(self, positions):
        self.positions = {k: np.asarray(v, float) for k, v in positions.items()}

    def position(self, name):
        return self.positions[name]

    def object_spec(self, name):
        return TASKS["PickCubeOntoPlate"].object_spec(name)


def test_relations_on_named_positions():
    plate = (0.0, 0.0, 0.806)
    assert on("cube", "plate")(_Scene({"cube": (0.03, 0.0, 0.832), "plate": plate}))
    assert not on("cube", "plate")(_Scene({"cube": (0.1, 0.0, 0.832), "plate": plate}))  # beside it
    assert not on("cube", "plate")(_Scene({"cube": (0.0, 0.0, 0.9), "plate": plate}))  # held above it
    scene = _Scene({"cube": (0.0, 0.0, 0.93), "plate": plate})
    assert lifted("cube", 0.1)(scene) and not lifted("cube", 0.2)(scene)
    assert near("cube", "plate", 0.2)(scene) and not near("cube", "plate", 0.1)(scene)
    combined = lifted("cube", 0.1) & ~on("cube", "plate")
    assert combined(scene) and "not on(cube, plate)" in combined.description


@pytest.mark.parametrize("task", ["PickCubeOntoPlate", "LiftCube"])
def test_expert_solves_the_fixed_init_states(task):
    env = TabletopEnv(task)
    expert = expert_for(env)
    results = [rollout_expert(env, expert, init_state=i)[0] for i in range(NUM_EVAL_INIT_STATES)]
    assert sum(results) >= 0.9 * NUM_EVAL_INIT_STATES, f"expert succeeded on {sum(results)}/50"


@pytest.mark.parametrize("task", sorted(TASKS))
def test_every_task_expert_solves_its_first_fixed_init_states(task):
    """All 50 states per task are in benchmarks/tabletop_experts.py; here the first 10 keep the suite fast."""
    env = TabletopEnv(task)
    results = [rollout_expert(env, expert_for(env), init_state=i) for i in range(10)]
    assert sum(ok for ok, _ in results) >= 9, f"{task}: {results}"
    assert all(steps < env.max_episode_steps for ok, steps in results if ok), "the horizon must leave slack"


def test_noisy_expert_in_joint_mode_still_succeeds():
    env = TabletopEnv(action_mode="joint")
    expert = expert_for(env, noise=0.1, seed=0)
    results = [rollout_expert(env, expert, init_state=i)[0] for i in range(10)]
    assert sum(results) >= 8, results


def test_random_policy_rarely_succeeds():
    env = TabletopEnv(max_episode_steps=100)
    env.action_space.seed(0)
    successes = 0
    for episode in range(10):
        env.reset(seed=episode)
        for _ in range(100):
            _, reward, terminated, truncated, info = env.step(env.action_space.sample())
            assert reward == float(info["is_success"])  # sparse by default
            if terminated or truncated:
                break
        successes += bool(info["is_success"])
        assert truncated or terminated
    assert successes <= 1


def test_reward_shaping_adds_the_info_terms():
    env = TabletopEnv(reward_shaping=True)
    env.reset(seed=0)
    _, reward, _, _, info = env.step(np.zeros(7, np.float32))
    assert reward == pytest.approx(info["reward_success"] + info["reward_reach"] + info["reward_place"])
    assert info["reward_reach"] < 0.0


def _steps_per_second(env: TabletopEnv, steps: int) -> float:
    env.reset(seed=0)
    env.action_space.seed(0)
    actions = [env.action_space.sample() for _ in range(steps)]
    start = time.perf_counter()
    for action in actions:
        _, _, terminated, truncated, _ = env.step(action)
        if terminated or truncated:
            env.reset()
    return steps / (time.perf_counter() - start)


def test_state_only_speed():
    rate = _steps_per_second(TabletopEnv(), 600)
    print(f"tabletop state-only: {rate:.0f} steps/s")
    assert rate >= 300, f"{rate:.0f} steps/s (about 2,000 expected on an idle 2-core machine)"


def test_two_camera_speed(gl):
    env = TabletopEnv(cameras=("agentview", "wrist"), image_size=128)
    try:
        rate = _steps_per_second(env, 150)
    finally:
        env.close()
    print(f"tabletop two 128 px cameras: {rate:.0f} steps/s")
    assert rate >= 50, f"{rate:.0f} steps/s (about 400 expected on an idle 2-core machine)"


def test_every_tabletop_task_is_registered_and_makes():
    import gymnasium as gym

    import envs
    from envs.registry import tabletop_env_ids

    envs.register_envs()
    for name, env_id in tabletop_env_ids().items():
        env = gym.make(env_id)
        try:
            obs, info = env.reset(seed=0)
            assert env.observation_space.contains(obs) and info["instruction"]
            assert env.spec.max_episode_steps == env.unwrapped.task.horizon, name
        finally:
            env.close()


def test_every_tabletop_task_passes_stable_baselines3_check_env():
    import warnings

    import gymnasium as gym
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    import envs
    from envs.registry import tabletop_env_ids

    envs.register_envs()
    for name, env_id in tabletop_env_ids().items():
        env = gym.make(env_id).unwrapped
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                sb3_check_env(env, warn=True)
            assert not caught, f"{name}: {[str(w.message) for w in caught]}"
        finally:
            env.close()


def test_cli_collects_pretrains_finetunes_and_evaluates_on_tabletop(tmp_path):
    """``env=tabletop env.task=...`` end to end: scripted demos -> BC -> PPO -> evaluation on the
    fixed init states, with success rates reported."""
    import json

    from robo_rlft.cli import main
    from robo_rlft.data import load_dataset

    task = ["env=tabletop", "env.task=LiftCube", "progress=false"]
    assert main(["collect", "collect.episodes=3", "collect.action_noise=0", f"run_dir={tmp_path / 'c'}", *task]) == 0
    dataset = load_dataset(tmp_path / "c" / "dataset.npz")
    assert dataset.meta["env"] == "robo_rlft/Tabletop-LiftCube-v0" and dataset.meta["success_rate"] == 1.0
    assert dataset.obs_dim == 8 + 7 and dataset.act_dim == 7  # state + the cube's pose; delta-EE actions
    pretrain = ["pretrain", f"pretrain.dataset={tmp_path / 'c' / 'dataset.npz'}", "pretrain.gradient_steps=20"]
    small = ["policy.hidden_dims=[32,32]", "policy.noise.hidden_dims=[16]", "policy.critic.hidden_dims=[32]"]
    assert main([*pretrain, "pretrain.eval_episodes=2", f"run_dir={tmp_path / 'p'}", *task, *small]) == 0
    finetune = ["finetune", f"policy.pretrained={tmp_path / 'p' / 'final'}", f"run_dir={tmp_path / 'f'}"]
    budget = ["algo.iterations=1", "algo.steps_per_iteration=10", "env.num_envs=2", "algo.eval_episodes=2"]
    assert main([*finetune, *budget, *task, *small]) == 0
    result = json.loads((tmp_path / "f" / "eval.json").read_text())
    assert result["episodes"] == 2 and result["success_rate"] is not None and len(result["success_ci95"]) == 2


def test_tabletop_config_requires_a_known_task(capsys):
    from robo_rlft.cli import main

    assert main(["finetune", "env=tabletop", "env.task=StackCubes"]) == 2
    assert "env.task='StackCubes'" in capsys.readouterr().err
    assert main(["finetune", "env=hopper", "env.task=LiftCube"]) == 2
