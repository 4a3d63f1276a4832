"""Tabletop suite: every task's scripted expert on its 50 fixed evaluation init states, and the env's speed.

For every task in ``envs.tabletop.tasks.TASKS`` (four suites: spatial, object, goal, long):

(a) the scripted expert (``envs.tabletop.expert.expert_for``) runs one episode from each of the task's
    :data:`~envs.tabletop.tasks.NUM_EVAL_INIT_STATES` fixed init states, in ``delta_ee`` action mode, at each
    ``--noise`` level (the expert's own noise knob, seeded per episode), up to the task's horizon; the table
    gives the success rate, the mean episode length of successful episodes and the wall time. The issue asks
    for >= 90 % at noise 0 on every task.
(b) env steps/s of one env with uniform random actions, state only and with both 128 px cameras
    (``agentview`` + ``wrist``), resetting on termination / truncation. Wall-clock rate and the rate in this
    process's CPU time (``time.process_time``, less sensitive to other load on a shared machine).

Usage:
    MUJOCO_GL=egl python benchmarks/tabletop_experts.py [--noise 0 0.1 --steps 1000 --camera-steps 200 \
        --tasks PickCubeOntoPlate ... --out benchmarks/results/tabletop_experts.md]

The defaults take about 1.5-2 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# Sibling benchmark script (importable because this one runs as a script from benchmarks/).
from rollout_throughput import load_average, machine_info, write_report

from envs.tabletop.env import TabletopEnv
from envs.tabletop.expert import expert_for, rollout_expert
from envs.tabletop.tasks import NUM_EVAL_INIT_STATES, SUITES, TASKS, TaskSpec

TARGET_SUCCESS = 0.9  # the acceptance bar for every expert at noise 0
TARGET_STATE_RATE = 1000.0  # env steps/s, state only, random actions
TARGET_CAMERA_RATE = 100.0  # env steps/s with both 128 px cameras


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.1], help="expert noise levels")
    parser.add_argument("--steps", type=int, default=1000, help="random-action steps timed per task, state only")
    parser.add_argument("--camera-steps", type=int, default=200, help="random-action steps timed with cameras")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), help="tasks to run (default: all)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/tabletop_experts.md"))
    args = parser.parse_args(argv)
    unknown = [name for name in args.tasks if name not in TASKS]
    if unknown:
        parser.error(f"unknown --tasks {unknown}; allowed: {list(TASKS)}.")
    if min(args.noise) < 0:
        parser.error(f"--noise levels must be >= 0, got {args.noise}.")
    if args.steps < 1 or args.camera_steps < 0:
        parser.error(f"need --steps >= 1 and --camera-steps >= 0, got {args.steps}, {args.camera_steps}.")
    return args


@dataclass
class ExpertResult:
    successes: int
    mean_success_steps: float
    wall_s: float


def run_expert(task: TaskSpec, noise: float) -> ExpertResult:
    """The expert from every fixed init state; episode ``i`` seeds the expert's noise with ``i``."""
    env = TabletopEnv(task)
    start = time.perf_counter()
    lengths = []
    try:
        for i in range(NUM_EVAL_INIT_STATES):
            success, steps = rollout_expert(env, expert_for(env, noise=noise, seed=i), init_state=i)
            if success:
                lengths.append(steps)
    finally:
        env.close()
    mean_steps = sum(lengths) / len(lengths) if lengths else float("nan")
    return ExpertResult(len(lengths), mean_steps, time.perf_counter() - start)


def random_action_rate(task: TaskSpec, steps: int, cameras: tuple[str, ...] = ()) -> tuple[float, float]:
    """(wall-clock, CPU-time) env steps/s of one env under uniform random actions."""
    env = TabletopEnv(task, cameras=cameras, image_size=128)
    try:
        env.reset(seed=0)
        env.action_space.seed(0)
        actions = [env.action_space.sample() for _ in range(steps)]
        wall, cpu = time.perf_counter(), time.process_time()
        for action in actions:
            _, _, terminated, truncated, _ = env.step(action)
            if terminated or truncated:
                env.reset()
        return steps / (time.perf_counter() - wall), steps / (time.process_time() - cpu)
    finally:
        env.close()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    command = shlex.join(["python", *sys.argv])
    if "MUJOCO_GL" in os.environ:
        command = f"MUJOCO_GL={os.environ['MUJOCO_GL']} {command}"
    started = datetime.datetime.now().astimezone()
    load_before = load_average()
    tasks = [TASKS[name] for name in args.tasks]

    expert_rows = []
    for task in tasks:
        results = []
        for noise in args.noise:
            print(f"expert {task.name} noise={noise:g}", file=sys.stderr)
            results.append(run_expert(task, noise))
        expert_rows.append((task, results))

    speed_rows = []
    for task in tasks:
        print(f"speed {task.name}", file=sys.stderr)
        state = random_action_rate(task, args.steps)
        camera = random_action_rate(task, args.camera_steps, ("agentview", "wrist")) if args.camera_steps else None
        speed_rows.append((task, state, camera))

    finished = datetime.datetime.now().astimezone()
    noise_header = " | ".join(f"success, noise {noise:g}" for noise in args.noise)
    expert_table = [
        f"| suite | task | instruction | horizon | {noise_header} | mean steps (noise {args.noise[0]:g}) | wall, s |",
        "|---|---|---|---|" + "---|" * len(args.noise) + "---|---|",
    ]
    clean_rates = []
    for task, results in sorted(expert_rows, key=lambda row: SUITES.index(row[0].suite)):
        rates = " | ".join(
            f"{r.successes}/{NUM_EVAL_INIT_STATES} ({r.successes / NUM_EVAL_INIT_STATES:.0%})" for r in results
        )
        clean_rates.append(results[0].successes / NUM_EVAL_INIT_STATES)
        expert_table.append(
            f"| {task.suite} | {task.name} | {task.instruction} | {task.horizon} | {rates} | "
            f"{results[0].mean_success_steps:.0f} | {sum(r.wall_s for r in results):.1f} |"
        )
    speed_table = [
        "| task | objects | state only, steps/s (wall) | state only, steps/s (CPU time) | "
        "2 × 128 px cameras, steps/s (wall) | cameras (CPU time) |",
        "|---|---|---|---|---|---|",
    ]
    for task, (state_wall, state_cpu), camera in speed_rows:
        camera_cells = f"{camera[0]:,.0f} | {camera[1]:,.0f}" if camera else "– | –"
        names = ", ".join(obj.name for obj in task.objects)
        speed_table.append(f"| {task.name} | {names} | {state_wall:,.0f} | {state_cpu:,.0f} | {camera_cells} |")
    worst = min(clean_rates)
    verdict = "meets" if worst >= TARGET_SUCCESS else "misses"
    report = "\n".join(
        [
            "# Tabletop suite: scripted experts on the fixed init states, and env speed",
            "",
            f"- command: `{command}`",
            f"- date: {started:%Y-%m-%d %H:%M %Z} (took {(finished - started).total_seconds():.0f} s)",
            *(f"- {key}: {value}" for key, value in machine_info().items()),
            f"- load average (1/5/15 min) before / after: {load_before} → {load_average()}",
            "",
            f"Every task's scripted expert (`expert_for`, `delta_ee` actions) from each of its "
            f"{NUM_EVAL_INIT_STATES} fixed init states (`envs/tabletop/init_states/<Task>.npz`), one episode each, "
            "up to the task's horizon; episode i seeds the expert's noise with i. Noise is the expert's Gaussian "
            "action noise in action units (0.1 = 5 mm / 0.05 rad per step). Mean steps: successful episodes only.",
            "",
            f"Worst task at noise {args.noise[0]:g}: {worst:.0%} — {verdict} the issue's bar of "
            f"{TARGET_SUCCESS:.0%} on every task.",
            "",
            "## Expert success on the fixed init states",
            "",
            *expert_table,
            "",
            "## Env speed: one env, uniform random actions",
            "",
            f"{args.steps} state-only steps and {args.camera_steps} steps with both 128 px cameras per task, resetting "
            f"on termination / truncation. Targets: ≥ {TARGET_STATE_RATE:,.0f} steps/s state only, "
            f"≥ {TARGET_CAMERA_RATE:,.0f} with cameras. CPU time counts only this process, so it is less "
            "disturbed by other load on a shared machine than wall-clock time.",
            "",
            *speed_table,
            "",
        ]
    )
    write_report(report, args.out)


if __name__ == "__main__":
    main()
