"""The data-parallel learner under ``torchrun``: each rank collects its slice of the rollout and its share of every
minibatch, and the gradients are averaged across ranks (``torch.distributed``: gloo on CPU, NCCL on GPU) before
each optimiser step, so every rank applies the same update and the parameters stay identical.

``torchrun --nproc_per_node=2 -m robo_rlft.cli finetune scale.num_workers=2 ...``: rank ``r`` runs rollout workers
``[r·k, (r+1)·k)`` of the ``scale.num_workers = W·k`` (the same seeds and noise streams the single-process run
gives those workers). Only rank 0 writes the run directory, logs, evaluates and checkpoints; checkpoints do not
depend on the number of ranks, so a run resumes with a different one.

With ``scale.fsdp=true`` the optimiser trains a copy of the policy sharded across the ranks by FSDP (parameters,
gradients and Adam state: each rank holds ``1/W`` of them, and the whole parameters are gathered only while a loss
is computed), for VLA-sized models whose optimiser state does not fit one device. Rollouts, evaluation and
checkpoints keep using the unsharded policy, refreshed from the shards after every update: FSDP's gathers are
collectives that every rank must enter together, which the rollouts cannot promise (GRPO's episodes end at
different steps on different ranks).
"""

from __future__ import annotations

import copy
import logging
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

logger = logging.getLogger(__name__)

# The policy methods the learner's losses call (PPO's and GRPO's ratio, PPO's BC term).
FSDP_LOSS_METHODS = ("log_prob_and_entropy", "sample")


@dataclass(frozen=True)
class MinibatchPlan:
    """How the ranks cut local batches of unequal sizes (GRPO keeps only its groups' valid steps) into the same
    number of minibatches: the gradient all-reduce after each one needs every rank. Rank ``r`` takes minibatch
    ``j`` as items ``[j·size, (j+1)·size)`` of its permuted batch, which may be short or empty.

    Attributes:
        size: items per minibatch on each rank (``minibatch_size / W``).
        count: minibatches per epoch, on every rank.
        global_sizes: items of minibatch ``j`` summed over the ranks.
    """

    size: int
    count: int
    global_sizes: tuple[int, ...]
    world_size: int = 1

    def weight(self, index: int, local: int) -> float:
        """Factor on a rank's mean loss over its ``local`` items of minibatch ``index`` such that the mean of the
        ranks' gradients is the gradient of the mean loss over the whole minibatch (1 on a single process)."""
        return local * self.world_size / self.global_sizes[index]


@dataclass(frozen=True)
class Distributed:
    """This process's place in the run: ``rank`` of ``world_size`` (1: not distributed)."""

    rank: int = 0
    world_size: int = 1

    @classmethod
    def from_env(cls, device: str) -> Distributed:
        """Join the process group ``torchrun`` describes (``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR``...), if any."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:
            return cls()
        if not dist.is_initialized():
            backend = "nccl" if device.startswith("cuda") else "gloo"
            dist.init_process_group(backend)
            logger.info("Rank %d of %d joined the process group (%s).", dist.get_rank(), world_size, backend)
        return cls(dist.get_rank(), dist.get_world_size())

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes files and logs."""
        return self.rank == 0

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (any picklable object)."""
        if not self.enabled:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, values: list) -> list:
        """Every rank's ``values``, concatenated in rank order, on every rank."""
        if not self.enabled:
            return values
        parts: list[list] = [[] for _ in range(self.world_size)]
        dist.all_gather_object(parts, values)
        return [value for part in parts for value in part]

    def mean(self, value: float) -> float:
        """The mean of ``value`` over the ranks."""
        if not self.enabled:
            return value
        tensor = torch.tensor([float(value)], dtype=torch.float64)
        dist.all_reduce(tensor)
        return float(tensor.item()) / self.world_size

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on some rank (decisions every rank must take together)."""
        return self.mean(1.0 if flag else 0.0) > 0.0

    def gather_envs(self, tensor: torch.Tensor) -> torch.Tensor:
        """``(T, n, ...)`` slices of the ranks → ``(T, W·n, ...)``, ranks in order (CPU tensors)."""
        if not self.enabled:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=1)

    def minibatch_plan(self, local_size: int, minibatch_size: int) -> MinibatchPlan:
        """Minibatches of ``minibatch_size`` items in all (``local_size`` here) cut as :class:`MinibatchPlan` says;
        on a single process, consecutive slices of ``minibatch_size`` (the last one short)."""
        sizes = self.gather([local_size])
        size = max(minibatch_size // self.world_size, 1)
        count = max(math.ceil(n / size) for n in sizes)
        global_sizes = tuple(sum(min(max(n - j * size, 0), size) for n in sizes) for j in range(count))
        return MinibatchPlan(size, count, global_sizes, self.world_size)

    def average_gradients(self, parameters: Iterable[nn.Parameter]) -> None:
        """Replace each gradient by its mean over the ranks (a parameter without one counts as zero). FSDP-sharded
        parameters (DTensors) are skipped: FSDP's backward already reduced their gradients across the ranks."""
        if not self.enabled:
            return
        for parameter in parameters:
            if not parameter.requires_grad or isinstance(parameter, DTensor):
                continue
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
            dist.all_reduce(parameter.grad)
            parameter.grad /= self.world_size

    def check_identical(self, *modules: nn.Module) -> None:
        """Raise if the ranks' parameters differ (a bug: they must apply identical updates)."""
        if not self.enabled:
            return
        with torch.no_grad():
            flat = torch.cat([p.detach().double().flatten().cpu() for m in modules for p in m.parameters()])
            fingerprint = torch.stack([flat.sum(), flat.abs().sum(), (flat * torch.arange(len(flat))).sum()])
        parts = [torch.empty_like(fingerprint) for _ in range(self.world_size)]
        dist.all_gather(parts, fingerprint)
        if any(not torch.equal(part, parts[0]) for part in parts):
            raise RuntimeError(f"Data-parallel ranks diverged: parameter fingerprints {[p.tolist() for p in parts]}.")

    # ---- the learner's policy: the policy itself, or an FSDP-sharded copy (scale.fsdp) ----
    def learner_policy(self, policy: nn.Module, fsdp: bool) -> nn.Module:
        """The module the actor's optimiser trains: ``policy`` itself, or (``fsdp``) a copy sharded across the ranks.

        The copy is one FSDP unit: the policies' losses call methods that are not ``forward`` (``sample``,
        ``log_prob_and_entropy``), so those are registered to gather the parameters, and nested modules are not
        sharded separately (their own methods would run on shards).
        """
        if not fsdp:
            return policy
        if not self.enabled:
            raise ValueError(
                "scale.fsdp=true shards the learner across data-parallel ranks: launch the run with "
                "torchrun --nproc_per_node=N (N >= 2), or set scale.fsdp=false."
            )
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        learner = copy.deepcopy(policy)
        fully_shard(learner)
        for method in FSDP_LOSS_METHODS:
            register_fsdp_forward_method(learner, method)
        return learner

    def sync_policy(self, learner: nn.Module, policy: nn.Module) -> None:
        """Copy the updated ``learner``'s whole parameters into ``policy`` (nothing to do when they are one module)."""
        if learner is not policy:
            policy.load_state_dict(get_model_state_dict(learner, options=StateDictOptions(full_state_dict=True)))

    @staticmethod
    def optimizer_state(learner: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """``optimizer.state_dict()`` as an unsharded learner's optimiser would write it, so that checkpoints do not
        depend on the sharding (under FSDP the state is gathered onto rank 0, the others get ``{}``: every rank must
        call)."""
        if not _is_sharded(learner):
            return optimizer.state_dict()
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        by_name = get_optimizer_state_dict(learner, optimizer, options=options)
        if not by_name:  # cpu_offload gathers the whole state onto rank 0 only
            return {}
        index = {name: i for i, (name, _) in enumerate(learner.named_parameters())}
        return _rekey_optimizer_state(by_name, index)

    @staticmethod
    def load_optimizer_state(learner: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Restore an :meth:`optimizer_state` (sharded again under FSDP: every rank must call)."""
        if not _is_sharded(learner):
            optimizer.load_state_dict(state)
            return
        names = dict(enumerate(name for name, _ in learner.named_parameters()))
        options = StateDictOptions(full_state_dict=True)
        set_optimizer_state_dict(learner, optimizer, _rekey_optimizer_state(state, names), options=options)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def _is_sharded(module: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in module.parameters())


def _rekey_optimizer_state(state: dict[str, Any], keys: dict) -> dict[str, Any]:
    """An optimiser state dict with its parameter keys mapped through ``keys`` (indices <-> parameter names).

    A single optimiser over ``module.parameters()`` numbers them in ``named_parameters()`` order."""
    return {
        "state": {keys[key]: value for key, value in state["state"].items()},
        "param_groups": [
            {**group, "params": [keys[key] for key in group["params"]]} for group in state["param_groups"]
        ],
    }
