"""GAE against hand-computed values, and the running reward scaler."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from robo_rlft.returns import RunningRewardScaler, compute_gae

# A rollout of T=4 chunk steps in N=2 envs.
#   env 0 *terminates* after step 1 (no bootstrap: next value 0), a new episode runs steps 2-3.
#   env 1 is *truncated* after step 2 (time limit: bootstrap from V(final_obs) = 20), a new episode runs step 3.
# After the last step both episodes go on, so they bootstrap from the values of the last observation (10, 11).
REWARDS = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]])
VALUES = torch.tensor([[0.5, 1.0], [1.5, 2.0], [2.5, 3.0], [3.5, 4.0]])
NEXT_VALUES = torch.tensor(
    [
        [1.5, 2.0],  # V(o_1)
        [0.0, 3.0],  # env 0 terminated: 0; env 1: V(o_2)
        [3.5, 20.0],  # env 0: V(o_3); env 1 truncated: V(final_obs)
        [10.0, 11.0],  # V(last obs)
    ]
)
ENDS = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
GAMMA, LAMBDA = 0.9, 0.8  # gamma * lambda = 0.72

# TD errors delta_t = r_t + gamma * next_value_t - V_t, by hand:
DELTAS = torch.tensor(
    [
        [1 + 0.9 * 1.5 - 0.5, 2 + 0.9 * 2.0 - 1.0],  # 1.85, 2.8
        [3 + 0.0 - 1.5, 4 + 0.9 * 3.0 - 2.0],  # 1.5, 4.7
        [5 + 0.9 * 3.5 - 2.5, 6 + 0.9 * 20.0 - 3.0],  # 5.65, 21.0
        [7 + 0.9 * 10.0 - 3.5, 8 + 0.9 * 11.0 - 4.0],  # 12.5, 13.9
    ]
)
# A_t = delta_t + 0.72 * A_{t+1}, the recursion cut where an episode ended at step t:
#   env 0: A3 = 12.5, A2 = 5.65 + 0.72*12.5 = 14.65, A1 = 1.5 (terminated), A0 = 1.85 + 0.72*1.5 = 2.93
#   env 1: A3 = 13.9, A2 = 21.0 (truncated), A1 = 4.7 + 0.72*21 = 19.82, A0 = 2.8 + 0.72*19.82 = 17.0704
EXPECTED_ADVANTAGES = torch.tensor([[2.93, 17.0704], [1.5, 19.82], [14.65, 21.0], [12.5, 13.9]])


def test_gae_matches_hand_computed_values():
    advantages, returns = compute_gae(REWARDS, VALUES, NEXT_VALUES, ENDS, GAMMA, LAMBDA)
    assert advantages.shape == returns.shape == (4, 2)
    torch.testing.assert_close(advantages, EXPECTED_ADVANTAGES, atol=1e-5, rtol=0)
    torch.testing.assert_close(returns, EXPECTED_ADVANTAGES + VALUES, atol=1e-5, rtol=0)


def test_gae_episode_end_stops_the_recursion():
    # Changing anything after an episode's end must not change that episode's advantages.
    rewards = REWARDS.clone()
    rewards[2:, 0] += 100.0  # env 0's next episode
    rewards[3, 1] += 100.0  # env 1's next episode
    advantages, _ = compute_gae(rewards, VALUES, NEXT_VALUES, ENDS, GAMMA, LAMBDA)
    torch.testing.assert_close(advantages[:2, 0], EXPECTED_ADVANTAGES[:2, 0])
    torch.testing.assert_close(advantages[:3, 1], EXPECTED_ADVANTAGES[:3, 1])


def test_gae_truncation_bootstraps_from_the_final_observation_value():
    # Only the truncated step's bootstrap value changes: its advantage moves by gamma * change, and the
    # steps before it by (gamma * lambda)^k times that.
    next_values = NEXT_VALUES.clone()
    next_values[2, 1] += 10.0
    advantages, _ = compute_gae(REWARDS, VALUES, next_values, ENDS, GAMMA, LAMBDA)
    shift = advantages[:, 1] - EXPECTED_ADVANTAGES[:, 1]
    torch.testing.assert_close(shift, torch.tensor([0.72**2 * 9.0, 0.72 * 9.0, 9.0, 0.0]), atol=1e-4, rtol=0)
    torch.testing.assert_close(advantages[:, 0], EXPECTED_ADVANTAGES[:, 0])


def test_gae_lambda_zero_is_td0():
    advantages, returns = compute_gae(REWARDS, VALUES, NEXT_VALUES, ENDS, GAMMA, 0.0)
    torch.testing.assert_close(advantages, DELTAS, atol=1e-6, rtol=0)
    torch.testing.assert_close(returns, REWARDS + GAMMA * NEXT_VALUES, atol=1e-6, rtol=0)


def test_gae_lambda_one_is_discounted_return_minus_value():
    # Discounted returns within each episode, bootstrapped where the rollout or episode stops:
    #   env 0: G3 = 7 + 0.9*10 = 16, G2 = 5 + 0.9*16 = 19.4, G1 = 3 (terminated), G0 = 1 + 0.9*3 = 3.7
    #   env 1: G3 = 8 + 0.9*11 = 17.9, G2 = 6 + 0.9*20 = 24 (truncated), G1 = 4 + 0.9*24 = 25.6,
    #          G0 = 2 + 0.9*25.6 = 25.04
    expected_returns = torch.tensor([[3.7, 25.04], [3.0, 25.6], [19.4, 24.0], [16.0, 17.9]])
    advantages, returns = compute_gae(REWARDS, VALUES, NEXT_VALUES, ENDS, GAMMA, 1.0)
    torch.testing.assert_close(returns, expected_returns, atol=1e-5, rtol=0)
    torch.testing.assert_close(advantages, expected_returns - VALUES, atol=1e-5, rtol=0)


@pytest.mark.parametrize("gae_lambda", [0.0, 0.5, 1.0])
def test_gae_gamma_zero_is_reward_minus_value(gae_lambda):
    advantages, _ = compute_gae(REWARDS, VALUES, NEXT_VALUES, ENDS, 0.0, gae_lambda)
    torch.testing.assert_close(advantages, REWARDS - VALUES)


# ---- reward scaling ---------------------------------------------------------------------------------------


def _random_stream(seed: int, steps: int, num_envs: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    rewards = rng.normal(3.0, 2.0, size=(steps, num_envs))
    ends = rng.random((steps, num_envs)) < 0.01  # episodes of ~100 steps
    return rewards, ends


def test_reward_scaler_state_dict_round_trip():
    rewards, ends = _random_stream(0, 400, 3)
    scaler = RunningRewardScaler(3, gamma=0.99)
    for r, e in zip(rewards[:200], ends[:200], strict=True):
        scaler(r, e)
    state = json.loads(json.dumps(scaler.state_dict()))  # it is stored in state.json
    restored = RunningRewardScaler(3, gamma=0.99)
    restored.load_state_dict(state)
    for r, e in zip(rewards[200:], ends[200:], strict=True):
        np.testing.assert_array_equal(scaler(r, e), restored(r, e))
    assert restored.state_dict() == scaler.state_dict()


def test_reward_scaler_gives_unit_std_discounted_returns():
    gamma, num_envs, steps = 0.99, 4, 20_000
    rewards, ends = _random_stream(1, steps, num_envs)
    scaler = RunningRewardScaler(num_envs, gamma)
    scaled = np.stack([scaler(r, e) for r, e in zip(rewards, ends, strict=True)])
    assert scaled.shape == rewards.shape
    # Ratio to the raw rewards is one positive per-step scale shared by all envs.
    ratio = scaled / rewards
    np.testing.assert_allclose(ratio, ratio[:, :1].repeat(num_envs, 1), rtol=1e-12)
    assert (ratio > 0).all()

    def discounted_returns(stream: np.ndarray) -> np.ndarray:
        """Discounted returns (reset after episode ends) over the second half, after a warm-up."""
        discounted, history = np.zeros(num_envs), []
        for r, e in zip(stream, ends, strict=True):
            discounted = discounted * gamma + r
            history.append(discounted.copy())
            discounted[e] = 0.0
        return np.asarray(history[steps // 2 :])

    assert discounted_returns(rewards).std() > 5.0  # raw: far from unit scale
    assert 0.8 < discounted_returns(scaled).std() < 1.25


def test_reward_scaler_reset_clears_returns_but_keeps_statistics():
    scaler = RunningRewardScaler(2, gamma=0.9)
    for _ in range(10):
        scaler(np.array([1.0, 2.0]), np.array([False, False]))
    var = scaler.var
    scaler.reset()
    assert scaler.var == var
    np.testing.assert_array_equal(scaler.discounted_return, [0.0, 0.0])
