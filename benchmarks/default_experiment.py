"""The default experiment, end to end, as a user runs it: before/after returns with CIs and wall time.

    python benchmarks/default_experiment.py [--work-dir runs/bench_default] [--episodes 50]
        [--out benchmarks/results/default_experiment.md]

Runs ``robo-rlft eval`` on the built-in checkpoint, ``robo-rlft finetune`` with no overrides (the
Quickstart's command) and ``robo-rlft eval`` on the result, each as a subprocess, then writes a
markdown table (and the learning curve next to it).
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path


def run(command: list[str]) -> float:
    """Run a CLI command; returns its wall time in seconds."""
    print("$", " ".join(command), file=sys.stderr, flush=True)
    tic = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - tic


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, default=Path("runs/bench_default"))
    parser.add_argument("--episodes", type=int, default=50, help="evaluation episodes before and after")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/default_experiment.md"))
    args = parser.parse_args()
    if args.work_dir.exists():
        sys.exit(f"{args.work_dir} exists; pass a fresh --work-dir.")
    finetune_dir, before_dir, after_dir = (args.work_dir / name for name in ("finetune", "eval_before", "eval_after"))
    common = ["progress=false"]
    robo = [sys.executable, "-m", "robo_rlft.cli"]
    run(
        [
            *robo,
            "eval",
            "eval.checkpoint=builtin:hopper_flow",
            f"eval.episodes={args.episodes}",
            f"run_dir={before_dir}",
            *common,
        ]
    )
    finetune_seconds = run([*robo, "finetune", f"run_dir={finetune_dir}", *common])
    run(
        [
            *robo,
            "eval",
            f"eval.checkpoint={finetune_dir}",
            f"eval.episodes={args.episodes}",
            f"run_dir={after_dir}",
            *common,
        ]
    )

    before = json.loads((before_dir / "eval.json").read_text())
    after = json.loads((after_dir / "eval.json").read_text())
    with open(finetune_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    evals = [r for r in rows if r.get("eval_return_mean")]
    curve = args.out.with_suffix(".png")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(finetune_dir / "learning_curve.png", curve)

    lines = [
        "# Default experiment: `robo-rlft finetune` (Hopper, flow policy K=4, ReinFlow-style PPO)",
        "",
        f"- command: `python {' '.join(sys.argv)}`",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; CPU: {cpu_model()}, "
        f"{len(__import__('os').sched_getaffinity(0))} cores",
        "- steps: `robo-rlft eval eval.checkpoint=builtin:hopper_flow`, `robo-rlft finetune` (no overrides), "
        f"`robo-rlft eval eval.checkpoint=<finetune run>` (its `best/` policy); {args.episodes} evaluation "
        "episodes each, the same reset seeds and sampler noise for both.",
        "",
        f"| policy | eval return ({args.episodes} episodes, mean ± 95 % CI) |",
        "|---|---|",
        f"| pretrained `builtin:hopper_flow` | {before['return_mean']:,.0f} ± {before['return_ci95']:,.0f} |",
        f"| fine-tuned | **{after['return_mean']:,.0f} ± {after['return_ci95']:,.0f}** |",
        "",
        f"`robo-rlft finetune` wall time: **{finetune_seconds / 60:.1f} min** for {int(rows[-1]['env_steps']):,} "
        f"env steps ({rows[-1]['iteration']} iterations).",
        "",
        "Evaluations during the run (`algo.eval_episodes` episodes each; iteration 0 is the pretrained policy):",
        "",
        "| iteration | env steps | eval return (mean ± 95 % CI) |",
        "|---|---|---|",
        *(
            f"| {r['iteration']} | {int(r['env_steps']):,} | "
            f"{float(r['eval_return_mean']):,.0f} ± {float(r['eval_return_ci95']):,.0f} |"
            for r in evals
        ),
        "",
        f"![learning curve]({curve.name})",
        "",
    ]
    table = "\n".join(lines)
    args.out.write_text(table)
    print(table)


if __name__ == "__main__":
    main()
