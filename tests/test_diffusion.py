"""DiffusionPolicy (DPPO): steps vs diffusers, chain log-probs, std floor, frozen base, pretraining, checkpoints."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from safetensors.torch import load_file

from policies.checkpoint import WEIGHTS_FILE, load_policy, save_policy
from policies.diffusion import DiffusionPolicy, DiffusionPolicyConfig
from policies.registry import POLICIES

torch.set_num_threads(1)

OBS_DIM, ACTION_DIM, HORIZON, BATCH = 5, 2, 4, 3
SAMPLERS_X_BACKBONES = [
    pytest.param(sampler, backbone, id=f"{sampler}-{backbone}")
    for sampler in ("ddpm", "ddim")
    for backbone in ("mlp", "unet1d")
]


def make_policy(sampler: str = "ddpm", backbone: str = "mlp", seed: int = 0, **overrides) -> DiffusionPolicy:
    """A tiny policy with a non-trivial normaliser."""
    kwargs = {
        "horizon": HORIZON,
        "sampler": sampler,
        "backbone": backbone,
        "hidden_dims": [32, 32],
        "unet_dims": [8, 16],
        "time_embed_dim": 8,
        **overrides,
    }
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        policy = DiffusionPolicy(OBS_DIM, ACTION_DIM, DiffusionPolicyConfig(**kwargs))
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        norm = policy.normalizer
        norm.obs_mean.copy_(torch.randn(OBS_DIM, generator=gen))
        norm.obs_std.copy_(0.5 + torch.rand(OBS_DIM, generator=gen))
        low = -0.5 - torch.rand(ACTION_DIM, generator=gen)
        norm.action_min.copy_(low)
        norm.action_max.copy_(low + 0.5 + torch.rand(ACTION_DIM, generator=gen))
    return policy


def _obs(seed: int = 1, batch: int = BATCH) -> torch.Tensor:
    return torch.randn(batch, OBS_DIM, generator=torch.Generator().manual_seed(seed)) * 2.0


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _steps(k: int, batch: int = BATCH) -> torch.Tensor:
    return torch.full((batch,), k, dtype=torch.long)


# ---- config and schedule ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"horizon": 0}, r"policy\.horizon must be >= 1, got 0"),
        ({"train_steps": 0}, r"policy\.train_steps must be >= 1, got 0"),
        ({"finetune_steps": 0}, r"policy\.finetune_steps must be >= 1, got 0"),
        ({"sampler": "euler"}, r"policy\.sampler='euler'.*\['ddpm', 'ddim'\]"),
        ({"backbone": "transformer"}, r"policy\.backbone='transformer'.*\['mlp', 'unet1d'\]"),
        ({"beta_schedule": "cosine"}, r"policy\.beta_schedule='cosine'.*squaredcos_cap_v2"),
        ({"sampler": "ddim", "ddim_steps": 30}, r"policy\.ddim_steps=30 exceeds policy\.train_steps=20"),
        ({"finetune_steps": 21}, r"policy\.finetune_steps=21 exceeds.*allowed: 1\.\.20"),
        ({"hidden_dims": []}, r"policy\.hidden_dims"),
        ({"unet_dims": [8]}, r"policy\.unet_dims.*\[8\]"),
        ({"time_embed_dim": 7}, r"policy\.time_embed_dim must be an even int >= 2, got 7"),
        ({"clip_sample": "yes"}, r"policy\.clip_sample.*'yes'"),
        ({"sigma_min": 0.0}, r"policy\.sigma_min must be > 0.*got 0\.0"),
        ({"eta": 1.5}, r"policy\.eta must be in \[0, 1\].*got 1\.5"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(overrides, match):
    with pytest.raises(ValueError, match=match):
        DiffusionPolicyConfig(**overrides)


def test_config_defaults_are_valid_for_both_samplers():
    assert DiffusionPolicyConfig().num_steps == 20
    # finetune_steps (10) only applies to ddpm; ddim fine-tunes all its K = 5 steps.
    assert DiffusionPolicyConfig(sampler="ddim").num_steps == 5


def test_schedule_that_keeps_the_signal_is_rejected():
    # diffusers' linear betas (1e-4 .. 0.02) are meant for T ~ 1000: at T = 20 most of x_0 survives.
    with pytest.raises(ValueError, match=r"policy\.beta_schedule='linear'.*train_steps=20.*alpha_bar_T"):
        make_policy(beta_schedule="linear")


def test_time_grids_are_diffusers_timesteps():
    ddpm, ddim = make_policy("ddpm"), make_policy("ddim")
    assert ddpm.num_steps == 20 and ddim.num_steps == 5
    assert ddpm.timesteps.tolist() == list(range(19, -1, -1))
    assert ddim.timesteps.tolist() == [16, 12, 8, 4, 0]
    torch.testing.assert_close(ddim.alpha_bar_prev[-1], torch.tensor(1.0))  # the last step lands on x_0
    assert not {"alphas_cumprod", "timesteps", "alpha_bar", "alpha_bar_prev"} & set(ddpm.state_dict())


# ---- steps against diffusers' schedulers -----------------------------------------------------------------------


@pytest.mark.parametrize("clip_sample", [True, False])
def test_ddpm_step_matches_diffusers_ddpm_scheduler(clip_sample):
    """diffusers draws the DDPM noise n as ``torch.randn(shape, generator=g)`` and returns mean + sigma * n.

    Two different noises give two equations that pin both our pre-floor mean and sigma (a tiny
    ``sigma_min`` so the floor does not act; at t = 0 diffusers adds no noise and our sigma is 0).
    """
    policy = make_policy("ddpm", clip_sample=clip_sample, sigma_min=1e-12)
    scheduler = DDPMScheduler(num_train_timesteps=20, beta_schedule="squaredcos_cap_v2", clip_sample=clip_sample)
    obs_norm = policy.normalizer.normalize_obs(_obs())
    gen = _gen(0)
    with torch.no_grad():
        for k in range(policy.num_steps):
            x = 1.5 * torch.randn(BATCH, HORIZON, ACTION_DIM, generator=gen)  # large x: x0 gets clipped early
            t = int(policy.timesteps[k])
            mean, std = policy.transition(x, _steps(k), obs_norm)
            eps = policy.predict_noise(x, torch.full((BATCH,), t), obs_norm)
            for seed in (1, 2):
                noise = torch.randn(x.shape, generator=_gen(seed))
                expected = scheduler.step(eps, t, x, generator=_gen(seed)).prev_sample
                torch.testing.assert_close(mean + std * noise, expected, atol=2e-5, rtol=1e-5, msg=f"k={k}")


@pytest.mark.parametrize("clip_sample", [True, False])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_step_matches_diffusers_ddim_scheduler(eta, clip_sample):
    """``variance_noise`` 0 gives diffusers' mean, 1 gives mean + sigma (pre-floor: tiny sigma_min)."""
    policy = make_policy("ddim", clip_sample=clip_sample, eta=eta, sigma_min=1e-12)
    scheduler = DDIMScheduler(
        num_train_timesteps=20, beta_schedule="squaredcos_cap_v2", clip_sample=clip_sample, set_alpha_to_one=True
    )
    scheduler.set_timesteps(policy.num_steps)
    assert policy.timesteps.tolist() == scheduler.timesteps.tolist()
    obs_norm = policy.normalizer.normalize_obs(_obs())
    gen = _gen(0)
    with torch.no_grad():
        for k, t in enumerate(scheduler.timesteps):
            x = 1.5 * torch.randn(BATCH, HORIZON, ACTION_DIM, generator=gen)
            mean, std = policy.transition(x, _steps(k), obs_norm)
            eps = policy.predict_noise(x, torch.full((BATCH,), int(t)), obs_norm)
            step = {"eta": eta, "use_clipped_model_output": clip_sample}
            expected_mean = scheduler.step(eps, t, x, variance_noise=torch.zeros_like(x), **step).prev_sample
            expected_sigma = scheduler.step(eps, t, x, variance_noise=torch.ones_like(x), **step).prev_sample
            torch.testing.assert_close(mean, expected_mean, atol=2e-5, rtol=1e-5, msg=f"k={k}")
            torch.testing.assert_close(std, (expected_sigma - expected_mean).clamp_min(1e-12), atol=2e-5, rtol=1e-4)


def test_std_floor_is_max_of_posterior_std_and_sigma_min_and_leaves_the_mean_alone():
    floored, raw = make_policy("ddpm", sigma_min=0.1), make_policy("ddpm", sigma_min=1e-12)
    scheduler = DDPMScheduler(num_train_timesteps=20, beta_schedule="squaredcos_cap_v2")
    a, betas = scheduler.alphas_cumprod, scheduler.betas
    a_prev = torch.cat([torch.ones(1), a[:-1]])
    posterior_std = ((1 - a_prev) / (1 - a) * betas).sqrt()  # sqrt(beta_tilde_t), t = 0..T-1
    obs_norm = floored.normalizer.normalize_obs(_obs())
    x = torch.randn(BATCH, HORIZON, ACTION_DIM, generator=_gen(0))
    with torch.no_grad():
        for k, t in enumerate(floored.timesteps.tolist()):
            mean, std = floored.transition(x, _steps(k), obs_norm)
            raw_mean, _ = raw.transition(x, _steps(k), obs_norm)
            expected = torch.full_like(std, max(posterior_std[t].item(), 0.1))
            torch.testing.assert_close(std, expected, atol=1e-6, rtol=1e-5, msg=f"k={k}")
            torch.testing.assert_close(mean, raw_mean, atol=0, rtol=0)  # same weights: the floor is noise only
    assert (posterior_std > 0.1).any() and (posterior_std < 0.1).any(), "both sides of the floor are exercised"


@pytest.mark.parametrize(("sampler", "backbone"), SAMPLERS_X_BACKBONES)
def test_deterministic_sample_is_diffusers_ddim_with_eta_zero(sampler, backbone):
    policy = make_policy(sampler, backbone)
    scheduler = DDIMScheduler(num_train_timesteps=20, beta_schedule="squaredcos_cap_v2", set_alpha_to_one=True)
    scheduler.set_timesteps(policy.num_steps)  # ddpm: all 20 timesteps, ddim: 16, 12, 8, 4, 0
    obs = _obs(3)
    obs_norm = policy.normalizer.normalize_obs(obs)
    with torch.no_grad():
        sample = policy.sample(obs, deterministic=True, generator=_gen(0))
        x = sample.chain[:, 0]
        for k, t in enumerate(scheduler.timesteps):
            eps = policy.predict_noise(x, torch.full((BATCH,), int(t)), obs_norm)
            x = scheduler.step(eps, t, x, eta=0.0, use_clipped_model_output=True).prev_sample
            torch.testing.assert_close(sample.chain[:, k + 1], x, atol=1e-5, rtol=1e-5, msg=f"k={k}")
    shape = (BATCH, policy.num_steps, HORIZON, ACTION_DIM)
    assert torch.equal(sample.log_prob, torch.zeros(shape)) and torch.equal(sample.std, torch.zeros(shape))
    assert not sample.stochastic.any()
    assert policy.base_model is None, "deterministic sampling (evaluation) must not freeze the base"
    torch.testing.assert_close(sample.actions, policy.normalizer.unnormalize_action(x.clamp(-1, 1)))


# ---- chain log-probs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("sampler", "backbone"), SAMPLERS_X_BACKBONES)
def test_rescoring_a_sampled_chain_reproduces_its_log_prob(sampler, backbone):
    """The importance ratio at PPO's first minibatch is 1."""
    policy = make_policy(sampler, backbone)
    obs = _obs()
    with torch.no_grad():
        sample = policy.sample(obs, generator=_gen(0))
        log_prob, _ = policy.log_prob_and_entropy(obs, sample.chain, sample.stochastic)
    shape = (BATCH, policy.num_steps, HORIZON, ACTION_DIM)
    assert log_prob.shape == sample.log_prob.shape == sample.std.shape == shape
    assert sample.stochastic.shape == (BATCH, policy.num_steps) and sample.stochastic.dtype == torch.bool
    assert (log_prob - sample.log_prob).abs().max().item() < 1e-5
    ratio = (log_prob.flatten(1).sum(-1) - sample.log_prob.flatten(1).sum(-1)).exp()
    torch.testing.assert_close(ratio, torch.ones(BATCH), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("sampler", "backbone"), SAMPLERS_X_BACKBONES)
def test_batched_rescoring_equals_a_loop_over_transitions(sampler, backbone):
    """One forward over the gathered (b, k) pairs = one ``transition`` per pair, scored by torch.distributions."""
    policy = make_policy(sampler, backbone)
    obs = _obs(2)
    with torch.no_grad():
        sample = policy.sample(obs, generator=_gen(1))
        # An irregular mask (a subset of the sampled one) exercises the gather / scatter.
        mask = sample.stochastic & (torch.rand(sample.stochastic.shape, generator=_gen(2)) < 0.7)
        log_prob, entropy = policy.log_prob_and_entropy(obs, sample.chain, mask)
        obs_norm = policy.normalizer.normalize_obs(obs)
        for b in range(BATCH):
            for k in range(policy.num_steps):
                if not mask[b, k]:
                    assert not log_prob[b, k].any() and not entropy[b, k].any()
                    continue
                mean, std = policy.transition(sample.chain[b : b + 1, k], _steps(k, 1), obs_norm[b : b + 1])
                expected = torch.distributions.Normal(mean[0], std[0])
                torch.testing.assert_close(
                    log_prob[b, k], expected.log_prob(sample.chain[b, k + 1]), atol=1e-5, rtol=1e-5
                )
                torch.testing.assert_close(entropy[b, k], expected.entropy(), atol=1e-6, rtol=1e-6)
    assert mask.any() and (sample.stochastic & ~mask).any(), "the mask must select some pairs and drop others"


@pytest.mark.parametrize("finetune_steps", [1, 3, 20])
def test_ddpm_mask_marks_the_last_finetune_steps_and_nothing_is_nan(finetune_steps):
    policy = make_policy("ddpm", finetune_steps=finetune_steps)
    obs = _obs()
    with torch.no_grad():
        sample = policy.sample(obs, generator=_gen(0))
    expected_row = [False] * (20 - finetune_steps) + [True] * finetune_steps
    assert sample.stochastic.tolist() == [expected_row] * BATCH
    assert policy.stochastic_steps().tolist() == expected_row
    frozen = ~sample.stochastic
    assert not sample.log_prob[frozen].any() and not sample.std[frozen].any()
    assert (sample.std[sample.stochastic] >= 0.1 - 1e-7).all()
    log_prob, entropy = policy.log_prob_and_entropy(obs, sample.chain, sample.stochastic)
    for name, value in [("chain", sample.chain), ("log_prob", log_prob), ("entropy", entropy)]:
        assert torch.isfinite(value).all(), name
    log_prob.sum().backward()  # gradients reach the network through the stochastic steps only
    grads = [p.grad for p in policy.model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_rescoring_rejects_malformed_inputs():
    policy = make_policy("ddpm", finetune_steps=3)
    obs, chain = _obs(), torch.zeros(BATCH, 21, HORIZON, ACTION_DIM)
    mask = policy.stochastic_steps().expand(BATCH, 20)
    with pytest.raises(ValueError, match=r"19 steps.*K=20"):
        policy.log_prob_and_entropy(obs, chain[:, :20], mask[:, :19])
    with pytest.raises(ValueError, match=r"bool tensor of shape \(3, 20\)"):
        policy.log_prob_and_entropy(obs, chain, mask.float())
    with pytest.raises(ValueError, match=r"frozen base"):
        policy.log_prob_and_entropy(obs, chain, torch.ones(BATCH, 20, dtype=torch.bool))


def _ks_statistic(z: torch.Tensor) -> float:
    """Kolmogorov-Smirnov distance between the empirical CDF of ``z`` and the N(0, 1) CDF."""
    z = z.double().flatten().sort().values
    n = z.numel()
    cdf = 0.5 * (1 + torch.erf(z / math.sqrt(2)))
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return max((i / n - cdf).max().item(), (cdf - (i - 1) / n).max().item())


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_stochastic_steps_draw_standard_normal_noise_around_the_transition(sampler):
    """KS test at 5 %: ``(x_{k+1} - mean) / std`` is N(0, 1) — for a scored step and, for ddpm, an early one.

    Right after the base is frozen, model == base, so ``transition`` also describes ddpm's early steps.
    """
    policy = make_policy(sampler)
    batch = 1000
    obs = _obs(4, batch)
    with torch.no_grad():
        sample = policy.sample(obs, generator=_gen(0))
        obs_norm = policy.normalizer.normalize_obs(obs)
        steps = [0, policy.num_steps - 1] if sampler == "ddim" else [5, 10, 19]  # ddpm: 5 is a frozen step
        critical = 1.36 / math.sqrt(batch * HORIZON * ACTION_DIM)
        for k in steps:
            mean, std = policy.transition(sample.chain[:, k], _steps(k, batch), obs_norm)
            z = (sample.chain[:, k + 1] - mean) / std
            assert _ks_statistic(z) < critical, (k, _ks_statistic(z), critical)
            assert _ks_statistic(z + 0.1) > critical, "the test must be able to reject a 0.1-sigma shift"


# ---- the frozen base network (ddpm) -------------------------------------------------------------------------


def test_frozen_base_runs_the_early_steps_and_stays_out_of_parameters_and_state():
    policy = make_policy("ddpm", finetune_steps=4)
    keys = set(policy.state_dict())
    n_params = len(list(policy.parameters()))
    with torch.no_grad():
        policy.sample(_obs())  # the first stochastic sample freezes the base (start of RL data collection)
    base = policy.base_model
    assert base is not None and not any(p.requires_grad for p in base.parameters())
    assert set(policy.state_dict()) == keys and len(list(policy.parameters())) == n_params
    pretrained = {k: v.clone() for k, v in policy.model.state_dict().items()}
    with torch.no_grad():  # "fine-tune": move the trained network away from the base
        for p in policy.model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=_gen(5)))
    reference = make_policy("ddpm", finetune_steps=4)
    reference.model.load_state_dict(pretrained)  # the pretrained network on every step
    obs = _obs(6)
    for deterministic in (True, False):
        with torch.no_grad():
            ours = policy.sample(obs, deterministic=deterministic, generator=_gen(7))
            ref = reference.sample(obs, deterministic=deterministic, generator=_gen(7))
        early = slice(0, 17)  # x_0 .. x_16: produced by the 16 frozen steps
        torch.testing.assert_close(ours.chain[:, early], ref.chain[:, early], atol=1e-6, rtol=1e-6)
        assert not torch.allclose(ours.chain[:, -1], ref.chain[:, -1], atol=1e-3), "late steps use the tuned net"
    assert all(torch.equal(base.state_dict()[k], v) for k, v in pretrained.items()), "the base never moves"


# ---- supervised pretraining -------------------------------------------------------------------------------


@pytest.mark.parametrize("backbone", ["mlp", "unet1d"])
def test_pretrain_loss_decreases_on_a_fixed_batch(backbone):
    policy = make_policy("ddpm", backbone)
    gen = _gen(0)
    obs = torch.randn(32, OBS_DIM, generator=gen)
    weight = torch.randn(OBS_DIM, HORIZON * ACTION_DIM, generator=gen)
    low, high = policy.normalizer.action_min, policy.normalizer.action_max
    actions = low + (torch.tanh(obs @ weight).view(32, HORIZON, ACTION_DIM) + 1) / 2 * (high - low)

    def fixed_noise_loss() -> float:
        with torch.random.fork_rng(), torch.no_grad():
            torch.manual_seed(123)
            return policy.pretrain_loss(obs, actions)["eps_prediction"].item()

    before = fixed_noise_loss()
    optimizer = torch.optim.Adam(policy.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(150):
        loss = policy.pretrain_loss(obs, actions)["eps_prediction"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = fixed_noise_loss()
    assert after < 0.5 * before, (before, after)


@pytest.mark.parametrize(("backbone", "train_steps", "lr"), [("mlp", 800, 3e-3), ("unet1d", 350, 5e-3)])
def test_deterministic_sampler_reproduces_a_constant_action_chunk_it_was_fitted_to(backbone, train_steps, lr):
    """End to end: ε-prediction training + DDIM η=0 sampling from noise lands on the one demonstrated chunk.

    The same ε-network serves both samplers (same T and schedule), so it is trained once and loaded into both.
    """
    policy = make_policy("ddpm", backbone, hidden_dims=[128, 128], unet_dims=[16, 32])
    target_norm = torch.tensor([[-0.8, 0.6], [-0.2, 0.2], [0.8, -0.4], [0.2, 0.2]])  # inside [-1, 1]
    target = policy.normalizer.unnormalize_action(target_norm)  # env units
    obs = torch.randn(32, OBS_DIM, generator=_gen(0))
    actions = target.expand(32, HORIZON, ACTION_DIM)

    def errors(model: DiffusionPolicy) -> torch.Tensor:
        with torch.no_grad():
            sample = model.sample(obs, deterministic=True, generator=_gen(1))
        return (model.normalizer.normalize_action(sample.actions) - target_norm).abs()

    untrained = errors(policy).mean().item()
    optimizer = torch.optim.Adam(policy.parameters(), lr=lr)
    torch.manual_seed(0)
    for _ in range(train_steps):
        loss = policy.pretrain_loss(obs, actions)["eps_prediction"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    ddim = DiffusionPolicy(OBS_DIM, ACTION_DIM, dataclasses.replace(policy.config, sampler="ddim"))
    ddim.load_state_dict(policy.state_dict())
    for model in (policy, ddim):
        error = errors(model).mean().item()  # normalised units, actions in [-1, 1]
        # Untrained: ~0.95; fitted: ~0.04 (fixed seeds); the bound leaves room for float differences across platforms.
        assert error < 0.15 and error < 0.2 * untrained, (model.config.sampler, untrained, error)


# ---- checkpoints ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("sampler", "backbone"), SAMPLERS_X_BACKBONES)
def test_checkpoint_round_trip_gives_identical_samples_and_keeps_the_frozen_base(
    sampler, backbone, monkeypatch, tmp_path
):
    monkeypatch.setitem(POLICIES, "diffusion", (DiffusionPolicy, DiffusionPolicyConfig))
    policy = make_policy(sampler, backbone, finetune_steps=5)
    path = save_policy(policy, tmp_path / "ckpt", metadata={"env": "test"})
    loaded, metadata = load_policy(path, expected_type="diffusion", obs_dim=OBS_DIM, action_dim=ACTION_DIM)
    assert isinstance(loaded, DiffusionPolicy) and loaded.config == policy.config and metadata == {"env": "test"}
    obs = _obs(5)
    for deterministic in (True, False):
        with torch.no_grad():
            a = policy.sample(obs, deterministic=deterministic, generator=_gen(7))
            b = loaded.sample(obs, deterministic=deterministic, generator=_gen(7))
        for field in ("actions", "chain", "log_prob", "std", "stochastic"):
            assert torch.equal(getattr(a, field), getattr(b, field)), (deterministic, field)
    # After fine-tuning started (base frozen) the checkpoint also holds the frozen base, so a reloaded
    # DDPM policy runs the same early steps as the policy that was trained (DPPO saves both networks).
    assert sampler == "ddim" or policy.base_model is not None
    with torch.no_grad():
        for parameter in policy.model.parameters():  # fine-tuning moved the model away from the base
            parameter.add_(0.01)
    path = save_policy(policy, tmp_path / "ckpt_finetuned")
    weights = load_file(path / WEIGHTS_FILE)
    base_keys = {f"base_model.{k}" for k in policy.base_model.state_dict()} if policy.base_model else set()
    assert weights.keys() == {k for k in policy.state_dict() if not k.startswith("normalizer.")} | base_keys
    reloaded, _ = load_policy(path)
    with torch.no_grad():
        a, b = policy.sample(obs, generator=_gen(8)), reloaded.sample(obs, generator=_gen(8))
    assert torch.equal(a.chain, b.chain) and torch.equal(a.log_prob, b.log_prob)


@pytest.mark.parametrize(("sampler", "ratio_unit"), [("ddpm", "transition"), ("ddim", "chain")])
def test_cli_pretrains_finetunes_and_evaluates_a_diffusion_policy(tmp_path, tiny_finetune, sampler, ratio_unit):
    """``policy=diffusion`` end to end through the CLI, on a small hand-made Hopper dataset."""
    import csv
    import json

    import numpy as np

    from robo_rlft.cli import main
    from robo_rlft.data import DemoDataset, save_dataset

    rng = np.random.default_rng(0)
    steps = 60
    ends = np.zeros(steps, dtype=bool)
    ends[[29, 59]] = True
    dataset = DemoDataset(
        observations=rng.normal(size=(steps, 11)).astype(np.float32),
        actions=rng.uniform(-1, 1, size=(steps, 3)).astype(np.float32),
        rewards=np.ones(steps, dtype=np.float32),
        terminals=ends,
        truncations=np.zeros(steps, dtype=bool),
        meta={"env": "hopper"},
    )
    save_dataset(dataset, tmp_path / "data.npz")
    arch = ["policy=diffusion", f"policy.sampler={sampler}", "policy.hidden_dims=[32,32]", "policy.finetune_steps=3"]
    pretrain = ["pretrain", f"pretrain.dataset={tmp_path / 'data.npz'}", "pretrain.gradient_steps=20"]
    assert main([*pretrain, "pretrain.eval_episodes=1", f"run_dir={tmp_path / 'bc'}", "progress=false", *arch]) == 0
    finetune = ["finetune", f"policy.pretrained={tmp_path / 'bc' / 'final'}", f"run_dir={tmp_path / 'ft'}"]
    extra = ["algo.iterations=2", f"algo.ratio_unit={ratio_unit}", "algo.clip_coef_first=0.001", "algo.eval_every=1"]
    assert main([*finetune, *tiny_finetune, *arch, *extra]) == 0
    with open(tmp_path / "ft" / "metrics.csv", newline="") as f:
        rows = [row for row in csv.DictReader(f) if row["iteration"] != "0"]
    assert len(rows) == 2
    for row in rows:
        assert abs(float(row["ratio_first_minibatch"]) - 1.0) < 1e-5
    final = json.loads((tmp_path / "ft" / "final" / "config.json").read_text())
    assert final["policy_type"] == "diffusion" and final["config"]["sampler"] == sampler
    assert main(["eval", f"eval.checkpoint={tmp_path / 'ft'}", "eval.episodes=2", f"run_dir={tmp_path / 'ev'}"]) == 0
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["episodes"] == 2
