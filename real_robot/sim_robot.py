"""A simulated robot behind the deployment topics: a tabletop task in MuJoCo that behaves like a real arm.

:class:`SimRobot` runs a :class:`envs.tabletop.env.TabletopEnv` in real time at the control rate, through a
:class:`~real_robot.transport.RobotEndpoint` (ROS 2, ROS 1 or in memory). Every tick it

1. takes the newest command received since the episode started: a streamed joint target (a position
   controller's ``commands``) or a trajectory (interpolated in time from where the arm was when it arrived, as
   ros2_control's trajectory controller does), and the newest gripper opening;
2. steps the physics one control period toward it (the env in ``action_mode="joint"``: the same position
   servos the policy was trained with, whatever its action mode — a ``delta_ee`` policy's IK runs on the
   deployment side, as on a real arm);
3. publishes ``/joint_states``, the camera images and the true ``object_state`` (standing in for perception).

Like a real arm's controller, it does not wait for the control period to end to take a new command: each
control step runs as ``slices`` real-time slices of physics (5 by default: 10 ms at 20 Hz), and every slice
takes the newest command and publishes the joint state and object state (images once per control step, as a
camera would). Computing a whole 50 ms step at once instead would make the control loop's phase decide whether
a command acts on the state it was computed from or one step later — a lag a chunked policy is not trained for.

Episodes: before each one the robot publishes ``pause`` on the control topic, resets the scene to the next fixed
init state, publishes the new observation for ``settle_ticks`` and then ``resume`` (repeated until a command
stamped after it arrives). The episode's clock starts at that first command, so a policy that is still loading
loses no steps. An episode ends on success or at the task's horizon; its :class:`EpisodeReport` is published on
the episode topic and returned.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from envs.tabletop.scene import CONTROL_SUBSTEPS
from real_robot.transport import EpisodeReport, Image, JointState, JointTrajectory, ObjectState, RobotEndpoint

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SimRobotConfig:
    """How the simulated robot runs.

    Attributes:
        rate_hz: control rate, Hz; must be the env's (20 Hz for the tabletop: one control step per period).
        slices: real-time physics slices per control step (each takes the newest command); must divide the env's
            physics substeps per control step (25).
        joint_names: the 7 arm joint names it publishes (the robot config's).
        finger_names: the 2 finger joint names it publishes after them.
        settle_ticks: ticks between the scene reset (``pause``) and ``resume``, so the policy side sees the new
            scene before it plans.
        start_timeout: s to wait for the first command of an episode before giving up.
        publish_object_state: publish the true ``object_state`` (for state policies trained on it).
    """

    rate_hz: float = 20.0
    slices: int = 5
    joint_names: tuple[str, ...] = ()
    finger_names: tuple[str, ...] = ()
    settle_ticks: int = 5
    start_timeout: float = 60.0
    publish_object_state: bool = True

    def __post_init__(self) -> None:
        if len(self.joint_names) != 7 or len(self.finger_names) != 2:
            raise ValueError(
                f"SimRobotConfig: need 7 arm and 2 finger joint names, got {list(self.joint_names)} and "
                f"{list(self.finger_names)}."
            )
        if self.settle_ticks < 1:
            raise ValueError(f"SimRobotConfig: settle_ticks must be >= 1, got {self.settle_ticks}.")
        if not self.start_timeout > 0.0:
            raise ValueError(f"SimRobotConfig: start_timeout must be > 0 s, got {self.start_timeout}.")


class NoCommandError(RuntimeError):
    """No command arrived within ``start_timeout`` of an episode's start."""


class SimRobot:
    """Runs episodes of a tabletop task behind a robot endpoint.

    Args:
        env: the task, made with ``action_mode="joint"`` and the cameras to publish (its ``cameras``).
        endpoint: the robot side of the transport.
        config: see :class:`SimRobotConfig`.
        clock, sleep: wall-clock seconds and sleep (the same clock as the endpoint's stamps).
    """

    def __init__(
        self,
        env,
        endpoint: RobotEndpoint,
        config: SimRobotConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.env = env.unwrapped
        if self.env.action_mode != "joint":
            raise ValueError(
                f"SimRobot: the env must take joint targets (action_mode='joint'), got {self.env.action_mode!r}."
            )
        control_hz = self.env.metadata["render_fps"]
        if abs(config.rate_hz - control_hz) > 1e-6:
            raise ValueError(
                f"SimRobot: rate_hz={config.rate_hz} must equal the env's control rate ({control_hz} Hz): one physics "
                "control step per tick keeps simulated time equal to wall time."
            )
        self._substeps = CONTROL_SUBSTEPS
        if self._substeps % config.slices:
            raise ValueError(
                f"SimRobotConfig: slices={config.slices} must divide the env's {self._substeps} physics substeps per "
                "control step."
            )
        self.endpoint = endpoint
        self.config = config
        self.clock = clock
        self.sleep = sleep
        self.arm = self.env.arm
        self._next_tick = 0.0
        self._target = np.zeros(7)
        self._gripper = 1.0
        self._trajectory: tuple[JointTrajectory, np.ndarray, float] | None = None  # (message, start q, received)
        self.reports: list[EpisodeReport] = []

    # -- episodes -----------------------------------------------------------------------------------------

    def run(self, init_states: Sequence[int | None], stop: threading.Event | None = None) -> list[EpisodeReport]:
        """One episode per entry of ``init_states`` (a fixed init state index, or ``None`` for a random layout);
        ends early (with the episodes finished so far) when ``stop`` is set. Finished episodes are also in
        :attr:`reports` as they end (kept if the run is interrupted)."""
        reports = self.reports = []
        self._next_tick = self.clock()
        for episode, init_state in enumerate(init_states):
            if stop is not None and stop.is_set():
                break
            report = self.run_episode(episode, init_state, stop)
            if report is None:
                break
            reports.append(report)
            self.endpoint.publish_episode(report)
            logger.info(
                "Episode %d (init state %s): %s in %d steps.",
                episode,
                init_state,
                "success" if report.success else "failure",
                report.steps,
            )
        self.endpoint.publish_control("pause")
        return reports

    def run_episode(
        self, episode: int, init_state: int | None, stop: threading.Event | None = None
    ) -> EpisodeReport | None:
        """Reset to ``init_state``, hand over to the policy and run until success or the horizon; ``None`` if
        stopped."""
        options = None if init_state is None else {"init_state": int(init_state)}
        obs, _ = self.env.reset(seed=episode if init_state is None else None, options=options)
        self._target = self.arm.q
        self._gripper = 1.0
        self._trajectory = None
        period = 1.0 / self.config.rate_hz
        for _ in range(self.config.settle_ticks):  # the policy side sees the new scene before it may move
            self.endpoint.publish_control("pause")
            self._publish(obs)
            if not self._wait(period, stop):
                return None

        resumed = self.clock()
        deadline = resumed + self.config.start_timeout
        while not self._take_commands(since=resumed):
            if self.clock() > deadline:
                raise NoCommandError(
                    f"SimRobot: no command within {self.config.start_timeout:.0f} s of episode {episode}'s start; is "
                    "`robo-rlft deploy` running with the same robot config (topics, transport)?"
                )
            self.endpoint.publish_control("resume")
            self._publish(obs)
            if not self._wait(period, stop):
                return None

        steps = 0
        slices = self.config.slices
        substeps = self._substeps // slices
        while True:
            for k in range(slices):
                self._take_commands(since=resumed)
                # The gripper entry of a joint action: -1 open … +1 close.
                self.env.apply_action(np.append(self._current_target(), 1.0 - 2.0 * self._gripper))
                self.env.advance(substeps)
                if k < slices - 1:
                    self._publish(None)
                    if not self._wait(period / slices, stop):
                        return None
            obs, _, terminated, truncated, info = self.env.finish_step()
            steps += 1
            self._publish(obs)
            if terminated or truncated:
                return EpisodeReport(episode, init_state, bool(info["is_success"]), steps)
            if not self._wait(period / slices, stop):
                return None

    # -- one tick -----------------------------------------------------------------------------------------

    def _take_commands(self, since: float) -> bool:
        """Adopt the newest command and gripper opening received after ``since``; whether any command has been."""
        command = self.endpoint.latest_joint_command()
        trajectory = self.endpoint.latest_trajectory()
        command = command if command is not None and command.stamp >= since else None
        trajectory = trajectory if trajectory is not None and trajectory.stamp >= since else None
        if trajectory is not None and (command is None or trajectory.stamp > command.stamp):
            if self._trajectory is None or self._trajectory[0] is not trajectory:
                self._trajectory = (trajectory, self._current_target(), trajectory.stamp)
        elif command is not None:
            if command.positions.shape != (7,) or not np.all(np.isfinite(command.positions)):
                logger.error("Ignored a malformed joint command %s.", command.positions)
            else:
                self._target = np.asarray(command.positions, dtype=np.float64)
                self._trajectory = None
        gripper = self.endpoint.latest_gripper()
        if gripper is not None and gripper[1] >= since and np.isfinite(gripper[0]):
            self._gripper = float(np.clip(gripper[0], 0.0, 1.0))
        return command is not None or trajectory is not None

    def _current_target(self) -> np.ndarray:
        """The joint target now: the streamed one, or the running trajectory interpolated at the time since it
        arrived (held at its last point after the end)."""
        if self._trajectory is None:
            return self._target
        trajectory, start, received = self._trajectory
        times = np.array([0.0, *(p.time_from_start for p in trajectory.points)])
        positions = np.stack([start, *(p.positions for p in trajectory.points)])  # (P+1, 7)
        t = self.clock() - received
        return np.array([np.interp(t, times, positions[:, j]) for j in range(7)])

    def _publish(self, obs: dict[str, np.ndarray] | None) -> None:
        """Joint state and object state now, and with a control step's ``obs`` its camera images too."""
        data = self.env.data
        names = (*self.config.joint_names, *self.config.finger_names)
        positions = np.concatenate([data.qpos[self.arm.qpos_index], data.qpos[self.arm.finger_qpos_index]])
        velocities = np.concatenate([data.qvel[self.arm.dof_index], data.qvel[self.arm.finger_dof_index]])
        now = self.clock()
        if obs is not None:
            for camera in self.env.cameras:
                self.endpoint.publish_image(camera, Image(obs[f"{camera}_image"], now))
        if self.config.publish_object_state:
            object_state = self.env.object_state() if obs is None else obs["object_state"]
            self.endpoint.publish_object_state(ObjectState(object_state.astype(np.float64), now))
        # Joint states last: a policy side that reacts to them finds the images of the same instant.
        self.endpoint.publish_joint_state(JointState(names, positions, velocities, now))

    def _wait(self, seconds: float, stop: threading.Event | None) -> bool:
        """Sleep until ``seconds`` after the previous wait's deadline; ``False`` if ``stop`` is set. A late tick
        restarts the schedule (no catch-up burst: simulated time must not run faster than wall time)."""
        self._next_tick += seconds
        now = self.clock()
        if self._next_tick > now:
            self.sleep(self._next_tick - now)
        else:
            self._next_tick = now
        return not (stop is not None and stop.is_set())
