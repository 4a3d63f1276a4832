"""Deterministic-sampler evaluation: returns and success with confidence intervals, optional video."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from envs import make_env, make_vector_env, step_info_value
from policies.checkpoint import save_policy
from robo_rlft.config import Config
from robo_rlft.metrics import MetricLogger
from robo_rlft.observations import ObservationAdapter, add_batch_dim
from robo_rlft.stats import mean_ci95, wilson_ci95

logger = logging.getLogger(__name__)


@torch.no_grad()
def evaluate_policy(
    policy: torch.nn.Module,
    env_name: str,
    num_episodes: int,
    act_steps: int,
    num_envs: int = 10,
    seed: int = 100_000,
    device: str | torch.device = "cpu",
    env_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run ``num_episodes`` episodes with the policy's deterministic sampler (envs made with ``env_kwargs``).

    Episodes run in batches of ``num_envs``; episode ``i`` uses reset seed ``seed + i`` and the
    sampler's noise comes from a generator seeded with ``seed``, so two evaluations with the same
    seed are identical, and evaluating never moves the training RNG. The default seed range is far
    from training seeds. Envs that define fixed evaluation init states (``num_fixed_init_states``,
    the tabletop tasks) are evaluated on them instead: episode ``i`` starts from fixed state ``i``.
    Image-based policies (a VLA) need ``env_kwargs`` with their cameras; see :mod:`robo_rlft.observations`.

    Returns:
        ``return_mean``, ``return_ci95`` (t-interval half-width), ``success_rate`` and
        ``success_ci95`` (Wilson ``[lo, hi]``; null when the env defines no success), ``episodes``,
        ``episode_returns``, ``episode_lengths`` (env steps); for a multi-task env, ``success_by_task``
        (task -> ``success_rate``, ``success_ci95``, ``episodes``).
    """
    was_training = policy.training
    policy.eval()
    returns, lengths, successes, tasks = [], [], [], []
    task_order: dict[Any, None] = {}  # the tasks in the order their first episode started
    has_success = False
    adapter = ObservationAdapter.for_policy(policy)
    envs = make_vector_env(
        env_name, min(num_envs, num_episodes), policy.horizon, act_steps, env_kwargs=env_kwargs, flatten=adapter.flatten
    )
    generator = torch.Generator(device=device).manual_seed(seed)
    # LIBERO-style envs define fixed evaluation init states: episode i then starts from state i.
    fixed_states = _fixed_init_states(envs)
    options = {"fixed_init_state": True} if fixed_states else None
    first_seed = 0 if fixed_states else seed
    try:
        for start in range(0, num_episodes, envs.num_envs):
            n = min(envs.num_envs, num_episodes - start)
            obs, reset_info = envs.reset(seed=[first_seed + start + i for i in range(envs.num_envs)], options=options)
            ep_task = reset_info.get("task", np.full(envs.num_envs, None))  # a multi-task env names each one's task
            task_order.update(dict.fromkeys(ep_task[:n]))
            ep_return = np.zeros(envs.num_envs)
            ep_length = np.zeros(envs.num_envs, dtype=np.int64)
            ep_success = np.zeros(envs.num_envs, dtype=bool)
            active = np.arange(envs.num_envs) < n
            while active.any():
                obs_t = adapter(obs, adapter.instructions(envs), device)
                actions = policy.sample(obs_t, deterministic=True, generator=generator).actions
                obs, reward, terminated, truncated, info = envs.step(actions.cpu().numpy())
                ended = terminated | truncated
                ep_return[active] += reward[active]
                ep_length[active] += step_info_value(info, "executed_steps", ended).astype(np.int64)[active]
                if "is_success" in info or "is_success" in info.get("final_info", {}):
                    has_success = True
                    ep_success[active] |= step_info_value(info, "is_success", ended).astype(bool)[active]
                for i in np.flatnonzero(active & ended):
                    returns.append(ep_return[i])
                    lengths.append(int(ep_length[i]))
                    successes.append(bool(ep_success[i]))
                    tasks.append(ep_task[i])
                active &= ~ended
    finally:
        envs.close()
        policy.train(was_training)
    returns_arr = np.asarray(returns)
    mean, half_width = mean_ci95(returns_arr)
    result: dict[str, Any] = {
        "return_mean": mean,
        "return_ci95": half_width,
        "success_rate": None,
        "success_ci95": None,
        "episodes": len(returns),
        "episode_returns": returns_arr.tolist(),
        "episode_lengths": lengths,
    }
    # Locomotion envs define no success; "success" there would be meaningless.
    if has_success:
        rate, lo, hi = wilson_ci95(int(np.sum(successes)), len(successes))
        result.update(success_rate=rate, success_ci95=[lo, hi])
        if len(task_order) > 1:
            by_task: dict[str, dict[str, Any]] = {}
            for task in task_order:
                outcomes = [ok for ok, t in zip(successes, tasks, strict=True) if t == task]
                rate, lo, hi = wilson_ci95(int(np.sum(outcomes)), len(outcomes))
                by_task[str(task)] = {"success_rate": rate, "success_ci95": [lo, hi], "episodes": len(outcomes)}
            result["success_by_task"] = by_task
    return result


def _fixed_init_states(envs: gym.vector.VectorEnv) -> int:
    """How many fixed evaluation init states the env defines (0 if none)."""
    try:
        return int(envs.get_attr("num_fixed_init_states")[0])
    except AttributeError:
        return 0


def policy_metadata(cfg: Config, trained_by: str, cameras: bool = False) -> dict[str, Any]:
    """What a checkpoint records about its env, so ``robo-rlft eval`` rebuilds the same one (``cameras``: with
    the env's cameras, for image-based policies)."""
    return {
        "env": cfg.env.env_id,
        "env_kwargs": cfg.env.make_kwargs(cameras=cameras),
        "act_steps": cfg.env.act_steps,
        "trained_by": trained_by,
    }


def eval_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The ``eval/`` metrics of an :func:`evaluate_policy` result."""
    metrics = {"eval/return_mean": result["return_mean"], "eval/return_ci95": result["return_ci95"]}
    if result["success_rate"] is not None:
        metrics["eval/success_rate"] = result["success_rate"]
    for task, outcome in result.get("success_by_task", {}).items():
        metrics[f"eval/success_rate/{task}"] = outcome["success_rate"]
    return metrics


class BestPolicyTracker:
    """Evaluates the policy being trained (deterministic sampler, its own RNG, so evaluating never
    shifts training) and keeps the best one so far in ``run_dir/best``."""

    def __init__(
        self,
        run_dir: Path,
        env_name: str,
        act_steps: int,
        episodes: int,
        device: str | torch.device,
        metadata: dict[str, Any],
        best_return: float = -math.inf,
        env_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.run_dir, self.env_name, self.act_steps = run_dir, env_name, act_steps
        self.episodes, self.device, self.metadata = episodes, device, metadata
        self.env_kwargs = env_kwargs or {}
        self.best_return = best_return

    @classmethod
    def for_finetune(
        cls,
        cfg: Config,
        run_dir: Path,
        device: str | torch.device,
        best_return: float = -math.inf,
        cameras: bool = False,
    ) -> BestPolicyTracker:
        """The tracker of a fine-tuning run; its ``metadata`` also labels the run's other checkpoints
        (``cameras``: the policy takes images, so its env renders ``env.cameras``)."""
        metadata = policy_metadata(cfg, "robo-rlft finetune", cameras=cameras)
        return cls(
            run_dir, cfg.env.env_id, cfg.env.act_steps, cfg.algo.eval_episodes, device, metadata, best_return,
            cfg.env.make_kwargs(cameras=cameras),
        )  # fmt: skip

    def evaluate(self, policy: torch.nn.Module, iteration: int) -> dict[str, Any]:
        """Evaluate; if it beats the best return so far, save ``policy`` to ``run_dir/best``."""
        result = evaluate_policy(
            policy, self.env_name, self.episodes, self.act_steps, device=self.device, env_kwargs=self.env_kwargs
        )
        if result["return_mean"] > self.best_return:
            self.best_return = result["return_mean"]
            save_policy(policy, self.run_dir / "best", {**self.metadata, "iteration": iteration})
        return result

    def log_start(self, policy: torch.nn.Module, metrics: MetricLogger) -> dict[str, Any]:
        """Iteration 0: evaluate the pretrained policy, so the learning curve starts where fine-tuning does."""
        result = self.evaluate(policy, 0)
        metrics.log(0, {"iteration": 0, "env_steps": 0, **eval_metrics(result)})
        return result


@torch.no_grad()
def record_video(
    policy: torch.nn.Module,
    env_name: str,
    act_steps: int,
    path: Path,
    seed: int = 100_000,
    env_kwargs: dict[str, Any] | None = None,
) -> Path:
    """Render one deterministic episode to ``path`` (mp4). Headless machines need ``MUJOCO_GL=egl``/``osmesa``."""
    import imageio.v2 as imageio

    # The plain env, stepped one action at a time, so the video shows every simulator frame.
    adapter = ObservationAdapter.for_policy(policy)
    env = make_env(env_name, render_mode="rgb_array", flatten=adapter.flatten, **(env_kwargs or {}))
    was_training = policy.training
    policy.eval()
    device = next(policy.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    try:
        obs, _ = env.reset(seed=seed)
        frames = [env.render()]
        done = False
        while not done:
            obs_t = adapter(add_batch_dim(obs), adapter.instructions(env), device)
            chunk = policy.sample(obs_t, deterministic=True, generator=generator).actions[0]  # (H, A)
            for action in chunk[:act_steps].cpu().numpy():
                obs, _, terminated, truncated, _ = env.step(action)
                frames.append(env.render())
                done = terminated or truncated
                if done:
                    break
    finally:
        env.close()
        policy.train(was_training)
    path.parent.mkdir(parents=True, exist_ok=True)
    fps = env.metadata.get("render_fps", 30)  # real time
    imageio.mimsave(path, frames, fps=fps, macro_block_size=1)
    logger.info("Wrote %d frames to %s", len(frames), path)
    return path
