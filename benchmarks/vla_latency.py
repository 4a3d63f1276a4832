"""VLA cost on this machine: inference latency per action chunk, re-scoring and SFT throughput.

    python benchmarks/vla_latency.py [--vlm-path tiny] [--threads 1] [--out benchmarks/results/vla_latency.md]

Times the policy's own calls (median of repeated runs after a warm-up) for the tiny preset by default
(``policy=vla_tiny``: random tiny Idefics3 + action expert), with two 128x128 tabletop camera images, and
prints a markdown table that is also written to ``--out``. The "VLM forward" row is the cost that prefix
caching saves K-1 times per chunk (sampling) and per observation (re-scoring).
"""

from __future__ import annotations

import argparse
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from policies.vla import VLAObservation, VLAPolicy, VLAPolicyConfig

STATE_DIM, ACTION_DIM, IMAGE_SIZE = 8, 7, 128


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def observations(batch: int) -> VLAObservation:
    gen = torch.Generator().manual_seed(0)
    images = {
        camera: torch.randint(0, 256, (batch, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=torch.uint8, generator=gen)
        for camera in ("agentview", "wrist")
    }
    state = torch.randn(batch, STATE_DIM, generator=gen)
    return VLAObservation(images, ["put the red cube on the plate"] * batch, state)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vlm-path", default="tiny", help="'tiny' or a local transformers VLM directory")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: see tests/conftest.py)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/vla_latency.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    # The vla_tiny preset's expert (configs/policy/vla_tiny.yaml).
    config = VLAPolicyConfig(
        vlm_path=args.vlm_path, horizon=8, denoising_steps=5, expert_width=64, expert_layers=2, expert_heads=4
    )
    policy = VLAPolicy(STATE_DIM, ACTION_DIM, config)
    lora = VLAPolicy(STATE_DIM, ACTION_DIM, VLAPolicyConfig(**{**config.__dict__, "lora_rank": 8}))
    counts = policy.parameter_counts()
    rows: list[tuple[str, str]] = []

    one, rollout, train = observations(1), observations(16), observations(32)
    with torch.no_grad():
        vlm = median_seconds(lambda: policy.backbone(one, config.cameras), args.repeats)
        chunk = median_seconds(lambda: policy.sample(one, deterministic=True), args.repeats)
        chunk_noisy = median_seconds(lambda: policy.sample(one), args.repeats)
        batch16 = median_seconds(lambda: policy.sample(rollout), args.repeats)
        sample = policy.sample(rollout)
        rescore = median_seconds(
            lambda: policy.log_prob_and_entropy(rollout, sample.chain, sample.stochastic), args.repeats
        )
    rows += [
        ("VLM forward (prefix), B=1", f"{vlm * 1e3:.1f} ms"),
        (
            f"chunk latency, deterministic (K={config.denoising_steps}, H={config.horizon}), B=1",
            f"{chunk * 1e3:.1f} ms",
        ),
        ("chunk latency, flow_noise, B=1", f"{chunk_noisy * 1e3:.1f} ms"),
        (
            f"K VLM forwards a policy without prefix caching would add, B=1 (x{config.denoising_steps - 1})",
            f"{(config.denoising_steps - 1) * vlm * 1e3:.1f} ms",
        ),
        ("sample, B=16 (per chunk)", f"{batch16 / 16 * 1e3:.2f} ms"),
        ("re-score stored chains, B=16 (one batched expert forward)", f"{rescore * 1e3:.1f} ms"),
    ]

    actions = torch.rand(32, config.horizon, ACTION_DIM) * 2 - 1
    for name, model in (("frozen VLM", policy), ("LoRA r=8", lora)):
        optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step(model: VLAPolicy = model, optimiser: torch.optim.Optimizer = optimiser) -> None:
            loss = model.pretrain_loss(train, actions)["flow_matching"]
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()

        seconds = median_seconds(step, max(5, args.repeats // 3))
        rows.append((f"SFT step, B=32, {name}", f"{seconds * 1e3:.0f} ms ({32 / seconds:.0f} samples/s)"))

    header = (
        f"# VLA latency ({args.vlm_path!r} VLM)\n\n"
        f"- command: `{shlex.join(['python', *sys.argv])}`\n"
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n"
        f"CPU: {cpu_model()}, {args.threads} torch threads, torch {torch.__version__}. Two {IMAGE_SIZE}x{IMAGE_SIZE} "
        f"cameras resized to the VLM's {policy.backbone.image_size}px. Parameters: backbone {counts['backbone']:,}, "
        f"expert {counts['expert']:,}, noise head {counts['noise']:,}; trainable {counts['trainable']:,} "
        f"(LoRA r=8: {lora.parameter_counts()['trainable']:,}). Medians of {args.repeats} runs.\n\n"
    )
    table = "| measurement | value |\n|---|---|\n" + "".join(f"| {name} | {value} |\n" for name, value in rows)
    print(header + table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(header + table)


if __name__ == "__main__":
    main()
