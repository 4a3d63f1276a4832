"""GRPO over denoising chains (Flow-GRPO / πRL style): the whole training loop, top to bottom.

Critic-free: each iteration runs ``num_groups`` groups of ``G`` episodes, the members of a group
starting from one initial state (they reset with the same seed). An episode's advantage is its
return normalised within its group, ``A_i = (R_i - mean_g) / (std_g + eps)``, and every chunk step
of the episode gets it. The loss weighs every episode the same (each of its steps by ``1 / its length``,
:func:`step_weights`), so failed episodes that run to the horizon do not outweigh the successes. As in
PPO (``robo_rlft.algos.ppo``), the policy's "action" is the stored denoising chain, replayed at update
time, so the ratio at the first minibatch is exactly 1.

Groups with no signal (all succeed / all fail, or all-equal returns in envs without success) are
dropped (DAPO's dynamic sampling), and the ratio is clipped asymmetrically to
``[1 - clip_low, 1 + clip_high]`` (DAPO's "clip-higher").
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
from policies.chain import reduce_log_prob
from policies.checkpoint import save_policy
from policies.vla_backbone import VLAObservation
from robo_rlft.checkpointing import latest_checkpoint, load_training_checkpoint, save_training_checkpoint
from robo_rlft.config import Config, GRPOConfig
from robo_rlft.distributed import Distributed
from robo_rlft.evaluation import BestPolicyTracker, eval_metrics
from robo_rlft.metrics import MetricLogger
from robo_rlft.observations import ObservationAdapter, ObservationBuffer
from robo_rlft.progress import progress_bar

logger = logging.getLogger(__name__)

# Added to the group's std: a group whose returns are all equal gets zero advantages, not 0/0.
ADV_EPS = 1e-6
# Below this std a group's returns count as "all equal" (no signal) for dynamic sampling.
EQUAL_RETURNS_STD = 1e-6


# ---- rollout ------------------------------------------------------------------------------------------------


@dataclass
class GroupRollout:
    """One episode per env; env ``i`` belongs to group ``i // G``. ``T`` chunk steps were run, ``N`` envs.

    Attributes:
        obs: ``(T, N)`` policy inputs the chunks were sampled at (``obs[t]``: step t's batch; for state policies
            ``(T, N, obs_dim)`` raw observations, see :class:`robo_rlft.observations.ObservationBuffer`).
        chains: ``(T, N, K+1, H, A)`` the sampled denoising chains.
        stochastic: ``(T, N, K)`` bool, which chain steps were stochastic.
        log_probs: ``(T, N)`` reduced log-probs of the chains at sampling time (detached).
        valid: ``(T, N)`` bool, true for the steps of each env's one episode; false once it has ended
            (the env was auto-reset and kept stepping only because its neighbours had not ended).
        returns: ``(N,)`` float64 episode returns (sums of raw rewards).
        lengths: ``(N,)`` int64 env steps of each episode.
        success: ``(N,)`` bool, whether the episode succeeded; None if the env reports no ``is_success``.
        noise_std_mean: mean transition std over the stochastic elements of the valid steps.
        time_sim, time_inference: seconds spent in ``envs.step`` and in ``policy.sample``.
    """

    obs: ObservationBuffer
    chains: torch.Tensor
    stochastic: torch.Tensor
    log_probs: torch.Tensor
    valid: torch.Tensor
    returns: np.ndarray
    lengths: np.ndarray
    success: np.ndarray | None
    noise_std_mean: float
    time_sim: float
    time_inference: float

    @staticmethod
    def concat(parts: Sequence[GroupRollout]) -> GroupRollout:
        """Rollouts of disjoint env slices → one, envs in the order of ``parts``; shorter ones are padded to the
        longest ``T`` with invalid steps."""
        if len(parts) == 1:
            return parts[0]
        steps = max(part.chains.shape[0] for part in parts)

        def pad(tensor: torch.Tensor) -> torch.Tensor:  # (T', N, ...) -> (steps, N, ...), zeros after T'
            extra = steps - tensor.shape[0]
            return torch.cat([tensor, tensor.new_zeros(extra, *tensor.shape[1:])]) if extra else tensor

        envs = [len(part.returns) for part in parts]
        has_success = [part.success is not None for part in parts]
        if any(has_success) and not all(has_success):
            raise ValueError("GroupRollout.concat: some slices report success and others do not.")
        return GroupRollout(
            obs=ObservationBuffer.concat_envs([part.obs.padded(steps) for part in parts]),
            chains=torch.cat([pad(part.chains) for part in parts], dim=1),
            stochastic=torch.cat([pad(part.stochastic) for part in parts], dim=1),
            log_probs=torch.cat([pad(part.log_probs) for part in parts], dim=1),
            valid=torch.cat([pad(part.valid) for part in parts], dim=1),
            returns=np.concatenate([part.returns for part in parts]),
            lengths=np.concatenate([part.lengths for part in parts]),
            success=np.concatenate([part.success for part in parts]) if all(has_success) else None,
            noise_std_mean=float(np.average([part.noise_std_mean for part in parts], weights=envs)),
            time_sim=sum(part.time_sim for part in parts),
            time_inference=sum(part.time_inference for part in parts),
        )


def group_seeds(seed: int, iteration: int, num_groups: int) -> list[int]:
    """Reset seed of each group at ``iteration``: a pure function of the run's seed, so resuming needs no
    simulator state (the same scheme PPO uses for its per-env seeds)."""
    return [seed * 1_000_003 + iteration * num_groups + g for g in range(num_groups)]


def collect_group_rollouts(
    policy: nn.Module,
    envs: gym.vector.VectorEnv,
    algo: GRPOConfig,
    seeds: Sequence[int],
    device: torch.device | str = "cpu",
) -> GroupRollout:
    """Run one episode in every env, ``algo.group_size`` envs per entry of ``seeds``.

    All members of group ``g`` reset with ``seeds[g]``; MuJoCo resets are a deterministic function of
    the seed, so they start from the same initial state and differ only by the policy's noise. An
    episode runs until it terminates or truncates, or ``algo.max_chunk_steps`` chunk steps have passed
    (it is then scored as it stands). Sampling draws from the global torch RNG. ``envs`` must be made with the
    policy's observation options (``ObservationAdapter.flatten``, cameras for image policies).
    """
    num_envs, group_size = envs.num_envs, algo.group_size
    if num_envs != len(seeds) * group_size:
        raise ValueError(
            f"{num_envs} envs cannot hold {len(seeds)} groups of algo.group_size={group_size}; "
            f"pass {len(seeds) * group_size} envs or {num_envs // group_size} seeds."
        )
    max_steps = algo.max_chunk_steps
    horizon, num_denoise, action_dim = policy.horizon, policy.num_steps, policy.action_dim
    adapter = ObservationAdapter.for_policy(policy)
    obs_buf = adapter.new_buffer(max_steps, num_envs, envs.single_observation_space)
    chain_buf = torch.zeros(max_steps, num_envs, num_denoise + 1, horizon, action_dim)
    stochastic_buf = torch.zeros(max_steps, num_envs, num_denoise, dtype=torch.bool)
    log_prob_buf = torch.zeros(max_steps, num_envs)
    valid_buf = torch.zeros(max_steps, num_envs, dtype=torch.bool)
    returns = np.zeros(num_envs)
    lengths = np.zeros(num_envs, dtype=np.int64)
    success = np.zeros(num_envs, dtype=bool)
    has_success = False
    std_sum, std_count = 0.0, 0
    time_sim = time_inference = 0.0

    obs_np, _ = envs.reset(seed=[int(s) for s in seeds for _ in range(group_size)])  # group-major order
    active = np.ones(num_envs, dtype=bool)  # the env's one episode is still running
    steps = 0
    while steps < max_steps and active.any():
        tic = time.perf_counter()
        obs = adapter(obs_np, adapter.instructions(envs), device)
        with torch.no_grad():
            sample = policy.sample(obs)
        # Mean std per chain over its stochastic elements: (N,)
        row_std = sample.std.flatten(1).sum(1) / (sample.stochastic.sum(1) * horizon * action_dim).clamp_min(1)
        time_inference += time.perf_counter() - tic

        tic = time.perf_counter()
        obs_np, reward, terminated, truncated, info = envs.step(sample.actions.cpu().numpy())
        time_sim += time.perf_counter() - tic
        ended = terminated | truncated
        # Envs whose episode ended earlier were auto-reset (SAME_STEP): their steps belong to no rollout.
        returns[active] += reward[active]
        lengths[active] += step_info_value(info, "executed_steps", ended).astype(np.int64)[active]
        if "is_success" in info or "is_success" in info.get("final_info", {}):
            has_success = True
            success[active] |= step_info_value(info, "is_success", ended).astype(bool)[active]

        obs_buf.store(steps, obs)
        chain_buf[steps] = sample.chain.cpu()
        stochastic_buf[steps] = sample.stochastic.cpu()
        log_prob_buf[steps] = reduce_log_prob(sample.log_prob, sample.stochastic, algo.log_prob_reduction).cpu()
        valid_buf[steps] = torch.as_tensor(active)
        std_sum += row_std.cpu()[torch.as_tensor(active)].sum().item()
        std_count += int(active.sum())
        active &= ~ended
        steps += 1

    return GroupRollout(
        obs=obs_buf.head(steps),
        chains=chain_buf[:steps],
        stochastic=stochastic_buf[:steps],
        log_probs=log_prob_buf[:steps],
        valid=valid_buf[:steps],
        returns=returns,
        lengths=lengths,
        success=success if has_success else None,
        noise_std_mean=std_sum / max(std_count, 1),
        time_sim=time_sim,
        time_inference=time_inference,
    )


# ---- advantages and dynamic sampling ------------------------------------------------------------------------


def group_advantages(returns: torch.Tensor, group_size: int) -> torch.Tensor:
    """``(N,) -> (N,)``: ``A_i = (R_i - mean_g) / (std_g + 1e-6)`` with the population std of ``i``'s group.

    Envs are grouped contiguously (env ``i`` in group ``i // group_size``). A group whose returns are all
    equal gets zero advantages.
    """
    grouped = returns.view(-1, group_size)  # (num_groups, G)
    mean = grouped.mean(1, keepdim=True)
    std = grouped.std(1, correction=0, keepdim=True)
    return ((grouped - mean) / (std + ADV_EPS)).reshape(-1)


def groups_with_signal(returns: torch.Tensor, success: torch.Tensor | None, group_size: int) -> torch.Tensor:
    """``(num_groups,)`` bool: groups that carry a learning signal (dynamic sampling keeps only these).

    With a success signal, a group where all succeed or all fail has none (whatever its returns); without
    one, a group whose returns are all equal (std < 1e-6) has none, as its advantages are all zero.
    """
    if success is not None:
        grouped = success.view(-1, group_size)  # (num_groups, G)
        return grouped.any(1) & ~grouped.all(1)
    return returns.view(-1, group_size).std(1, correction=0) >= EQUAL_RETURNS_STD


# ---- loss -----------------------------------------------------------------------------------------------------


def step_weights(used: torch.Tensor, aggregation: str, mean_episode_length: float) -> torch.Tensor:
    """``(B,)`` the loss weight of each kept chunk step of ``used`` ``(T, N)`` (column ``n``: episode ``n``; ``B``
    its true entries, in the order of ``x[used]``).

    ``step``: ones. ``episode``: ``mean_episode_length / L_n`` for a step of episode ``n`` (``L_n`` its kept
    steps), so each episode's weights sum to the same and, with ``mean_episode_length`` the mean over the whole
    batch (every rank's), the weights still average 1.
    """
    if aggregation == "step":
        return torch.ones(int(used.sum()))
    lengths = used.sum(0).clamp_min(1).double()  # (N,); dropped episodes have no kept step
    return (mean_episode_length / lengths)[None].expand_as(used)[used].float()


def clipped_surrogate(ratio: torch.Tensor, advantages: torch.Tensor, clip_low: float, clip_high: float) -> torch.Tensor:
    """Per-sample pessimistic clipped objective (to minimise), ``(M,) -> (M,)``:
    ``max(-A * r, -A * clip(r, 1 - clip_low, 1 + clip_high))``.

    The gradient vanishes where the clip binds on the side the advantage pushes toward: ``r > 1 + clip_high``
    with ``A > 0``, ``r < 1 - clip_low`` with ``A < 0``. A larger ``clip_high`` lets unlikely good samples
    gain more probability (DAPO's clip-higher, against entropy collapse).
    """
    return torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip_low, 1 + clip_high))


@dataclass
class GRPOLosses:
    """The loss term and detached diagnostics of one minibatch."""

    policy: torch.Tensor
    approx_kl: float
    clip_fraction: float
    ratio_mean: float


def grpo_losses(
    policy: nn.Module,
    obs: torch.Tensor | VLAObservation,
    chains: torch.Tensor,
    stochastic: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    weights: torch.Tensor,
    algo: GRPOConfig,
) -> GRPOLosses:
    """Asymmetrically clipped policy-gradient loss on one minibatch: the mean over its chunk steps of each
    step's surrogate times its weight (:func:`step_weights`).

    Args:
        obs: ``(M, obs_dim)`` (a ``VLAObservation`` of M rows for the VLA); chains: ``(M, K+1, H, A)``;
        stochastic: ``(M, K)`` bool;
        old_log_probs, advantages, weights: ``(M,)``.
    """
    if old_log_probs.requires_grad:
        raise RuntimeError("old_log_probs require grad: they must be stored detached at rollout time.")
    log_prob_elements, _ = policy.log_prob_and_entropy(obs, chains, stochastic)  # (M, K, H, A)
    log_ratio = reduce_log_prob(log_prob_elements, stochastic, algo.log_prob_reduction) - old_log_probs
    ratio = log_ratio.exp()
    loss = (weights * clipped_surrogate(ratio, advantages, algo.clip_low, algo.clip_high)).mean()
    with torch.no_grad():
        # Schulman's low-variance estimator of KL(old || new).
        approx_kl = ((ratio - 1) - log_ratio).mean().item()
        clipped = (ratio < 1 - algo.clip_low) | (ratio > 1 + algo.clip_high)
        clip_fraction = clipped.float().mean().item()
    return GRPOLosses(policy=loss, approx_kl=approx_kl, clip_fraction=clip_fraction, ratio_mean=ratio.mean().item())


# ---- training loop --------------------------------------------------------------------------------------------


def train_grpo(
    cfg: Config,
    run_dir: Path,
    policy: nn.Module | None,
    resume: bool = False,
    distributed: Distributed | None = None,
) -> dict[str, Any]:
    """Fine-tune ``policy`` with GRPO; writes metrics, checkpoints, ``best/`` and ``final/`` to ``run_dir``.

    With ``resume=True`` the policy (pass None) and all training state come from the run's latest
    checkpoint. Under ``torchrun`` (``distributed``), each rank collects whole groups (its rollout workers'),
    computes their advantages, and takes its share of every minibatch; gradients are averaged across ranks and
    rank 0 alone logs, evaluates and checkpoints. Returns the last evaluation result (``{}`` on other ranks).
    """
    algo, device = cfg.algo, torch.device(cfg.device)
    distributed = distributed or Distributed()
    main = distributed.is_main
    if not isinstance(algo, GRPOConfig):
        raise TypeError(f"train_grpo needs algo=grpo, got algo.name={getattr(algo, 'name', algo)!r}.")
    num_envs, group_size = cfg.env.num_envs, algo.group_size
    if num_envs % group_size:
        raise ValueError(f"env.num_envs={num_envs} must be a multiple of algo.group_size={group_size}.")
    num_groups = num_envs // group_size
    start_iteration, env_steps, best_return = 0, 0, -math.inf
    optim_state: dict[str, Any] | None = None
    if resume:
        loaded = load_training_checkpoint(latest_checkpoint(run_dir))
        policy, optim_state, state = loaded["policy"], loaded["optim"], loaded["state"]
        start_iteration, env_steps, best_return = state["iteration"], state["env_steps"], state["best_return"]
        logger.info("Resumed %s at iteration %d (%d env steps).", run_dir, start_iteration, env_steps)
    if cfg.env.act_steps > policy.horizon:
        raise ValueError(f"env.act_steps={cfg.env.act_steps} exceeds the policy's horizon {policy.horizon}.")
    adapter = ObservationAdapter.for_policy(policy)
    policy.to(device).train()
    from robo_rlft.scale import make_rollout_workers  # (robo_rlft.scale runs this module's rollout)

    workers = make_rollout_workers(cfg, policy, None, distributed)
    # The module the optimiser trains: the policy, or its FSDP-sharded copy (scale.fsdp; robo_rlft.distributed).
    learner = distributed.learner_policy(policy, cfg.scale.fsdp)
    optimizer = torch.optim.Adam(learner.parameters(), lr=algo.actor_lr)  # no critic: the group is the baseline
    if optim_state is not None:
        distributed.load_optimizer_state(learner, optimizer, optim_state["actor_optimizer"])
    last_eval: dict[str, Any] = {}
    tracker = BestPolicyTracker.for_finetune(cfg, run_dir, device, best_return, cameras=adapter.uses_images)
    metrics = None
    if main:  # rank 0 writes the run's files
        metrics = MetricLogger(run_dir, resume=resume, resume_iteration=start_iteration if resume else None)
        if start_iteration == 0:
            last_eval = tracker.log_start(policy, metrics)

    if optim_state is not None:
        torch.set_rng_state(optim_state["torch_rng"])  # last: nothing may draw random numbers after it
    bar = progress_bar(algo.iterations, "finetune (grpo)", enabled=cfg.progress and main, completed=start_iteration)
    try:
        for iteration in range(start_iteration, algo.iterations):
            # ---- rollout: G episodes from each group's seeded initial state ----
            tic = time.perf_counter()
            rollout = workers.collect_grpo(policy, iteration)
            time_rollout = time.perf_counter() - tic
            # Only the steps of the rollouts' episodes count; auto-reset steps of finished envs are discarded.
            env_steps += sum(distributed.gather([int(rollout.lengths.sum())]))

            # ---- group-relative advantages; dynamic sampling drops groups without signal ----
            returns = torch.as_tensor(rollout.returns)  # (n,) float64: this rank's episodes (n = N on one process)
            success = None if rollout.success is None else torch.as_tensor(rollout.success)
            advantages = group_advantages(returns, group_size).float()  # (n,)
            if algo.dynamic_sampling:
                keep_group = groups_with_signal(returns, success, group_size)  # (n / G,)
            else:
                keep_group = torch.ones(len(returns) // group_size, dtype=torch.bool)
            groups_dropped = sum(distributed.gather([int((~keep_group).sum())]))
            used = rollout.valid & keep_group.repeat_interleave(group_size)[None]  # (T, N)
            kept = distributed.gather([(int(used.sum()), int(used.any(0).sum()))])  # (steps, episodes) per rank
            mean_length = sum(steps for steps, _ in kept) / max(sum(episodes for _, episodes in kept), 1)

            # ---- update: epochs x minibatches over the kept chunk steps (B, ...) ----
            tic = time.perf_counter()
            learner.train()
            b_obs = rollout.obs[used].to(device)  # (B, obs_dim), or a VLAObservation of B rows
            b_chains = rollout.chains[used].to(device)  # (B, K+1, H, A)
            b_stochastic = rollout.stochastic[used].to(device)  # (B, K)
            b_log_probs = rollout.log_probs[used].to(device)  # (B,)
            b_advantages = advantages[None].expand_as(used)[used].to(device)  # (B,): step of episode i gets A_i
            b_weights = step_weights(used, algo.loss_aggregation, mean_length).to(device)  # (B,)
            batch_size = b_chains.shape[0]
            # Every rank cuts its batch into the same number of minibatches (distributed.MinibatchPlan).
            plan = distributed.minibatch_plan(batch_size, algo.minibatch_size)
            total_samples = sum(plan.global_sizes)
            # FSDP's backward is a collective: a rank without a single sample cannot take part (rare: all of its
            # groups dropped), so then every rank skips the update.
            rank_idle = learner is not policy and distributed.any(batch_size == 0)
            if total_samples == 0:
                logger.info("Iteration %d: all %d groups had no signal; skipping the update.", iteration, num_groups)
            elif rank_idle:
                logger.warning("Iteration %d: a rank has no samples; skipping the sharded update.", iteration)
            ratio_first = math.nan
            kls, clip_fracs, policy_losses = [], [], []
            skipped = epochs_run = 0
            for _epoch in range(0 if total_samples == 0 or rank_idle else algo.update_epochs):
                epochs_run += 1
                epoch_start = len(kls)
                perm = torch.randperm(batch_size, device=device)
                for index in range(plan.count):
                    mb = perm[index * plan.size : (index + 1) * plan.size]
                    weight = plan.weight(index, len(mb))
                    if len(mb) == 0 and batch_size:  # a short rank: a zero-weight item keeps its backward in step
                        mb = perm[:1]
                    losses = None
                    if len(mb):
                        losses = grpo_losses(
                            learner,
                            b_obs[mb],
                            b_chains[mb],
                            b_stochastic[mb],
                            b_log_probs[mb],
                            b_advantages[mb],
                            b_weights[mb],
                            algo,
                        )
                    if distributed.any(losses is not None and not torch.isfinite(losses.policy)):
                        skipped += 1
                        logger.warning("Non-finite loss at iteration %d; skipping this minibatch update.", iteration)
                        continue
                    optimizer.zero_grad()
                    if losses is not None:
                        (losses.policy * weight).backward()
                    distributed.average_gradients(learner.parameters())
                    nn.utils.clip_grad_norm_(learner.parameters(), algo.max_grad_norm)
                    optimizer.step()
                    if losses is None or weight == 0:
                        continue
                    if math.isnan(ratio_first):
                        ratio_first = losses.ratio_mean
                    kls.append(losses.approx_kl)
                    clip_fracs.append(losses.clip_fraction)
                    policy_losses.append(losses.policy.item())
                # KL early stop: skip the remaining epochs once this epoch moved the policy too far (all ranks).
                epoch_kls = distributed.gather(kls[epoch_start:])
                if algo.target_kl is not None and epoch_kls and np.mean(epoch_kls) > algo.target_kl:
                    break
            distributed.sync_policy(learner, policy)
            distributed.check_identical(policy)
            time_update = time.perf_counter() - tic
            returns_all = distributed.gather(rollout.returns.tolist())
            lengths_all = distributed.gather(rollout.lengths.tolist())
            success_all = None if rollout.success is None else distributed.gather(rollout.success.tolist())

            row: dict[str, float] = {
                "iteration": iteration + 1,
                "env_steps": env_steps,
                "rollout/return_mean": float(np.mean(returns_all)),
                "rollout/ep_len_mean": float(np.mean(lengths_all)),
                "rollout/episodes": num_envs,
                "rollout/groups": num_groups,
                "rollout/groups_dropped": groups_dropped,
                "rollout/noise_std_mean": rollout.noise_std_mean,
                "train/samples": total_samples,
                "train/approx_kl": float(np.mean(kls)) if kls else math.nan,
                "train/clip_fraction": float(np.mean(clip_fracs)) if clip_fracs else math.nan,
                "train/ratio_first_minibatch": ratio_first,
                "train/policy_loss": float(np.mean(policy_losses)) if policy_losses else math.nan,
                "train/skipped_updates": skipped,
                "train/epochs": epochs_run,
                "time/sim": rollout.time_sim,
                "time/inference": rollout.time_inference,
                "time/rollout": time_rollout,
                "time/update": time_update,
            }
            if success_all is not None:
                row["rollout/success_rate"] = float(np.mean(success_all))

            done = iteration + 1 == algo.iterations
            checkpoint_now = done or (iteration + 1) % algo.checkpoint_every == 0
            # Every rank takes part in gathering sharded optimiser state; rank 0 writes it.
            optimizer_state = distributed.optimizer_state(learner, optimizer) if checkpoint_now else None
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
                    None,  # critic-free
                    {"actor_optimizer": optimizer_state},
                    {"env_steps": env_steps, "best_return": tracker.best_return},
                    tracker.metadata,
                )
            bar.advance(
                f"it {iteration + 1} | steps {env_steps} | return {row['rollout/return_mean']:.0f}"
                + f" | groups {num_groups - groups_dropped}/{num_groups}"
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
