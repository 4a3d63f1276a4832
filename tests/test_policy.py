"""FlowPolicy and its noise schemes: chain log-probs, sampling, pretraining loss and checkpoints."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from safetensors.torch import load_file, save_file

from policies.chain import gaussian_entropy, gaussian_log_prob, reduce_log_prob
from policies.checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_policy, save_policy
from policies.flow import FlowPolicy, FlowPolicyConfig
from policies.noise import BoundedStdHead, FlowNoiseConfig

OBS_DIM, ACTION_DIM, BATCH = 5, 2, 6
SHAPES = [pytest.param(1, 1, id="H1-K1"), pytest.param(3, 1, id="H3-K1"), pytest.param(4, 3, id="H4-K3")]
# Every flow noise scheme; flow_sde in both its modes (all steps, one random step per chain).
SCHEMES = [
    pytest.param("reinflow", "all", id="reinflow"),
    pytest.param("flow_noise", "all", id="flow_noise"),
    pytest.param("flow_sde", "all", id="flow_sde-all"),
    pytest.param("flow_sde", "one", id="flow_sde-one"),
]


@pytest.fixture
def make_policy(flow_policy_factory):
    def make(horizon: int, steps: int, **kwargs) -> FlowPolicy:
        return flow_policy_factory(OBS_DIM, ACTION_DIM, horizon, steps, random_noise_head=True, **kwargs)

    return make


def _obs(seed: int = 1, batch: int = BATCH) -> torch.Tensor:
    return torch.randn(batch, OBS_DIM, generator=torch.Generator().manual_seed(seed)) * 2.0


# ---- log-probs of a stored chain ----------------------------------------------------------------------------


@pytest.mark.parametrize(("scheme", "sde_steps"), SCHEMES)
@pytest.mark.parametrize(("horizon", "steps"), SHAPES)
def test_rescoring_a_sampled_chain_reproduces_its_log_prob(make_policy, horizon, steps, scheme, sde_steps):
    if scheme == "flow_sde" and steps == 1:
        with pytest.raises(ValueError, match=r"flow_sde.*denoising_steps >= 2, got 1"):
            make_policy(horizon, steps, scheme=scheme, sde_steps=sde_steps)
        return
    policy = make_policy(horizon, steps, scheme=scheme, sde_steps=sde_steps)
    obs = _obs()
    torch.manual_seed(0)
    with torch.no_grad():
        sample = policy.sample(obs)
        new_log_prob, _ = policy.log_prob_and_entropy(obs, sample.chain, sample.stochastic)
    assert new_log_prob.shape == sample.log_prob.shape == (BATCH, steps, horizon, ACTION_DIM)
    assert sample.stochastic.shape == (BATCH, steps)
    expected_per_chain = 1 if sde_steps == "one" else steps
    assert (sample.stochastic.sum(1) == expected_per_chain).all()
    assert (new_log_prob - sample.log_prob).abs().max().item() < 1e-5
    for reduction in ("sum", "mean"):
        new = reduce_log_prob(new_log_prob, sample.stochastic, reduction)
        old = reduce_log_prob(sample.log_prob, sample.stochastic, reduction)
        assert new.shape == (BATCH,)
        torch.testing.assert_close((new - old).exp(), torch.ones(BATCH), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("scheme", "sde_steps"), SCHEMES)
@pytest.mark.parametrize(("horizon", "steps"), SHAPES)
def test_batched_rescoring_equals_a_loop_over_transitions(make_policy, horizon, steps, scheme, sde_steps):
    if scheme == "flow_sde" and steps == 1:
        return  # refused at construction (see the test above)
    policy = make_policy(horizon, steps, scheme=scheme, sde_steps=sde_steps)
    obs = _obs(2)
    torch.manual_seed(1)
    with torch.no_grad():
        sample = policy.sample(obs)
        chain, stochastic = sample.chain, sample.stochastic
        log_prob, entropy = policy.log_prob_and_entropy(obs, chain, stochastic)
        obs_norm = policy.normalizer.normalize_obs(obs)
        for k in range(steps):  # one forward per denoising step: the reference the batched path must match
            mean, std = policy.transition(chain[:, k], torch.full((BATCH,), k, dtype=torch.long), obs_norm)
            expected = torch.distributions.Normal(mean, std)
            noisy = stochastic[:, k]
            torch.testing.assert_close(
                log_prob[noisy, k], expected.log_prob(chain[:, k + 1])[noisy], atol=1e-5, rtol=1e-5
            )
            torch.testing.assert_close(entropy[noisy, k], expected.entropy()[noisy], atol=1e-6, rtol=1e-6)
            assert not log_prob[~noisy, k].any() and not entropy[~noisy, k].any()
            # Deterministic steps of the chain follow the Euler ODE exactly.
            euler = chain[:, k] + policy.velocity(chain[:, k], torch.full((BATCH,), k / steps), obs_norm) / steps
            torch.testing.assert_close(chain[~noisy, k + 1], euler[~noisy], atol=1e-6, rtol=1e-6)


def test_rescoring_rejects_a_chain_with_the_wrong_number_of_steps(make_policy):
    policy = make_policy(2, 3)
    chain = torch.zeros(BATCH, 3, 2, ACTION_DIM)  # 2 denoising steps, but the policy has K = 3
    with pytest.raises(ValueError, match=r"2 steps.*K=3"):
        policy.log_prob_and_entropy(_obs(), chain, torch.ones(BATCH, 2, dtype=torch.bool))


def test_gaussian_formulas_match_torch_distributions():
    gen = torch.Generator().manual_seed(0)
    x, mean = torch.randn(64, 3, generator=gen) * 3, torch.randn(64, 3, generator=gen)
    std = 0.01 + torch.rand(64, 3, generator=gen) * 2
    normal = torch.distributions.Normal(mean, std)
    torch.testing.assert_close(gaussian_log_prob(x, mean, std), normal.log_prob(x), atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(gaussian_entropy(std), normal.entropy(), atol=1e-6, rtol=1e-6)


def test_reduce_log_prob_sum_mean_and_bad_name():
    log_prob = torch.arange(24.0).view(2, 3, 2, 2)
    every_step = torch.ones(2, 3, dtype=torch.bool)
    torch.testing.assert_close(reduce_log_prob(log_prob, every_step, "sum"), torch.tensor([66.0, 210.0]))
    torch.testing.assert_close(reduce_log_prob(log_prob, every_step, "mean"), torch.tensor([5.5, 17.5]))
    # With one stochastic step per chain, "mean" averages over that step's H*A elements only.
    one_step = torch.tensor([[False, True, False], [True, False, False]])
    masked = log_prob * one_step[:, :, None, None]
    torch.testing.assert_close(
        reduce_log_prob(masked, one_step, "mean"), torch.tensor([(4 + 5 + 6 + 7) / 4, (12 + 13 + 14 + 15) / 4])
    )
    with pytest.raises(ValueError, match=r"sum.*mean.*'max'"):
        reduce_log_prob(log_prob, every_step, "max")


# ---- noise and sampling -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("sigma_min", "sigma_max"), [(0.05, 0.15), (0.01, 1.0), (0.2, 0.2)])
def test_noise_std_stays_in_its_range_even_for_extreme_inputs(sigma_min, sigma_max):
    torch.manual_seed(0)
    head = BoundedStdHead(4, 2, 3, FlowNoiseConfig(sigma_min=sigma_min, sigma_max=sigma_max, hidden_dims=[8]))
    torch.nn.init.normal_(head.net[-1].weight, std=10.0)  # saturate the squash both ways
    cond = torch.cat([torch.randn(200, 4), torch.randn(200, 4) * 1e6, torch.full((1, 4), -1e30)])
    std = head(cond)
    assert std.shape == (401, 2, 3)
    assert torch.isfinite(std).all()
    assert std.min().item() >= torch.tensor(sigma_min).item()
    assert std.max().item() <= torch.tensor(sigma_max).item()
    if sigma_min < sigma_max:  # the extremes are reached, so the test did probe the bounds
        assert std.min().item() == pytest.approx(sigma_min, rel=1e-3)
        assert std.max().item() == pytest.approx(sigma_max, rel=1e-3)


def test_fresh_noise_head_starts_at_the_middle_of_its_range():
    head = BoundedStdHead(4, 2, 3, FlowNoiseConfig(sigma_min=0.05, sigma_max=0.15, hidden_dims=[8]))
    torch.testing.assert_close(head(torch.randn(5, 4) * 100), torch.full((5, 2, 3), 0.1))


def test_noise_config_rejects_bad_bounds():
    with pytest.raises(ValueError, match=r"sigma_min=0\.2, sigma_max=0\.1"):
        FlowNoiseConfig(sigma_min=0.2, sigma_max=0.1)
    with pytest.raises(ValueError, match=r"sigma_min=0\.0"):
        FlowNoiseConfig(sigma_min=0.0, sigma_max=0.1)
    with pytest.raises(ValueError, match=r"scheme='ddpm'.*reinflow"):
        FlowNoiseConfig(scheme="ddpm")
    with pytest.raises(ValueError, match=r"sde_steps='two'"):
        FlowNoiseConfig(sde_steps="two")


@pytest.mark.parametrize(("horizon", "steps"), SHAPES)
def test_stochastic_sample_stds_are_within_bounds(make_policy, horizon, steps):
    policy = make_policy(horizon, steps)
    with torch.no_grad():
        sample = policy.sample(_obs() * 1e4)
    assert sample.std.shape == (BATCH, steps, horizon, ACTION_DIM)
    assert sample.std.min().item() >= torch.tensor(0.05).item()
    assert sample.std.max().item() <= torch.tensor(0.15).item()
    assert sample.std.std().item() > 0  # the random head really makes the std input-dependent


@pytest.mark.parametrize(("horizon", "steps"), SHAPES)
def test_deterministic_sample_is_the_euler_ode(make_policy, horizon, steps):
    policy = make_policy(horizon, steps)
    obs = _obs(3)
    with torch.no_grad():
        sample = policy.sample(obs, deterministic=True)
        obs_norm = policy.normalizer.normalize_obs(obs)
        for k in range(steps):
            t = torch.full((BATCH,), k / steps)
            expected = sample.chain[:, k] + policy.velocity(sample.chain[:, k], t, obs_norm) / steps
            torch.testing.assert_close(sample.chain[:, k + 1], expected, atol=1e-6, rtol=1e-6)
    assert torch.equal(sample.log_prob, torch.zeros(BATCH, steps, horizon, ACTION_DIM))
    assert torch.equal(sample.std, torch.zeros(BATCH, steps, horizon, ACTION_DIM))


@pytest.mark.parametrize(("horizon", "steps"), SHAPES)
def test_sample_shapes_and_actions_clipped_to_the_normaliser_range(make_policy, horizon, steps):
    policy = make_policy(horizon, steps)
    with torch.no_grad():  # a large output layer drives the chain well outside [-1, 1]
        policy.velocity_net[-1].weight.mul_(50.0)
        policy.velocity_net[-1].bias.mul_(50.0)
    for deterministic in (False, True):
        torch.manual_seed(0)
        with torch.no_grad():
            sample = policy.sample(_obs(4, batch=64), deterministic=deterministic)
        assert sample.actions.shape == (64, horizon, ACTION_DIM)
        assert sample.chain.shape == (64, steps + 1, horizon, ACTION_DIM)
        assert (sample.chain[:, -1].abs() > 1).any(), "the test must exercise the clip"
        low, high = policy.normalizer.action_min, policy.normalizer.action_max
        assert (sample.actions >= low - 1e-6).all() and (sample.actions <= high + 1e-6).all()
        expected = policy.normalizer.unnormalize_action(sample.chain[:, -1].clamp(-1, 1))
        torch.testing.assert_close(sample.actions, expected)


def test_flow_config_rejects_bad_values():
    with pytest.raises(ValueError, match=r"policy\.denoising_steps must be >= 1, got 0"):
        FlowPolicyConfig(denoising_steps=0)
    with pytest.raises(ValueError, match=r"policy\.hidden_dims"):
        FlowPolicyConfig(hidden_dims=[])


# ---- supervised pretraining -------------------------------------------------------------------------------


def test_pretrain_loss_decreases_on_a_fixed_batch(make_policy):
    policy = make_policy(2, 2)
    gen = torch.Generator().manual_seed(0)
    obs = torch.randn(32, OBS_DIM, generator=gen)
    # A deterministic function of the observation inside the action range: learnable to a low loss.
    weight = torch.randn(OBS_DIM, 2 * ACTION_DIM, generator=gen)
    low, high = policy.normalizer.action_min, policy.normalizer.action_max
    unit = torch.tanh(obs @ weight).view(32, 2, ACTION_DIM)
    actions = low + (unit + 1) / 2 * (high - low)

    def fixed_noise_loss() -> float:
        with torch.random.fork_rng(), torch.no_grad():
            torch.manual_seed(123)
            return sum(policy.pretrain_loss(obs, actions).values()).item()

    before = fixed_noise_loss()
    optimizer = torch.optim.Adam(policy.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(200):
        loss = sum(policy.pretrain_loss(obs, actions).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = fixed_noise_loss()
    assert after < 0.5 * before, (before, after)


# ---- checkpoints ------------------------------------------------------------------------------------------


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module, skip_prefix: str | None = None) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        if skip_prefix is None or not key.startswith(skip_prefix):
            assert torch.equal(sa[key], sb[key]), key


def test_checkpoint_round_trip_is_exact(make_policy, tmp_path):
    policy = make_policy(3, 2)
    path = save_policy(policy, tmp_path / "ckpt", metadata={"env": "test", "note": [1, 2]})
    assert {p.name for p in path.iterdir()} == {"config.json", "model.safetensors", "normalization.safetensors"}
    loaded, metadata = load_policy(path, expected_type="flow", obs_dim=OBS_DIM, action_dim=ACTION_DIM)
    assert metadata == {"env": "test", "note": [1, 2]}
    assert isinstance(loaded, FlowPolicy)
    assert loaded.config == policy.config
    _assert_same_state(policy, loaded)
    torch.testing.assert_close(loaded.normalizer.obs_mean, policy.normalizer.obs_mean, atol=0, rtol=0)
    obs = _obs(5)
    for deterministic in (False, True):
        outs = []
        for model in (policy, loaded):
            torch.manual_seed(7)
            with torch.no_grad():
                outs.append(model.sample(obs, deterministic=deterministic))
        assert torch.equal(outs[0].actions, outs[1].actions)
        assert torch.equal(outs[0].chain, outs[1].chain)
        assert torch.equal(outs[0].log_prob, outs[1].log_prob)


def test_checkpoint_overwrite_replaces_the_old_one(make_policy, tmp_path):
    path = tmp_path / "ckpt"
    save_policy(make_policy(2, 2, seed=0), path)
    newer = make_policy(2, 2, seed=1)
    save_policy(newer, path)
    _assert_same_state(newer, load_policy(path)[0])
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"], "no temporary or .old directories left behind"


def test_checkpoint_without_noise_head_loads_with_a_fresh_head(make_policy, tmp_path):
    policy = make_policy(2, 2)
    path = save_policy(policy, tmp_path / "ckpt", include_noise=False)
    assert not any(k.startswith("noise.") for k in load_file(path / WEIGHTS_FILE))
    loaded, _ = load_policy(path)
    _assert_same_state(policy, loaded, skip_prefix="noise.")
    # The noise head is re-initialised: zero last layer, i.e. the middle of [sigma_min, sigma_max].
    assert torch.equal(loaded.noise.std_head.net[-1].weight, torch.zeros_like(loaded.noise.std_head.net[-1].weight))
    assert not torch.equal(loaded.noise.std_head.net[-1].weight, policy.noise.std_head.net[-1].weight)
    with torch.no_grad():
        std = loaded.sample(_obs()).std
    torch.testing.assert_close(std, torch.full_like(std, 0.1))


def test_checkpoint_dims_and_type_mismatches_name_both_sides(make_policy, tmp_path):
    path = save_policy(make_policy(2, 2), tmp_path / "ckpt", metadata={"env": "toy"})
    with pytest.raises(ValueError) as err:
        load_policy(path, obs_dim=OBS_DIM + 6)
    assert f"obs_dim={OBS_DIM}" in str(err.value) and f"obs_dim={OBS_DIM + 6}" in str(err.value)
    with pytest.raises(ValueError) as err:
        load_policy(path, action_dim=7)
    assert f"action_dim={ACTION_DIM}" in str(err.value) and "action_dim=7" in str(err.value)
    with pytest.raises(ValueError) as err:
        load_policy(path, expected_type="diffusion")
    assert "'flow'" in str(err.value) and "'diffusion'" in str(err.value)


def test_missing_checkpoint_names_the_path(tmp_path):
    missing = tmp_path / "no_such_checkpoint"
    with pytest.raises(FileNotFoundError, match="no_such_checkpoint"):
        load_policy(missing)


def test_checkpoint_missing_a_file_names_it(make_policy, tmp_path):
    path = save_policy(make_policy(2, 2), tmp_path / "ckpt")
    (path / "normalization.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"normalization\.safetensors"):
        load_policy(path)


def test_tampered_weights_name_the_bad_key(make_policy, tmp_path):
    path = save_policy(make_policy(2, 2), tmp_path / "ckpt")
    weights = load_file(path / WEIGHTS_FILE)
    weights["velocity_net.0.weight"] = torch.zeros(3, 3)
    save_file(weights, path / WEIGHTS_FILE)
    with pytest.raises(ValueError, match=r"velocity_net\.0\.weight: checkpoint \(3, 3\) vs model"):
        load_policy(path)


def test_checkpoint_config_with_unknown_key_is_rejected(make_policy, tmp_path):
    path = save_policy(make_policy(2, 2), tmp_path / "ckpt")
    config = json.loads((path / CONFIG_FILE).read_text())
    config["config"]["dropout"] = 0.1
    (path / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="dropout"):
        load_policy(path)


def test_checkpoint_directory_permissions_follow_the_umask(make_policy, tmp_path):
    umask = os.umask(0o022)
    try:
        path = save_policy(make_policy(2, 2), tmp_path / "ckpt")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o755
    for f in path.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) & 0o044 == 0o044, f.name
