"""Cost at equal samples: wall time of one PPO fine-tuning iteration per likelihood scheme, on one machine.

Issue "Likelihood family", benchmark 1. Every scheme runs ``robo_rlft.algos.ppo.train_ppo`` on Hopper with the
same rollout (envs x chunk steps), the same update (epochs x minibatches of chains, ``algo.target_kl=null`` so
every epoch runs) and the default MLP widths of its family; only the policy and its noise scheme differ:

- ReinFlow: flow, K=4, learned std on ``[obs, emb(t)]``, every step scored (chain ratio);
- Flow-SDE: flow, K=4, closed-form SDE std, every step scored, or ``sde_steps=one`` random step per chain;
- Flow-Noise: flow, K=4, learned std on the velocity net's features, every step scored;
- DPPO-DDPM: diffusion, K=20 posterior steps, the last 10 fine-tuned and scored (per-transition ratio);
- DPPO-DDIM: diffusion, K=5 eta-DDIM steps, all scored (per-transition ratio).

DPPO's update follows its denoising MDP: each stochastic transition is one PPO sample, so with the same
``minibatch_size`` a DPPO epoch takes K' times as many minibatches (of single transitions) as a chain-ratio epoch.

Policies are randomly initialised (the architecture, not the weights, sets the cost) with the built-in Hopper
checkpoint's normalisation stats. Each iteration's cost is read from ``metrics.csv``: ``time_sim`` (``envs.step``),
``time_inference`` (``policy.sample`` + critic) and ``time_update`` (all epochs x minibatches). The iteration-0
evaluation row and the first training iteration (warm-up; it also freezes DDPM's base network) are skipped. The
final evaluation and checkpoint are outside those columns, as they are outside the per-iteration cost compared.
Schemes are interleaved: each repeat runs every scheme once, in turn, so load drift hits all alike.

Usage:
    python benchmarks/scheme_cost.py [--iterations 3 --repeats 2 --num-envs 16 --steps-per-iteration 250 \
        --update-epochs 10 --minibatch-size 1000 --out benchmarks/results/scheme_cost.md]

Rollout and update sizes default to those of a default ``robo-rlft finetune`` (``EnvConfig``, ``PPOConfig``).
The defaults take about 5 minutes on 2 CPU cores. Run it on a quiet machine: every number is wall-clock.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import logging
import shlex
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

# Sibling benchmark script (importable because this one runs as a script from benchmarks/).
from rollout_throughput import load_average, machine_info, spread, write_report

from envs import make_env
from policies.checkpoint import load_policy
from policies.registry import policy_classes
from robo_rlft.algos.ppo import train_ppo
from robo_rlft.cli import compose_config
from robo_rlft.commands import resolve_checkpoint
from robo_rlft.config import Config, EnvConfig, PPOConfig
from robo_rlft.metrics import METRICS_CSV, load_metrics

ENV = "hopper"
NORMALIZER_CHECKPOINT = "builtin:hopper_flow"  # Hopper observation / action stats for every policy
BASELINE = "DPPO-DDPM"
HEADLINE = "ReinFlow"
ANCHOR_RATIO = (0.12, 0.28)  # ReinFlow / DPPO wall time per iteration in the anchors' papers (FACTS.md)
TARGET_RATIO = 0.3  # the target for ReinFlow / DPPO-DDPM
WARMUP_ITERATIONS = 1  # training iterations skipped at the start of every run

# Scheme name -> its overrides of the default config.
SCHEMES: dict[str, list[str]] = {
    "ReinFlow": ["policy=flow", "policy.denoising_steps=4", "policy.noise.scheme=reinflow"],
    "Flow-SDE (all)": [
        "policy=flow", "policy.denoising_steps=4", "policy.noise.scheme=flow_sde", "policy.noise.sde_steps=all"
    ],
    "Flow-SDE (one)": [
        "policy=flow", "policy.denoising_steps=4", "policy.noise.scheme=flow_sde", "policy.noise.sde_steps=one"
    ],
    "Flow-Noise": ["policy=flow", "policy.denoising_steps=4", "policy.noise.scheme=flow_noise"],
    "DPPO-DDPM": [
        "policy=diffusion", "policy.sampler=ddpm", "policy.train_steps=20", "policy.finetune_steps=10",
        "algo.ratio_unit=transition",
    ],
    "DPPO-DDIM": ["policy=diffusion", "policy.sampler=ddim", "policy.ddim_steps=5", "algo.ratio_unit=transition"],
}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    env_defaults, ppo_defaults = EnvConfig(), PPOConfig()  # the rollout and update of a default run
    parser.add_argument(
        "--iterations", type=int, default=3, help="PPO iterations per run; the first is warm-up (default: 3)"
    )
    parser.add_argument("--repeats", type=int, default=2, help="runs per scheme, interleaved (default: 2)")
    parser.add_argument(
        "--num-envs", type=int, default=env_defaults.num_envs, help="env.num_envs (default: %(default)s)"
    )
    parser.add_argument(
        "--steps-per-iteration",
        type=int,
        default=ppo_defaults.steps_per_iteration,
        help="algo.steps_per_iteration, chunk steps per env (default: %(default)s)",
    )
    parser.add_argument(
        "--update-epochs",
        type=int,
        default=ppo_defaults.update_epochs,
        help="algo.update_epochs (default: %(default)s)",
    )
    parser.add_argument(
        "--minibatch-size",
        type=int,
        default=ppo_defaults.minibatch_size,
        help="algo.minibatch_size, PPO samples (chains, or DPPO transitions) per minibatch (default: %(default)s)",
    )
    parser.add_argument(
        "--schemes", nargs="+", default=list(SCHEMES), choices=list(SCHEMES), metavar="SCHEME", help="default: all"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/scheme_cost.md"))
    args = parser.parse_args(argv)
    if args.iterations <= WARMUP_ITERATIONS:
        parser.error(f"--iterations must be > {WARMUP_ITERATIONS} (the first is warm-up), got {args.iterations}.")
    for name in ("repeats", "num_envs", "steps_per_iteration", "update_epochs", "minibatch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}.")
    return args


# ---------------------------------------------------------------- one run of one scheme


@dataclass
class IterationCost:
    """One measured PPO iteration, from ``metrics.csv``."""

    repeat: int
    sim_s: float
    inference_s: float
    update_s: float
    env_steps: int  # executed single-env steps in this iteration

    @property
    def total_s(self) -> float:
        return self.sim_s + self.inference_s + self.update_s


@dataclass
class SchemeResult:
    """A scheme's measured iterations over all repeats, or the error that stopped it."""

    name: str
    overrides: list[str]
    sampled_forwards: int = 0  # network forwards per sampled chunk (K, DDPM's frozen-base steps included)
    scored_transitions: float = 0.0  # stochastic transitions per chain, each one forward in the update
    iterations: list[IterationCost] = field(default_factory=list)
    error: str | None = None


def scheme_config(args: argparse.Namespace, scheme_overrides: list[str], run_dir: Path) -> Config:
    return compose_config(
        [
            f"env={ENV}",
            *scheme_overrides,
            f"env.num_envs={args.num_envs}",
            f"algo.steps_per_iteration={args.steps_per_iteration}",
            f"algo.update_epochs={args.update_epochs}",
            f"algo.minibatch_size={args.minibatch_size}",
            f"algo.iterations={args.iterations}",
            f"algo.checkpoint_every={args.iterations}",  # one checkpoint, after the last row
            "algo.eval_every=0",
            "algo.eval_episodes=1",
            "algo.target_kl=null",  # equal work: every config runs all update epochs
            "algo.critic_warmup_iterations=0",  # the actor is updated from the first iteration
            "progress=false",
            "torch_threads=1",
            f"seed={args.seed}",
            f"run_dir={run_dir}",
        ]
    )


def new_policy(cfg: Config, obs_dim: int, action_dim: int, normalizer_state: dict) -> torch.nn.Module:
    """A randomly initialised policy of ``cfg.policy``'s family (as ``robo_rlft.commands._new_policy``)."""
    model_cls, config_cls = policy_classes(cfg.policy.name)
    arch = {k: v for k, v in vars(cfg.policy).items() if k in config_cls.__dataclass_fields__}
    policy = model_cls(obs_dim, action_dim, config_cls(**arch))
    policy.normalizer.load_state_dict(normalizer_state)
    return policy


def read_iterations(run_dir: Path, repeat: int) -> list[IterationCost]:
    """The measured iterations of one run: rows after iteration 0 (eval only) and the warm-up ones."""
    metrics = load_metrics(run_dir / METRICS_CSV)
    iteration, env_steps = metrics["iteration"], metrics["env_steps"]
    costs = []
    for row in range(1, len(iteration)):
        if iteration[row] <= WARMUP_ITERATIONS:
            continue
        costs.append(
            IterationCost(
                repeat=repeat,
                sim_s=float(metrics["time_sim"][row]),
                inference_s=float(metrics["time_inference"][row]),
                update_s=float(metrics["time_update"][row]),
                env_steps=int(env_steps[row] - env_steps[row - 1]),
            )
        )
    return costs


def run_scheme(
    result: SchemeResult, args: argparse.Namespace, repeat: int, work_dir: Path, dims: tuple[int, int], norm: dict
) -> None:
    """One ``train_ppo`` run of a scheme; appends its iterations to ``result`` or records the error."""
    run_dir = work_dir / f"{result.name.replace(' ', '_').replace('(', '').replace(')', '')}_r{repeat}"
    try:
        cfg = scheme_config(args, result.overrides, run_dir)
        # Same weights for a scheme in every repeat; the global RNG also drives sampling and minibatches.
        torch.manual_seed(args.seed)
        np.random.seed(args.seed)
        policy = new_policy(cfg, *dims, norm)
        tic = time.perf_counter()
        train_ppo(cfg, run_dir, policy)
        wall = time.perf_counter() - tic
        costs = read_iterations(run_dir, repeat)
    except Exception as exc:  # report any scheme's failure and keep measuring the others
        traceback.print_exc()
        result.error = f"{type(exc).__name__}: {exc}"
        return
    result.iterations += costs
    print(
        f"  {result.name}, repeat {repeat + 1}: "
        + ", ".join(f"{c.total_s:.2f} s" for c in costs)
        + f" per measured iteration ({wall:.0f} s for the whole run)",
        file=sys.stderr,
    )


# ---------------------------------------------------------------- report


def median_of(costs: list[IterationCost], attr: str) -> float:
    return statistics.median(getattr(c, attr) for c in costs)


def per_repeat_ratios(result: SchemeResult, baseline: SchemeResult, attr: str = "total_s") -> list[float]:
    """Median cost of ``result`` over that of ``baseline``, repeat by repeat (the runs that sat side by side)."""
    ratios = []
    for repeat in sorted({c.repeat for c in result.iterations}):
        mine = [c for c in result.iterations if c.repeat == repeat]
        theirs = [c for c in baseline.iterations if c.repeat == repeat]
        if mine and theirs:
            ratios.append(median_of(mine, attr) / median_of(theirs, attr))
    return ratios


def compute_s(c: IterationCost) -> float:
    return c.inference_s + c.update_s


def results_table(results: list[SchemeResult], baseline: SchemeResult | None) -> str:
    lines = [
        "| scheme | forwards sampled / transitions scored per chain | iteration wall, s | sim, s | inference, s "
        "| update, s | sim share | env steps / iteration | ratio to DPPO-DDPM | ratio excl. sim |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    base_ok = baseline is not None and bool(baseline.iterations)
    base_total = median_of(baseline.iterations, "total_s") if base_ok else float("nan")
    base_compute = statistics.median(compute_s(c) for c in baseline.iterations) if base_ok else float("nan")
    for r in results:
        forwards = f"{r.sampled_forwards} / {r.scored_transitions:g}" if r.sampled_forwards else "n/a"
        head = f"| {r.name} | {forwards} "
        if not r.iterations:
            lines.append(head + f"| **error**: `{r.error}` | | | | | | | |")
            continue
        its = r.iterations
        total = median_of(its, "total_s")
        compute = statistics.median(compute_s(c) for c in its)
        ratio = f"{total / base_total:.2f}" if base_ok else "n/a"
        compute_ratio = f"{compute / base_compute:.2f}" if base_ok else "n/a"
        repeat_ratios = per_repeat_ratios(r, baseline) if base_ok else []
        if len(repeat_ratios) > 1:
            ratio += f" ({min(repeat_ratios):.2f}–{max(repeat_ratios):.2f})"
        bold = "**" if r.name in (HEADLINE, BASELINE) else ""
        lines.append(
            head
            + f"| {bold}{spread([c.total_s for c in its], '{:.2f}')}{bold} "
            + f"| {spread([c.sim_s for c in its], '{:.2f}')} "
            + f"| {spread([c.inference_s for c in its], '{:.2f}')} "
            + f"| {spread([c.update_s for c in its], '{:.2f}')} "
            + f"| {100 * median_of(its, 'sim_s') / total:.0f} % "
            + f"| {spread([c.env_steps for c in its])} "
            + f"| {bold}{ratio}{bold} | {compute_ratio} |"
        )
    errors = [
        f"- {r.name} failed ({len(r.iterations)} iterations measured before): `{r.error}`" for r in results if r.error
    ]
    return "\n".join(lines + (["", *errors] if errors else []))


def headline(results: dict[str, SchemeResult]) -> str:
    ours, base = results.get(HEADLINE), results.get(BASELINE)
    if not (ours and base and ours.iterations and base.iterations):
        return f"Headline {HEADLINE} / {BASELINE}: not available (a run failed or was not selected)."
    total_o, total_b = median_of(ours.iterations, "total_s"), median_of(base.iterations, "total_s")
    ratio = total_o / total_b
    verdict = "meets" if ratio <= TARGET_RATIO else "misses"
    parts = {
        name: {attr: median_of(r.iterations, attr) for attr in ("sim_s", "inference_s", "update_s")}
        for name, r in ((HEADLINE, ours), (BASELINE, base))
    }
    compute_ratio = (parts[HEADLINE]["inference_s"] + parts[HEADLINE]["update_s"]) / (
        parts[BASELINE]["inference_s"] + parts[BASELINE]["update_s"]
    )
    return "\n".join(
        [
            f"**{HEADLINE} / {BASELINE} = {ratio:.2f}** of DPPO-DDPM's wall time per iteration (median iterations; "
            f"anchors: {ANCHOR_RATIO[0]:.2f}–{ANCHOR_RATIO[1]:.2f} on GPU; issue target ≤ {TARGET_RATIO}: "
            f"{verdict} it).",
            "",
            "Split (median s per iteration): "
            + "; ".join(
                f"{name} sim {p['sim_s']:.2f}, inference {p['inference_s']:.2f}, update {p['update_s']:.2f}"
                for name, p in parts.items()
            )
            + f". The simulator is {100 * parts[HEADLINE]['sim_s'] / total_o:.0f} % of {HEADLINE}'s iteration and "
            f"{100 * parts[BASELINE]['sim_s'] / total_b:.0f} % of {BASELINE}'s; the policies' own compute "
            f"(inference + update) alone gives {HEADLINE} / {BASELINE} = {compute_ratio:.2f}.",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    # One torch thread, as robo_rlft runs (`torch_threads=1`): on 2 cores a second thread fights the simulator.
    torch.set_num_threads(1)
    with contextlib.suppress(RuntimeError):  # inter-op threads can only be set before any parallel work
        torch.set_num_interop_threads(1)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Tiny evaluations (one episode) have no CI; the logger's per-metric NaN warnings would drown the progress.
    logging.getLogger("robo_rlft.metrics").setLevel(logging.ERROR)
    args = parse_args(argv)
    command = shlex.join(["python", *sys.argv])
    started = datetime.datetime.now().astimezone()
    load_before = load_average()

    env = make_env(ENV)
    dims = (env.observation_space.shape[0], env.action_space.shape[0])
    env.close()
    reference, _ = load_policy(resolve_checkpoint(NORMALIZER_CHECKPOINT), obs_dim=dims[0], action_dim=dims[1])
    norm = reference.normalizer.state_dict()
    results = {name: SchemeResult(name, SCHEMES[name]) for name in SCHEMES if name in args.schemes}
    with tempfile.TemporaryDirectory(prefix="scheme_cost_") as tmp:
        for result in results.values():  # fail at t = 0 on a bad override or policy, not after minutes
            try:
                probe = new_policy(scheme_config(args, result.overrides, Path(tmp) / "check"), *dims, norm)
                with torch.no_grad():
                    stochastic = probe.sample(torch.zeros(64, dims[0])).stochastic  # (64, K)
                result.sampled_forwards = probe.num_steps
                result.scored_transitions = stochastic.sum(1).float().mean().item()
            except Exception as exc:
                traceback.print_exc()
                result.error = f"{type(exc).__name__}: {exc}"
        for repeat in range(args.repeats):
            print(f"repeat {repeat + 1}/{args.repeats}", file=sys.stderr)
            for result in results.values():
                if result.error is None:
                    run_scheme(result, args, repeat, Path(tmp), dims, norm)

    finished = datetime.datetime.now().astimezone()
    chains = args.num_envs * args.steps_per_iteration
    minibatches = -(-chains // args.minibatch_size)
    measured = args.iterations - WARMUP_ITERATIONS
    report = "\n".join(
        [
            "# Cost at equal samples: one PPO fine-tuning iteration per likelihood scheme",
            "",
            f"- command: `{command}`",
            f"- date: {started:%Y-%m-%d %H:%M %Z} (took {(finished - started).total_seconds():.0f} s)",
            *(f"- {key}: {value}" for key, value in machine_info().items()),
            f"- load average (1/5/15 min) before / after: {load_before} → {load_average()}",
            "",
            f"Env `{ENV}`; every scheme: {args.num_envs} envs × {args.steps_per_iteration} chunk steps (H=4, all 4 "
            f"executed) = {chains:,} chains per iteration; update {args.update_epochs} epochs of minibatches of "
            f"{args.minibatch_size} PPO samples (`algo.target_kl=null`: all epochs run), critic updated alongside. "
            "Default MLP widths of each family (velocity / ε-net [256, 256, 256], "
            "noise head [128, 128], critic default), random weights, built-in Hopper normalisation stats. Per "
            f"iteration: `time_sim + time_inference + time_update` from `metrics.csv`; {measured} measured "
            f"iteration(s) per run after {WARMUP_ITERATIONS} warm-up, {args.repeats} interleaved run(s) per "
            "scheme; figures are median (min–max) over all measured iterations. The iteration's untimed glue "
            "(env reset, buffer copies, GAE) and the final evaluation / checkpoint are not included. DPPO rows use "
            "`algo.ratio_unit=transition` and minibatch as DPPO does: a PPO sample is one stochastic denoising "
            f"transition, so DPPO-DDPM's {chains:,} chains give {10 * chains:,} samples and "
            f"{-(-10 * chains // args.minibatch_size)} minibatches per epoch, where a chain-ratio scheme has "
            f"{minibatches} minibatches of {min(args.minibatch_size, chains)} whole chains.",
            "",
            "Columns: *forwards sampled* = ε / velocity network calls per sampled chunk (DDPM's frozen-base "
            "steps included); *transitions scored* = stochastic transitions per chain, each re-scored by one forward "
            "(+ backward) per epoch in the update; *sim share* = sim / iteration "
            "wall; *ratio to DPPO-DDPM* = median iteration wall over DPPO-DDPM's (per-repeat range in parentheses); "
            "*ratio excl. sim* = the same for inference + update only.",
            "",
            results_table(list(results.values()), results.get(BASELINE)),
            "",
            headline(results),
            "",
            "Anchors' setting for comparison (FACTS.md): 40 envs × 500 chunk steps × 4 actions = 80k env steps per "
            "iteration on a GPU, Hopper 11.7 s (ReinFlow) vs 99.0 s (DPPO) per iteration.",
            "",
        ]
    )
    write_report(report, args.out)


if __name__ == "__main__":
    main()
