"""Rollout workers (``scale=``): env steps/s of PPO rollouts in this process vs in Ray actors, on this machine.

Two cases, measured in one run of this script with one Ray instance (``ray.init(num_cpus=3)``, shut down at the end):

(1) env-bound: the tabletop with images (``env=tabletop env.task=LiftCube env.cameras=[agentview,wrist]``, both
    cameras rendered at ``env.image_size``) and a randomly initialised ``policy=vla_tiny`` (the tiny random
    Idefics3 VLM + action expert, built as ``robo-rlft pretrain`` builds it) with PPO's critic.
(2) cheap env: Hopper with the built-in ``hopper_flow`` checkpoint (a small MLP flow policy) and PPO's critic.

For each case, three sets of rollout workers over the same total envs ``N``: ``scale=local`` (one worker, in this
process: the single-process loop), ``scale=ray scale.num_workers=1`` and ``scale=ray scale.num_workers=2`` (N/2
envs each). Each set collects one untimed warm-up rollout, then ``--iterations`` rounds in which every set calls
``workers.collect_ppo(policy, critic, iteration)`` once, in turn, so drift in machine load hits all alike. Env
steps/s = ``rollout.env_steps`` / wall time of that call (for Ray: the weight broadcast through the object store,
the actors' rollouts and the concatenation). Ratios to the single-process loop are taken round by round; figures
are the median (min–max) over the rounds.

Usage:
    MUJOCO_GL=egl python benchmarks/scale_throughput.py [--tabletop-envs 8 --tabletop-steps 50 \
        --hopper-envs 8 --hopper-steps 250 --iterations 6 --out benchmarks/results/scale_throughput.md]

The defaults take about 3-4 minutes on 2 cores. Every number is wall-clock: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray
import torch
from rollout_throughput import load_average, spread  # benchmarks/rollout_throughput.py

from envs import make_env
from policies.checkpoint import load_policy
from policies.critic import ValueCritic
from policies.registry import policy_classes
from robo_rlft.cli import compose_config
from robo_rlft.commands import _env_dims, _new_policy, _with_checkpoint_architecture
from robo_rlft.observations import ObservationAdapter
from robo_rlft.scale import LocalRolloutWorkers, RayRolloutWorkers

HOPPER_CHECKPOINT = Path(__file__).resolve().parents[1] / "robo_rlft" / "assets" / "checkpoints" / "hopper_flow"
TABLETOP = ["env=tabletop", "env.task=LiftCube", "env.cameras=[agentview,wrist]", "policy=vla_tiny"]
HOPPER = ["env=hopper"]
SETS = (  # (label, scale overrides)
    ("single-process loop", ["scale=local", "scale.num_workers=1"]),
    ("Ray, 1 actor", ["scale=ray", "scale.num_workers=1"]),
    ("Ray, 2 actors", ["scale=ray", "scale.num_workers=2"]),
)
RAY_CPUS = 3  # logical CPUs: the 1-actor and the 2-actor sets are alive at the same time (1 CPU reserved each)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tabletop-envs", type=int, default=8, help="total envs N of case (1) (even)")
    parser.add_argument("--tabletop-steps", type=int, default=50, help="algo.steps_per_iteration of case (1)")
    parser.add_argument("--image-size", type=int, default=128, help="env.image_size of case (1)")
    parser.add_argument("--hopper-envs", type=int, default=8, help="total envs N of case (2) (even)")
    parser.add_argument("--hopper-steps", type=int, default=250, help="algo.steps_per_iteration of case (2)")
    parser.add_argument("--iterations", type=int, default=6, help="timed rounds per case, after one warm-up")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/scale_throughput.md"))
    args = parser.parse_args(argv)
    if args.tabletop_envs % 2 or args.hopper_envs % 2 or min(args.tabletop_envs, args.hopper_envs) < 2:
        parser.error("--tabletop-envs and --hopper-envs must be even (2 actors split them).")
    if min(args.tabletop_steps, args.hopper_steps, args.iterations) < 1:
        parser.error("--tabletop-steps, --hopper-steps and --iterations must be >= 1.")
    return args


def cpu_times() -> tuple[float, float]:
    """``(busy, total)`` jiffies of the whole machine (all cores), from ``/proc/stat``."""
    with open("/proc/stat") as f:
        values = [float(x) for x in f.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def own_cpu_seconds() -> dict[int, float]:
    """CPU seconds (user + system) of this process and its descendants (the local Ray instance: GCS, raylet, the
    actors), by pid."""
    parents, times = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry)] = int(fields[1])
        times[int(entry)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    ours, frontier = {os.getpid()}, [os.getpid()]
    while frontier:
        pid = frontier.pop()
        children = [child for child, parent in parents.items() if parent == pid and child not in ours]
        ours.update(children)
        frontier.extend(children)
    return {pid: times[pid] for pid in ours if pid in times}


@dataclass
class CaseResult:
    title: str
    overrides: list[str]
    policy_desc: str
    env_steps: int = 0  # per collect_ppo call
    weights_mb: float = 0.0
    steps_per_s: dict[str, list[float]] = field(default_factory=dict)
    call_s: dict[str, list[float]] = field(default_factory=dict)
    ratios: dict[str, list[float]] = field(default_factory=dict)
    broadcast_ms: list[float] = field(default_factory=list)
    setup_s: dict[str, float] = field(default_factory=dict)
    load_before: str = ""
    load_after: str = ""
    wall_s: float = 0.0
    busy_cores: float = 0.0  # whole machine, all processes (ours and others), averaged over the timed rounds
    own_cores: float = 0.0  # this script and its Ray processes, averaged over the timed rounds
    raw_env: str = ""


def tabletop_policy(cfg):
    """A random ``policy=vla_tiny`` shaped for the camera env, as ``robo-rlft pretrain`` builds a new policy."""
    adapter = ObservationAdapter.for_policy(policy_classes(cfg.policy.name)[0], cfg.policy)
    obs_dim, action_dim = _env_dims(cfg.env.env_id, cfg.env.make_kwargs(), adapter)
    torch.manual_seed(0)
    return _new_policy(cfg, obs_dim, action_dim), cfg


def hopper_policy(cfg):
    """The built-in checkpoint with the config's fine-tuning noise, as ``robo-rlft finetune env=hopper`` loads it."""
    policy, _ = load_policy(HOPPER_CHECKPOINT)
    policy = policy.configure_finetuning(cfg.policy)
    return policy, _with_checkpoint_architecture(cfg, policy)


def raw_env_steps_per_s(cfg, steps: int = 300) -> str:
    """One env of the case (no chunking, no policy) stepped with random actions, with and without its cameras."""
    rates = []
    for cameras in (True, False):
        env = make_env(cfg.env.env_id, flatten=False, **cfg.env.make_kwargs(cameras=cameras))
        try:
            env.reset(seed=0)
            env.action_space.seed(0)
            tic = time.perf_counter()
            for _ in range(steps):
                _, _, terminated, truncated, _ = env.step(env.action_space.sample())
                if terminated or truncated:
                    env.reset()
            rates.append(steps / (time.perf_counter() - tic))
        finally:
            env.close()
    return (
        f"the env alone (one env, random actions, no policy): {rates[0]:,.0f} steps/s with its cameras rendered, "
        f"{rates[1]:,.0f} steps/s without them"
    )


def run_case(title: str, overrides: list[str], num_envs: int, build, iterations: int, policy_desc: str) -> CaseResult:
    result = CaseResult(title, overrides, policy_desc, load_before=load_average())
    tic = time.perf_counter()
    base = [*overrides, f"env.num_envs={num_envs}", "torch_threads=1"]
    policy, cfg0 = build(compose_config([*base, *SETS[0][1]]))
    if cfg0.env.cameras:
        result.raw_env = raw_env_steps_per_s(cfg0)
    adapter = ObservationAdapter.for_policy(policy, critic_input=getattr(cfg0.policy, "critic_input", "prefix"))
    torch.manual_seed(1)
    critic = ValueCritic(adapter.critic_dim(policy), cfg0.policy.critic)
    result.weights_mb = sum(t.numel() * t.element_size() for m in (policy, critic) for t in m.state_dict().values())
    result.weights_mb /= 2**20
    worker_sets = {}
    try:
        for label, scale in SETS:
            cfg = compose_config([*base, *scale])
            if cfg0.policy != compose_config([*base, *SETS[0][1]]).policy:  # a checkpoint's architecture
                cfg = _with_checkpoint_architecture(cfg, policy)
            t0 = time.perf_counter()
            workers = (LocalRolloutWorkers if cfg.scale.backend == "local" else RayRolloutWorkers)(cfg, policy, critic)
            worker_sets[label] = workers
            workers.collect_ppo(policy, critic, 0)  # warm-up (Ray: actors up, envs and policy warm)
            result.setup_s[label] = time.perf_counter() - t0
            ready = f"{title}: {label} ready ({result.setup_s[label]:.1f} s)"
            print(f"[{time.strftime('%H:%M:%S')}] {ready}", file=sys.stderr)
        busy0, total0 = cpu_times()
        own0, rounds_tic = own_cpu_seconds(), time.perf_counter()
        for iteration in range(1, iterations + 1):
            per_set = {}
            for label, workers in worker_sets.items():
                t0 = time.perf_counter()
                rollout = workers.collect_ppo(policy, critic, iteration)
                wall = time.perf_counter() - t0
                result.env_steps = rollout.env_steps
                per_set[label] = rollout.env_steps / wall
                result.steps_per_s.setdefault(label, []).append(per_set[label])
                result.call_s.setdefault(label, []).append(wall)
            for label, value in per_set.items():
                result.ratios.setdefault(label, []).append(value / per_set[SETS[0][0]])
            print(
                f"[{time.strftime('%H:%M:%S')}] {title} round {iteration}: "
                + ", ".join(f"{k} {v:,.0f}/s" for k, v in per_set.items()),
                file=sys.stderr,
            )
        busy1, total1 = cpu_times()
        own1, rounds_wall = own_cpu_seconds(), time.perf_counter() - rounds_tic
        result.busy_cores = (os.cpu_count() or 1) * (busy1 - busy0) / max(total1 - total0, 1.0)
        result.own_cores = sum(t - own0.get(pid, 0.0) for pid, t in own1.items()) / rounds_wall
        ray_workers = worker_sets[SETS[1][0]]
        for _ in range(5):  # the weight broadcast alone (part of every Ray collect_ppo)
            t0 = time.perf_counter()
            ray_workers._broadcast(policy, critic)
            result.broadcast_ms.append(1e3 * (time.perf_counter() - t0))
    finally:
        for workers in worker_sets.values():
            workers.close()
    result.wall_s = time.perf_counter() - tic
    result.load_after = load_average()
    return result


def case_lines(case: CaseResult, num_envs: int, steps: int) -> list[str]:
    overrides = " ".join([*case.overrides, f"env.num_envs={num_envs}", "torch_threads=1"])
    lines = [
        f"## {case.title}",
        "",
        f"- overrides: `{overrides}` + each row's scale overrides",
        f"- policy: {case.policy_desc}; weights broadcast per Ray rollout (policy + critic): "
        f"{case.weights_mb:.1f} MiB, `ray.put` {spread(case.broadcast_ms, '{:.1f}')} ms",
        f"- {case.env_steps:,} env steps per `collect_ppo` call; load average (1/5/15 min) before / after the case: "
        f"{case.load_before} → {case.load_after}; machine CPU busy during the timed rounds (all processes): "
        f"{case.busy_cores:.2f} of {os.cpu_count()} cores, of which this script and its Ray processes "
        f"{case.own_cores:.2f} and other processes {max(case.busy_cores - case.own_cores, 0.0):.2f}; "
        f"the case took {case.wall_s:.0f} s",
        *([f"- {case.raw_env}"] if case.raw_env else []),
        "",
        "| workers (same total envs) | scale overrides | envs per worker | s per `collect_ppo` | env steps/s "
        "| × single-process loop | setup + warm-up, s |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, scale in SETS:
        workers = int(scale[1].split("=")[1])
        ratio = spread(case.ratios[label], "{:.2f}")
        ratio = "1 (reference)" if label == SETS[0][0] else f"**{ratio}×**"
        lines.append(
            f"| {label} | `{' '.join(scale)}` | {num_envs // workers} | {spread(case.call_s[label], '{:.2f}')} "
            f"| {spread(case.steps_per_s[label])} | {ratio} "
            f"| {case.setup_s[label]:.1f} |"
        )
    lines.append("")
    return lines


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("MUJOCO_GL", "egl")
    torch.set_num_threads(1)
    started, tic = time.gmtime(), time.perf_counter()
    load_start = load_average()
    ray.init(num_cpus=RAY_CPUS, include_dashboard=False, logging_level="WARNING")
    try:
        tabletop = run_case(
            "(1) env-bound: tabletop LiftCube, two cameras, VLA",
            [*TABLETOP, f"env.image_size={args.image_size}", f"algo.steps_per_iteration={args.tabletop_steps}"],
            args.tabletop_envs,
            tabletop_policy,
            args.iterations,
            "random `policy=vla_tiny` (tiny random Idefics3 VLM, images resized to 32 px, action expert, "
            "5 denoising steps, H=8), `env.act_steps=4`",
        )
        hopper = run_case(
            "(2) cheap env: Hopper, MLP flow policy",
            [*HOPPER, f"algo.steps_per_iteration={args.hopper_steps}"],
            args.hopper_envs,
            hopper_policy,
            args.iterations,
            "the built-in `hopper_flow` checkpoint (MLP flow policy) with the default fine-tuning noise, "
            "`env.act_steps=4`",
        )
    finally:
        ray.shutdown()
    usable = len(os.sched_getaffinity(0))
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    lines = [
        "# Rollout workers: single-process loop vs Ray actors (`scale=`)",
        "",
        f"- command: `MUJOCO_GL={os.environ['MUJOCO_GL']} python {shlex.join(sys.argv)}`",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', started)} (took {time.perf_counter() - tic:.0f} s)",
        f"- machine: {cpu}, {os.cpu_count()} logical cores ({usable} usable), no GPU; python "
        f"{platform.python_version()}, torch {torch.__version__} (`torch_threads=1` in the driver and every actor), "
        f"ray {ray.__version__}, numpy {np.__version__}",
        f"- Ray: one local instance for the whole run, `ray.init(num_cpus={RAY_CPUS})` (logical CPUs: the 1-actor and "
        "2-actor sets are alive together, `scale.cpus_per_worker=1` each), shut down at the end",
        f"- load average (1/5/15 min) at the start: {load_start}",
        f"- method: per case, one warm-up `collect_ppo` per worker set, then {args.iterations} rounds in which each "
        "set collects once in turn; env steps/s = `rollout.env_steps` / wall time of `workers.collect_ppo(policy, "
        "critic, iteration)`; ratios taken round by round; median (min–max) over the rounds",
        "",
        *case_lines(tabletop, args.tabletop_envs, args.tabletop_steps),
        *case_lines(hopper, args.hopper_envs, args.hopper_steps),
    ]
    report = "\n".join(lines)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(report)


if __name__ == "__main__":
    main()
