"""Experts: tiny PPO training, loading, VecNormalize-exact acting and noisy demonstration rollouts."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

import envs
from robo_rlft.data import DemoDataset, load_dataset, save_dataset
from robo_rlft.expert import META_FILE, MODEL_FILE, NORMALIZER_FILE, Expert, rollout_expert, train_expert


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def expert_dir(tmp_path_factory, one_torch_thread):
    # One PPO iteration (8 envs x 256 steps): enough to get non-trivial normaliser statistics.
    return train_expert("hopper", total_steps=2048, out_dir=tmp_path_factory.mktemp("expert"), eval_episodes=2)


@pytest.fixture(scope="module")
def expert(expert_dir):
    return Expert.load(expert_dir, "hopper")


def test_train_writes_self_describing_directory(expert_dir):
    assert {p.name for p in expert_dir.iterdir()} == {MODEL_FILE, NORMALIZER_FILE, META_FILE}
    meta = json.loads((expert_dir / META_FILE).read_text())
    assert meta["env"] == "hopper"
    assert meta["total_steps"] == 2048
    assert meta["seed"] == 0
    assert np.isfinite(meta["eval_return_mean"])
    with np.load(expert_dir / NORMALIZER_FILE) as npz:
        assert set(npz.files) == {"mean", "var", "clip_obs", "epsilon"}
        assert npz["mean"].shape == (11,)
        assert not np.allclose(npz["mean"], 0.0)  # statistics were actually collected


def test_act_matches_vecnormalize_and_sb3_predict(expert):
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(16, expert.obs_dim)) * 3.0  # large values so clip_obs matters somewhere too
    # Reference: SB3's own VecNormalize, carrying the saved statistics.
    vec_norm = VecNormalize(DummyVecEnv([lambda: envs.make_env("hopper")]), norm_obs=True, norm_reward=False)
    vec_norm.obs_rms.mean, vec_norm.obs_rms.var = expert.obs_mean, expert.obs_var
    vec_norm.clip_obs, vec_norm.epsilon = expert.clip_obs, expert.epsilon
    normalized = vec_norm.normalize_obs(obs)
    np.testing.assert_array_equal(expert.normalize_obs(obs), normalized)

    reference, _ = expert.model.predict(normalized, deterministic=True)
    actions = expert.act(obs)
    assert actions.shape == (16, expert.act_dim) and actions.dtype == np.float32
    np.testing.assert_array_equal(actions, reference.astype(np.float32))
    # Unbatched input: same action up to float rounding (a batch of 1 takes another matmul kernel).
    single = expert.act(obs[3])
    assert single.shape == (expert.act_dim,)
    np.testing.assert_allclose(single, actions[3], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"obs must have shape \(B, 11\) or \(11,\), got \(4, 3\)"):
        expert.act(np.zeros((4, 3)))


def test_load_errors(expert_dir, tmp_path):
    with pytest.raises(ValueError, match="trained on env 'hopper', but env 'walker2d' was requested"):
        Expert.load(expert_dir, "walker2d")
    assert Expert.load(expert_dir, "robo_rlft/Hopper-v5").env_name == "hopper"  # ids are accepted too
    broken = tmp_path / "broken"
    shutil.copytree(expert_dir, broken)
    (broken / NORMALIZER_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(broken / NORMALIZER_FILE))):
        Expert.load(broken)


def test_train_rejects_unknown_env_before_work(tmp_path):
    with pytest.raises(ValueError, match="Unknown env 'nope'"):
        train_expert("nope", total_steps=2048, out_dir=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_rollout_dataset_is_valid_and_deterministic(expert, tmp_path):
    ds = rollout_expert(expert, "hopper", num_episodes=3, seed=5)
    assert isinstance(ds, DemoDataset)
    assert ds.num_episodes == 3
    assert ds.meta["action_noise"] == 0.0 and ds.meta["seed"] == 5 and ds.meta["env"] == "hopper"
    assert ds.meta["expert_path"] == str(expert.path.resolve())
    # The stored actions are the expert's (noise 0) and the stored obs are what it acted on.
    np.testing.assert_allclose(ds.actions, expert.act(ds.observations), atol=1e-5)
    again = rollout_expert(expert, "hopper", num_episodes=3, seed=5)
    for key in ("observations", "actions", "rewards", "terminals", "truncations"):
        np.testing.assert_array_equal(getattr(ds, key), getattr(again, key))
    # The dataset survives the file format's validation.
    loaded = load_dataset(save_dataset(ds, tmp_path / "demos.npz"))
    np.testing.assert_array_equal(loaded.episode_returns(), ds.episode_returns())


def test_action_noise_changes_executed_actions_and_returns(expert):
    clean = rollout_expert(expert, "hopper", num_episodes=2, seed=0)
    noisy = rollout_expert(expert, "hopper", num_episodes=2, action_noise=1.0, seed=0)
    assert noisy.meta["action_noise"] == 1.0
    assert not np.allclose(noisy.episode_returns(), clean.episode_returns())
    # Executed (stored) actions are noisy yet stay inside the action space.
    assert np.abs(noisy.actions - expert.act(noisy.observations)).mean() > 0.3
    assert noisy.actions.min() >= -1.0 and noisy.actions.max() <= 1.0
    # Same seed, same noise: reproducible.
    np.testing.assert_array_equal(
        noisy.actions, rollout_expert(expert, "hopper", num_episodes=2, action_noise=1.0, seed=0).actions
    )


def test_rollout_validates_arguments(expert):
    with pytest.raises(ValueError, match="trained on env 'hopper', but env 'ant' was requested"):
        rollout_expert(expert, "ant", num_episodes=1)
    with pytest.raises(ValueError, match=r"action_noise must be a finite std >= 0, got -0\.1"):
        rollout_expert(expert, "hopper", num_episodes=1, action_noise=-0.1)
    with pytest.raises(ValueError, match="num_episodes must be >= 1, got 0"):
        rollout_expert(expert, "hopper", num_episodes=0)


def test_plain_sb3_zip_loads_with_identity_normaliser(expert_dir):
    from stable_baselines3 import PPO

    zip_path = expert_dir / "expert.zip"
    plain = Expert.load(zip_path, env_name="hopper")
    obs = np.random.default_rng(0).normal(size=(4, plain.obs_dim)).astype(np.float32)
    expected, _ = PPO.load(zip_path, device="cpu").predict(obs, deterministic=True)
    np.testing.assert_array_equal(plain.act(obs), expected.astype(np.float32))
    assert plain.meta["env"] == "hopper"
    with pytest.raises(ValueError, match="needs the env"):
        Expert.load(zip_path)
