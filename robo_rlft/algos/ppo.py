"""PPO over denoising chains (ReinFlow-style): the whole training loop, top to bottom.

One "step" of the MDP is one executed action chunk; the policy's "action" is the whole denoising
chain ``x_{0:K}`` it sampled, whose log-probability is exact (DESIGN.md §3). The chain is stored at
rollout and *replayed* at update time, so the ratio at the first minibatch is exactly 1.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from envs import step_info_value
from policies.chain import chain_log_prob, step_log_prob
from policies.checkpoint import load_policy, save_policy
from policies.critic import ValueCritic
from policies.vla_backbone import VLAObservation
from robo_rlft.checkpointing import latest_checkpoint, load_training_checkpoint, save_training_checkpoint
from robo_rlft.config import Config
from robo_rlft.distributed import Distributed
from robo_rlft.evaluation import BestPolicyTracker, eval_metrics, policy_metadata
from robo_rlft.metrics import MetricLogger
from robo_rlft.observations import ObservationAdapter, ObservationBuffer, stack_observations
from robo_rlft.progress import progress_bar
from robo_rlft.returns import RunningRewardScaler, compute_gae

logger = logging.getLogger(__name__)

# Where a run keeps the frozen pretrained policy of the BC regulariser.
BASE_POLICY_DIR = "base_policy"


@dataclass
class PPOLosses:
    """Named loss terms (summed by the caller) and detached diagnostics of one minibatch."""

    policy: torch.Tensor
    value: torch.Tensor
    entropy: torch.Tensor
    bc: torch.Tensor
    approx_kl: float
    clip_fraction: float
    ratio_mean: float
    entropy_mean: float


def ppo_losses(
    policy: nn.Module,
    critic: ValueCritic,
    obs: torch.Tensor | VLAObservation,
    critic_inputs: torch.Tensor,
    chains: torch.Tensor,
    stochastic: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    returns: torch.Tensor,
    cfg: Config,
    base_policy: nn.Module | None = None,
    step_clips: torch.Tensor | None = None,
) -> PPOLosses:
    """Clipped PPO objective on one minibatch, with the value loss, the entropy bonus and, when a
    frozen ``base_policy`` is given, the BC regulariser toward it (:func:`bc_regulariser`).

    Args:
        obs: ``(M, obs_dim)`` (a ``VLAObservation`` of M rows for the VLA); critic_inputs: ``(M, D)`` the
            critic's input at rollout (``ObservationAdapter.critic_features``); chains: ``(M, K+1, H, A)``;
            stochastic: ``(M, K)`` bool — for
            ``ratio_unit=transition`` minibatches (:func:`ppo_samples`) one-hot: the row's transition;
        old_log_probs: ``(M, K)`` per-transition log-probs at rollout (:func:`step_log_prob`);
        advantages, returns: ``(M,)``;
        step_clips: ``(K,)`` clip per denoising step for ``ratio_unit=transition``, from
            :func:`transition_clip_schedule` over the whole batch (a minibatch may miss some steps).
    """
    if old_log_probs.requires_grad:
        raise RuntimeError("old_log_probs require grad: they must be stored detached at rollout time.")
    algo = cfg.algo
    log_prob_elements, entropy_elements = policy.log_prob_and_entropy(obs, chains, stochastic)  # (M, K, H, A) each
    new_log_probs = step_log_prob(log_prob_elements, algo.log_prob_reduction)  # (M, K)
    if algo.norm_adv and advantages.numel() > 1:
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    if algo.ratio_unit == "chain":
        reduction = algo.log_prob_reduction
        log_ratio = chain_log_prob(new_log_probs, stochastic, reduction) - chain_log_prob(
            old_log_probs, stochastic, reduction
        )  # (M,)
        clip = torch.full_like(log_ratio, algo.clip_coef)
    else:  # DPPO: every stochastic transition is its own PPO sample
        rows, steps = stochastic.nonzero(as_tuple=True)  # (S,) each
        log_ratio = new_log_probs[rows, steps] - old_log_probs[rows, steps]  # (S,)
        last_step = stochastic.shape[1] - 1
        advantages = advantages[rows] * algo.denoising_discount ** (last_step - steps)
        if step_clips is None:
            raise ValueError("ppo_losses: ratio_unit=transition needs step_clips (transition_clip_schedule).")
        clip = step_clips[steps]
    ratio = log_ratio.exp()
    pg_loss = torch.max(-advantages * ratio, -advantages * torch.clamp(ratio, 1 - clip, 1 + clip)).mean()
    value_loss = 0.5 * (critic(critic_inputs) - returns).pow(2).mean()
    # Mean entropy of the stochastic transitions (deterministic steps hold zeros).
    entropy_mean = entropy_elements.sum() / (stochastic.sum() * entropy_elements.shape[2] * entropy_elements.shape[3])
    with torch.no_grad():
        # Schulman's low-variance estimator of KL(old || new).
        approx_kl = ((ratio - 1) - log_ratio).mean().item()
        clip_fraction = ((ratio - 1).abs() > clip).float().mean().item()
    bc = algo.bc_coef * bc_regulariser(policy, base_policy, obs) if base_policy is not None else pg_loss.new_zeros(())
    return PPOLosses(
        policy=pg_loss,
        value=algo.vf_coef * value_loss,
        entropy=-algo.ent_coef * entropy_mean,
        bc=bc,
        approx_kl=approx_kl,
        clip_fraction=clip_fraction,
        ratio_mean=ratio.mean().item(),
        entropy_mean=entropy_mean.item(),
    )


def bc_regulariser(policy: nn.Module, base_policy: nn.Module, obs: torch.Tensor | VLAObservation) -> torch.Tensor:
    """Mean squared distance between the action chunks (normalised units, before the clip) that the
    policy and the frozen base produce with their deterministic samplers from the same ``x_0``:
    ReinFlow's W2 regulariser, which keeps fine-tuning near the pretrained behaviour.

    The shared ``x_0`` comes from a generator seeded off the global RNG, so runs stay reproducible.
    """
    seed = int(torch.randint(2**62, (1,)))
    device = policy.normalizer.obs_mean.device
    mine = policy.sample(obs, deterministic=True, generator=torch.Generator(device).manual_seed(seed)).chain[:, -1]
    with torch.no_grad():
        base = base_policy.sample(obs, deterministic=True, generator=torch.Generator(device).manual_seed(seed))
    return (mine - base.chain[:, -1]).pow(2).mean()


def ppo_samples(stochastic: torch.Tensor, ratio_unit: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The PPO samples of a batch of ``B`` chains, which minibatches draw from: ``(rows (S,), masks (S, K))``.

    ``chain``: one sample per chain with its own stochastic mask (S = B). ``transition``: one sample per
    stochastic (chain, step) pair, as in DPPO's denoising MDP where every transition is an MDP step
    (S = number of stochastic transitions, so ``minibatch_size`` counts transitions); the mask is one-hot
    at the pair's step, so re-scoring (``policies.chain.score_chain``) evaluates that transition only.
    """
    if ratio_unit == "chain":
        return torch.arange(stochastic.shape[0], device=stochastic.device), stochastic
    rows, steps = stochastic.nonzero(as_tuple=True)
    return rows, nn.functional.one_hot(steps, stochastic.shape[1]).bool()


def transition_clip_schedule(
    stochastic: torch.Tensor, clip_last: float, clip_first: float | None, rate: float
) -> torch.Tensor:
    """``(K,)`` PPO clip per denoising step for per-transition ratios (DPPO).

    Over the n steps that can be stochastic (the last n of K), the clip rises exponentially from
    ``clip_first`` at the earliest to ``clip_last`` at the final step. With a single such step the
    schedule is just ``clip_last`` (DPPO computed ``k / (n - 1)`` there and got NaN).
    """
    num_steps = stochastic.shape[1]
    clips = torch.full((num_steps,), clip_last, device=stochastic.device)
    if clip_first is None:
        return clips
    first = int(stochastic.any(0).nonzero()[0]) if stochastic.any() else num_steps - 1
    n = num_steps - first
    if n > 1:
        progress = torch.arange(n, device=stochastic.device) / (n - 1)  # 0 at the earliest, 1 at the last
        growth = (torch.exp(rate * progress) - 1) / math.expm1(rate) if rate != 0 else progress
        clips[first:] = clip_first + (clip_last - clip_first) * growth
    return clips


@dataclass
class ChunkRollout:
    """``T`` chunk steps of ``N`` envs, as PPO's update needs them (everything ``(T, N, ...)``, CPU).

    Attributes:
        obs: the policy inputs the chunks were sampled at (:class:`robo_rlft.observations.ObservationBuffer`).
        critic_inputs: ``(T, N, D)`` the critic's inputs at those observations.
        chains: ``(T, N, K+1, H, A)`` the sampled denoising chains; ``stochastic`` ``(T, N, K)`` which steps were.
        log_probs: ``(T, N, K)`` per-transition log-probs at sampling time (reduced over the chunk's elements).
        rewards: ``(T, N)`` raw rewards (scaling is the learner's: its running statistics span all envs).
        values: ``(T, N)`` ``V(o_t)``.
        next_values: ``(T, N)`` the bootstrap target after step t: ``V(o_{t+1})``, ``V(final_obs)`` when the episode
            was truncated, 0 when it terminated; the rollout's end counts as a truncation.
        ends: ``(T, N)`` 1.0 where an episode ended at step t.
        env_steps: env steps executed (chunks × executed actions).
        finished_returns, finished_success: per episode that ended (success only where the env reports it).
        noise_std_mean: mean transition std over the stochastic elements, averaged over steps.
        time_sim, time_inference: seconds in ``envs.step`` and in the policy + critic.
    """

    obs: ObservationBuffer
    critic_inputs: torch.Tensor
    chains: torch.Tensor
    stochastic: torch.Tensor
    log_probs: torch.Tensor
    rewards: torch.Tensor
    values: torch.Tensor
    next_values: torch.Tensor
    ends: torch.Tensor
    env_steps: int
    finished_returns: list[float]
    finished_success: list[float]
    noise_std_mean: float
    time_sim: float
    time_inference: float

    @staticmethod
    def concat(parts: Sequence[ChunkRollout]) -> ChunkRollout:
        """Rollouts of disjoint env slices (same ``T``) → one, envs in the order of ``parts``."""
        if len(parts) == 1:
            return parts[0]
        envs = [part.rewards.shape[1] for part in parts]

        def cat(name: str) -> torch.Tensor:
            return torch.cat([getattr(part, name) for part in parts], dim=1)

        return ChunkRollout(
            obs=ObservationBuffer.concat_envs([part.obs for part in parts]),
            **{name: cat(name) for name in ROLLOUT_TENSORS},
            env_steps=sum(part.env_steps for part in parts),
            finished_returns=[r for part in parts for r in part.finished_returns],
            finished_success=[s for part in parts for s in part.finished_success],
            noise_std_mean=float(np.average([part.noise_std_mean for part in parts], weights=envs)),
            time_sim=sum(part.time_sim for part in parts),
            time_inference=sum(part.time_inference for part in parts),
        )


def rollout_reset_seed(seed: int, iteration: int, num_envs: int) -> int:
    """Reset seed of env 0 at ``iteration`` (env i gets this + i): a pure function of the run's seed, so resuming
    needs no simulator state and every env slice of a distributed run gets the seeds of the single-process run."""
    return seed * 1_000_003 + iteration * num_envs


ROLLOUT_TENSORS = ("critic_inputs", "chains", "stochastic", "log_probs", "rewards", "values", "next_values", "ends")


def collect_chunk_rollout(
    policy: nn.Module,
    critic: nn.Module,
    adapter: ObservationAdapter,
    envs: gym.vector.VectorEnv,
    num_steps: int,
    reset_seed: int,
    log_prob_reduction: str,
    device: torch.device | str = "cpu",
) -> ChunkRollout:
    """Run ``num_steps`` chunk steps in every env from ``envs.reset(seed=reset_seed)`` (env i: ``reset_seed + i``).

    Sampling draws from the global torch RNG. ``envs`` must be made with the policy's observation options
    (``adapter.training_envs``).
    """
    num_envs = envs.num_envs
    horizon, num_denoise, action_dim = policy.horizon, policy.num_steps, policy.action_dim

    def values_of(obs: torch.Tensor | VLAObservation) -> torch.Tensor:
        """``V(o)`` of N policy inputs: ``(N,)`` on the CPU."""
        with torch.no_grad():
            return critic(adapter.critic_features(policy, obs)).cpu()

    obs_buf = adapter.new_buffer(num_steps, num_envs, envs.single_observation_space)
    # The critic's inputs at rollout: the update regresses V on them, so a VLA's prefix runs once per observation.
    critic_input_buf = torch.zeros(num_steps, num_envs, adapter.critic_dim(policy))
    chain_buf = torch.zeros(num_steps, num_envs, num_denoise + 1, horizon, action_dim)
    stochastic_buf = torch.zeros(num_steps, num_envs, num_denoise, dtype=torch.bool)
    log_prob_buf = torch.zeros(num_steps, num_envs, num_denoise)
    reward_buf = torch.zeros(num_steps, num_envs)
    value_buf = torch.zeros(num_steps, num_envs)
    next_value_buf = torch.zeros(num_steps, num_envs)
    end_buf = torch.zeros(num_steps, num_envs)
    env_steps = 0
    time_sim = time_inference = std_sum = 0.0
    finished_returns: list[float] = []
    finished_success: list[float] = []
    episode_return = np.zeros(num_envs)

    # Every iteration starts from fresh, seeded episodes, so resuming needs no simulator state.
    obs_np, _ = envs.reset(seed=reset_seed)
    for t in range(num_steps):
        tic = time.perf_counter()
        # Instructions are read every step: an env's task may change when it resets.
        instructions = adapter.instructions(envs)
        obs = adapter(obs_np, instructions, device)
        with torch.no_grad():
            sample, critic_inputs = adapter.sample_with_critic_features(policy, obs)  # one VLM forward
            value = critic(critic_inputs).cpu()
        std_sum += (sample.std.sum() / (sample.stochastic.sum() * horizon * action_dim)).item()
        time_inference += time.perf_counter() - tic

        tic = time.perf_counter()
        obs_np, reward, terminated, truncated, info = envs.step(sample.actions.cpu().numpy())
        time_sim += time.perf_counter() - tic
        ended = terminated | truncated
        env_steps += int(step_info_value(info, "executed_steps", ended).sum())
        episode_return += reward
        if "is_success" in info or "is_success" in info.get("final_info", {}):
            success = step_info_value(info, "is_success", ended).astype(float)
            finished_success += success[ended].tolist()
        finished_returns += episode_return[ended].tolist()
        episode_return[ended] = 0.0

        obs_buf.store(t, obs)
        critic_input_buf[t] = critic_inputs.cpu()
        chain_buf[t] = sample.chain.cpu()
        stochastic_buf[t] = sample.stochastic.cpu()
        log_prob_buf[t] = step_log_prob(sample.log_prob, log_prob_reduction).cpu()
        value_buf[t] = value
        reward_buf[t] = torch.as_tensor(reward, dtype=torch.float32)
        end_buf[t] = torch.as_tensor(ended, dtype=torch.float32)
        # Bootstrap target after step t: V(final_obs) if truncated (time limit, not a terminal
        # state), 0 if terminated, else V(o_{t+1}) (filled in from value_buf below).
        truncated_only = np.flatnonzero(truncated & ~terminated)
        if truncated_only.size:
            # The episode's instruction is the one it was stepped with (the env may have reset to another).
            final_obs = stack_observations(info["final_obs"][truncated_only])
            final_instructions = None if instructions is None else [instructions[i] for i in truncated_only]
            next_value_buf[t, truncated_only] = values_of(adapter(final_obs, final_instructions, device))
    # The rollout's end is a truncation too: bootstrap from the value of the last observation.
    last_obs = adapter(obs_np, adapter.instructions(envs), device)
    following_values = torch.cat([value_buf[1:], values_of(last_obs)[None]], 0)
    return ChunkRollout(
        obs=obs_buf,
        critic_inputs=critic_input_buf,
        chains=chain_buf,
        stochastic=stochastic_buf,
        log_probs=log_prob_buf,
        rewards=reward_buf,
        values=value_buf,
        next_values=torch.where(end_buf.bool(), next_value_buf, following_values),
        ends=end_buf,
        env_steps=env_steps,
        finished_returns=finished_returns,
        finished_success=finished_success,
        noise_std_mean=std_sum / num_steps,
        time_sim=time_sim,
        time_inference=time_inference,
    )


def train_ppo(
    cfg: Config,
    run_dir: Path,
    policy: nn.Module | None,
    resume: bool = False,
    distributed: Distributed | None = None,
) -> dict[str, Any]:
    """Fine-tune ``policy`` with PPO; writes metrics, checkpoints, ``best/`` and ``final/`` to ``run_dir``.

    With ``resume=True`` the policy (pass None) and all training state come from the run's latest
    checkpoint. Under ``torchrun`` (``distributed``), each rank collects its slice of the rollout and of every
    minibatch, gradients are averaged across ranks, and rank 0 alone logs, evaluates and checkpoints
    (:mod:`robo_rlft.distributed`). Returns the last evaluation result (on rank 0; ``{}`` on the others).
    """
    algo, device = cfg.algo, torch.device(cfg.device)
    distributed = distributed or Distributed()
    main = distributed.is_main
    reward_scaler = RunningRewardScaler(cfg.env.num_envs, algo.gamma)
    start_iteration, env_steps, best_return = 0, 0, -math.inf
    optim_state: dict[str, Any] | None = None
    if resume:
        loaded = load_training_checkpoint(latest_checkpoint(run_dir))
        policy, optim_state, state = loaded["policy"], loaded["optim"], loaded["state"]
        start_iteration, env_steps, best_return = state["iteration"], state["env_steps"], state["best_return"]
        reward_scaler.load_state_dict(state["reward_scaler"])
        logger.info("Resumed %s at iteration %d (%d env steps).", run_dir, start_iteration, env_steps)
    # The one place that knows the policy's observations: env options, policy inputs, the critic's input
    # (policy.critic_input: only policy=vla has the choice).
    adapter = ObservationAdapter.for_policy(policy, critic_input=getattr(cfg.policy, "critic_input", "prefix"))
    critic = ValueCritic(adapter.critic_dim(policy), cfg.policy.critic)
    if resume:
        critic.load_state_dict(loaded["critic_state"])
    if cfg.env.act_steps > policy.horizon:
        raise ValueError(f"env.act_steps={cfg.env.act_steps} exceeds the policy's horizon {policy.horizon}.")
    base_policy = None
    if algo.bc_coef > 0:
        # The frozen pretrained policy lives in the run directory, so a resumed run regularises
        # toward the same policy as the original one.
        if not resume and main:
            base_meta = {
                **policy_metadata(cfg, "robo-rlft finetune", cameras=adapter.uses_images),
                "role": "bc regulariser base",
            }
            save_policy(policy, run_dir / BASE_POLICY_DIR, base_meta)
        distributed.barrier()
        base_policy = load_policy(run_dir / BASE_POLICY_DIR)[0].to(device).eval().requires_grad_(False)
    policy.to(device).train()
    critic.to(device).train()
    # Rollout workers: in this process, or Ray actors with copies of the policy and critic.
    from robo_rlft.scale import make_rollout_workers  # (robo_rlft.scale runs this module's rollout)

    workers = make_rollout_workers(cfg, policy, critic, distributed)
    # The module the actor's optimiser trains: the policy, or its FSDP-sharded copy (scale.fsdp;
    # robo_rlft.distributed), whose whole weights are copied back into the policy after every update.
    learner = distributed.learner_policy(policy, cfg.scale.fsdp)
    # A VLA's frozen backbone has requires_grad=False: it never gets a gradient, so Adam leaves it alone.
    actor_optimizer = torch.optim.Adam(learner.parameters(), lr=algo.actor_lr)
    critic_optimizer = torch.optim.Adam(critic.parameters(), lr=algo.critic_lr)

    def lr_factor(it: int) -> float:
        return 1.0 - it / algo.iterations if algo.lr_schedule == "linear" else 1.0

    actor_scheduler = torch.optim.lr_scheduler.LambdaLR(actor_optimizer, lr_factor)
    critic_scheduler = torch.optim.lr_scheduler.LambdaLR(critic_optimizer, lr_factor)
    if optim_state is not None:
        distributed.load_optimizer_state(learner, actor_optimizer, optim_state["actor_optimizer"])
        critic_optimizer.load_state_dict(optim_state["critic_optimizer"])
        actor_scheduler.load_state_dict(optim_state["actor_scheduler"])
        critic_scheduler.load_state_dict(optim_state["critic_scheduler"])
    last_eval: dict[str, Any] = {}
    tracker = BestPolicyTracker.for_finetune(cfg, run_dir, device, best_return, cameras=adapter.uses_images)
    metrics = None
    if main:  # rank 0 writes the run's files
        metrics = MetricLogger(run_dir, resume=resume, resume_iteration=start_iteration if resume else None)
        if start_iteration == 0:
            last_eval = tracker.log_start(policy, metrics)

    if optim_state is not None:
        torch.set_rng_state(optim_state["torch_rng"])  # last: nothing may draw random numbers after it
    bar = progress_bar(algo.iterations, "finetune", enabled=cfg.progress and main, completed=start_iteration)
    try:
        for iteration in range(start_iteration, algo.iterations):
            tic = time.perf_counter()
            rollout = workers.collect_ppo(policy, critic, iteration)
            time_rollout = time.perf_counter() - tic
            env_steps += sum(distributed.gather([rollout.env_steps]))
            rewards = rollout.rewards
            if algo.reward_scaling:  # in step order, as if scaled while stepping, over every rank's envs
                reward_scaler.reset()
                all_rewards, all_ends = distributed.gather_envs(rewards), distributed.gather_envs(rollout.ends)
                scaled = torch.stack(
                    [
                        torch.as_tensor(reward_scaler(r.numpy(), e.bool().numpy()), dtype=torch.float32)
                        for r, e in zip(all_rewards, all_ends, strict=True)
                    ]
                )
                envs_here = rewards.shape[1]
                rewards = scaled[:, distributed.rank * envs_here : (distributed.rank + 1) * envs_here]
            advantages, returns = compute_gae(
                rewards, rollout.values, rollout.next_values, rollout.ends, algo.gamma, algo.gae_lambda
            )

            # ---- update: epochs x minibatches of PPO samples (chains or transitions) of the batch ----
            tic = time.perf_counter()
            learner.train()
            b_obs = rollout.obs.flat().to(device)  # (B, obs_dim), or a VLAObservation of B rows
            b_critic_inputs = rollout.critic_inputs.flatten(0, 1).to(device)  # (B, D)
            b_chains = rollout.chains.flatten(0, 1).to(device)  # (B, K+1, H, A)
            b_stochastic = rollout.stochastic.flatten(0, 1).to(device)  # (B, K)
            b_log_probs = rollout.log_probs.flatten(0, 1).to(device)  # (B, K)
            b_advantages = advantages.reshape(-1).to(device)
            b_returns = returns.reshape(-1).to(device)
            sample_rows, sample_masks = ppo_samples(b_stochastic, algo.ratio_unit)  # (S,), (S, K)
            num_samples = sample_rows.shape[0]
            # Each rank takes its share of a minibatch from its own slice (equal slices: equal minibatch counts).
            minibatch = min(max(algo.minibatch_size // distributed.world_size, 1), num_samples)
            step_clips = None
            if algo.ratio_unit == "transition":
                step_clips = transition_clip_schedule(
                    b_stochastic, algo.clip_coef, algo.clip_coef_first, algo.clip_schedule_rate
                )
            train_actor = iteration >= algo.critic_warmup_iterations
            ratio_first = math.nan
            kls, clip_fracs, policy_losses, value_losses, entropies, bc_losses = [], [], [], [], [], []
            skipped = epochs_run = 0
            for _epoch in range(algo.update_epochs):
                epochs_run += 1
                epoch_start = len(kls)
                perm = torch.randperm(num_samples, device=device)
                for start in range(0, num_samples, minibatch):
                    picked = perm[start : start + minibatch]
                    mb = sample_rows[picked]
                    losses = ppo_losses(
                        learner,
                        critic,
                        b_obs[mb],
                        b_critic_inputs[mb],
                        b_chains[mb],
                        sample_masks[picked],
                        b_log_probs[mb],
                        b_advantages[mb],
                        b_returns[mb],
                        cfg,
                        base_policy,
                        step_clips,
                    )
                    if math.isnan(ratio_first):
                        ratio_first = losses.ratio_mean
                    loss = losses.value + (losses.policy + losses.entropy + losses.bc if train_actor else 0.0)
                    if distributed.any(not torch.isfinite(loss)):  # every rank skips, or none
                        skipped += 1
                        logger.warning("Non-finite loss at iteration %d; skipping this minibatch update.", iteration)
                        continue
                    actor_optimizer.zero_grad()
                    critic_optimizer.zero_grad()
                    loss.backward()
                    distributed.average_gradients(critic.parameters())
                    if train_actor:
                        distributed.average_gradients(learner.parameters())
                    nn.utils.clip_grad_norm_(critic.parameters(), algo.max_grad_norm)
                    critic_optimizer.step()
                    if train_actor:
                        nn.utils.clip_grad_norm_(learner.parameters(), algo.max_grad_norm)
                        actor_optimizer.step()
                    kls.append(losses.approx_kl)
                    clip_fracs.append(losses.clip_fraction)
                    policy_losses.append(losses.policy.item())
                    value_losses.append(losses.value.item())
                    entropies.append(losses.entropy_mean)
                    bc_losses.append(losses.bc.item())
                # KL early stop: skip the remaining epochs once this epoch moved the policy too far.
                epoch_kl = distributed.mean(float(np.mean(kls[epoch_start:] or [0.0])))
                if train_actor and algo.target_kl is not None and epoch_kl > algo.target_kl:
                    break
            if train_actor:  # the actor's schedule starts after critic warm-up
                actor_scheduler.step()
            critic_scheduler.step()
            distributed.sync_policy(learner, policy)
            distributed.check_identical(policy, critic)
            time_update = time.perf_counter() - tic

            finished_returns = distributed.gather(rollout.finished_returns)
            finished_success = distributed.gather(rollout.finished_success)
            row: dict[str, float] = {
                "iteration": iteration + 1,
                "env_steps": env_steps,
                "rollout/return_mean": float(np.mean(finished_returns or [math.nan])),
                "rollout/episodes": len(finished_returns),
                "rollout/noise_std_mean": rollout.noise_std_mean,
                "train/approx_kl": float(np.mean(kls)) if kls else math.nan,
                "train/clip_fraction": float(np.mean(clip_fracs)) if clip_fracs else math.nan,
                "train/ratio_first_minibatch": ratio_first,
                "train/policy_loss": float(np.mean(policy_losses)) if policy_losses else math.nan,
                "train/value_loss": float(np.mean(value_losses)) if value_losses else math.nan,
                "train/entropy": float(np.mean(entropies)) if entropies else math.nan,
                "train/bc_loss": float(np.mean(bc_losses)) if bc_losses else math.nan,
                "train/skipped_updates": skipped,
                "train/epochs": epochs_run,
                "train/actor_lr": actor_scheduler.get_last_lr()[0],
                "time/sim": rollout.time_sim,
                "time/inference": rollout.time_inference,
                "time/rollout": time_rollout,
                "time/update": time_update,
            }
            if finished_success:
                row["rollout/success_rate"] = float(np.mean(finished_success))

            done = iteration + 1 == algo.iterations
            checkpoint_now = done or (iteration + 1) % algo.checkpoint_every == 0
            # Every rank takes part in gathering sharded optimiser state; rank 0 writes it.
            actor_state = distributed.optimizer_state(learner, actor_optimizer) if checkpoint_now else None
            if not main:  # logging, evaluation and checkpoints are rank 0's
                continue
            if done or (algo.eval_every and (iteration + 1) % algo.eval_every == 0):
                last_eval = tracker.evaluate(policy, iteration + 1)
                row.update(eval_metrics(last_eval))
            metrics.log(env_steps, row)
            if checkpoint_now:
                save_training_checkpoint(
                    run_dir,
                    iteration + 1,
                    policy,
                    critic,
                    {
                        "actor_optimizer": actor_state,
                        "critic_optimizer": critic_optimizer.state_dict(),
                        "actor_scheduler": actor_scheduler.state_dict(),
                        "critic_scheduler": critic_scheduler.state_dict(),
                    },
                    {
                        "env_steps": env_steps,
                        "best_return": tracker.best_return,
                        "reward_scaler": reward_scaler.state_dict(),
                    },
                    tracker.metadata,
                )
            bar.advance(
                f"it {iteration + 1} | steps {env_steps} | return {row['rollout/return_mean']:.0f}"
                + (f" | eval {row['eval/return_mean']:.0f}" if "eval/return_mean" in row else "")
            )
    finally:
        bar.close()
        workers.close()
        if metrics is not None:
            metrics.close()
    if main:
        save_policy(policy, run_dir / "final", {**tracker.metadata, "iteration": algo.iterations})
        metrics.plot(run_dir / "learning_curve.png")
    distributed.barrier()  # the other ranks return once the run's files are complete
    return last_eval
