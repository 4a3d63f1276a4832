"""Rollout workers: the training envs split into ``scale.num_workers`` slices, each run by a worker — in this
process (``scale.backend=local``) or in Ray actors (``scale.backend=ray``), on this machine or a cluster.

Both backends run the same :class:`RolloutWorker` code, so a run's data does not depend on where its workers
run: worker ``w`` owns envs ``[w·E, (w+1)·E)`` of the ``N = num_workers·E`` training envs, resets them with the
seeds the single-process run gives those envs, and draws its sampling noise from a generator seeded by
``(seed, iteration, w)`` (:func:`rollout_rng`). The learner concatenates the slices in worker order, so the batch
has exactly the configured shape and order.

Ray actors hold copies of the policy (and PPO's critic) on the CPU; the learner broadcasts their weights through
the object store before every rollout. An actor that dies mid-rollout is restarted and its rollout re-run from
the same seeds (``scale.max_restarts``): no sample is lost or duplicated.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from robo_rlft.algos.grpo import GroupRollout, collect_group_rollouts, group_seeds
from robo_rlft.algos.ppo import ChunkRollout, collect_chunk_rollout, rollout_reset_seed
from robo_rlft.config import Config, ScaleConfig
from robo_rlft.distributed import Distributed
from robo_rlft.observations import ObservationAdapter

logger = logging.getLogger(__name__)

RAY_INSTALL_HINT = 'scale.backend=ray needs Ray: pip install "robo_rlft[ray]".'


@contextlib.contextmanager
def rollout_rng(seed: int, iteration: int, worker: int) -> Iterator[None]:
    """Run the block with torch's global RNG seeded by ``(seed, iteration, worker)``, then restore it.

    A worker's sampling noise is then the same in this process or in a Ray actor, and rollouts leave the learner's
    RNG stream (minibatch permutations) untouched — which also keeps resumed runs exact.
    """
    state = int(np.random.SeedSequence([seed, iteration, worker]).generate_state(1)[0])
    with torch.random.fork_rng():
        torch.manual_seed(state)
        yield


class RolloutWorker:
    """One slice of the training envs and the policy (and critic) that acts in them.

    Args:
        cfg: the run's config (env, algorithm, seed).
        policy: the policy; in-process workers share the learner's, Ray actors get a CPU copy.
        critic: PPO's critic (``None`` for GRPO).
        index: this worker's index ``w``.
        num_envs: ``E``, envs in this worker's slice.
    """

    def __init__(self, cfg: Config, policy: nn.Module, critic: nn.Module | None, index: int, num_envs: int) -> None:
        if cfg.torch_threads > 0:
            torch.set_num_threads(cfg.torch_threads)  # a Ray actor is a fresh process
        self.cfg, self.policy, self.critic, self.index, self.num_envs = cfg, policy, critic, index, num_envs
        self.first_env = index * num_envs
        self.device = next(policy.parameters()).device
        critic_input = getattr(cfg.policy, "critic_input", "prefix")
        self.adapter = ObservationAdapter.for_policy(policy, critic_input=critic_input)
        self.envs = self.adapter.training_envs(dataclasses.replace(cfg.env, num_envs=num_envs), policy.horizon)

    def pid(self) -> int:
        """The process this worker runs in."""
        return os.getpid()

    def load_weights(self, weights: dict[str, dict[str, torch.Tensor]]) -> None:
        """The learner's current ``{"policy": state_dict, "critic": state_dict}``."""
        self.policy.load_state_dict(weights["policy"])
        if self.critic is not None and "critic" in weights:
            self.critic.load_state_dict(weights["critic"])

    def collect_ppo(self, iteration: int, weights: dict | None = None) -> ChunkRollout:
        """``algo.steps_per_iteration`` chunk steps in each of this slice's envs."""
        if weights is not None:
            self.load_weights(weights)
        assert self.critic is not None, "collect_ppo: PPO workers are built with the critic"
        cfg = self.cfg
        reset_seed = rollout_reset_seed(cfg.seed, iteration, cfg.env.num_envs) + self.first_env
        self.policy.eval()
        with rollout_rng(cfg.seed, iteration, self.index):
            return collect_chunk_rollout(
                self.policy,
                self.critic,
                self.adapter,
                self.envs,
                cfg.algo.steps_per_iteration,
                reset_seed,
                cfg.algo.log_prob_reduction,
                self.device,
            )

    def collect_grpo(self, iteration: int, weights: dict | None = None) -> GroupRollout:
        """One episode per env of this slice's groups (a slice holds whole groups)."""
        if weights is not None:
            self.load_weights(weights)
        cfg, group_size = self.cfg, self.cfg.algo.group_size
        seeds = group_seeds(cfg.seed, iteration, cfg.env.num_envs // group_size)
        first_group = self.first_env // group_size
        self.policy.eval()
        with rollout_rng(cfg.seed, iteration, self.index):
            return collect_group_rollouts(
                self.policy,
                self.envs,
                cfg.algo,
                seeds[first_group : first_group + self.num_envs // group_size],
                self.device,
            )

    def close(self) -> None:
        self.envs.close()


class RolloutWorkers(Protocol):
    """What the training loops call."""

    def collect_ppo(self, policy: nn.Module, critic: nn.Module, iteration: int) -> ChunkRollout: ...

    def collect_grpo(self, policy: nn.Module, iteration: int) -> GroupRollout: ...

    def close(self) -> None: ...


class LocalRolloutWorkers:
    """Workers in this process, one after the other, sharing the learner's policy and critic: all of them, or
    (``indices``) a data-parallel rank's share."""

    def __init__(self, cfg: Config, policy: nn.Module, critic: nn.Module | None, indices: range | None = None) -> None:
        envs_per_worker = cfg.env.num_envs // cfg.scale.num_workers
        indices = range(cfg.scale.num_workers) if indices is None else indices
        self.workers = [RolloutWorker(cfg, policy, critic, w, envs_per_worker) for w in indices]

    def collect_ppo(self, policy: nn.Module, critic: nn.Module, iteration: int) -> ChunkRollout:
        return ChunkRollout.concat([worker.collect_ppo(iteration) for worker in self.workers])

    def collect_grpo(self, policy: nn.Module, iteration: int) -> GroupRollout:
        return GroupRollout.concat([worker.collect_grpo(iteration) for worker in self.workers])

    def close(self) -> None:
        for worker in self.workers:
            worker.close()


def _cpu_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().cpu() for name, tensor in module.state_dict().items()}


def connect_ray(scale: ScaleConfig) -> bool:
    """Join ``scale.address`` unless this process is already connected (e.g. it is the learner's Ray actor); True
    when this call started the connection (its caller shuts it down). A local instance gets room for every worker
    and the learner's actor, whatever this machine's core count."""
    import ray

    if ray.is_initialized():
        return False
    options: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
    if scale.address is None:
        cpus = scale.num_workers * scale.cpus_per_worker + (scale.learner_cpus if scale.learner == "actor" else 0)
        options["num_cpus"] = max(os.cpu_count() or 1, int(np.ceil(cpus)))
    ray.init(address=scale.address, **options)
    return True


def run_in_learner_actor(scale: ScaleConfig, function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)`` in a Ray actor with ``scale.learner_cpus`` CPUs and ``scale.learner_gpus`` GPUs
    (``scale.learner=actor``): on a cluster the learner runs on a node with a GPU while this process (the driver,
    e.g. a laptop connected through ``ray://``) only waits, and the rollout workers it starts join the same
    cluster. The actor is killed if the driver is interrupted."""
    import ray

    try:
        owns_ray = connect_ray(scale)
    except ImportError as exc:
        raise ImportError(RAY_INSTALL_HINT) from exc
    actor = ray.remote(LearnerActor).options(num_cpus=scale.learner_cpus, num_gpus=scale.learner_gpus).remote()
    try:
        return ray.get(actor.run.remote(function, *args))
    finally:
        ray.kill(actor)
        if owns_ray:
            ray.shutdown()


class LearnerActor:
    """The Ray actor :func:`run_in_learner_actor` runs the learner in."""

    def run(self, function: Callable[..., Any], *args: Any) -> Any:
        return function(*args)


class RayRolloutWorkers:
    """``scale.num_workers`` Ray actors, each a :class:`RolloutWorker` with CPU copies of the policy and critic.

    Connects to ``scale.address`` (``None``: starts a local Ray instance, shut down by :meth:`close`; ``"auto"``: the
    cluster this machine belongs to; ``"ray://host:10001"``: a remote cluster through Ray Client).
    """

    def __init__(self, cfg: Config, policy: nn.Module, critic: nn.Module | None) -> None:
        try:
            import ray
        except ImportError as exc:
            raise ImportError(RAY_INSTALL_HINT) from exc
        self.ray = ray
        scale = cfg.scale
        self._owns_ray = connect_ray(scale)
        actor = ray.remote(RolloutWorker).options(
            num_cpus=scale.cpus_per_worker,
            max_restarts=scale.max_restarts,
            max_task_retries=scale.max_restarts,
        )
        # The constructor's arguments stay in the object store as long as this object holds them: Ray re-runs the
        # constructor with them when it restarts a dead actor.
        self._init_args = [
            ray.put(cfg),
            ray.put(copy.deepcopy(policy).cpu()),
            ray.put(None if critic is None else copy.deepcopy(critic).cpu()),
        ]
        envs_per_worker = cfg.env.num_envs // scale.num_workers
        self.actors = [actor.remote(*self._init_args, w, envs_per_worker) for w in range(scale.num_workers)]
        logger.info(
            "Ray: %d rollout workers x %d envs (%s).", scale.num_workers, envs_per_worker, scale.address or "local"
        )

    def _broadcast(self, policy: nn.Module, critic: nn.Module | None) -> Any:
        """The weights in the object store, once for all actors."""
        weights = {"policy": _cpu_state_dict(policy)}
        if critic is not None:
            weights["critic"] = _cpu_state_dict(critic)
        return self.ray.put(weights)

    def collect_ppo(self, policy: nn.Module, critic: nn.Module, iteration: int) -> ChunkRollout:
        weights = self._broadcast(policy, critic)
        parts = self.ray.get([a.collect_ppo.remote(iteration, weights) for a in self.actors])
        return ChunkRollout.concat(parts)

    def collect_grpo(self, policy: nn.Module, iteration: int) -> GroupRollout:
        weights = self._broadcast(policy, None)
        parts = self.ray.get([a.collect_grpo.remote(iteration, weights) for a in self.actors])
        return GroupRollout.concat(parts)

    def pids(self) -> list[int]:
        """Each actor's process id (tests kill one to check recovery)."""
        return self.ray.get([a.pid.remote() for a in self.actors])

    def close(self) -> None:
        for actor in self.actors:
            with contextlib.suppress(Exception):  # an actor that is gone needs no closing
                self.ray.get(actor.close.remote(), timeout=30)
            self.ray.kill(actor)
        if self._owns_ray:
            self.ray.shutdown()


def make_rollout_workers(
    cfg: Config, policy: nn.Module, critic: nn.Module | None = None, distributed: Distributed | None = None
) -> RolloutWorkers:
    """The run's rollout workers (``cfg.scale``); under ``torchrun``, this rank's share of them (in process)."""
    distributed = distributed or Distributed()
    if distributed.enabled:
        workers, ranks = cfg.scale.num_workers, distributed.world_size
        if cfg.scale.backend != "local" or workers % ranks:
            raise ValueError(
                f"Under torchrun ({ranks} ranks) each rank runs its share of the rollout workers in its process: "
                f"use scale.backend=local and scale.num_workers a multiple of {ranks} (got "
                f"scale.backend={cfg.scale.backend}, scale.num_workers={workers})."
            )
        share = workers // ranks
        return LocalRolloutWorkers(cfg, policy, critic, range(distributed.rank * share, (distributed.rank + 1) * share))
    if cfg.scale.backend == "ray":
        return RayRolloutWorkers(cfg, policy, critic)
    return LocalRolloutWorkers(cfg, policy, critic)
