"""Several tabletop tasks in one env (``env.tasks``): the task per episode, padded observations, the fixed init
states of every task, demonstrations of every task, and evaluation per task."""

from __future__ import annotations

import json

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from envs import make_env
from envs.registry import TABLETOP_MULTITASK_ENV_ID
from envs.tabletop.multitask import MultiTaskTabletopEnv
from envs.tabletop.tasks import TASKS
from robo_rlft.cli import compose_config, main
from robo_rlft.data import load_dataset

TASK_LIST = ["OpenDrawer", "CloseDrawer", "PushCubeToPlate"]
MULTI = ["env=tabletop_multitask", "env.cameras=[agentview,wrist]", "env.image_size=32", "progress=false"]


@pytest.fixture(autouse=True)
def _headless_rendering(monkeypatch):
    monkeypatch.setenv("MUJOCO_GL", "egl")


def test_each_episode_runs_one_task_with_its_instruction_and_padded_object_state():
    env = MultiTaskTabletopEnv(["LiftCube", *TASK_LIST])
    try:
        sizes = [inner.object_state_size for inner in env.envs]
        assert env.observation_space["object_state"].shape == (max(sizes),) and len(set(sizes)) > 1
        for seed in range(8):  # consecutive seeds cycle through the tasks
            obs, info = env.reset(seed=seed)
            task = env.tasks[seed % 4]
            assert info["task"] == task and env.instruction == TASKS[task].instruction == info["instruction"]
            assert env.observation_space.contains(obs)
            assert not obs["object_state"][env.active_env.object_state_size :].any()  # the padding is zero
            obs, *_, info = env.step(env.action_space.sample())
            assert info["task"] == task and env.observation_space.contains(obs)
        _, info = env.reset(options={"task": "CloseDrawer"})
        assert info["task"] == "CloseDrawer"
        with pytest.raises(ValueError, match="options\\['task'\\]='Nope' is not one of this env's tasks"):
            env.reset(options={"task": "Nope"})
    finally:
        env.close()


def test_the_multitask_env_passes_gymnasiums_and_sb3s_checkers():
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    env = MultiTaskTabletopEnv(TASK_LIST, cameras=["agentview"], image_size=32)
    try:
        check_env(env, skip_render_check=True)
        sb3_check_env(env)
    finally:
        env.close()


def test_fixed_init_states_interleave_the_tasks_fixed_states():
    env = MultiTaskTabletopEnv(TASK_LIST)
    assert env.num_fixed_init_states == 150
    try:
        for index in (0, 1, 2, 4, 149):
            obs, info = env.reset(options={"init_state": index})
            task, state = TASK_LIST[index % 3], index // 3
            single = make_env(f"robo_rlft/Tabletop-{task}-v0", flatten=False)
            expected, single_info = single.reset(options={"init_state": state})
            single.close()
            assert info["task"] == task and info["init_state"] == state == single_info["init_state"]
            np.testing.assert_array_equal(obs["state"], expected["state"])
            np.testing.assert_array_equal(
                obs["object_state"][: len(expected["object_state"])], expected["object_state"]
            )
        with pytest.raises(ValueError, match=r"must be an int in \[0, 150\) \(3 tasks x 50\)"):
            env.reset(options={"init_state": 150})
    finally:
        env.close()


def test_task_lists_are_validated():
    with pytest.raises(ValueError, match="at least two distinct tabletop tasks"):
        MultiTaskTabletopEnv(["LiftCube"])
    with pytest.raises(ValueError, match=r"\['Nope'\] are not tasks"):
        compose_config(["env=tabletop_multitask", "env.tasks=[LiftCube,Nope]"])
    with pytest.raises(ValueError, match="give one task or a list, not both"):
        compose_config(["env=tabletop", "env.tasks=[LiftCube,CloseDrawer]"])
    with pytest.raises(ValueError, match="only applies to env=tabletop"):
        compose_config(["env=hopper", "env.tasks=[LiftCube,CloseDrawer]"])
    cfg = compose_config(["env=tabletop_multitask"])
    assert cfg.env.env_id == TABLETOP_MULTITASK_ENV_ID and cfg.env.make_kwargs()["tasks"] == TASK_LIST


def test_collect_pretrain_and_evaluate_per_task(tmp_path):
    """Demonstrations of every task (the experts succeed in each), a VLA trained on them, success per task."""
    collect = ["collect", "collect.episodes=6", "collect.action_noise=0", f"run_dir={tmp_path / 'data'}", *MULTI]
    assert main(collect) == 0
    dataset = load_dataset(tmp_path / "data" / "dataset.npz")
    assert sorted(set(dataset.instructions)) == sorted(TASKS[t].instruction for t in TASK_LIST)
    assert dataset.meta["success_rate"] == 1.0 and dataset.meta["instructions"] == sorted(set(dataset.instructions))
    pretrain = ["pretrain", f"pretrain.dataset={tmp_path / 'data' / 'dataset.npz'}", "pretrain.eval_episodes=6"]
    pretrain += ["pretrain.gradient_steps=3", "pretrain.batch_size=8", f"run_dir={tmp_path / 'sft'}"]
    assert main([*pretrain, "policy=vla_tiny", "policy.expert_width=32", "policy.expert_layers=1", *MULTI]) == 0
    result = json.loads((tmp_path / "sft" / "eval.json").read_text())
    assert list(result["success_by_task"]) == TASK_LIST
    assert [outcome["episodes"] for outcome in result["success_by_task"].values()] == [2, 2, 2]
