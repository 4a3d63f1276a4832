"""End to end deployment over a real transport: ``robo-rlft sim-robot`` and ``robo-rlft deploy`` as two processes.

Shared by the ROS 2 test (tests/test_deploy.py, main interpreter) and the ROS 1 test (tests/ros1/, Debian's
interpreter). The two processes only meet through the backend's topics.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TASK = "LiftCube"
EPISODES = 20  # fixed init states 0..19, in real time: ~1.5 min per backend


@dataclass
class DeployRun:
    sim: dict  # sim_robot.json
    deploy: dict  # deploy.json
    commands_logged: int  # lines in commands.log
    deploy_output: str


def run_deploy_e2e(
    checkpoint: Path,
    task: str,
    episodes: int,
    transport: str,
    work: Path,
    env: dict[str, str],
    python: str = sys.executable,
    timeout: float = 600.0,
) -> DeployRun:
    """Start ``deploy`` (the policy) and ``sim-robot`` (the arm) on ``transport``; wait for the robot's episodes,
    then stop the policy with SIGINT as an operator would; return both reports."""
    env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
    robot = ["robot=panda_sim", f"robot.transport={transport}", "torch_threads=1"]
    deploy = [python, "-m", "robo_rlft.cli", "deploy", f"deploy.checkpoint={checkpoint}", f"run_dir={work / 'deploy'}"]
    deploy += [*robot, "deploy.status_every=2"]
    sim = [python, "-m", "robo_rlft.cli", "sim-robot", "env=tabletop", f"env.task={task}", *robot]
    sim += [f"sim_robot.episodes={episodes}", f"run_dir={work / 'sim'}"]
    with open(work / "deploy.out", "w") as deploy_out, open(work / "sim.out", "w") as sim_out:
        policy = subprocess.Popen(deploy, cwd=REPO, env=env, stdout=deploy_out, stderr=subprocess.STDOUT)
        try:
            arm = subprocess.run(sim, cwd=REPO, env=env, stdout=sim_out, stderr=subprocess.STDOUT, timeout=timeout)
        finally:
            policy.send_signal(signal.SIGINT)
            try:
                policy_code = policy.wait(timeout=30)
            except subprocess.TimeoutExpired:
                policy.kill()
                policy_code = "killed"
    deploy_output = (work / "deploy.out").read_text()
    sim_output = (work / "sim.out").read_text()
    assert arm.returncode == 0, f"sim-robot exited with {arm.returncode}:\n{sim_output[-4000:]}"
    assert policy_code == 0, f"deploy exited with {policy_code}:\n{deploy_output[-4000:]}"
    commands = (work / "deploy" / "commands.log").read_text().splitlines()
    return DeployRun(
        sim=json.loads((work / "sim" / "sim_robot.json").read_text()),
        deploy=json.loads((work / "deploy" / "deploy.json").read_text()),
        commands_logged=len(commands),
        deploy_output=deploy_output,
    )


def check_deploy_run(run: DeployRun, direct_successes: int, episodes: int) -> None:
    """The acceptance: the deployed policy completes the task on >= 80 % of the episodes the same policy completes
    in direct simulation (same init states), at its control rate, sending logged commands."""
    deployed = sum(r["success"] for r in run.sim["reports"])
    assert run.sim["episodes"] == episodes
    assert [r["init_state"] for r in run.sim["reports"]] == list(range(episodes))
    print(f"success: deployed {deployed}/{episodes}, direct {direct_successes}/{episodes}")
    print(f"deploy: {run.deploy}")
    assert deployed >= 0.8 * direct_successes, (deployed, direct_successes, run.deploy_output[-3000:])
    assert abs(run.deploy["rate_hz"] - 20.0) < 1.0, run.deploy
    assert run.deploy["jitter_p99_ms"] < 25.0, run.deploy  # half a control period
    assert run.commands_logged >= run.deploy["ticks"] // 2
    assert run.deploy["estop"] is None
