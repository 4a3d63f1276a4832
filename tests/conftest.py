"""Shared fixtures: one torch thread, tiny flow policies and checkpoints, tiny CLI settings."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import pytest
import torch
from deploy_e2e import EPISODES, TASK

from policies.checkpoint import load_policy, save_policy
from policies.flow import FlowPolicy, FlowPolicyConfig
from policies.noise import FlowNoiseConfig

# tests/ros1 needs rospy, which only a ROS 1 interpreter has: tests/test_ros1_backend.py runs that folder in one.
# find_spec, not import: importing rospy here would load ROS into every test process.
collect_ignore = [] if importlib.util.find_spec("rospy") else ["ros1"]

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


@pytest.fixture(scope="session")
def lift_policy(tmp_path_factory) -> Path:
    """A LiftCube policy: 50 scripted demos → 4000 BC steps → 2 PPO iterations (the fine-tuned checkpoint)."""
    work = tmp_path_factory.mktemp("lift")
    env = ["experiment=tabletop", f"env.task={TASK}", "progress=false"]
    steps = [
        ["collect", *env, "collect.episodes=50", "collect.action_noise=0.1", f"run_dir={work / 'data'}"],
        ["pretrain", *env, f"pretrain.dataset={work / 'data' / 'dataset.npz'}", "pretrain.gradient_steps=4000"],
        ["finetune", *env, f"policy.pretrained={work / 'bc' / 'final'}", "algo.iterations=2", "env.num_envs=16"],
    ]
    steps[1] += ["pretrain.eval_episodes=0", f"run_dir={work / 'bc'}"]
    steps[2] += ["algo.steps_per_iteration=50", "algo.eval_episodes=10", f"run_dir={work / 'ft'}"]
    from robo_rlft.cli import main

    for argv in steps:
        assert main(argv) == 0, argv
    return work / "ft" / "final"


@pytest.fixture(scope="session")
def direct_successes(lift_policy) -> int:
    """Successes of the policy in direct simulation on fixed init states 0..EPISODES-1."""
    from robo_rlft.evaluation import evaluate_policy

    policy, metadata = load_policy(lift_policy)
    result = evaluate_policy(
        policy, metadata["env"], EPISODES, metadata["act_steps"], num_envs=10, env_kwargs=metadata["env_kwargs"]
    )
    successes = round(result["success_rate"] * EPISODES)
    assert successes >= EPISODES // 2, f"the trained policy is too weak to test deployment: {successes}/{EPISODES}"
    return successes


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
