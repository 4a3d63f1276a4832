"""Rectified-flow policy with K Euler steps, made trainable by policy gradients with ReinFlow noise."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from policies.chain import ChainSample, gaussian_entropy, gaussian_log_prob
from policies.mlp import SinusoidalEmbedding, mlp
from policies.noise import ReinFlowNoise, ReinFlowNoiseConfig
from policies.normalizer import Normalizer


@dataclass
class FlowPolicyConfig:
    """Architecture of :class:`FlowPolicy`.

    Attributes:
        horizon: H, actions per predicted chunk.
        denoising_steps: K, Euler steps from noise (t=0) to action (t=1).
        hidden_dims: widths of the velocity MLP.
        time_embed_dim: size of the sinusoidal embedding of t.
        noise: the ReinFlow noise head used during RL fine-tuning.
    """

    horizon: int = 4
    denoising_steps: int = 4
    hidden_dims: list[int] = field(default_factory=lambda: [256, 256, 256])
    time_embed_dim: int = 16
    noise: ReinFlowNoiseConfig = field(default_factory=ReinFlowNoiseConfig)

    def __post_init__(self) -> None:
        for name in ("horizon", "denoising_steps", "time_embed_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"policy.{name} must be >= 1, got {getattr(self, name)}.")
        if not self.hidden_dims or min(self.hidden_dims) < 1:
            raise ValueError(f"policy.hidden_dims must be a non-empty list of positive ints, got {self.hidden_dims}.")


class FlowPolicy(nn.Module):
    """Flow-matching policy ``pi(a_{1:H} | o)`` over action chunks.

    The velocity net ``v_theta(x, t, o)`` is an MLP on ``[o_norm, emb(t), x.flatten()]``. Sampling runs
    K Euler steps on the grid ``t_k = k / K``; with the ReinFlow noise each step becomes
    ``x_{k+1} ~ N(x_k + v_theta(x_k, t_k, o) / K, sigma_phi(t_k, o)^2)``.
    Observations and actions cross the API in env units; the chain lives in normalised units.
    """

    policy_type = "flow"

    def __init__(self, obs_dim: int, action_dim: int, config: FlowPolicyConfig) -> None:
        super().__init__()
        self.obs_dim = obs_dim
        self.action_dim = action_dim
        self.config = config
        self.horizon = config.horizon
        self.num_steps = config.denoising_steps
        chunk_dim = config.horizon * action_dim
        self.normalizer = Normalizer(obs_dim, action_dim)
        self.time_embed = SinusoidalEmbedding(config.time_embed_dim)
        self.velocity_net = mlp(obs_dim + config.time_embed_dim + chunk_dim, config.hidden_dims, chunk_dim)
        self.noise = ReinFlowNoise(obs_dim + config.time_embed_dim, config.horizon, action_dim, config.noise)

    def configure_noise(self, config: ReinFlowNoiseConfig) -> None:
        """Switch the exploration-noise settings (fine-tuning choices, not part of the base model).

        New std bounds keep a trained head's weights; a different head shape starts a fresh head.
        """
        if config.hidden_dims != self.config.noise.hidden_dims:
            device = self.normalizer.obs_mean.device
            self.noise = ReinFlowNoise(self.noise.net[0].in_features, self.horizon, self.action_dim, config).to(device)
        self.noise.config = config
        self.config = dataclasses.replace(self.config, noise=config)

    # ---- the one place that defines the chain's time grid, means and stds ----
    def time_grid(self) -> torch.Tensor:
        """``(K,)`` start times ``t_k = k / K`` of the Euler steps."""
        return torch.arange(self.num_steps, device=self.normalizer.obs_mean.device) / self.num_steps

    def velocity(self, x: torch.Tensor, t: torch.Tensor, obs_norm: torch.Tensor) -> torch.Tensor:
        """``v_theta``: ``x (N, H, A), t (N,), obs_norm (N, obs_dim) -> (N, H, A)``."""
        inp = torch.cat([obs_norm, self.time_embed(t), x.flatten(1)], dim=-1)
        return self.velocity_net(inp).view_as(x)

    def transition(self, x: torch.Tensor, k: torch.Tensor, obs_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of ``x_{k+1} | x_k``: ``x (N, H, A), k (N,) long -> ((N, H, A), (N, H, A))``."""
        t = self.time_grid()[k]
        mean = x + self.velocity(x, t, obs_norm) / self.num_steps
        std = self.noise(torch.cat([obs_norm, self.time_embed(t)], dim=-1))
        return mean, std

    # ---- chain interface ----
    def sample(
        self, obs: torch.Tensor, deterministic: bool = False, generator: torch.Generator | None = None
    ) -> ChainSample:
        """Sample an action chunk. ``obs (B, obs_dim)`` in env units.

        Deterministic sampling is the plain Euler ODE (the noise head is not used), which is how
        the policy is evaluated and deployed; it is deterministic given ``x_0``. ``generator`` draws
        all noise (default: the global torch RNG); evaluation passes its own so that it never
        shifts the training RNG stream.
        """
        obs_norm = self.normalizer.normalize_obs(obs)
        batch = obs.shape[0]
        x = torch.randn(batch, self.horizon, self.action_dim, device=obs.device, generator=generator)
        chain = [x]
        log_probs, stds = [], []
        for k in range(self.num_steps):
            step = torch.full((batch,), k, device=obs.device, dtype=torch.long)
            if deterministic:
                t = self.time_grid()[step]
                x = x + self.velocity(x, t, obs_norm) / self.num_steps
                log_probs.append(torch.zeros_like(x))
                stds.append(torch.zeros_like(x))
            else:
                mean, std = self.transition(x, step, obs_norm)
                x = mean + std * torch.randn(mean.shape, device=mean.device, generator=generator)
                log_probs.append(gaussian_log_prob(x, mean, std))
                stds.append(std)
            chain.append(x)
        # The clip to [-1, 1] acts on the executed action only; the likelihood is of the unclipped
        # chain, which is exact if the clip is seen as part of the environment.
        actions = self.normalizer.unnormalize_action(x.clamp(-1.0, 1.0))
        return ChainSample(
            actions=actions,
            chain=torch.stack(chain, 1),
            log_prob=torch.stack(log_probs, 1),
            std=torch.stack(stds, 1),
        )

    def log_prob_and_entropy(self, obs: torch.Tensor, chain: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Re-score a stored chain in one batched forward over all K steps.

        Args:
            obs: ``(B, obs_dim)`` env units.
            chain: ``(B, K+1, H, A)`` as returned by :meth:`sample`.

        Returns:
            ``(log_prob, entropy)``, each ``(B, K, H, A)`` element-wise.
        """
        batch, k_plus_1 = chain.shape[:2]
        if k_plus_1 != self.num_steps + 1:
            raise ValueError(f"chain has {k_plus_1 - 1} steps, policy has K={self.num_steps}.")
        obs_norm = self.normalizer.normalize_obs(obs).repeat_interleave(self.num_steps, 0)  # (B*K, obs_dim)
        x_k = chain[:, :-1].reshape(batch * self.num_steps, self.horizon, self.action_dim)  # (B*K, H, A)
        x_next = chain[:, 1:].reshape_as(x_k)
        steps = torch.arange(self.num_steps, device=chain.device).repeat(batch)  # (B*K,)
        mean, std = self.transition(x_k, steps, obs_norm)
        shape = (batch, self.num_steps, self.horizon, self.action_dim)
        return gaussian_log_prob(x_next, mean, std).view(shape), gaussian_entropy(std).view(shape)

    def pretrain_loss(self, obs: torch.Tensor, actions: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rectified-flow matching loss. ``obs (B, obs_dim)``, ``actions (B, H, A)`` env units."""
        x1 = self.normalizer.normalize_action(actions)
        x0 = torch.randn_like(x1)
        t = torch.rand(x1.shape[0], device=x1.device)
        x_t = (1 - t)[:, None, None] * x0 + t[:, None, None] * x1
        loss = (self.velocity(x_t, t, self.normalizer.normalize_obs(obs)) - (x1 - x0)).pow(2).mean()
        return {"flow_matching": loss}
