"""The chain interface shared by every denoising policy (DESIGN.md §3).

A policy turns noise ``x_0 ~ N(0, I)`` into an action chunk ``x_K`` in K refinement steps
``x_{k+1} = m_theta(x_k, k, o) + s_k * eps_k``. A noise scheme makes steps stochastic with a known
Gaussian transition, so the log-probability of a stored chain is a sum of Gaussian terms:

    log pi(x_{0:K} | o) = sum_k log N(x_{k+1}; m_theta(x_k, k, o), s_k^2)

The ``log N(x_0; 0, I)`` term is left out: it does not depend on the parameters, so it cancels
in every importance ratio.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

LogProbReduction = Literal["sum", "mean"]
LOG_PROB_REDUCTIONS: tuple[str, ...] = ("sum", "mean")

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


@dataclass
class ChainSample:
    """What a policy returns when it samples.

    Attributes:
        actions: ``(B, H, A)`` action chunk in env units (clipped to the normalised range first).
        chain: ``(B, K+1, H, A)`` the denoising chain ``x_0 .. x_K`` in normalised action units.
        log_prob: ``(B, K, H, A)`` per-element transition log-probs (zero at deterministic steps).
        std: ``(B, K, H, A)`` transition stds (zero at deterministic steps).
        stochastic: ``(B, K)`` bool, which steps were sampled from a Gaussian; re-scoring needs it.
    """

    actions: torch.Tensor
    chain: torch.Tensor
    log_prob: torch.Tensor
    std: torch.Tensor
    stochastic: torch.Tensor


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Element-wise ``log N(x; mean, std^2)`` — the one formula for sampling and re-scoring."""
    return -0.5 * ((x - mean) / std) ** 2 - std.log() - _HALF_LOG_2PI


def gaussian_entropy(std: torch.Tensor) -> torch.Tensor:
    """Element-wise entropy ``0.5 * log(2 pi e std^2)`` of a Gaussian transition."""
    return 0.5 + _HALF_LOG_2PI + std.log()


def score_chain(
    policy: torch.nn.Module, obs: torch.Tensor, chain: torch.Tensor, stochastic: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-score a stored chain: the one implementation behind every policy's ``log_prob_and_entropy``.

    Gathers the stochastic ``(b, k)`` pairs, runs ``policy.transition`` once on all of them (one
    batched forward, not a loop over K), and scatters the element-wise log-probs and entropies back.

    Args:
        policy: has ``transition(x (P, H, A), k (P,), obs_norm (P, obs_dim)) -> (mean, std)``,
            ``normalizer``, ``num_steps``, ``horizon``, ``action_dim``.
        obs: ``(B, obs_dim)`` env units.
        chain: ``(B, K+1, H, A)`` as sampled.
        stochastic: ``(B, K)`` bool mask returned with the chain.

    Returns:
        ``(log_prob, entropy)``, each ``(B, K, H, A)``, zero at deterministic steps.
    """
    batch, k_plus_1 = chain.shape[:2]
    if k_plus_1 != policy.num_steps + 1:
        raise ValueError(f"chain has {k_plus_1 - 1} steps, policy has K={policy.num_steps}.")
    if stochastic.shape != (batch, policy.num_steps) or stochastic.dtype != torch.bool:
        raise ValueError(
            f"stochastic must be a bool tensor of shape {(batch, policy.num_steps)}, "
            f"got {stochastic.dtype} {tuple(stochastic.shape)}."
        )
    rows, steps = stochastic.nonzero(as_tuple=True)  # (P,) each
    log_prob = chain.new_zeros(batch, policy.num_steps, policy.horizon, policy.action_dim)
    entropy = torch.zeros_like(log_prob)
    if rows.numel() == 0:
        return log_prob, entropy
    obs_norm = policy.normalizer.normalize_obs(obs)[rows]  # (P, obs_dim)
    mean, std = policy.transition(chain[rows, steps], steps, obs_norm)  # (P, H, A) each
    log_prob = log_prob.index_put((rows, steps), gaussian_log_prob(chain[rows, steps + 1], mean, std))
    return log_prob, entropy.index_put((rows, steps), gaussian_entropy(std))


def step_log_prob(log_prob: torch.Tensor, reduction: LogProbReduction) -> torch.Tensor:
    """``(B, K, H, A) -> (B, K)``: each transition's log-prob, summed or averaged over its H*A elements."""
    if reduction == "sum":
        return log_prob.sum((2, 3))
    if reduction == "mean":
        return log_prob.mean((2, 3))
    raise ValueError(f"log-prob reduction must be one of {LOG_PROB_REDUCTIONS}, got {reduction!r}.")


def chain_log_prob(step_log_probs: torch.Tensor, stochastic: torch.Tensor, reduction: LogProbReduction) -> torch.Tensor:
    """``(B, K) -> (B,)``: the chain's log-prob from :func:`step_log_prob` values, summed over the
    stochastic steps or averaged over them (``stochastic`` is the chain's ``(B, K)`` mask)."""
    total = (step_log_probs * stochastic).sum(-1)
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / stochastic.sum(-1).clamp_min(1)
    raise ValueError(f"log-prob reduction must be one of {LOG_PROB_REDUCTIONS}, got {reduction!r}.")


def reduce_log_prob(log_prob: torch.Tensor, stochastic: torch.Tensor, reduction: LogProbReduction) -> torch.Tensor:
    """``(B, K, H, A) -> (B,)``: sum or mean over the stochastic steps, chunk steps and action dims.

    ``sum`` is the exact chain log-likelihood; its ratio moves with every one of the S*H*A elements
    (S stochastic steps), so it pairs with a small PPO clip. ``mean`` divides by S*H*A (ReinFlow's
    normalisation): the ratio is the geometric mean of per-element ratios, and the clip range no
    longer depends on K, H or A — our default pairs it with clip 0.01.
    ``stochastic`` is the ``(B, K)`` mask of the chain (deterministic steps hold zeros).
    """
    return chain_log_prob(step_log_prob(log_prob, reduction), stochastic, reduction)
