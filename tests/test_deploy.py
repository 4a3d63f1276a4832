"""Deployment end to end: a policy fine-tuned on a tabletop task, deployed on the simulated robot.

The policy is trained once per session (tests/conftest.py: scripted demos → BC → two PPO iterations, ~1 min).
Three ways to run it on the
simulated arm, from most to least controlled:

- lockstep, in memory, on a fake clock: the control loop and the simulated robot's physics slices interleave
  deterministically — the deployment path's semantics (observation assembly, IK, safety layer, chunk timing)
  without scheduling noise;
- ``robo-rlft deploy`` and ``robo-rlft sim-robot`` as two processes over ROS 2, in real time;
- the same over ROS 1 (tests/ros1/, run under Debian's interpreter by tests/test_ros1_backend.py).

Each must complete the task on >= 80 % of the episodes the policy completes in direct simulation.
"""

from __future__ import annotations

import concurrent.futures
import os

import numpy as np
import pytest
import torch
from deploy_e2e import EPISODES, TASK, check_deploy_run, run_deploy_e2e

from real_robot.deploy import build_deployment, build_sim_robot
from real_robot.sim_robot import NoCommandError, SimRobot, SimRobotConfig
from real_robot.transport import InMemoryRobot, InMemoryTransport, JointTrajectory, TrajectoryPoint
from robo_rlft.cli import compose_config, main


class _Immediate(concurrent.futures.Executor):
    """Runs inference synchronously (the lockstep test has no threads)."""

    def submit(self, fn, /, *args, **kwargs):
        future: concurrent.futures.Future = concurrent.futures.Future()
        future.set_result(fn(*args, **kwargs))
        return future


class _FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("output", ["stream", "trajectory"])
def test_lockstep_deployment_matches_direct_simulation(lift_policy, direct_successes, output):
    """Through the whole deployment path (in memory, fake clock), the policy succeeds as in direct simulation,
    streaming joint targets or sending a trajectory per chunk."""
    clock = _FakeClock()
    robot = compose_config(["robot=panda_sim", f"robot.output={output}"]).robot
    transport = InMemoryTransport(clock=clock)
    deployment = build_deployment(robot, lift_policy, transport=transport, clock=clock)
    loop = deployment.loop
    loop.executor, loop._owns_executor = _Immediate(), False
    metadata = deployment.metadata
    sim = build_sim_robot(
        robot, metadata["env"], metadata["env_kwargs"], endpoint=InMemoryRobot(transport), clock=clock
    )
    period = loop.config.dt
    next_tick = [0.3 * period]  # the loop ticks 30 % into each of the robot's control periods

    def sleep(seconds: float) -> None:  # the robot waits; the loop ticks when its time comes
        end = clock.now + seconds
        while next_tick[0] <= end:
            clock.now = next_tick[0]
            loop.tick()
            next_tick[0] += period
        clock.now = end

    sim.sleep = sleep
    reports = sim.run(range(EPISODES))
    deployed = sum(r.success for r in reports)
    print(f"lockstep ({output}): {deployed}/{EPISODES}, direct {direct_successes}/{EPISODES}; {loop.status().line()}")
    assert deployed >= 0.8 * direct_successes
    assert loop.status().interventions.get("deadline_miss", 0) == 0


@pytest.fixture
def ros2_env(monkeypatch) -> dict[str, str]:
    """ROS 2 traffic on loopback only, in a domain of its own."""
    env = {"ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST", "ROS_DOMAIN_ID": str(60 + os.getpid() % 40)}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


def test_deploy_over_ros2_completes_the_task(lift_policy, direct_successes, ros2_env, tmp_path):
    """`robo-rlft deploy` against `robo-rlft sim-robot` over ROS 2, in real time: >= 80 % of direct successes."""
    run = run_deploy_e2e(lift_policy, TASK, EPISODES, "ros2", tmp_path, ros2_env)
    check_deploy_run(run, direct_successes, EPISODES)


# -- the simulated robot on its own ------------------------------------------------------------------------------


def _sim_robot(clock: _FakeClock, **config) -> tuple[SimRobot, InMemoryTransport]:
    from envs import make_env

    env = make_env(f"robo_rlft/Tabletop-{TASK}-v0", flatten=False, action_mode="joint")
    transport = InMemoryTransport(clock=clock)
    names = SimRobotConfig.__dataclass_fields__
    assert "joint_names" in names
    robot_config = SimRobotConfig(joint_names=tuple(f"j{i}" for i in range(7)), finger_names=("f1", "f2"), **config)
    return SimRobot(
        env, InMemoryRobot(transport), robot_config, clock=clock, sleep=lambda s: setattr(clock, "now", clock.now + s)
    ), transport


def test_sim_robot_without_commands_times_out_with_a_named_error():
    clock = _FakeClock()
    robot, _ = _sim_robot(clock, start_timeout=1.0)
    with pytest.raises(NoCommandError, match=r"no command within 1 s.*robo-rlft deploy"):
        robot.run([0])


def test_sim_robot_follows_a_trajectory_by_time():
    """A trajectory is interpolated from where the arm was when it arrived, point k reached at its time."""
    clock = _FakeClock()
    robot, transport = _sim_robot(clock)
    robot.env.reset(options={"init_state": 0})
    start = robot.arm.q
    robot._target = start
    goal = start + 0.2
    clock.now = 10.0
    transport.publish_trajectory(
        JointTrajectory(tuple(f"j{i}" for i in range(7)), (TrajectoryPoint(goal, 1.0),), stamp=clock.now)
    )
    assert robot._take_commands(since=5.0)
    clock.now = 10.5
    np.testing.assert_allclose(robot._current_target(), start + 0.1)
    clock.now = 12.0
    np.testing.assert_allclose(robot._current_target(), goal)


def test_sim_robot_refuses_a_delta_ee_env_and_a_wrong_rate():
    from envs import make_env

    names = {"joint_names": tuple("abcdefg"), "finger_names": ("a", "b")}
    endpoint = InMemoryRobot(InMemoryTransport())
    with pytest.raises(ValueError, match="action_mode='joint'"):
        SimRobot(make_env(f"robo_rlft/Tabletop-{TASK}-v0", flatten=False), endpoint, SimRobotConfig(**names))
    joint_env = make_env(f"robo_rlft/Tabletop-{TASK}-v0", flatten=False, action_mode="joint")
    with pytest.raises(ValueError, match=r"rate_hz=10\.0 must equal the env's control rate"):
        SimRobot(joint_env, endpoint, SimRobotConfig(rate_hz=10.0, **names))
    with pytest.raises(ValueError, match="slices=4 must divide"):
        SimRobot(joint_env, endpoint, SimRobotConfig(slices=4, **names))


# -- CLI errors ---------------------------------------------------------------------------------------------------


def test_deploy_and_sim_robot_refuse_bad_input(tmp_path, capsys):
    assert main(["deploy", f"run_dir={tmp_path / 'a'}"]) == 2
    assert "deploy.checkpoint is required" in capsys.readouterr().err
    assert main(["sim-robot", "env=hopper", f"run_dir={tmp_path / 'b'}"]) == 2
    assert "sim-robot runs a tabletop task" in capsys.readouterr().err
    assert main(["sim-robot", "env=tabletop", "env.task=LiftCube", "sim_robot.episodes=60"]) == 2
    assert "exceeds the task's 50 fixed init states" in capsys.readouterr().err
    assert main(["deploy", "robot.transport=ros3"]) == 2
    assert "robot.transport='ros3' is not allowed; choose one of ['ros2', 'ros1']" in capsys.readouterr().err
    assert main(["deploy", "robot=ur10"]) == 2
    assert "Unknown robot 'ur10'" in capsys.readouterr().err


def test_deploy_refuses_a_vla_without_its_camera_topics(tmp_path):
    from policies.checkpoint import save_policy
    from policies.vla import VLAPolicy, VLAPolicyConfig

    torch.manual_seed(0)
    policy = VLAPolicy(8, 7, VLAPolicyConfig(vlm_path="tiny", horizon=4, denoising_steps=2))
    save_policy(policy, tmp_path / "vla", {"env": f"robo_rlft/Tabletop-{TASK}-v0", "act_steps": 4})
    robot = compose_config(["robot=panda_sim"]).robot
    robot.topics.cameras = {"agentview": "/camera/agentview/image_raw"}
    with pytest.raises(ValueError, match=r"no topic for \['wrist'\].*robot.topics.cameras.wrist="):
        build_deployment(robot, tmp_path / "vla", transport=InMemoryTransport())
