"""End to end on CPU with the tiny VLA: scripted demos with images -> SFT of ``vla_tiny`` -> PPO and GRPO.

    MUJOCO_GL=egl python benchmarks/vla_tabletop.py [--task LiftCube | --tasks A B C] [--episodes 300]
        [--demo-noise 0.1] [--image-size 64] [--pretrain-steps 5000] [--ppo-iterations 20] [--grpo-iterations 20]
        [--eval-rounds 1] [--work-dir runs/bench_vla_tabletop] [--out benchmarks/results/vla_tabletop.md]
        [--policy KEY=VALUE ...] [--rl-policy KEY=VALUE ...] [--ppo KEY=VALUE ...] [--grpo KEY=VALUE ...]

Every step is the CLI command a user would type (printed in the report): ``collect`` records the scripted
expert's demonstrations with both cameras and the instruction; ``pretrain`` fits ``policy=vla_tiny`` to them
(flow matching plus the auxiliary object-pose loss of ``policy.object_loss_weight``, the VLM trained) and
evaluates it on the task's 50 fixed init states; two ``finetune`` runs start from that one SFT checkpoint:
PPO with ``flow_noise`` and GRPO with ``flow_noise``; ``--rl-policy`` gives both the policy's fine-tuning
choices (by default ``freeze_backbone=true``: RL trains the action expert, the noise head and PPO's critic, not
the VLM the SFT trained). Success rates are the deterministic evaluations on the 50
fixed init states (Wilson 95 % CIs), ``--eval-rounds`` times each with a new draw of the sampler's initial noise
(one 50-episode draw moves by several successes on its own): the SFT policy's from ``pretrain``'s ``eval.json``,
the fine-tuned ones from each run's ``metrics.csv`` (iteration 0 re-evaluates the SFT policy) and final
``eval.json``. The report also has the evaluation curves (PNG). Stages whose output exists are skipped
(``--fresh`` reruns them), so a long benchmark can be continued after an interruption; an RL run that finished
fewer iterations than now asked is continued from its last checkpoint (``finetune resume=...``); the report lists
every command as it ran.

With ``--tasks A B C`` the run is multi-task (``env=tabletop_multitask``): one policy for the tasks, told apart by
their instructions, evaluated on every task's 50 fixed init states, with success per task before and after RL.
``--grpo-iterations 0`` skips GRPO.
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

from tabletop_rl import run, shown  # benchmarks/tabletop_rl.py: the same CLI runner

from envs.tabletop.tasks import TASKS
from robo_rlft.stats import wilson_ci95

ROBO = [sys.executable, "-m", "robo_rlft.cli"]
FIXED_INIT_STATES = 50
NOTES_MARKER = "<!-- notes: kept when the report is regenerated -->"


def iterations_run(run_dir: Path) -> int:
    """The last iteration a fine-tuning run logged in its ``metrics.csv``."""
    with open(run_dir / "metrics.csv", newline="") as f:
        return max(int(row["iteration"]) for row in csv.DictReader(f))


def read_evals(run_dir: Path) -> tuple[list[dict], float]:
    """The evaluation rows of a fine-tuning run's ``metrics.csv`` and its final ``eval.json`` success rate."""
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    evals = [r for r in rows if r.get("eval_success_rate")]
    return evals, json.loads((run_dir / "eval.json").read_text())["success_rate"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="LiftCube")
    parser.add_argument("--tasks", nargs="*", default=[], help="several tasks: a multi-task run (instead of --task)")
    parser.add_argument("--episodes", type=int, default=300, help="demonstration episodes")
    parser.add_argument("--demo-noise", type=float, default=0.1, help="collect.action_noise of the scripted expert")
    parser.add_argument("--image-size", type=int, default=64, help="env.image_size the cameras render at")
    parser.add_argument("--pretrain-steps", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=32, help="pretrain.batch_size")
    parser.add_argument("--ppo-iterations", type=int, default=20)
    parser.add_argument("--grpo-iterations", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--eval-rounds",
        type=int,
        default=1,
        help="evaluate every fixed init state this many times (each round a new x_0 draw of the deterministic "
        "sampler): one 50-episode draw moves by several successes on its own",
    )
    parser.add_argument("--work-dir", type=Path, default=Path("runs/bench_vla_tabletop"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/vla_tabletop.md"))
    parser.add_argument("--policy", nargs="*", default=[], help="extra policy.* overrides of the SFT run")
    parser.add_argument(
        "--rl-policy",
        nargs="*",
        default=["freeze_backbone=true"],
        help="policy.* fine-tuning choices of both RL runs (FINETUNE_FIELDS: freeze_backbone, noise.*); the SFT "
        "trains the tiny VLM, RL trains only the action expert, the noise head and the critic unless "
        "freeze_backbone=false",
    )
    parser.add_argument("--ppo", nargs="*", default=[], help="extra overrides of the PPO run")
    parser.add_argument("--grpo", nargs="*", default=[], help="extra overrides of the GRPO run")
    parser.add_argument("--fresh", action="store_true", help="rerun every stage, even those already done")
    args = parser.parse_args()
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    tasks = args.tasks or [args.task]
    if args.tasks:
        env = ["env=tabletop_multitask", "env.task=null", f"env.tasks=[{','.join(args.tasks)}]"]
    else:
        env = ["env=tabletop", f"env.task={args.task}"]
    fixed = FIXED_INIT_STATES * len(tasks) * args.eval_rounds  # every task's fixed init states, eval_rounds times
    cameras = [*env, "env.cameras=[agentview,wrist]"]
    cameras += [f"env.image_size={args.image_size}", f"seed={args.seed}"]
    data, sft, ppo, grpo = work / "data", work / "sft", work / "ppo", work / "grpo"
    collect = ["collect", *cameras, f"collect.episodes={args.episodes}", f"collect.action_noise={args.demo_noise}"]
    collect.append(f"run_dir={data}")
    pretrain = ["pretrain", "policy=vla_tiny", *cameras, f"pretrain.dataset={data / 'dataset.npz'}"]
    pretrain += [f"pretrain.gradient_steps={args.pretrain_steps}", f"pretrain.batch_size={args.batch_size}"]
    pretrain += [f"pretrain.eval_episodes={fixed}", *(f"policy.{o}" for o in args.policy)]
    pretrain.append(f"run_dir={sft}")
    start = ["policy=vla_tiny", f"policy.pretrained={sft / 'final'}", *cameras]
    start += ["policy.noise.scheme=flow_noise", *(f"policy.{o}" for o in args.rl_policy)]
    start.append(f"algo.eval_episodes={fixed}")
    # PPO: experiment=tabletop, the settings of the state-based tabletop benchmark (benchmarks/tabletop_rl.py).
    finetune_ppo = ["finetune", "experiment=tabletop", *start, f"algo.iterations={args.ppo_iterations}", *args.ppo]
    finetune_ppo.append(f"run_dir={ppo}")
    # GRPO: that preset's PPO keys do not exist for GRPO; its shared ones (envs, actor lr, eval cadence) are given.
    grpo_preset = ["env.num_envs=32", "algo.actor_lr=3e-5", "algo.eval_every=5"]
    finetune_grpo = ["finetune", "algo=grpo", *start, *grpo_preset, f"algo.iterations={args.grpo_iterations}"]
    finetune_grpo += [*args.grpo, f"run_dir={grpo}"]

    stages = {
        "collect": (collect, data / "dataset.npz"),
        "pretrain": (pretrain, sft / "eval.json"),
        "ppo": (finetune_ppo, ppo / "eval.json"),
        "grpo": (finetune_grpo, grpo / "eval.json"),
    }
    if args.grpo_iterations == 0:
        del stages["grpo"]
    iterations = {"ppo": args.ppo_iterations, "grpo": args.grpo_iterations}
    # What each stage ran, as run (stage -> [[argv, seconds], ...]): its command, then any resume that continued it
    # (an RL run asked for more iterations than it finished is continued from its last checkpoint, not restarted).
    # Older work dirs hold only seconds.json (stage -> seconds); their report shows today's command for each stage.
    commands_file, legacy_file = work / "commands.json", work / "seconds.json"
    commands = json.loads(commands_file.read_text()) if commands_file.is_file() and not args.fresh else {}
    if legacy_file.is_file() and not args.fresh:
        legacy = json.loads(legacy_file.read_text())
        commands = {name: [[stages[name][0], wall]] for name, wall in legacy.items() if name in stages} | commands

    def record(name: str, argv: list[str], log: Path) -> float:
        print(f"[{time.strftime('%H:%M:%S')}] {shown(argv)}", file=sys.stderr)
        wall = run([*ROBO, *argv, "progress=false"], log)
        commands.setdefault(name, []).append([argv, wall])
        commands_file.write_text(json.dumps(commands, indent=2))
        return wall

    for name, (argv, done) in stages.items():
        if done.is_file() and name in commands:
            if name in iterations and iterations_run(done.parent) < iterations[name]:
                resume = ["finetune", f"resume={done.parent}", f"algo.iterations={iterations[name]}"]
                record(name, resume, work / f"{name}_resume.log")
            print(f"[{time.strftime('%H:%M:%S')}] {name}: done ({done})", file=sys.stderr)
            continue
        shutil.rmtree(done.parent, ignore_errors=True)  # a run_dir must be new
        commands.pop(name, None)
        record(name, argv, work / f"{name}.log")

    demos = json.loads((data / "collect.json").read_text())
    sft_result = json.loads((sft / "eval.json").read_text())
    sft_rate = sft_result["success_rate"]
    results = {"PPO, `flow_noise`": (ppo, *read_evals(ppo))}
    if "grpo" in stages:
        results["GRPO, `flow_noise`"] = (grpo, *read_evals(grpo))
    curve = args.out.with_suffix(".png")
    plot({name.replace("`", ""): evals for name, (_, evals, _) in results.items()}, sft_rate, curve, tasks, fixed)

    def rate(p: float, episodes: int = fixed) -> str:
        successes = round(p * episodes)
        _, lo, hi = wilson_ci95(successes, episodes)
        return f"{successes}/{episodes} = {100 * p:.0f} % [{100 * lo:.0f}, {100 * hi:.0f}]"

    def last_env_steps(evals: list[dict]) -> str:
        return f"{int(evals[-1]['env_steps']):,}" if evals else "?"

    from robo_rlft.data import load_dataset

    dataset = load_dataset(data / "dataset.npz")
    steps = [(name, argv) for name, (argv, _) in stages.items()]
    title = ", ".join(tasks) + (" (one multi-task policy)" if args.tasks else "")
    lines = [
        f"# End to end on CPU with the tiny VLA: {title} from images and instruction, SFT → "
        + " / ".join(name.split(",")[0] for name in results),
        "",
        f"- command: `MUJOCO_GL=egl python {shlex.join(sys.argv)}`",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; 2-core CPU (one core used), no GPU",
        "- the steps it ran:",
        *(
            f"  - `{shown(argv)}` ({wall / 60:.1f} min)"
            for name, argv in steps
            for argv, wall in commands[name]
        ),
        f"- demonstrations: {demos['episodes']} episodes, {demos['steps']:,} steps from the scripted expert with "
        f"action noise {args.demo_noise} (the expert succeeded in {100 * dataset.meta['success_rate']:.0f} % of "
        f"them), agentview and wrist images at {args.image_size} px, the instruction",
        f"- SFT: {args.pretrain_steps} gradient steps of batch {args.batch_size}; RL: PPO {args.ppo_iterations} "
        f"iterations, GRPO {args.grpo_iterations} iterations, both from the same SFT checkpoint",
        f"- evaluation: deterministic sampler, {fixed} episodes: the {FIXED_INIT_STATES} fixed init states of each "
        f"task, {args.eval_rounds} time(s) each (a new x_0 draw each round); success count and rate with a Wilson "
        "95 % interval",
        "",
        f"| policy | success in {fixed} episodes on the fixed init states | change vs SFT |",
        "|---|---|---|",
        f"| SFT (`vla_tiny`, images + instruction + state) | {rate(sft_rate)} | |",
        *(
            f"| {name} ({last_env_steps(evals)} env steps) | **{rate(final)}** "
            f"| {100 * (final - sft_rate):+.0f} points |"
            for name, (_, evals, final) in results.items()
        ),
        "",
    ]  # fmt: skip
    if args.tasks:  # success per task, before and after
        finals = {name: json.loads((run_dir / "eval.json").read_text()) for name, (run_dir, _, _) in results.items()}
        lines += [
            "| task | instruction | SFT | " + " | ".join(f"after {name}" for name in results) + " |",
            "|---|---|---|" + "---|" * len(results),
        ]
        for task in tasks:
            before = sft_result["success_by_task"][task]
            cells = [rate(before["success_rate"], before["episodes"])]
            for result in finals.values():
                after = result["success_by_task"][task]
                change = 100 * (after["success_rate"] - before["success_rate"])
                cells.append(f"{rate(after['success_rate'], after['episodes'])} ({change:+.0f})")
            lines.append(f"| {task} | {TASKS[task].instruction} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [f"![evaluation curves]({curve.name})", ""]
    report = "\n".join(lines)
    # Hand-written notes (what was tried before, with its budget) below the marker survive a regenerated report.
    if args.out.is_file() and NOTES_MARKER in args.out.read_text():
        report += "\n" + NOTES_MARKER + args.out.read_text().split(NOTES_MARKER, 1)[1]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(report)


def plot(runs: dict[str, list[dict]], sft_rate: float, path: Path, tasks: list[str], fixed: int) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, evals in runs.items():
        steps = [int(e["env_steps"]) for e in evals]
        rates = [float(e["eval_success_rate"]) for e in evals]
        bounds = [wilson_ci95(round(r * fixed), fixed)[1:] for r in rates]
        ax.plot(steps, rates, marker="o", label=label)
        ax.fill_between(steps, [b[0] for b in bounds], [b[1] for b in bounds], alpha=0.15)
    ax.axhline(sft_rate, color="grey", linestyle="--", label="SFT")
    top = max([sft_rate, *(float(e["eval_success_rate"]) for evals in runs.values() for e in evals)])
    ax.set_xlabel("Environment steps")
    ax.set_ylabel(f"Success rate ({fixed} episodes, fixed init states)")
    ax.set_ylim(0, min(1.0, max(0.3, 2 * top)))
    ax.set_title(f"Tabletop {', '.join(tasks)}: RL fine-tuning of the tiny VLA (images + instruction)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
