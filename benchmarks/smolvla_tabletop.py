"""A user's LeRobot SmolVLA checkpoint, trained on their demos, fine-tuned with PPO + ``flow_noise`` on CPU.

    MUJOCO_GL=egl python benchmarks/smolvla_tabletop.py [--task LiftCube] [--episodes 200] [--demo-noise 0.1]
        [--image-size 64] [--pretrain-steps 5000] [--batch-size 32] [--pretrain-lr 1e-3] [--iterations 10]
        [--work-dir runs/bench_smolvla_tabletop] [--out benchmarks/results/smolvla_tabletop.md]
        [--ppo KEY=VALUE ...] [--fresh]

The story it measures: a user holds a SmolVLA checkpoint in LeRobot's layout, trained on their own demonstrations,
and fine-tunes it with RL. LeRobot cannot run here, so the user's checkpoint is made with our implementation from
the tiny random LeRobot SmolVLA of ``tests/fixtures/smolvla`` (its SmolVLM-tiny VLM frozen, as SmolVLA trains):

1. ``robo-rlft collect`` records the scripted expert's demonstrations with both cameras and the instruction;
2. ``robo-rlft pretrain policy=smolvla policy.pretrained=<fixture>`` fits the fixture's action expert to them
   (flow matching, the normalisation taken from the demos) and evaluates it on the task's 50 fixed init states;
3. :func:`policies.smolvla_lerobot.export_lerobot_checkpoint` writes that policy in LeRobot's layout: the user's
   checkpoint;
4. ``robo-rlft finetune policy=smolvla policy.pretrained=<export> policy.noise.scheme=flow_noise`` (PPO) evaluates
   the imported checkpoint (iteration 0), fine-tunes it and evaluates it again.

Success rates are deterministic evaluations on the 50 fixed init states (Wilson 95 % CIs). Every CLI command is
printed in the report with its wall time. A stage is skipped when its output exists and its command is unchanged
since it ran (``--fresh`` reruns all); a stage that reruns reruns every later one.
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
from vla_tabletop import FIXED_INIT_STATES, NOTES_MARKER, ROBO

from robo_rlft.stats import wilson_ci95

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "smolvla"
EXPORT_STAGE = "export"


def export_sft(sft_run: Path, export_dir: Path) -> dict[str, int]:
    """Write the SFT run's policy in LeRobot's layout at ``export_dir``; returns its parameter counts."""
    from policies.checkpoint import load_policy
    from policies.smolvla_lerobot import export_lerobot_checkpoint

    policy, _ = load_policy(sft_run / "final", "smolvla")
    export_lerobot_checkpoint(policy, export_dir)
    return policy.parameter_counts()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="LiftCube")
    parser.add_argument("--episodes", type=int, default=200, help="demonstration episodes")
    parser.add_argument("--demo-noise", type=float, default=0.1, help="collect.action_noise of the scripted expert")
    parser.add_argument(
        "--image-size", type=int, default=64, help="env.image_size (the fixture's image features are 64 px)"
    )
    parser.add_argument("--pretrain-steps", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=32, help="pretrain.batch_size")
    parser.add_argument("--pretrain-lr", type=float, default=1e-3, help="pretrain.lr")
    parser.add_argument("--iterations", type=int, default=10, help="PPO iterations")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=Path("runs/bench_smolvla_tabletop"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/smolvla_tabletop.md"))
    parser.add_argument("--ppo", nargs="*", default=[], help="extra overrides of the PPO run")
    parser.add_argument("--fresh", action="store_true", help="rerun every stage, even those already done")
    args = parser.parse_args()
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = ["env=tabletop", f"env.task={args.task}", "env.cameras=[agentview,wrist]"]
    env += [f"env.image_size={args.image_size}", f"seed={args.seed}", "torch_threads=1"]
    vlm = f"policy.vlm_path={FIXTURES / 'SmolVLM-tiny'}"
    data, sft, export, ppo = work / "data", work / "sft", work / "export", work / "ppo"
    collect = ["collect", *env, f"collect.episodes={args.episodes}", f"collect.action_noise={args.demo_noise}"]
    collect.append(f"run_dir={data}")
    pretrain = ["pretrain", "policy=smolvla", f"policy.pretrained={FIXTURES / 'checkpoint'}", vlm, *env]
    pretrain += [f"pretrain.dataset={data / 'dataset.npz'}", f"pretrain.gradient_steps={args.pretrain_steps}"]
    pretrain += [f"pretrain.batch_size={args.batch_size}", f"pretrain.lr={args.pretrain_lr}"]
    pretrain += [f"pretrain.eval_episodes={FIXED_INIT_STATES}", f"run_dir={sft}"]
    export_code = (
        "from policies.checkpoint import load_policy; from policies.smolvla_lerobot import export_lerobot_checkpoint; "
        f'export_lerobot_checkpoint(load_policy("{sft / "final"}", "smolvla")[0], "{export}")'
    )
    # PPO: the experiment=tabletop preset (32 envs, actor lr 3e-5, evaluation every 5 iterations on the 50 states).
    finetune = ["finetune", "experiment=tabletop", "policy=smolvla", f"policy.pretrained={export}", vlm, *env]
    finetune += ["policy.noise.scheme=flow_noise", f"algo.iterations={args.iterations}"]
    finetune += [f"algo.eval_episodes={FIXED_INIT_STATES}", *args.ppo, f"run_dir={ppo}"]

    stages = {
        "collect": (collect, data / "dataset.npz"),
        "pretrain": (pretrain, sft / "eval.json"),
        EXPORT_STAGE: (["python", "-c", export_code], export / "config.json"),
        "finetune": (finetune, ppo / "eval.json"),
    }
    record_file = work / "stages.json"
    record = json.loads(record_file.read_text()) if record_file.is_file() and not args.fresh else {}
    rerun = False
    for name, (argv, done) in stages.items():
        rerun = rerun or not done.exists() or record.get(name, {}).get("argv") != argv
        if not rerun:
            print(f"[{time.strftime('%H:%M:%S')}] {name}: done ({done})", file=sys.stderr)
            continue
        shutil.rmtree(done.parent, ignore_errors=True)  # a run_dir must be new
        command = shlex.join(argv) if name == EXPORT_STAGE else shown(argv)
        print(f"[{time.strftime('%H:%M:%S')}] {command}", file=sys.stderr)
        if name == EXPORT_STAGE:
            tic = time.perf_counter()
            counts = export_sft(sft, export)
            record[name] = {"argv": argv, "seconds": time.perf_counter() - tic, "parameters": counts}
        else:
            record[name] = {"argv": argv, "seconds": run([*ROBO, *argv, "progress=false"], work / f"{name}.log")}
        record_file.write_text(json.dumps(record, indent=2))

    report = render(args, record, stages, data, sft, ppo)
    # Hand-written notes (what was tried before, with its budget) below the marker survive a regenerated report.
    if args.out.is_file() and NOTES_MARKER in args.out.read_text():
        report += "\n" + NOTES_MARKER + args.out.read_text().split(NOTES_MARKER, 1)[1]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(report)


def rate(p: float) -> str:
    """``k/50 = p % [lo, hi]`` with the Wilson 95 % interval of a success rate on the fixed init states."""
    successes = round(p * FIXED_INIT_STATES)
    _, lo, hi = wilson_ci95(successes, FIXED_INIT_STATES)
    return f"{successes}/{FIXED_INIT_STATES} = {100 * p:.0f} % [{100 * lo:.0f}, {100 * hi:.0f}]"


def render(
    args: argparse.Namespace, record: dict, stages: dict[str, tuple[list[str], Path]], data: Path, sft: Path, ppo: Path
) -> str:
    """The markdown report from the runs' outputs."""
    from robo_rlft.data import load_dataset

    demos = json.loads((data / "collect.json").read_text())
    demo_success = load_dataset(data / "dataset.npz").meta["success_rate"]
    sft_rate = json.loads((sft / "eval.json").read_text())["success_rate"]
    with open(ppo / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    evals = [r for r in rows if r.get("eval_success_rate")]
    before, after = float(evals[0]["eval_success_rate"]), json.loads((ppo / "eval.json").read_text())["success_rate"]
    best = max(evals, key=lambda r: float(r["eval_success_rate"]))
    updates = [r for r in rows if r.get("ratio_first_minibatch")]
    ratios = [float(r["ratio_first_minibatch"]) for r in updates]
    # Iterations in which no episode ended log no rollout success.
    rollout_success = [f"{100 * float(r['success_rate']):.0f}" for r in updates if r.get("success_rate")]
    counts = record[EXPORT_STAGE]["parameters"]

    def step(name: str) -> str:
        argv, _ = stages[name]
        command = shlex.join(argv) if name == EXPORT_STAGE else shown(argv)
        return f"  - {name}: `{command}` ({record[name]['seconds'] / 60:.1f} min)"

    total = sum(stage["seconds"] for stage in record.values()) / 60
    lines = [
        f"# A LeRobot SmolVLA checkpoint trained on demos, fine-tuned with PPO + `flow_noise`: {args.task}, CPU",
        "",
        f"- command: `MUJOCO_GL=egl OMP_NUM_THREADS=1 python {shlex.join(sys.argv)}`",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; 2-core CPU shared with other work "
        f"(`torch_threads=1`), no GPU; {total:.1f} min in all",
        "- the steps it ran (run directories under the work dir):",
        *(step(name) for name in stages),
        f"- demonstrations: {demos['episodes']} episodes, {demos['steps']:,} steps from the scripted expert with "
        f"action noise {args.demo_noise} (it succeeded in {100 * demo_success:.0f} % of them), agentview and wrist "
        f"images at {args.image_size} px (the policy resizes them to its 32 px with padding), the instruction",
        "- the model: the tiny random LeRobot SmolVLA of `tests/fixtures/smolvla` (chunk 8, 4 denoising steps, "
        f"n_action_steps 4 = `env.act_steps`): {counts['vlm']:,} VLM parameters (frozen, random: they never saw an "
        f"image), {counts['expert']:,} in the action expert and projections ({counts['trainable']:,} trainable "
        "in RL, with the noise head)",
        f"- SFT: {args.pretrain_steps} gradient steps of batch {args.batch_size}, lr {args.pretrain_lr:g} "
        "(cosine to a tenth), EMA 0.995, flow-matching loss; the VLM frozen, the state projection trained "
        "(LeRobot's `train_state_proj`)",
        f"- PPO: {int(rows[-1]['iteration'])} iteration(s), {int(rows[-1]['env_steps']):,} env steps "
        f"(`experiment=tabletop`: 32 envs; {' '.join(args.ppo) or 'no further overrides'})",
        f"- evaluation: deterministic sampler on the task's {FIXED_INIT_STATES} fixed init states, success count "
        "and rate with a Wilson 95 % interval",
        "",
        "| policy | success on the 50 fixed init states |",
        "|---|---|",
        f"| SFT run (our checkpoint, `pretrain`'s evaluation) | {rate(sft_rate)} |",
        f"| the user's checkpoint: the LeRobot export of it, imported (PPO iteration 0) | {rate(before)} |",
        f"| after PPO + `flow_noise` ({int(rows[-1]['env_steps']):,} env steps) | **{rate(after)}** |",
        f"| best evaluation during PPO (iteration {int(best['iteration'])}) "
        f"| {rate(float(best['eval_success_rate']))} |",
        "",
        f"**Change: {100 * (after - before):+.0f} points** (after PPO vs the imported checkpoint).",
        "",
        f"- `train/ratio_first_minibatch` of the first PPO iteration: **{ratios[0]:.6f}** (the update re-scores the "
        f"stored chains before any step; max |ratio - 1| over all {len(ratios)} iterations: "
        f"{max(abs(r - 1) for r in ratios):.1e})",
        f"- rollout success of the noisy policy per iteration (%): {', '.join(rollout_success) or 'no episode ended'}",
        "",
    ]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
