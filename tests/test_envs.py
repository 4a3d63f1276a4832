"""Registered envs, the action-chunk wrapper and the vectorised chunked env."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import envs
from envs import ENV_IDS, ChunkedEnv, make_env, make_vector_env, resolve_env_id, step_info_value
from envs.registry import LIBERO_ENV_ID, TABLETOP_MULTITASK_ENV_ID, tabletop_env_ids


class CounterEnv(gym.Env):
    """Tiny env with exactly known dynamics.

    Observation ``[t, a_0]`` after step ``t`` (1-based) with action ``a``; reward ``10 * t + a_0``;
    terminates after step ``terminate_at``; ``is_success`` only after step ``success_at``.
    """

    def __init__(self, terminate_at: int | None = None, success_at: int | None = None) -> None:
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.terminate_at, self.success_at = terminate_at, success_at
        self.t = 0
        self.actions: list[np.ndarray] = []

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.t = 0
        return np.zeros(2, np.float32), {"reset": True}

    def step(self, action):
        self.t += 1
        self.actions.append(np.asarray(action).copy())
        obs = np.array([self.t, action[0]], np.float32)
        reward = 10.0 * self.t + float(action[0])
        terminated = self.t == self.terminate_at
        return obs, reward, terminated, False, {"is_success": self.t == self.success_at, "step": self.t}


def _chunk(rows: int, dims: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-0.5, 0.5, (rows, dims)).astype(np.float32)


# ---- registered envs --------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:.*Box observation space (minimum|maximum) value is")
@pytest.mark.parametrize("name", sorted(ENV_IDS))
def test_registered_env_passes_checker_and_is_seeded(name):
    env = make_env(name)
    other = make_env(ENV_IDS[name])  # the full id resolves to the same env
    try:
        assert env.spec.id == ENV_IDS[name] and env.spec.id.startswith("robo_rlft/")
        check_env(env.unwrapped, skip_render_check=True)
        obs_a, _ = env.reset(seed=3)
        obs_b, _ = other.reset(seed=3)
        np.testing.assert_array_equal(obs_a, obs_b)
        assert np.isfinite(obs_a).all() and env.observation_space.contains(obs_a)
        obs_c, _ = other.reset(seed=4)
        assert not np.array_equal(obs_a, obs_c), "reset must randomise the initial state"
        # Same seed and actions -> same trajectory.
        env.reset(seed=5)
        other.reset(seed=5)
        for action in _chunk(5, env.action_space.shape[0], seed=1):
            step_a, step_b = env.step(action), other.step(action)
            np.testing.assert_array_equal(step_a[0], step_b[0])
            assert step_a[1] == step_b[1]
            assert np.isfinite(step_a[0]).all() and env.observation_space.contains(step_a[0])
    finally:
        env.close()
        other.close()


def test_unknown_env_names_the_allowed_ones():
    with pytest.raises(ValueError, match=r"'nope'.*hopper"):
        resolve_env_id("nope")


def test_register_envs_is_idempotent():
    before = {k for k in gym.registry if k.startswith("robo_rlft/")}
    envs.register_envs()
    expected = set(ENV_IDS.values()) | set(tabletop_env_ids().values()) | {LIBERO_ENV_ID, TABLETOP_MULTITASK_ENV_ID}
    assert {k for k in gym.registry if k.startswith("robo_rlft/")} == before == expected


# ---- ChunkedEnv -------------------------------------------------------------------------------------------


def test_chunked_reward_is_the_sum_over_executed_actions_of_a_seeded_env():
    horizon, act_steps = 4, 3
    chunked = ChunkedEnv(make_env("hopper"), horizon=horizon, act_steps=act_steps)
    manual = make_env("hopper")
    try:
        assert chunked.action_space.shape == (horizon, 3)
        np.testing.assert_array_equal(chunked.action_space.low[2], manual.action_space.low)
        obs, _ = chunked.reset(seed=11)
        manual_obs, _ = manual.reset(seed=11)
        np.testing.assert_array_equal(obs, manual_obs)
        for i in range(3):
            chunk = _chunk(horizon, 3, seed=i)
            obs, reward, terminated, truncated, info = chunked.step(chunk)
            expected = 0.0
            for action in chunk[:act_steps]:  # the last horizon - act_steps rows are never executed
                manual_obs, r, manual_term, manual_trunc, _ = manual.step(action)
                expected += r
            assert not (manual_term or manual_trunc), "the test needs a chunk that runs in full"
            assert reward == pytest.approx(expected, rel=1e-12)
            np.testing.assert_array_equal(obs, manual_obs)
            assert (terminated, truncated, info["executed_steps"]) == (False, False, act_steps)
            assert "is_success" not in info  # hopper defines no success
    finally:
        chunked.close()
        manual.close()


def test_chunked_env_stops_early_on_termination():
    inner = CounterEnv(terminate_at=3, success_at=2)
    env = ChunkedEnv(inner, horizon=4, act_steps=4)
    env.reset(seed=0)
    chunk = _chunk(4)
    obs, reward, terminated, truncated, info = env.step(chunk)
    assert (terminated, truncated, info["executed_steps"]) == (True, False, 3)
    assert reward == pytest.approx(sum(10.0 * t + chunk[t - 1, 0] for t in (1, 2, 3)), rel=1e-6)
    np.testing.assert_array_equal(obs, [3.0, chunk[2, 0]])  # the observation after the last executed step
    assert len(inner.actions) == 3
    np.testing.assert_array_equal(np.stack(inner.actions), chunk[:3])
    assert info["is_success"] is True  # step 2 succeeded, step 3 did not: "any executed step"
    assert info["step"] == 3  # other info keys come from the last executed step


def test_chunked_env_stops_early_on_truncation_and_counts_steps():
    env = ChunkedEnv(gym.wrappers.TimeLimit(CounterEnv(), max_episode_steps=5), horizon=3, act_steps=2)
    env.reset(seed=0)
    executed, flags = [], []
    for i in range(3):
        obs, reward, terminated, truncated, info = env.step(_chunk(3, seed=i))
        executed.append(info["executed_steps"])
        flags.append((terminated, truncated))
    assert executed == [2, 2, 1]
    assert flags == [(False, False), (False, False), (False, True)]
    assert obs[0] == 5.0 and reward == pytest.approx(50.0 + _chunk(3, seed=2)[0, 0], rel=1e-6)
    assert info["is_success"] is False


def test_chunked_env_rejects_a_wrong_shape_action():
    env = ChunkedEnv(CounterEnv(), horizon=4, act_steps=2)
    env.reset()
    for bad in (np.zeros((2, 2)), np.zeros((4, 3)), np.zeros(8)):
        with pytest.raises(ValueError, match=r"\(4, 2\)"):
            env.step(bad)


@pytest.mark.parametrize(("horizon", "act_steps"), [(0, 1), (4, 0), (4, 5), (-1, -1)])
def test_chunked_env_rejects_bad_horizon_or_act_steps(horizon, act_steps):
    with pytest.raises(ValueError, match=f"horizon={horizon}, act_steps={act_steps}"):
        ChunkedEnv(CounterEnv(), horizon=horizon, act_steps=act_steps)


def test_chunked_env_needs_a_1d_box_action_space():
    with pytest.raises(TypeError, match="1-D Box"):
        ChunkedEnv(gym.make("CartPole-v1"), horizon=2, act_steps=1)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_chunked_env_passes_the_gymnasium_checker():
    env = ChunkedEnv(make_env("hopper"), horizon=4, act_steps=2)
    try:
        check_env(env, skip_render_check=True)
    finally:
        env.close()


# ---- vector env -------------------------------------------------------------------------------------------


@pytest.fixture
def counter_vector_env(monkeypatch):
    """make_vector_env over two CounterEnvs: env 0 truncates after 3 steps and succeeds at step 3,
    env 1 terminates after 4 steps."""
    made = iter(
        [
            gym.wrappers.TimeLimit(CounterEnv(success_at=3), max_episode_steps=3),
            CounterEnv(terminate_at=4),
        ]
    )
    monkeypatch.setattr("envs.vector.make_env", lambda name, **kwargs: next(made))
    vec = make_vector_env("hopper", num_envs=2, horizon=2, act_steps=2)
    yield vec
    vec.close()


def test_vector_env_same_step_autoreset_carries_final_obs(counter_vector_env):
    vec = counter_vector_env
    obs, _ = vec.reset(seed=0)
    np.testing.assert_array_equal(obs, np.zeros((2, 2)))
    actions = np.stack([_chunk(2, seed=0), _chunk(2, seed=1)])

    obs, reward, terminated, truncated, info = vec.step(actions)  # both run steps 1-2
    np.testing.assert_array_equal(obs[:, 0], [2.0, 2.0])
    assert not (terminated | truncated).any()
    np.testing.assert_array_equal(info["executed_steps"], [2, 2])

    obs, reward, terminated, truncated, info = vec.step(actions)  # env 0: step 3 then time limit; env 1: 3-4
    np.testing.assert_array_equal(truncated, [True, False])
    np.testing.assert_array_equal(terminated, [False, True])
    ended = terminated | truncated
    # SAME_STEP: the ended envs are already reset; the true last observations are in final_obs.
    np.testing.assert_array_equal(obs, np.zeros((2, 2)))
    np.testing.assert_array_equal(info["_final_obs"], [True, True])
    np.testing.assert_array_equal(info["final_obs"][0], [3.0, actions[0, 0, 0]])
    np.testing.assert_array_equal(info["final_obs"][1], [4.0, actions[1, 1, 0]])
    np.testing.assert_allclose(reward, [30.0 + actions[0, 0, 0], 30.0 + actions[1, 0, 0] + 40.0 + actions[1, 1, 0]])
    # The top-level info is the reset info; the ended step's values come from final_info.
    np.testing.assert_array_equal(step_info_value(info, "executed_steps", ended), [1, 2])
    np.testing.assert_array_equal(step_info_value(info, "is_success", ended), [True, False])
    np.testing.assert_array_equal(step_info_value(info, "step", ended), [3, 4])


def test_vector_env_step_info_value_mixes_live_and_ended_envs(counter_vector_env):
    vec = counter_vector_env
    vec.reset(seed=0)
    actions = np.zeros((2, 2, 2), np.float32)
    vec.step(actions)
    vec.step(actions)  # both ended and reset
    _, _, terminated, truncated, info = vec.step(actions)  # both live again
    ended = terminated | truncated
    assert not ended.any()
    np.testing.assert_array_equal(step_info_value(info, "executed_steps", ended), [2, 2])
    np.testing.assert_array_equal(step_info_value(info, "missing", ended, default=-1.0), [-1.0, -1.0])


def test_step_info_value_on_a_hand_built_info():
    info = {"x": np.array([1.0, 0.0, 3.0]), "final_info": {"x": np.array([0.0, 7.0, 9.0])}}
    np.testing.assert_array_equal(step_info_value(info, "x", np.array([False, True, False])), [1.0, 7.0, 3.0])
    np.testing.assert_array_equal(step_info_value({}, "x", np.array([True, False]), default=5.0), [5.0, 5.0])


def test_make_vector_env_on_hopper_has_chunk_spaces():
    vec = make_vector_env("hopper", num_envs=2, horizon=3, act_steps=2)
    try:
        assert vec.num_envs == 2
        assert vec.single_action_space.shape == (3, 3)
        assert vec.single_observation_space.shape == (11,)
        obs, _ = vec.reset(seed=[1, 2])
        assert obs.shape == (2, 11) and not np.array_equal(obs[0], obs[1])
    finally:
        vec.close()


def test_make_vector_env_rejects_zero_envs():
    with pytest.raises(ValueError, match="num_envs must be >= 1, got 0"):
        make_vector_env("hopper", num_envs=0, horizon=2, act_steps=1)
