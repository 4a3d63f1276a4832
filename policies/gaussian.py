"""Gaussian MLP policy over action chunks: the classical PPO baseline, behind the chain interface.

A Gaussian policy is a one-step chain: ``x_0`` is a fixed zero start and
``x_1 ~ N(mu_theta(o), diag(exp(2 log_std)))`` is the action chunk, so PPO, GRPO, evaluation and
checkpoints treat it exactly like the generative policies and every learning curve can show the
classical baseline beside them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from policies.chain import ChainSample, gaussian_log_prob, score_chain
from policies.mlp import mlp
from policies.normalizer import Normalizer


@dataclass
class GaussianPolicyConfig:
    """Architecture of :class:`GaussianPolicy`.

    Attributes:
        horizon: H, actions per predicted chunk.
        hidden_dims: widths of the mean MLP.
        log_std_init: initial state-independent log-std (normalised action units); behaviour cloning
            fits the mean only, so fine-tuning starts from this exploration level.
    """

    horizon: int = 4
    hidden_dims: list[int] = field(default_factory=lambda: [256, 256, 256])
    log_std_init: float = -1.5

    def __post_init__(self) -> None:
        if self.horizon < 1:
            raise ValueError(f"policy.horizon must be >= 1, got {self.horizon}.")
        if not self.hidden_dims or min(self.hidden_dims) < 1:
            raise ValueError(f"policy.hidden_dims must be a non-empty list of positive ints, got {self.hidden_dims}.")
        if not -10.0 <= self.log_std_init <= 2.0:
            raise ValueError(f"policy.log_std_init must be in [-10, 2], got {self.log_std_init}.")


class GaussianPolicy(nn.Module):
    """``pi(a_{1:H} | o) = N(mu_theta(o), diag(sigma^2))`` with a learned, state-independent ``sigma``."""

    policy_type = "gaussian"
    FINETUNE_FIELDS: tuple[str, ...] = ()
    num_steps = 1  # one "denoising" step: zero start -> action chunk

    def __init__(self, obs_dim: int, action_dim: int, config: GaussianPolicyConfig) -> None:
        super().__init__()
        self.obs_dim = obs_dim
        self.action_dim = action_dim
        self.config = config
        self.horizon = config.horizon
        self.normalizer = Normalizer(obs_dim, action_dim)
        self.mean_net = mlp(obs_dim, config.hidden_dims, config.horizon * action_dim)
        self.log_std = nn.Parameter(torch.full((config.horizon, action_dim), config.log_std_init))

    def configure_finetuning(self, settings: object) -> GaussianPolicy:
        """No fine-tuning-only settings: the learned ``log_std`` is part of the model."""
        return self

    def transition(self, x: torch.Tensor, k: torch.Tensor, obs_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of the action chunk: ``obs_norm (N, obs_dim) -> ((N, H, A), (N, H, A))``."""
        mean = self.mean_net(obs_norm).view(-1, self.horizon, self.action_dim)
        return mean, self.log_std.exp().expand_as(mean)

    def sample(
        self, obs: torch.Tensor, deterministic: bool = False, generator: torch.Generator | None = None
    ) -> ChainSample:
        """Sample an action chunk (the mean when ``deterministic``). ``obs (B, obs_dim)`` in env units."""
        batch, device = obs.shape[0], obs.device
        x0 = torch.zeros(batch, self.horizon, self.action_dim, device=device)
        mean, std = self.transition(
            x0, torch.zeros(batch, dtype=torch.long, device=device), self.normalizer.normalize_obs(obs)
        )
        if deterministic:
            x1, log_prob, std = mean, torch.zeros_like(mean), torch.zeros_like(mean)
        else:
            x1 = mean + std * torch.randn(mean.shape, device=device, generator=generator)
            log_prob = gaussian_log_prob(x1, mean, std)
        return ChainSample(
            actions=self.normalizer.unnormalize_action(x1.clamp(-1.0, 1.0)),
            chain=torch.stack([x0, x1], 1),
            log_prob=log_prob[:, None],
            std=std[:, None],
            stochastic=torch.full((batch, 1), not deterministic, device=device),
        )

    def log_prob_and_entropy(
        self, obs: torch.Tensor, chain: torch.Tensor, stochastic: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log_prob, entropy)``, each ``(B, 1, H, A)``, of the chunk ``chain[:, 1]``; zero where not stochastic."""
        return score_chain(self, obs, chain, stochastic)

    def pretrain_loss(self, obs: torch.Tensor, actions: torch.Tensor) -> dict[str, torch.Tensor]:
        """Behaviour cloning of the mean: MSE in normalised action units. ``actions (B, H, A)`` env units."""
        mean = self.mean_net(self.normalizer.normalize_obs(obs)).view_as(actions)
        return {"bc_mse": (mean - self.normalizer.normalize_action(actions)).pow(2).mean()}
