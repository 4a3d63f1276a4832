"""Env options from the config (tabletop reward shaping, action mode, cameras; LIBERO's suite and task)
reach every env the run makes, are recorded in checkpoints and datasets, and bad ones are refused."""

from __future__ import annotations

import json

import numpy as np
import pytest

from robo_rlft.cli import compose_config, main
from robo_rlft.data import DemoDataset, load_dataset, save_dataset

TASK = ["env=tabletop", "env.task=LiftCube", "progress=false"]
SMALL = ["policy.hidden_dims=[32,32]", "policy.noise.hidden_dims=[16]", "policy.critic.hidden_dims=[32]"]


def test_make_kwargs_carry_the_env_options_and_cameras_only_on_request():
    cfg = compose_config(["env=tabletop", "env.task=LiftCube", "env.reward_shaping=true", "env.cameras=[agentview]"])
    assert cfg.env.make_kwargs() == {"reward_shaping": True, "action_mode": "delta_ee"}
    assert cfg.env.make_kwargs(cameras=True) == {
        "reward_shaping": True,
        "action_mode": "delta_ee",
        "cameras": ["agentview"],
        "image_size": 128,
    }
    assert compose_config(["env=hopper"]).env.make_kwargs(cameras=True) == {}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["env=hopper", "env.reward_shaping=true"], "env.reward_shaping=True only applies to env=tabletop"),
        (["env=hopper", "env.cameras=[agentview]"], "only applies to env=tabletop or env=libero"),
        (["env=tabletop", "env.action_mode=torque"], "env.action_mode='torque' is not allowed"),
        (["env=tabletop", "env.cameras=[top]"], "env.cameras[]='top' is not allowed"),
        (["env=tabletop", "env.cameras=[wrist,wrist]"], "names a camera twice"),
        (["env=tabletop", "env.image_size=0"], "env.image_size must be > 0"),
        (["env=tabletop", "env.suite=libero_goal"], "env.suite='libero_goal' only applies to env=libero"),
        (["env=libero", "env.task_id=null"], "env=libero needs env.suite and env.task_id"),
        (["env=libero", "env.suite=libero_100"], "env.suite='libero_100' is not allowed"),
        (["env=libero", "env.task_id=10"], "env.task_id=10 is out of range: libero_spatial has tasks 0..9"),
    ],
)
def test_bad_env_options_are_refused_with_the_key_named(capsys, overrides, message):
    assert main(["finetune", *overrides]) == 2
    assert message in capsys.readouterr().err


def test_dataset_images_and_instructions_round_trip_and_are_validated(tmp_path):
    n = 3
    base = {
        "observations": np.zeros((n, 2), np.float32),
        "actions": np.zeros((n, 1), np.float32),
        "rewards": np.zeros(n, np.float32),
        "terminals": np.array([False, False, True]),
        "truncations": np.zeros(n, bool),
    }
    frames = np.random.default_rng(0).integers(0, 255, (n, 8, 8, 3), dtype=np.uint8)
    ds = DemoDataset(**base, images={"agentview": frames}, instructions=np.full(n, "lift the red cube"))
    loaded = load_dataset(save_dataset(ds, tmp_path / "d.npz"))
    np.testing.assert_array_equal(loaded.images["agentview"], frames)
    assert list(loaded.instructions) == ["lift the red cube"] * n
    with np.load(tmp_path / "d.npz", allow_pickle=False) as npz:  # plain arrays, no pickle
        assert {"agentview_image", "instructions"} <= set(npz.files)
    with pytest.raises(ValueError, match=r"images\['agentview'\] must be a uint8"):
        DemoDataset(**base, images={"agentview": frames.astype(np.float32)})
    with pytest.raises(ValueError, match=r"expected \(3, H, W, 3\)"):
        DemoDataset(**base, images={"agentview": frames[:2]})
    with pytest.raises(ValueError, match="instructions must be a str array of shape"):
        DemoDataset(**base, instructions=np.zeros(n))


def test_collect_with_cameras_records_images_and_instructions(tmp_path, monkeypatch):
    monkeypatch.setenv("MUJOCO_GL", "egl")
    cameras = ["env.cameras=[agentview,wrist]", "env.image_size=32"]
    argv = ["collect", "collect.episodes=1", "collect.action_noise=0", f"run_dir={tmp_path}", *TASK, *cameras]
    assert main(argv) == 0
    dataset = load_dataset(tmp_path / "dataset.npz")
    assert set(dataset.images) == {"agentview", "wrist"}
    for frames in dataset.images.values():
        assert frames.shape == (dataset.num_steps, 32, 32, 3) and frames.dtype == np.uint8
        assert frames.std() > 5  # a rendered scene, not a blank frame
    # The arm moves: the wrist camera's first and last frames differ.
    assert np.abs(dataset.images["wrist"][0].astype(int) - dataset.images["wrist"][-1]).mean() > 5
    assert set(dataset.instructions) == {"lift the red cube"}
    assert dataset.meta["observation_layout"] == {"state": 8, "object_state": 7}
    assert dataset.meta["env_kwargs"]["cameras"] == ["agentview", "wrist"]


def test_checkpoints_record_env_options_and_eval_rebuilds_that_env(tmp_path):
    """A policy trained with joint actions is evaluated with joint actions, whatever the eval config says."""
    joint = ["env.action_mode=joint", "env.reward_shaping=true"]
    collect = ["collect", "collect.episodes=2", "collect.action_noise=0", f"run_dir={tmp_path / 'c'}"]
    assert main([*collect, *TASK, *joint]) == 0
    dataset = load_dataset(tmp_path / "c" / "dataset.npz")
    assert dataset.act_dim == 8  # 7 joint targets + gripper
    assert dataset.rewards.min() < 0  # shaping terms are distances below zero
    pretrain = ["pretrain", f"pretrain.dataset={tmp_path / 'c' / 'dataset.npz'}", "pretrain.gradient_steps=5"]
    assert main([*pretrain, "pretrain.eval_episodes=1", f"run_dir={tmp_path / 'p'}", *TASK, *joint, *SMALL]) == 0
    meta = json.loads((tmp_path / "p" / "final" / "config.json").read_text())["metadata"]
    assert meta["env_kwargs"] == {"reward_shaping": True, "action_mode": "joint"}
    evaluate = ["eval", f"eval.checkpoint={tmp_path / 'p'}", "eval.episodes=1", f"run_dir={tmp_path / 'e'}"]
    assert main([*evaluate, "progress=false"]) == 0  # default env=hopper: the checkpoint's env wins
    result = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert result["env"] == "robo_rlft/Tabletop-LiftCube-v0" and result["return_mean"] < 0


def test_the_tabletop_experiment_preset_composes_over_any_task():
    cfg = compose_config(["experiment=tabletop", "env.task=OpenDrawer"])
    assert (cfg.env.name, cfg.env.task, cfg.env.num_envs) == ("tabletop", "OpenDrawer", 32)
    assert cfg.algo.actor_lr == 3e-5 and cfg.algo.eval_episodes == 50
