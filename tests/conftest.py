"""Shared fixtures: one torch thread, tiny flow policies and checkpoints, tiny CLI settings."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from policies.checkpoint import save_policy
from policies.flow import FlowPolicy, FlowPolicyConfig
from policies.noise import FlowNoiseConfig

# The networks in tests are tiny; on a 2-core machine shared with the simulator a second torch
# thread made small-MLP forwards ~30x slower.
torch.set_num_threads(1)

HOPPER_OBS_DIM, HOPPER_ACTION_DIM = 11, 3

# Overrides that make `robo-rlft finetune` run in a couple of seconds on hopper.
TINY_FINETUNE = [
    "env.num_envs=2",
    "env.act_steps=2",
    "algo.steps_per_iteration=10",
    "algo.minibatch_size=10",
    "algo.update_epochs=2",
    "algo.eval_episodes=2",
    "policy.critic.hidden_dims=[32,32]",
    "progress=false",
]


def make_flow_policy(
    obs_dim: int = HOPPER_OBS_DIM,
    action_dim: int = HOPPER_ACTION_DIM,
    horizon: int = 4,
    denoising_steps: int = 2,
    seed: int = 0,
    random_noise_head: bool = False,
    scheme: str = "reinflow",
    sde_steps: str = "all",
) -> FlowPolicy:
    """A tiny FlowPolicy with a non-trivial normaliser (and optionally a non-constant noise head)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        config = FlowPolicyConfig(
            horizon=horizon,
            denoising_steps=denoising_steps,
            hidden_dims=[32, 32],
            time_embed_dim=8,
            noise=FlowNoiseConfig(scheme, sigma_min=0.05, sigma_max=0.15, hidden_dims=[16], sde_steps=sde_steps),
        )
        policy = FlowPolicy(obs_dim, action_dim, config)
    with torch.no_grad():
        norm = policy.normalizer
        norm.obs_mean.copy_(torch.randn(obs_dim, generator=gen))
        norm.obs_std.copy_(0.5 + torch.rand(obs_dim, generator=gen))
        low = -0.5 - torch.rand(action_dim, generator=gen)
        norm.action_min.copy_(low)
        norm.action_max.copy_(low + 0.5 + torch.rand(action_dim, generator=gen))
        if random_noise_head and hasattr(policy.noise, "std_head"):
            # The head starts at zero (constant std); make the std depend on the input.
            last = policy.noise.std_head.net[-1]
            last.weight.copy_(torch.randn(last.weight.shape, generator=gen))
            last.bias.copy_(torch.randn(last.bias.shape, generator=gen))
    return policy


@pytest.fixture(scope="session")
def flow_policy_factory():
    """:func:`make_flow_policy`, for tests that build their own policies."""
    return make_flow_policy


@pytest.fixture(scope="session")
def tiny_finetune() -> list[str]:
    """CLI overrides for a finetune run of a few seconds (append run_dir, iterations, ...)."""
    return list(TINY_FINETUNE)


@pytest.fixture(scope="session")
def hopper_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny pretrained-looking hopper flow checkpoint (H=4, K=2, no noise head), as `pretrain` writes."""
    policy = make_flow_policy()
    # The env's action range, so the policy's actions are valid hopper actions.
    with torch.no_grad():
        policy.normalizer.action_min.fill_(-1.0)
        policy.normalizer.action_max.fill_(1.0)
    path = tmp_path_factory.mktemp("ckpt") / "hopper_flow"
    save_policy(policy, path, {"env": "hopper", "act_steps": 2, "trained_by": "tests"}, include_noise=False)
    return path


@pytest.fixture(autouse=True)
def _close_run_log_handlers():
    """Remove the per-run file handlers the CLI adds to the root logger, so runs don't log into each other."""
    root = logging.getLogger()
    before = set(root.handlers)
    yield
    for handler in set(root.handlers) - before:
        if isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
            handler.close()
