"""Rollout throughput: how close a rollout with the K=4 flow policy in the loop gets to the raw simulator.

Three measurements in one process and one run:

(a) the ceiling: a raw ``gymnasium.vector.SyncVectorEnv`` of ``--num-envs`` un-chunked envs (``envs.make_env``)
    stepped with pre-sampled uniform random actions, so sampling costs nothing; env steps/s.
(b) the PPO rollout loop: ``envs.make_vector_env`` (chunks of H=4, all 4 executed) with a ``FlowPolicy`` sampling
    stochastically (ReinFlow noise, K=4 Euler steps) each chunk step under ``torch.no_grad``, as
    ``robo_rlft/algos/ppo.py`` does; executed env steps/s, the sim / inference split, and (b)/(a).
(c) chain re-scoring as in a PPO minibatch: ``FlowPolicy.log_prob_and_entropy`` (one batched forward over the K
    steps) against a per-step Python loop of K ``FlowPolicy.transition`` forwards computing the same quantity;
    forward + backward of the summed log-probs, ms per call and the speedup.

(a) and (b) are interleaved repeat by repeat, so drift in machine load hits both alike; the headline is the
per-repeat ratio. The policy is randomly initialised: its architecture, not its weights, sets the cost.

Usage:
    python benchmarks/rollout_throughput.py [--env hopper --num-envs 16 --seconds 10 --repeats 3 \
        --out benchmarks/results/rollout_throughput.md]

The defaults take about 1.5-2 minutes. Run it on a quiet machine: every number is wall-clock.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import mujoco
import numpy as np
import torch

from envs import make_env, make_vector_env, step_info_value
from policies.chain import gaussian_entropy, gaussian_log_prob
from policies.flow import FlowPolicy, FlowPolicyConfig

TARGET_RATIO = 0.5  # (b) must reach at least half of the raw simulator's throughput
ACTION_BANK_SIZE = 1024  # pre-sampled random action batches for (a), cycled
AGREEMENT_TOL = 1e-5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--env", default="hopper", help="short env name or robo_rlft/ id (default: hopper)")
    parser.add_argument("--num-envs", type=int, default=16, help="vectorised envs in (a) and (b) (default: 16)")
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of one timed repeat of (a) and of (b)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement; the median is reported")
    parser.add_argument("--warmup", type=float, default=1.0, help="untimed seconds of (a) and of (b) before timing")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1000, 4000], help="chain batch sizes B for (c)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/rollout_throughput.md"))
    args = parser.parse_args(argv)
    if args.num_envs < 1:
        parser.error(f"--num-envs must be >= 1, got {args.num_envs}.")
    if args.seconds <= 0 or args.warmup < 0:
        parser.error(f"need --seconds > 0 and --warmup >= 0, got --seconds {args.seconds} --warmup {args.warmup}.")
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}.")
    if min(args.batch_sizes) < 1:
        parser.error(f"--batch-sizes must be positive, got {args.batch_sizes}.")
    return args


# ---------------------------------------------------------------- machine and timing helpers


def machine_info() -> dict[str, str]:
    cpu_model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "CPU": cpu_model,
        "cores": f"{os.cpu_count()} logical ({usable} usable by this process)",
        "python": platform.python_version(),
        "torch": f"{torch.__version__} ({torch.get_num_threads()} intra-op thread)",
        "mujoco": mujoco.__version__,
        "gymnasium": gym.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
    }


def load_average() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def spread(values: list[float], fmt: str = "{:,.0f}") -> str:
    """``median (min–max)`` of a list of measurements."""
    med = statistics.median(values)
    if len(values) == 1:
        return fmt.format(med)
    return f"{fmt.format(med)} ({fmt.format(min(values))}–{fmt.format(max(values))})"


@dataclass
class RolloutTiming:
    """One timed block of (a) or (b)."""

    env_steps: int  # executed single-env steps, summed over the vector
    chunk_steps: int  # calls to ``envs.step``
    episodes: int  # episodes that ended inside the block
    wall_s: float
    sim_s: float  # inside ``envs.step``
    inference_s: float = 0.0  # obs -> tensor, ``policy.sample``, actions -> numpy

    @property
    def steps_per_s(self) -> float:
        return self.env_steps / self.wall_s


# ---------------------------------------------------------------- (a) raw simulator


def make_raw_vector_env(name: str, num_envs: int) -> gym.vector.SyncVectorEnv:
    """The ceiling: the same registered env as (b), un-chunked, same autoreset mode."""
    return gym.vector.SyncVectorEnv(
        [lambda: make_env(name)] * num_envs, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP
    )


def run_raw(envs: gym.vector.VectorEnv, action_bank: np.ndarray, seconds: float) -> RolloutTiming:
    """Step ``envs`` for ``seconds`` with actions cycled from ``action_bank (M, N, A)``."""
    num_envs = envs.num_envs
    steps = episodes = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        _, _, terminated, truncated, _ = envs.step(action_bank[steps % len(action_bank)])
        episodes += int((terminated | truncated).sum())
        steps += 1
        now = time.perf_counter()
        if now >= deadline:
            break
    wall = now - start
    # With SAME_STEP autoreset every sub-env executes one env step per vector step, ending or not.
    return RolloutTiming(steps * num_envs, steps, episodes, wall, sim_s=wall)


# ---------------------------------------------------------------- (b) rollout with the flow policy


def run_policy(
    envs: gym.vector.VectorEnv, policy: FlowPolicy, obs_np: np.ndarray, seconds: float, obs_log: list[np.ndarray]
) -> tuple[RolloutTiming, np.ndarray]:
    """The rollout loop of ``ppo.py`` (policy part only) for ``seconds``; returns the timing and the last obs.

    Observations seen are appended to ``obs_log`` (a reference per step, no copy) for (c).
    """
    env_steps = chunk_steps = episodes = 0
    sim_s = inference_s = 0.0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        tic = time.perf_counter()
        obs = torch.as_tensor(obs_np, dtype=torch.float32)
        with torch.no_grad():
            actions = policy.sample(obs).actions.numpy()  # (N, H, A)
        toc = time.perf_counter()
        obs_np, _, terminated, truncated, info = envs.step(actions)
        now = time.perf_counter()
        inference_s += toc - tic
        sim_s += now - toc
        ended = terminated | truncated
        env_steps += int(step_info_value(info, "executed_steps", ended).sum())
        episodes += int(ended.sum())
        chunk_steps += 1
        obs_log.append(obs_np)
        if now >= deadline:
            break
    return RolloutTiming(env_steps, chunk_steps, episodes, now - start, sim_s, inference_s), obs_np


# ---------------------------------------------------------------- (c) chain re-scoring


def per_step_log_prob_and_entropy(
    policy: FlowPolicy, obs: torch.Tensor, chain: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for ``FlowPolicy.log_prob_and_entropy``: K forwards of ``transition``, one per denoising step.

    ``obs (B, obs_dim)``, ``chain (B, K+1, H, A)`` -> ``(log_prob, entropy)``, each ``(B, K, H, A)``.
    """
    obs_norm = policy.normalizer.normalize_obs(obs)
    batch = chain.shape[0]
    log_probs, entropies = [], []
    for k in range(policy.num_steps):
        step = torch.full((batch,), k, dtype=torch.long, device=chain.device)
        mean, std = policy.transition(chain[:, k], step, obs_norm)  # (B, H, A) each
        log_probs.append(gaussian_log_prob(chain[:, k + 1], mean, std))
        entropies.append(gaussian_entropy(std))
    return torch.stack(log_probs, 1), torch.stack(entropies, 1)


def check_agreement(policy: FlowPolicy, obs: torch.Tensor, chain: torch.Tensor, stochastic: torch.Tensor) -> float:
    """Raise unless both implementations give the same log-probs, entropies and gradients; return the max error."""
    results = []
    for batched in (True, False):
        policy.zero_grad(set_to_none=True)
        if batched:
            log_prob, entropy = policy.log_prob_and_entropy(obs, chain, stochastic)
        else:
            log_prob, entropy = per_step_log_prob_and_entropy(policy, obs, chain)
        log_prob.sum().backward()
        grads = torch.cat([p.grad.flatten() for p in policy.parameters() if p.grad is not None])
        results.append((log_prob.detach(), entropy.detach(), grads))
    policy.zero_grad(set_to_none=True)
    (lp_a, ent_a, g_a), (lp_b, ent_b, g_b) = results
    torch.testing.assert_close(lp_a, lp_b, rtol=0, atol=AGREEMENT_TOL, msg=lambda m: f"log-probs differ: {m}")
    torch.testing.assert_close(ent_a, ent_b, rtol=0, atol=AGREEMENT_TOL, msg=lambda m: f"entropies differ: {m}")
    # Gradients are sums over B*K*H*A terms, so compare them relative to their scale.
    grad_scale = g_b.abs().max().item()
    torch.testing.assert_close(
        g_a, g_b, rtol=AGREEMENT_TOL, atol=AGREEMENT_TOL * grad_scale, msg=lambda m: f"gradients differ: {m}"
    )
    return max((lp_a - lp_b).abs().max().item(), (ent_a - ent_b).abs().max().item())


def time_calls(fn: Callable[[], None], calls: int) -> float:
    """Milliseconds per call of ``fn`` over ``calls`` back-to-back calls."""
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e3


def rescoring_benchmark(
    policy: FlowPolicy, obs: torch.Tensor, block_s: float, repeats: int
) -> tuple[list[float], list[float], float]:
    """Time forward + backward of both re-scorings on chains sampled for ``obs (B, obs_dim)``.

    Returns per-repeat ms per call of (batched, per-step loop) and the max forward disagreement.
    """
    with torch.no_grad():
        sample = policy.sample(obs)
    # ReinFlow noise: every step is stochastic, so the per-step loop below covers the whole chain.
    chain, stochastic = sample.chain, sample.stochastic  # (B, K+1, H, A), (B, K)
    assert stochastic.all(), "the per-step reference assumes every step is stochastic"
    max_err = check_agreement(policy, obs, chain, stochastic)

    def batched() -> None:
        policy.zero_grad(set_to_none=True)
        log_prob, _ = policy.log_prob_and_entropy(obs, chain, stochastic)
        log_prob.sum().backward()

    def per_step() -> None:
        policy.zero_grad(set_to_none=True)
        log_prob, _ = per_step_log_prob_and_entropy(policy, obs, chain)
        log_prob.sum().backward()

    # Warm up, then fix the call count per block from one timed call so each block lasts ~block_s.
    calls = {}
    for name, fn in (("batched", batched), ("per_step", per_step)):
        fn()
        calls[name] = max(1, math.ceil(block_s / (time_calls(fn, 1) / 1e3)))
    batched_ms, per_step_ms = [], []
    for _ in range(repeats):
        batched_ms.append(time_calls(batched, calls["batched"]))
        per_step_ms.append(time_calls(per_step, calls["per_step"]))
    policy.zero_grad(set_to_none=True)
    return batched_ms, per_step_ms, max_err


# ---------------------------------------------------------------- report


def rollout_table(raw: list[RolloutTiming], flow: list[RolloutTiming], cfg: FlowPolicyConfig, num_envs: int) -> str:
    ratios = [b.steps_per_s / a.steps_per_s for a, b in zip(raw, flow, strict=True)]
    ratio = statistics.median(ratios)
    verdict = "meets" if ratio >= TARGET_RATIO else "BELOW"

    def ms_per_chunk(runs: list[RolloutTiming], attr: str) -> list[float]:
        return [getattr(r, attr) / r.chunk_steps * 1e3 for r in runs]

    def share(runs: list[RolloutTiming], attr: str) -> list[float]:
        return [100 * getattr(r, attr) / r.wall_s for r in runs]

    sim_only = [r.env_steps / r.sim_s for r in flow]
    lines = [
        f"| measurement ({num_envs} envs) | env steps/s | % of (a) | mean episode length |",
        "|---|---|---|---|",
        f"| (a) raw `SyncVectorEnv`, pre-sampled random actions | {spread([r.steps_per_s for r in raw])} | 100 "
        f"| {spread([r.env_steps / max(r.episodes, 1) for r in raw])} |",
        f"| (b) chunked env + `FlowPolicy` K={cfg.denoising_steps}, H={cfg.horizon}, ReinFlow noise "
        f"| {spread([r.steps_per_s for r in flow])} | **{spread([100 * x for x in ratios])}** "
        f"| {spread([r.env_steps / max(r.episodes, 1) for r in flow])} |",
        f"| (b) counting sim time only | {spread(sim_only)} "
        f"| {spread([100 * s / a.steps_per_s for s, a in zip(sim_only, raw, strict=True)])} | |",
        "",
        f"(b)/(a) = **{100 * ratio:.0f} %** (median of per-repeat ratios), target ≥ {100 * TARGET_RATIO:.0f} %: "
        f"{verdict} the target.",
        "",
        "| (b) time split, per chunk step of all envs | ms | % of wall time |",
        "|---|---|---|",
        f"| sim (`envs.step`, {cfg.horizon} env steps per env) | {spread(ms_per_chunk(flow, 'sim_s'), '{:.2f}')} "
        f"| {spread(share(flow, 'sim_s'), '{:.0f}')} |",
        "| inference (obs → tensor, `policy.sample`, `.numpy()`) "
        f"| {spread(ms_per_chunk(flow, 'inference_s'), '{:.2f}')} | {spread(share(flow, 'inference_s'), '{:.0f}')} |",
    ]
    return "\n".join(lines)


def rescoring_table(rows: list[tuple[int, list[float], list[float], float]], cfg: FlowPolicyConfig) -> str:
    lines = [
        f"| B chains (K={cfg.denoising_steps}) | batched `log_prob_and_entropy`, ms | per-step loop of "
        f"{cfg.denoising_steps} `transition`s, ms | speedup | max abs diff |",
        "|---|---|---|---|---|",
    ]
    for batch, batched_ms, per_step_ms, max_err in rows:
        speedups = [p / b for b, p in zip(batched_ms, per_step_ms, strict=True)]
        lines.append(
            f"| {batch:,} | {spread(batched_ms, '{:.1f}')} | {spread(per_step_ms, '{:.1f}')} "
            f"| **{spread(speedups, '{:.2f}')}×** | {max_err:.1e} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    # One torch thread: on a 2-core machine a second thread competing with the simulator made small-MLP
    # forwards ~30x slower. The PPO rollout runs the same way (robo_rlft `torch_threads`).
    torch.set_num_threads(1)
    # Raises if inter-op work already started (main() called from Python after other torch use): keep it then.
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    args = parse_args(argv)
    command = shlex.join(["python", *sys.argv])
    started = datetime.datetime.now().astimezone()
    load_before = load_average()
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    cfg = FlowPolicyConfig()  # default sizes; the weights are random, only the architecture sets the cost
    raw_envs = make_raw_vector_env(args.env, args.num_envs)
    flow_envs = make_vector_env(args.env, args.num_envs, horizon=cfg.horizon, act_steps=cfg.horizon)
    obs_dim = raw_envs.single_observation_space.shape[0]
    action_dim = raw_envs.single_action_space.shape[0]
    policy = FlowPolicy(obs_dim, action_dim, cfg).eval()
    space = raw_envs.single_action_space
    action_bank = rng.uniform(space.low, space.high, (ACTION_BANK_SIZE, args.num_envs, action_dim)).astype(space.dtype)
    raw_envs.reset(seed=args.seed)
    flow_obs, _ = flow_envs.reset(seed=args.seed)
    obs_log: list[np.ndarray] = []

    # ---- (a) and (b), interleaved so that load drift hits both alike ----
    print(f"(a)/(b): warm-up {args.warmup:g} s each, then {args.repeats} × {args.seconds:g} s each", file=sys.stderr)
    run_raw(raw_envs, action_bank, args.warmup)
    _, flow_obs = run_policy(flow_envs, policy, flow_obs, args.warmup, obs_log)
    raw_runs, flow_runs = [], []
    for i in range(args.repeats):
        raw_runs.append(run_raw(raw_envs, action_bank, args.seconds))
        timing, flow_obs = run_policy(flow_envs, policy, flow_obs, args.seconds, obs_log)
        flow_runs.append(timing)
        print(
            f"  repeat {i + 1}: (a) {raw_runs[-1].steps_per_s:,.0f}  (b) {timing.steps_per_s:,.0f} env steps/s",
            file=sys.stderr,
        )
    raw_envs.close()
    flow_envs.close()

    # ---- (c) chain re-scoring on observations the rollouts visited ----
    seen_obs = np.concatenate(obs_log).astype(np.float32)  # (T*N, obs_dim)
    rescoring_rows = []
    for batch in args.batch_sizes:
        print(f"(c): B={batch}", file=sys.stderr)
        obs = torch.as_tensor(seen_obs[rng.integers(0, len(seen_obs), batch)])  # (B, obs_dim)
        rescoring_rows.append((batch, *rescoring_benchmark(policy, obs, args.seconds / 5, args.repeats)))

    # ---- report ----
    finished = datetime.datetime.now().astimezone()
    info = machine_info()
    report = "\n".join(
        [
            "# Rollout throughput",
            "",
            f"- command: `{command}`",
            f"- date: {started:%Y-%m-%d %H:%M %Z} (took {(finished - started).total_seconds():.0f} s)",
            *(f"- {key}: {value}" for key, value in info.items()),
            f"- load average (1/5/15 min) before / after: {load_before} → {load_average()}",
            "",
            f"Env `{args.env}`, {args.num_envs} envs in one `SyncVectorEnv` (SAME_STEP autoreset). "
            f"`FlowPolicy` with default `FlowPolicyConfig` (velocity MLP {cfg.hidden_dims}, "
            f"noise MLP {cfg.noise.hidden_dims}), randomly initialised: the architecture, not the weights, "
            "sets the cost. Env steps are executed single-env steps ((b) counts `executed_steps`). "
            f"Figures: median (min–max) over {args.repeats} repeat(s) of {args.seconds:g} s after {args.warmup:g} s "
            "warm-up; (a) and (b) interleaved repeat by repeat, ratios taken per repeat. Rollout (b) leaves out "
            "the critic forward that PPO's rollout also runs.",
            "",
            "## Rollout: env steps/s",
            "",
            rollout_table(raw_runs, flow_runs, cfg, args.num_envs),
            "",
            "## Chain re-scoring: forward + backward of the summed log-probs (a PPO minibatch)",
            "",
            f"Chains sampled from the policy on observations visited in (b). Both implementations checked to agree "
            f"to {AGREEMENT_TOL:g} (log-probs, entropies; gradients relative to their scale) before timing. Each "
            f"repeat runs a fixed number of calls (≈ {args.seconds / 5:g} s), the two implementations alternating.",
            "",
            rescoring_table(rescoring_rows, cfg),
            "",
        ]
    )
    write_report(report, args.out)


def write_report(report: str, out: Path) -> None:
    """Print the markdown report and write it to ``out``."""
    print(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
