"""Behaviour-cloning pretraining: the policy's own supervised loss on demonstration chunks, with EMA."""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

import numpy as np
import torch

from policies.normalizer import Normalizer
from policies.smolvla import SmolVLANormalizer
from policies.vla_backbone import VLAObservation
from robo_rlft.config import Config
from robo_rlft.data import OBS_STD_FLOOR, DemoDataset
from robo_rlft.metrics import MetricLogger
from robo_rlft.observations import ObservationAdapter
from robo_rlft.progress import progress_bar

logger = logging.getLogger(__name__)

LOG_EVERY = 200


def pretrain_bc(cfg: Config, run_dir: Path, policy: torch.nn.Module, dataset: DemoDataset) -> torch.nn.Module:
    """Fit ``policy`` to ``dataset``; returns the EMA copy (the one to evaluate and save).

    The normaliser is set from the dataset statistics first (:func:`set_normalizer_from_dataset`), so the
    checkpoint carries them. Only the parameters that require grad train (an imported SmolVLA keeps its VLM and
    state projection frozen). The policy's inputs come from
    :meth:`robo_rlft.observations.ObservationAdapter.dataset_inputs`: the flat observations, or for a VLA its
    cameras' images, the instructions and the ``state`` dims (kept on the CPU; the policy moves each minibatch to
    its device).
    """
    pre, device = cfg.pretrain, torch.device(cfg.device)
    adapter = ObservationAdapter.for_policy(policy)
    obs, stats = adapter.dataset_inputs(dataset)  # M rows: (M, obs_dim) or VLA
    set_normalizer_from_dataset(policy, obs, stats, dataset.actions)
    adapter.prepare_pretraining(policy, obs)  # e.g. the VLA's auxiliary object head, before the optimiser
    if isinstance(obs, torch.Tensor):
        obs = obs.to(device)
    _, chunks_np = dataset.action_chunks(policy.horizon)  # (M, H, A)
    chunks = torch.as_tensor(chunks_np, dtype=torch.float32, device=device)
    logger.info("Pretraining on %d chunks from %d episodes.", len(chunks), dataset.num_episodes)
    policy.to(device).train()
    ema = copy.deepcopy(policy).eval().requires_grad_(False)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=pre.lr, weight_decay=pre.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=pre.gradient_steps, eta_min=pre.lr * 0.1)
    generator = torch.Generator(device="cpu").manual_seed(cfg.seed)
    metrics = MetricLogger(run_dir)
    bar = progress_bar(pre.gradient_steps // LOG_EVERY, "pretrain", enabled=cfg.progress)
    running, running_terms, tic = [], {}, time.perf_counter()
    try:
        for step in range(1, pre.gradient_steps + 1):
            idx = torch.randint(len(chunks), (min(pre.batch_size, len(chunks)),), generator=generator).to(device)
            losses = policy.pretrain_loss(obs[idx], chunks[idx])
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                logger.warning("Non-finite BC loss at step %d; skipping the update.", step)
                continue
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                for p_ema, p in zip(ema.parameters(), policy.parameters(), strict=True):
                    p_ema.lerp_(p, 1.0 - pre.ema_decay)
                for b_ema, b in zip(ema.buffers(), policy.buffers(), strict=True):
                    b_ema.copy_(b)
            running.append(loss.item())
            for name, term in losses.items():
                running_terms.setdefault(name, []).append(term.item())
            if step % LOG_EVERY == 0:
                metrics.log(
                    step,
                    {
                        "iteration": step,
                        "train/bc_loss": float(np.mean(running)),
                        **{f"train/loss_{name}": float(np.mean(values)) for name, values in running_terms.items()},
                        "train/lr": scheduler.get_last_lr()[0],
                        "time/update": time.perf_counter() - tic,
                    },
                )
                bar.advance(f"step {step} | loss {np.mean(running):.4f}")
                running, running_terms, tic = [], {}, time.perf_counter()
    finally:
        bar.close()
        metrics.close()
    if not all(torch.isfinite(p).all() for p in ema.parameters()):
        raise FloatingPointError("EMA weights are not finite; pretraining diverged.")
    adapter.finish_pretraining(policy)
    adapter.finish_pretraining(ema)
    return ema


def set_normalizer_from_dataset(
    policy: torch.nn.Module, inputs: torch.Tensor | VLAObservation, stats: dict[str, np.ndarray], actions: np.ndarray
) -> None:
    """Set ``policy.normalizer`` from the demonstrations it is fitted to.

    Our policies' :class:`~policies.normalizer.Normalizer` takes ``stats`` (of
    :meth:`~robo_rlft.observations.ObservationAdapter.dataset_inputs`). A policy imported from LeRobot (its
    :class:`~policies.smolvla.SmolVLANormalizer`) keeps its checkpoint's modes (``policy.config.state_norm`` /
    ``action_norm``) and takes the dataset's statistics in them, replacing the checkpoint's: LeRobot does the same
    when it trains a pretrained policy on a new dataset (the dataset's stats override its normaliser processors').

    Args:
        inputs: the policy inputs of every dataset step (a ``VLAObservation`` for a LeRobot policy: its ``state``).
        stats: the dataset statistics of :meth:`~robo_rlft.observations.ObservationAdapter.dataset_inputs`.
        actions: ``(N, A)`` the dataset's actions, env units.
    """
    norm = policy.normalizer
    if isinstance(norm, SmolVLANormalizer):
        norm.fit(inputs.state.numpy(), actions, (policy.config.state_norm, policy.config.action_norm), OBS_STD_FLOOR)
    else:
        norm.load_state_dict(Normalizer.from_stats(stats).state_dict())
