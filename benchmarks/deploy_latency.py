"""Deployment latency through ROS: observation published by the robot → command received by the robot.

    python benchmarks/deploy_latency.py [--samples 500] [--threads 1] [--out benchmarks/results/deploy_latency.md]

For ROS 2 (rclpy, this interpreter) and ROS 1 (rospy: the script re-runs itself under the ROS 1 interpreter,
``$ROBO_RLFT_ROS1_PYTHON`` or ``.venv-ros1/bin/python``, against a private ``roscore``), one process holds a robot
endpoint and a policy-side transport on loopback. Per sample the robot publishes a ``JointState`` (and, for the
VLA, one image per camera); the policy side, woken by the reception, assembles the observation
(:class:`~real_robot.observation.ObservationAssembler`), runs the policy's deterministic sampler
(:class:`~real_robot.observation.PolicyRunner` over a checkpoint), the action adapter and the safety layer, and
publishes a ``JointCommand``; the latency is the robot's reception stamp of that command minus the time it started
publishing. Cases:

- ``bare``: the policy side answers with the measured joints at once (the transport's own round trip);
- ``flow``: a random state flow policy (obs 8, joint actions 8, H=8, K=4, MLP 256x3) saved with
  ``policies.checkpoint``;
- ``vla_tiny``: ``policy=vla_tiny`` (random tiny Idefics3, ``delta_ee`` actions 7, H=8, K=5), cameras
  ``agentview`` + ``wrist`` at the policy's image size.

Medians and p99 over ``--samples`` samples (after a warm-up), one at a time (the next is published after the
previous command arrived), plus the policy side's compute alone (assemble → safety) for reference.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import xmlrpc.client
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
CASES: tuple[str, ...] = ("bare", "flow", "vla_tiny")
WARMUP = 20
SAMPLE_DEADLINE = 5.0  # s: a sample whose command does not arrive by then aborts the run
CAMERAS = ("agentview", "wrist")


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def make_checkpoints(directory: Path) -> dict[str, Path]:
    """The ``flow`` and ``vla_tiny`` checkpoints (random weights, fixed seeds)."""
    from policies.checkpoint import save_policy
    from policies.flow import FlowPolicy, FlowPolicyConfig
    from policies.vla import VLAPolicy, VLAPolicyConfig

    torch.manual_seed(0)
    flow = FlowPolicy(8, 8, FlowPolicyConfig(horizon=8, denoising_steps=4))
    with torch.no_grad():  # actions in the joint range around home, so the safety layer has real work
        flow.normalizer.action_min.fill_(-1.0)
        flow.normalizer.action_max.fill_(1.0)
    vla_config = VLAPolicyConfig(
        vlm_path="tiny", horizon=8, denoising_steps=5, expert_width=64, expert_layers=2, expert_heads=4
    )
    vla = VLAPolicy(8, 7, vla_config)
    return {
        "flow": save_policy(flow, directory / "flow", {"env": "tabletop", "act_steps": 8}),
        "vla_tiny": save_policy(vla, directory / "vla_tiny", {"env": "tabletop", "act_steps": 8}),
    }


class PolicySide:
    """Answers each new observation with one command, on its own thread (as the control loop's worker would).

    Args:
        transport: the policy side's transport.
        case: one of :data:`CASES`.
        checkpoint: the case's checkpoint (``None`` for ``bare``).
        cameras: the cameras an observation needs.
    """

    def __init__(self, transport: Any, case: str, checkpoint: Path | None, cameras: tuple[str, ...]) -> None:
        from real_robot.adapters import ActionAdapter, ArmKinematics
        from real_robot.observation import ObservationAssembler, PolicyRunner
        from real_robot.safety import SafetyLayer, SafetyLimits

        self.transport = transport
        self.case = case
        self.cameras = cameras
        self.kinematics = ArmKinematics()
        self.assembler = ObservationAssembler(self.kinematics, cameras, "put the red cube on the plate")
        self.runner = None if checkpoint is None else PolicyRunner.from_checkpoint(checkpoint)[0]
        self.adapter = ActionAdapter(self.kinematics, "joint" if case == "flow" else "delta_ee")
        self.safety = SafetyLayer(SafetyLimits(dt=0.05), self.kinematics)
        self.compute_seconds: list[float] = []
        self.wake = threading.Event()
        self.stop = threading.Event()
        # Woken by every reception; the transport's own subscription was created first and runs first (ROS 2's
        # executor and rospy both call a topic's callbacks in creation order), the 1 ms timeout covers the rest.
        ros, bus = transport.ros, transport.bus
        bus.subscribe(transport.topics.joint_states, ros.JointState, lambda _: self.wake.set())
        for camera in cameras:
            bus.subscribe(transport.topics.cameras[camera], ros.Image, lambda _: self.wake.set(), sensor_data=True)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        from real_robot.transport import JointCommand

        last_state, last_images = None, {}
        while not self.stop.is_set():
            self.wake.wait(0.001)
            self.wake.clear()
            state, images = self.transport.latest_joint_state(), self.transport.latest_images()
            if state is None or state is last_state or any(images.get(c) is last_images.get(c) for c in self.cameras):
                continue  # wait until the joint state and every image are new
            last_state, last_images = state, images
            tic = time.perf_counter()
            if self.runner is None:
                positions, gripper = state.positions[:7], None
            else:
                obs = self.assembler.assemble(state, images)
                chunk = self.runner(obs)  # (H, A)
                target = self.adapter.step(chunk[0], obs.joint_positions)
                safe, _ = self.safety.filter(target, obs.joint_positions)
                positions, gripper = safe.positions, safe.gripper
            command = JointCommand(self.kinematics.joint_names, positions, gripper, time.perf_counter())
            self.compute_seconds.append(time.perf_counter() - tic)
            self.transport.publish_joint_command(command)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


def measure(backend: str, case: str, checkpoint: Path | None, samples: int, image_size: int) -> dict[str, Any]:
    """One backend × case: latencies (s) of ``samples`` samples and the policy side's compute times (s)."""
    from envs.tabletop.robot import ARM_JOINTS, FINGER_JOINTS, HOME_QPOS
    from real_robot.transport import Image, JointState, Topics

    if backend == "ros2":
        from real_robot.ros2 import Ros2RobotEndpoint as Robot
        from real_robot.ros2 import Ros2Transport as Transport
    else:
        from real_robot.ros1 import Ros1RobotEndpoint as Robot
        from real_robot.ros1 import Ros1Transport as Transport

    cameras = CAMERAS if case == "vla_tiny" else ()
    prefix = f"/bench_{case}"
    topics = Topics(
        joint_states=f"{prefix}/joint_states",
        cameras={c: f"{prefix}/{c}/image_raw" for c in cameras},
        commands=f"{prefix}/commands",
    )
    # Both sides stamp receptions with perf_counter: latency = command stamp − publish start.
    transport = Transport(topics, clock=time.perf_counter)
    robot = Robot(topics, clock=time.perf_counter, joint_names=ARM_JOINTS)
    policy = PolicySide(transport, case, checkpoint, cameras)
    rng = np.random.default_rng(0)
    images = {c: Image(rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)) for c in cameras}
    state = JointState(ARM_JOINTS + FINGER_JOINTS, np.append(HOME_QPOS, [0.04, 0.04]))

    def publish() -> float:
        start = time.perf_counter()
        for camera, image in images.items():
            robot.publish_image(camera, image)
        robot.publish_joint_state(state)
        return start

    try:
        # Discovery / connection: re-publish until the first command comes back, then let stragglers drain.
        end = time.monotonic() + 10.0
        while robot.latest_joint_command() is None:
            if time.monotonic() > end:
                raise TimeoutError(f"{backend}/{case}: no command within 10 s (discovery failed?)")
            publish()
            time.sleep(0.05)
        time.sleep(0.3)
        latencies = []
        for i in range(WARMUP + samples):
            previous = robot.latest_joint_command()
            start = publish()
            deadline = time.monotonic() + SAMPLE_DEADLINE
            while (command := robot.latest_joint_command()) is previous:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{backend}/{case}: sample {i} got no command within {SAMPLE_DEADLINE} s")
                time.sleep(0.0001)
            if i >= WARMUP:
                latencies.append(command.stamp - start)
            time.sleep(0.002)  # idle queues between samples
        compute = policy.compute_seconds[-samples:]
    finally:
        policy.close()
        robot.close()
        transport.close()
    return {"backend": backend, "case": case, "latency": latencies, "compute": compute}


def run_backend(backend: str, checkpoints: dict[str, Path], samples: int, cases: list[str]) -> list[dict[str, Any]]:
    from policies.vla_backbone import TINY_IMAGE_SIZE

    return [
        measure(backend, case, checkpoints.get(case), samples, TINY_IMAGE_SIZE)
        for case in cases  # the tiny VLM's image size is the policy's (vla_tiny keeps the default)
    ]


def ros1_python() -> str:
    explicit = os.environ.get("ROBO_RLFT_ROS1_PYTHON")
    return explicit or str(REPO / ".venv-ros1" / "bin" / "python")


def wait_for_master(uri: str, roscore: subprocess.Popen, timeout: float = 15.0) -> None:
    """Poll the master's XML-RPC API (this interpreter has no rosgraph) until it answers."""
    end = time.monotonic() + timeout
    while True:
        try:
            xmlrpc.client.ServerProxy(uri).getPid("/deploy_latency")
            return
        except OSError:
            if roscore.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"roscore did not answer at {uri} within {timeout} s") from None
            time.sleep(0.05)


def run_ros1_child(args: argparse.Namespace, checkpoint_dir: Path) -> list[dict[str, Any]]:
    """This script under the ROS 1 interpreter, against a private roscore; returns its results."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, ROS_MASTER_URI=f"http://127.0.0.1:{port}", ROS_IP="127.0.0.1")
    env.update(ROS_HOME=str(checkpoint_dir / "ros_home"), ROS_LOG_DIR=str(checkpoint_dir / "ros_home" / "log"))
    roscore = subprocess.Popen(
        ["roscore", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # roscore and its children (rosmaster, rosout) stopped together
    )
    try:
        out = checkpoint_dir / "ros1.json"
        command = [ros1_python(), __file__, "--backend", "ros1", "--samples", str(args.samples)]
        command += ["--threads", str(args.threads), "--checkpoints", str(checkpoint_dir), "--json", str(out)]
        command += ["--cases", *args.cases]
        wait_for_master(env["ROS_MASTER_URI"], roscore)
        subprocess.run(command, env=env, check=True, cwd=REPO)
        return json.loads(out.read_text())
    finally:
        os.killpg(roscore.pid, signal.SIGINT)
        roscore.wait(timeout=10)


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| backend | case | latency median | latency p99 | compute median | compute p99 | samples |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        latency, compute = np.asarray(r["latency"]) * 1e3, np.asarray(r["compute"]) * 1e3
        lines.append(
            f"| {r['backend']} | {r['case']} | {np.median(latency):.2f} ms | {np.percentile(latency, 99):.2f} ms | "
            f"{np.median(compute):.2f} ms | {np.percentile(compute, 99):.2f} ms | {len(latency)} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=500, help="measured samples per backend and case")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: see tests/conftest.py)")
    parser.add_argument("--backend", choices=["both", "ros2", "ros1"], default="both")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "deploy_latency.md")
    parser.add_argument("--checkpoints", type=Path, help=argparse.SUPPRESS)  # the ROS 1 child's
    parser.add_argument("--json", type=Path, help=argparse.SUPPRESS)  # the ROS 1 child's output
    args = parser.parse_args()
    if args.samples < 1:
        parser.error(f"--samples must be >= 1, got {args.samples}")
    torch.set_num_threads(args.threads)

    if args.json is not None:  # the ROS 1 child
        checkpoints = {case: args.checkpoints / case for case in ("flow", "vla_tiny")}
        args.json.write_text(json.dumps(run_backend("ros1", checkpoints, args.samples, args.cases)))
        return

    # Loopback only, on a DDS domain of our own (FACTS.md, ROS); read when the first rclpy context starts.
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    os.environ.setdefault("ROS_DOMAIN_ID", str(1 + os.getpid() % 100))
    results = []
    with tempfile.TemporaryDirectory(prefix="deploy_latency_") as tmp:
        checkpoints = make_checkpoints(Path(tmp))
        if args.backend in ("both", "ros2"):
            results += run_backend("ros2", checkpoints, args.samples, args.cases)
        if args.backend in ("both", "ros1"):
            results += run_ros1_child(args, Path(tmp))

    report = "\n".join(
        [
            "# Deployment latency through ROS (observation → command)",
            "",
            f"- command: `{shlex.join(['python', *sys.argv])}`",
            f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
            "",
            f"CPU: {cpu_model()} ({os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end: the "
            "machine was shared), "
            f"{args.threads} torch thread(s), torch {torch.__version__}, Python "
            f"{platform.python_version()} (ROS 2: PyPI ros-rclpy, Fast DDS, loopback) and Debian's Python 3.11 with "
            "rospy (ROS 1, private roscore). One process per backend: robot endpoint and policy side on loopback. "
            "Latency: robot starts publishing the observation → robot receives the command (stamped on reception); "
            "compute: the policy side's assemble → policy → adapter → safety alone.",
            "",
            table(results),
            "",
            "Reading: latency − compute is what the transport adds (two messages, plus the images for the VLA); "
            "compare it with the control period (50 ms at 20 Hz) and with the chunk's execution time, behind which "
            "the control loop hides inference.",
            "",
        ]
    )
    print(report)
    args.out.write_text(report)


if __name__ == "__main__":
    main()
