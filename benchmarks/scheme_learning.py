"""Learning at equal env steps: every noise scheme / policy family from its own BC start on the same
medium Hopper data, fine-tuned for the same env-step budget, plus the Gaussian-policy PPO baseline.

    python benchmarks/scheme_learning.py --dataset runs/hopper_medium/dataset.npz [--iterations 20]
        [--jobs 2] [--work-dir runs/bench_schemes] [--out benchmarks/results/scheme_learning.md]

Without ``--dataset`` the medium dataset is made first with ``robo-rlft collect`` (about 5 minutes).
Each method runs as the CLI commands a user would type (subprocesses, ``--jobs`` at a time); the
table gives the deterministic evaluation (``algo.eval_episodes`` episodes, 95 % CI) before and after
fine-tuning, read from each run's ``metrics.csv``, and a plot of the evaluation curves.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROBO = [sys.executable, "-m", "robo_rlft.cli"]
DPPO = ["algo.ratio_unit=transition", "algo.clip_coef_first=0.001", "algo.denoising_discount=0.99"]


@dataclass
class Method:
    """A row of the table: how its starting policy is made and how it is fine-tuned."""

    name: str
    pretrain: list[str] | None  # None: start from the built-in flow checkpoint (BC on the same data)
    finetune: list[str] = field(default_factory=list)


METHODS = [
    Method("ReinFlow (flow K=4)", None, ["policy.noise.scheme=reinflow"]),
    Method("Flow-Noise (flow K=4)", None, ["policy.noise.scheme=flow_noise"]),
    Method("Flow-SDE, all steps (flow K=4)", None, ["policy.noise.scheme=flow_sde"]),
    Method("Flow-SDE, one step (flow K=4)", None, ["policy.noise.scheme=flow_sde", "policy.noise.sde_steps=one"]),
    Method(
        "ReinFlow (shortcut, 1 step)",
        ["policy=shortcut"],
        ["policy=shortcut", "policy.denoising_steps=1", "policy.noise.scheme=reinflow"],
    ),
    Method("DPPO-DDPM (K=20, K'=10)", ["policy=diffusion", "policy.sampler=ddpm"], ["policy=diffusion", *DPPO]),
    Method("DPPO-DDIM (K=5)", ["policy=diffusion", "policy.sampler=ddim"], ["policy=diffusion", *DPPO]),
    Method(
        "Gaussian PPO baseline",
        ["policy=gaussian"],
        ["policy=gaussian", "algo.log_prob_reduction=sum", "algo.clip_coef=0.2"],
    ),
]


def run(command: list[str], log: Path) -> float:
    """Run one CLI command, its output into ``log``; returns the wall time in seconds."""
    tic = time.perf_counter()
    with open(log, "w") as f:
        subprocess.run(command, check=True, stdout=f, stderr=subprocess.STDOUT)
    return time.perf_counter() - tic


def run_method(
    method: Method, index: int, dataset: Path, work_dir: Path, budget: list[str], pretrain: list[str]
) -> dict:
    """Pretrain (if needed) and fine-tune one method; returns its before/after numbers and curve."""
    slug = f"{index}_" + re.sub(r"\W+", "_", method.name.lower()).strip("_")  # also a safe Hydra value
    pretrained = "builtin:hopper_flow"
    if method.pretrain is not None:
        bc_dir = work_dir / f"{slug}_bc"
        argv = ["pretrain", f"pretrain.dataset={dataset}", f"run_dir={bc_dir}", "pretrain.eval_episodes=0"]
        run([*ROBO, *argv, *pretrain, *method.pretrain, "progress=false"], work_dir / f"{slug}_pretrain.log")
        pretrained = str(bc_dir / "final")
    ft_dir = work_dir / f"{slug}_ft"
    argv = ["finetune", f"policy.pretrained={pretrained}", f"run_dir={ft_dir}", *budget, *method.finetune]
    seconds = run([*ROBO, *argv, "progress=false"], work_dir / f"{slug}_finetune.log")
    with open(ft_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    evals = [r for r in rows if r.get("eval_return_mean")]
    return {"method": method, "seconds": seconds, "evals": evals, "env_steps": int(rows[-1]["env_steps"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, help="medium Hopper dataset from `robo-rlft collect`")
    parser.add_argument("--iterations", type=int, default=20, help="PPO iterations (16 envs x 250 chunks x 4)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--pretrain-steps", type=int, default=10_000, help="BC gradient steps (the default's)")
    parser.add_argument("--steps-per-iteration", type=int, default=250, help="chunk steps per env per iteration")
    parser.add_argument("--eval-episodes", type=int, default=20)
    parser.add_argument("--work-dir", type=Path, default=Path("runs/bench_schemes"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/scheme_learning.md"))
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    dataset = args.dataset
    if dataset is None:
        run([*ROBO, "collect", f"run_dir={args.work_dir / 'data'}", "progress=false"], args.work_dir / "collect.log")
        dataset = args.work_dir / "data" / "dataset.npz"
    budget = [
        f"algo.iterations={args.iterations}",
        f"algo.eval_every={max(1, args.iterations // 4)}",
        f"algo.steps_per_iteration={args.steps_per_iteration}",
        f"algo.eval_episodes={args.eval_episodes}",
    ]
    tic = time.perf_counter()
    with ThreadPoolExecutor(args.jobs) as pool:
        pretrain = [f"pretrain.gradient_steps={args.pretrain_steps}"]
        futures = [
            pool.submit(run_method, m, i, dataset, args.work_dir, budget, pretrain) for i, m in enumerate(METHODS)
        ]
        results = [f.result() for f in futures]
    total = time.perf_counter() - tic

    curve = args.out.with_suffix(".png")
    plot(results, curve)
    lines = [
        "# Learning at equal env steps (Hopper, medium data)",
        "",
        f"- command: `python {' '.join(sys.argv)}`",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {os.cpu_count()} cores, "
        f"{args.jobs} runs at a time (wall times include that sharing); total {total / 60:.0f} min",
        f"- dataset: `{dataset}`; every method starts from behaviour cloning on it (`robo-rlft pretrain` "
        "defaults, or the built-in flow checkpoint, which is exactly that), then `robo-rlft finetune` with "
        f"`{' '.join(budget)}` and the defaults (16 envs x 250 chunk steps x 4 actions per iteration).",
        f"- evaluation: deterministic sampler, {args.eval_episodes} episodes, the same seeds for every method; "
        "95 % CI.",
        "",
        "| method | before | after | env steps | wall time |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        before, after = r["evals"][0], r["evals"][-1]
        minutes = r["seconds"] / 60
        lines.append(
            f"| {r['method'].name} | {fmt(before)} | **{fmt(after)}** | {r['env_steps']:,} | {minutes:.1f} min |"
        )
    lines += ["", f"![evaluation curves]({curve.name})", ""]
    table = "\n".join(lines)
    args.out.write_text(table)
    print(table)


def fmt(row: dict) -> str:
    return f"{float(row['eval_return_mean']):,.0f} ± {float(row['eval_return_ci95']):,.0f}"


def plot(results: list[dict], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for r in results:
        steps = [int(e["env_steps"]) for e in r["evals"]]
        means = [float(e["eval_return_mean"]) for e in r["evals"]]
        ci = [float(e["eval_return_ci95"]) for e in r["evals"]]
        (line,) = ax.plot(steps, means, marker="o", label=r["method"].name)
        low = [m - c for m, c in zip(means, ci, strict=True)]
        high = [m + c for m, c in zip(means, ci, strict=True)]
        ax.fill_between(steps, low, high, alpha=0.15, color=line.get_color())
    ax.set_xlabel("Environment steps")
    ax.set_ylabel("Eval return (deterministic sampler, 95 % CI)")
    ax.set_title("Hopper: fine-tuning from BC on medium data, equal env steps")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
