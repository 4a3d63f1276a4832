"""The data-parallel learner under ``torchrun``: each rank collects its slice of the rollout and its share of every
minibatch, and the gradients are averaged across ranks (``torch.distributed``: gloo on CPU, NCCL on GPU) before
each optimiser step, so every rank applies the same update and the parameters stay identical.

``torchrun --nproc_per_node=2 -m robo_rlft.cli finetune scale.num_workers=2 ...``: rank ``r`` runs rollout workers
``[r·k, (r+1)·k)`` of the ``scale.num_workers = W·k`` (the same seeds and noise streams the single-process run
gives those workers). Only rank 0 writes the run directory, logs, evaluates and checkpoints; checkpoints do not
depend on the number of ranks, so a run resumes with a different one.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

logger = logging.getLogger(__name__)


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

    def average_gradients(self, parameters: Iterable[nn.Parameter]) -> None:
        """Replace each gradient by its mean over the ranks (a parameter without one counts as zero)."""
        if not self.enabled:
            return
        for parameter in parameters:
            if not parameter.requires_grad:
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

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()
