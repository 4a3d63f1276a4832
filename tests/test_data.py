"""DemoDataset: validation, episode bookkeeping, action chunks and the .npz round trip."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from robo_rlft.data import FORMAT_VERSION, OBS_STD_FLOOR, DemoDataset, load_dataset, save_dataset


def two_episode_dataset() -> DemoDataset:
    """Episode 0: steps 0-2 (terminated). Episode 1: steps 3-4 (truncated). obs_dim 2, act_dim 1."""
    return DemoDataset(
        observations=np.arange(10, dtype=np.float32).reshape(5, 2),
        actions=np.array([[1.0], [2.0], [3.0], [10.0], [20.0]], dtype=np.float32),
        rewards=np.array([1.0, 2.0, 3.0, 0.5, -1.5], dtype=np.float32),
        terminals=np.array([False, False, True, False, False]),
        truncations=np.array([False, False, False, False, True]),
        meta={"env": "hopper", "action_noise": 0.1, "seed": 3, "nested": {"a": [1, 2]}},
    )


def arrays(**overrides: np.ndarray) -> dict:
    ds = two_episode_dataset()
    fields = {
        "observations": ds.observations,
        "actions": ds.actions,
        "rewards": ds.rewards,
        "terminals": ds.terminals,
        "truncations": ds.truncations,
    }
    fields.update(overrides)
    return fields


# ---- episodes --------------------------------------------------------------------------------------


def test_episode_bookkeeping():
    ds = two_episode_dataset()
    assert ds.num_episodes == 2
    assert ds.episode_slices() == [slice(0, 3), slice(3, 5)]
    np.testing.assert_array_equal(ds.episode_lengths(), [3, 2])
    np.testing.assert_allclose(ds.episode_returns(), [6.0, -1.0])


def test_terminal_and_truncation_on_same_step_is_one_episode():
    # Gymnasium sets both when the env terminates on the time-limit step.
    ds = DemoDataset(**arrays(truncations=np.array([False, False, True, False, True])))
    assert ds.num_episodes == 2
    assert ds.episode_slices() == [slice(0, 3), slice(3, 5)]


def test_stats():
    ds = two_episode_dataset()
    stats = ds.stats()
    np.testing.assert_allclose(stats["obs_mean"], [4.0, 5.0])
    np.testing.assert_allclose(stats["obs_std"], [np.sqrt(8.0)] * 2, rtol=1e-6)
    np.testing.assert_array_equal(stats["action_min"], [1.0])
    np.testing.assert_array_equal(stats["action_max"], [20.0])
    constant = DemoDataset(**arrays(observations=np.ones((5, 2), dtype=np.float32)))
    np.testing.assert_array_equal(constant.stats()["obs_std"], np.float32([OBS_STD_FLOOR] * 2))


# ---- action chunks ---------------------------------------------------------------------------------


def test_action_chunks_pad_with_episode_last_action_and_never_mix_episodes():
    ds = two_episode_dataset()
    obs, chunks = ds.action_chunks(horizon=3)
    np.testing.assert_array_equal(obs, ds.observations)
    expected = np.array(
        [
            [1, 2, 3],  # episode 0
            [2, 3, 3],  # padded with episode 0's last action (3), never episode 1's 10
            [3, 3, 3],
            [10, 20, 20],  # episode 1
            [20, 20, 20],
        ],
        dtype=np.float32,
    )[:, :, None]
    assert chunks.shape == (5, 3, 1)
    np.testing.assert_array_equal(chunks, expected)


def test_action_chunks_horizon_one_is_actions_and_longer_than_episode():
    ds = two_episode_dataset()
    _, chunks = ds.action_chunks(1)
    np.testing.assert_array_equal(chunks[:, 0], ds.actions)
    _, chunks = ds.action_chunks(6)
    np.testing.assert_array_equal(chunks[3, :, 0], [10, 20, 20, 20, 20, 20])


@pytest.mark.parametrize("horizon", [0, -1, 1.5])
def test_action_chunks_rejects_bad_horizon(horizon):
    with pytest.raises(ValueError, match="horizon must be an int >= 1"):
        two_episode_dataset().action_chunks(horizon)


# ---- validation ------------------------------------------------------------------------------------


def test_mismatched_lengths_name_the_field_and_shapes():
    with pytest.raises(ValueError, match=r"rewards has 4 steps but observations has 5") as err:
        DemoDataset(**arrays(rewards=np.zeros(4, dtype=np.float32)))
    assert "(4,)" in str(err.value) and "(5, 2)" in str(err.value)


def test_last_step_must_end_an_episode():
    with pytest.raises(ValueError, match=r"last step \(index 4\) does not end an episode"):
        DemoDataset(**arrays(truncations=np.zeros(5, dtype=bool)))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        (
            "actions",
            np.zeros(5, dtype=np.float32),
            r"actions must have shape \(N, act_dim\), got shape \(5,\)",
        ),
        ("observations", np.zeros((5, 2)), "observations must have dtype float32, got float64"),
        ("terminals", np.zeros(5, dtype=np.float32), "terminals must have dtype bool"),
        ("rewards", [0.0] * 5, "rewards must be a numpy array"),
        ("observations", np.zeros((0, 2), dtype=np.float32), "observations is empty"),
    ],
)
def test_bad_field_is_named(field, value, message):
    with pytest.raises(ValueError, match=message):
        DemoDataset(**arrays(**{field: value}))


def test_non_finite_values_are_rejected():
    actions = two_episode_dataset().actions.copy()
    actions[2, 0] = np.nan
    with pytest.raises(ValueError, match=r"actions has 1 non-finite values .* first at index \[2, 0\]"):
        DemoDataset(**arrays(actions=actions))


def test_meta_must_be_json():
    with pytest.raises(ValueError, match="meta must be JSON-serialisable"):
        DemoDataset(**arrays(), meta={"path": Path("/tmp")})


# ---- file format -----------------------------------------------------------------------------------


def test_round_trip(tmp_path):
    ds = two_episode_dataset()
    path = save_dataset(ds, tmp_path / "sub" / "demos.npz")
    assert path == tmp_path / "sub" / "demos.npz"
    assert [p.name for p in path.parent.iterdir()] == ["demos.npz"]  # no temp file left behind
    loaded = load_dataset(path)
    for key in ("observations", "actions", "rewards", "terminals", "truncations"):
        np.testing.assert_array_equal(getattr(loaded, key), getattr(ds, key))
        assert getattr(loaded, key).dtype == getattr(ds, key).dtype
    assert loaded.meta == ds.meta
    # The format is plain numpy, readable without robo_rlft and without pickle.
    with np.load(path, allow_pickle=False) as npz:
        assert int(npz["format_version"]) == FORMAT_VERSION
        assert json.loads(str(npz["meta_json"]))["seed"] == 3


def test_save_overwrites_atomically(tmp_path):
    path = tmp_path / "demos.npz"
    save_dataset(two_episode_dataset(), path)
    ds2 = DemoDataset(**arrays(rewards=np.full(5, 7.0, dtype=np.float32)))
    save_dataset(ds2, path)
    np.testing.assert_array_equal(load_dataset(path).rewards, ds2.rewards)
    assert len(list(tmp_path.iterdir())) == 1


def test_load_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nope.npz"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        load_dataset(path)


def test_load_missing_key_names_it(tmp_path):
    ds = two_episode_dataset()
    path = tmp_path / "partial.npz"
    np.savez_compressed(path, observations=ds.observations, actions=ds.actions, format_version=1)
    with pytest.raises(ValueError, match=r"missing keys \['rewards', 'terminals', 'truncations', 'meta_json'\]"):
        load_dataset(path)


def test_load_wrong_version(tmp_path):
    ds = two_episode_dataset()
    path = tmp_path / "future.npz"
    fields = arrays()
    np.savez_compressed(path, **fields, meta_json=np.array(json.dumps(ds.meta)), format_version=np.array(99))
    with pytest.raises(ValueError, match="format_version 99"):
        load_dataset(path)
