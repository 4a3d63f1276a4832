"""The fixed-rate control loop: newest observation → policy on a worker thread → action chunk → safety → robot.

Every tick (default 20 Hz):

1. read the newest joint state and images and assemble the observation;
2. collect a finished inference: the new chunk replaces the rest of the running one, starting at the step
   that is due now (the steps whose time passed while the policy ran are skipped);
3. watchdog: a joint state, camera image or object state older than ``stale_after`` → hold (and no inference
   on stale data); an e-stop → hold (the running chunk is dropped); paused (``pause`` on the control topic) →
   one hold, then nothing until ``resume``, which starts from a fresh observation; the chunk ran out before the
   next one arrived → hold (deadline miss);
4. when ``remaining steps <= replan margin`` and no request is running, request the next chunk with this
   observation, so inference runs while the current chunk is still being executed; the margin grows to the
   observed p90 inference latency in control periods if that is longer;
5. execute one step: the action → joint target (:class:`~real_robot.adapters.ActionAdapter`, from the measured
   joints) → :meth:`~real_robot.safety.SafetyLayer.filter` → publish (stream) — or, with ``output="trajectory"``,
   publish the whole rest of a new chunk once as a ``JointTrajectory`` with point k at k·dt.

Dry run publishes with ``shadow=True`` only. Every command sent is logged on the ``real_robot.commands`` logger
(DEBUG); :meth:`ControlLoop.status` gives rate, jitter, inference latency and interventions.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from real_robot.adapters import ActionAdapter, JointTarget
from real_robot.observation import ObservationAssembler, RobotObservation
from real_robot.safety import REJECTIONS, SafetyLayer
from real_robot.transport import (
    CONTROL_COMMANDS,
    JointCommand,
    JointTrajectory,
    PoseStamped,
    TrajectoryPoint,
    Transport,
)

logger = logging.getLogger(__name__)
command_logger = logging.getLogger("real_robot.commands")

OUTPUTS: tuple[str, ...] = ("stream", "trajectory", "pose")
_HISTORY = 2000  # ticks / inferences kept for the status percentiles


@dataclass(frozen=True)
class LoopConfig:
    """Control loop settings.

    Attributes:
        rate_hz: control rate, Hz (the policy's training rate: the tabletop env runs at 20 Hz).
        stale_after: a joint state or policy camera image older than this (s) makes the loop hold; default two
            control periods.
        replan_margin: request the next chunk when this many steps (or fewer) of the current one remain (0: when
            it has run out, as a simulator's chunked rollout does; the loop raises it to cover slow inference).
        inference_wait: when the chunk has run out and an inference is running, the tick waits this long (s) for
            it before holding for a whole period; default a quarter period. A fast policy then starts its chunk
            from an observation of this tick, exactly as in simulation.
        output: ``"stream"`` (one ``Float64MultiArray`` per tick), ``"trajectory"`` (a ``JointTrajectory`` per
            chunk) or ``"pose"`` (per tick, the safe joint target's tool pose as a ``PoseStamped`` in the arm's base
            frame, for a Cartesian impedance controller).
        dry_run: publish to the shadow topics only.
        skip_elapsed: start a new chunk at the step due now rather than at its first step.
    """

    rate_hz: float = 20.0
    stale_after: float | None = None
    replan_margin: int = 2
    inference_wait: float | None = None
    output: str = "stream"
    dry_run: bool = False
    skip_elapsed: bool = True

    def __post_init__(self) -> None:
        if not 0.0 < self.rate_hz <= 1000.0:
            raise ValueError(f"LoopConfig: rate_hz must be in (0, 1000], got {self.rate_hz}.")
        if self.stale_after is not None and self.stale_after <= 0.0:
            raise ValueError(f"LoopConfig: stale_after must be > 0 s, got {self.stale_after}.")
        if self.replan_margin < 0:
            raise ValueError(f"LoopConfig: replan_margin must be >= 0, got {self.replan_margin}.")
        if self.inference_wait is not None and not 0.0 <= self.inference_wait < self.dt:
            raise ValueError(
                f"LoopConfig: inference_wait must be in [0, {self.dt}) s (under a period), got {self.inference_wait}."
            )
        if self.output not in OUTPUTS:
            raise ValueError(f"LoopConfig: output must be one of {OUTPUTS}, got {self.output!r}.")

    @property
    def dt(self) -> float:
        """Control period, s."""
        return 1.0 / self.rate_hz

    @property
    def inference_wait_limit(self) -> float:
        """``inference_wait`` with its default filled in, s."""
        return 0.25 * self.dt if self.inference_wait is None else self.inference_wait

    @property
    def stale_limit(self) -> float:
        """``stale_after`` with its default filled in, s."""
        return 2.0 * self.dt if self.stale_after is None else self.stale_after


@dataclass(frozen=True)
class LoopStatus:
    """What the status line shows. Times in ms, rate in Hz."""

    ticks: int
    rate_hz: float
    jitter_p50_ms: float
    jitter_p99_ms: float
    inference_p50_ms: float
    inference_p99_ms: float
    interventions: dict[str, int]
    estop: str | None
    dry_run: bool
    paused: bool = False

    def line(self) -> str:
        """One human-readable line."""
        interventions = ", ".join(f"{k}={v}" for k, v in sorted(self.interventions.items())) or "none"
        return (
            f"{'[DRY RUN] ' if self.dry_run else ''}ticks {self.ticks} | {self.rate_hz:.1f} Hz | jitter p50/p99 "
            f"{self.jitter_p50_ms:.1f}/{self.jitter_p99_ms:.1f} ms | inference p50/p99 {self.inference_p50_ms:.0f}/"
            f"{self.inference_p99_ms:.0f} ms | interventions: {interventions}"
            + (f" | E-STOP: {self.estop}" if self.estop else "")
            + (" | PAUSED" if self.paused else "")
        )


def _percentile_ms(values: deque[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q) * 1e3) if values else math.nan


class ControlLoop:
    """Runs a policy on a robot through a :class:`~real_robot.transport.Transport`, safely.

    Operator commands arrive on the transport's control topic (:data:`~real_robot.transport.CONTROL_COMMANDS`) or
    through :meth:`pause` / :meth:`resume` / :meth:`reset_estop`.

    Args:
        transport: the robot backend.
        infer: ``infer(observation) -> actions (H, A)`` in env units (e.g. a
            :class:`~real_robot.observation.PolicyRunner`).
        assembler: builds observations from the transport's newest messages.
        adapter: actions → joint targets.
        safety: the safety layer (its e-stop latch is hooked to the transport's e-stop).
        config: the loop's settings.
        clock: monotonic seconds; inject a fake one for deterministic tests.
        sleep: sleeps seconds (paired with ``clock``).
        executor: runs inference; default a one-thread pool owned (and shut down) by the loop.
    """

    def __init__(
        self,
        transport: Transport,
        infer: Callable[[RobotObservation], np.ndarray],
        assembler: ObservationAssembler,
        adapter: ActionAdapter,
        safety: SafetyLayer,
        config: LoopConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        executor: concurrent.futures.Executor | None = None,
    ) -> None:
        self.transport = transport
        self.infer = infer
        self.assembler = assembler
        self.adapter = adapter
        self.safety = safety
        self.config = config or LoopConfig()
        if abs(safety.limits.dt - self.config.dt) > 1e-9:
            raise ValueError(
                f"ControlLoop: SafetyLimits.dt ({safety.limits.dt} s) must equal the control period "
                f"1/rate_hz ({self.config.dt} s)."
            )
        self.clock = clock
        self.sleep = sleep
        self._owns_executor = executor is None
        self.executor = executor or concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="policy")
        transport.on_estop(safety.trigger)
        transport.on_control(self._on_control)

        self.ticks = 0
        self.counts: Counter[str] = Counter()  # loop-side interventions (the safety layer counts its own)
        self.last_command: JointTarget | None = None
        self._chunk: np.ndarray | None = None  # (H, A) actions being executed
        self._index = 0  # next step of _chunk
        self._republish = False  # trajectory output: send the rest of the chunk at the next executed step
        self._pending: concurrent.futures.Future | None = None
        self._request_tick = 0
        # Pause/resume arrive on any thread; the tick applies them. A resume bumps the generation so an inference
        # started before the pause is discarded.
        self._pause_requested = threading.Event()
        self._resume_requested = threading.Event()
        self._paused = False
        self._generation = 0
        self._tick_times: deque[float] = deque(maxlen=_HISTORY)
        self._jitter: deque[float] = deque(maxlen=_HISTORY)
        self._latency: deque[float] = deque(maxlen=_HISTORY)

    # -- the API around the loop ------------------------------------------------------------------------

    def trigger_estop(self, reason: str = "API") -> None:
        """Engage the e-stop latch (as the e-stop topic does)."""
        self.safety.trigger(reason)

    def reset_estop(self) -> None:
        """Release the e-stop latch (explicit operator action); the loop re-plans from the current observation."""
        self.safety.reset()

    def pause(self) -> None:
        """Stop executing the policy at the next tick (one hold, then nothing is sent), e.g. to reset the scene."""
        self._resume_requested.clear()
        self._pause_requested.set()

    def resume(self) -> None:
        """Resume after :meth:`pause`: the next tick plans from a fresh observation (the arm may have moved)."""
        self._pause_requested.clear()
        self._resume_requested.set()

    @property
    def paused(self) -> bool:
        return self._paused

    def _on_control(self, command: str) -> None:
        actions = {"pause": self.pause, "resume": self.resume, "reset_estop": self.reset_estop}
        if command not in actions:
            logger.warning("Ignored control command %r; allowed: %s.", command, CONTROL_COMMANDS)
            return
        actions[command]()

    @property
    def remaining_steps(self) -> int:
        """Steps of the current chunk not executed yet."""
        return 0 if self._chunk is None else len(self._chunk) - self._index

    def replan_margin(self) -> int:
        """Steps before the chunk runs out at which the next one is requested: the configured margin, or what the
        p90 inference latency needs beyond the in-tick wait, in control periods (rounded up), if that is longer."""
        if not self._latency:
            return self.config.replan_margin
        p90 = float(np.percentile(np.asarray(self._latency), 90))
        needed = math.ceil(max(p90 - self.config.inference_wait_limit, 0.0) / self.config.dt)
        return max(self.config.replan_margin, needed)

    def status(self) -> LoopStatus:
        """Rate, jitter, inference latency and interventions so far."""
        times = self._tick_times
        rate = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else math.nan
        return LoopStatus(
            ticks=self.ticks,
            rate_hz=rate,
            jitter_p50_ms=_percentile_ms(self._jitter, 50),
            jitter_p99_ms=_percentile_ms(self._jitter, 99),
            inference_p50_ms=_percentile_ms(self._latency, 50),
            inference_p99_ms=_percentile_ms(self._latency, 99),
            interventions=dict(self.safety.counts + self.counts),
            estop=self.safety.estop_reason,
            dry_run=self.config.dry_run,
            paused=self._paused,
        )

    def run(self, max_ticks: int | None = None, stop: threading.Event | None = None, status_every: float = 5.0) -> None:
        """Tick at ``rate_hz`` until ``max_ticks`` ticks or ``stop`` is set; logs the status line every
        ``status_every`` s. A tick that overruns its period is not made up: the schedule restarts from now."""
        dt = self.config.dt
        scheduled = self.clock()
        last_status = scheduled
        done = 0
        while (max_ticks is None or done < max_ticks) and not (stop is not None and stop.is_set()):
            self._jitter.append(abs(self.clock() - scheduled))
            self.tick()
            done += 1
            scheduled += dt
            now = self.clock()
            if now - last_status >= status_every:
                logger.info(self.status().line())
                last_status = now
            if scheduled > now:
                self.sleep(scheduled - now)
            elif now - scheduled > dt:
                logger.warning("Control tick overran by %.1f ms; resynchronising.", (now - scheduled) * 1e3)
                scheduled = now

    def close(self) -> None:
        """Stop the inference worker (an inference already running finishes in the background)."""
        if self._owns_executor:
            self.executor.shutdown(wait=False, cancel_futures=True)

    # -- one tick -----------------------------------------------------------------------------------------

    def tick(self) -> JointTarget | None:
        """One control period's work; returns the command sent this tick (``None`` if nothing was sent: before the
        first joint state, while paused, or while a trajectory sent earlier runs)."""
        now = self.clock()
        self.ticks += 1
        self._tick_times.append(now)
        joint_state = self.transport.latest_joint_state()
        if joint_state is None:
            logger.warning("No joint state received yet: sending nothing.")
            return None
        images = self.transport.latest_images()
        object_state = self.transport.latest_object_state() if self.assembler.object_state_dim else None
        missing = self.assembler.missing_inputs(images, object_state)
        if missing:  # cameras or perception still starting up: hold where the arm is
            logger.warning("No message yet from %s: holding.", missing)
            q, _ = self.assembler.kinematics.split_joint_state(joint_state.names, joint_state.positions)
            return self._send_hold(q, now, None)
        # Raises on a joint-name/order mismatch: a configuration error, not a transient one.
        obs = self.assembler.assemble(joint_state, images, object_state)
        q = obs.joint_positions
        if self._pause_requested.is_set():
            self._pause_requested.clear()
            if not self._paused:
                logger.info("Paused: holding until resume.")
            self._paused = True
            self._chunk = None
            return self._send_hold(q, now, None)
        if self._resume_requested.is_set():
            self._resume_requested.clear()
            if self._paused:  # a resume without a pause (a repeated one) changes nothing
                logger.info("Resumed: planning from the current observation.")
                self._paused = False
                self._generation += 1  # an inference still running saw the scene before the pause
                self._pending = None
                self.safety.restart_from(q)
        if self._paused:
            return None
        self._collect()

        if now - obs.stamp > self.config.stale_limit:
            logger.warning("Observation (joint state or image) is %.0f ms old: holding.", (now - obs.stamp) * 1e3)
            return self._send_hold(q, now, "stale_observation")
        if self.safety.engaged:
            self._chunk = None  # planned before the stop: never resume it
            return self._send_hold(q, now, "estop")

        if self._pending is None and self.remaining_steps <= self.replan_margin():
            self._pending = self.executor.submit(self._timed_infer, obs, self._generation)
            self._request_tick = self.ticks
        if self._pending is not None and self.remaining_steps == 0:
            # Nothing left to execute: a fast inference finishing within the wait beats holding a whole period.
            concurrent.futures.wait([self._pending], timeout=self.config.inference_wait_limit)
        self._collect()

        if self.remaining_steps == 0:
            # Before the first chunk there is nothing to miss; afterwards the policy missed its deadline.
            return self._send_hold(q, now, None if self._chunk is None else "deadline_miss")
        return self._execute_step(q, now)

    def _collect(self) -> None:
        """Take a finished inference's chunk (or log its error)."""
        future = self._pending
        if future is None or not future.done():
            return
        self._pending = None
        error = future.exception()
        if error is not None:
            logger.error("Policy inference failed: %r", error)
            self.counts["policy_error"] += 1
            return
        chunk, seconds, generation = future.result()
        self._latency.append(seconds)
        if generation != self._generation:
            return
        chunk = np.asarray(chunk, dtype=np.float64)
        if chunk.ndim != 2 or chunk.shape[1] != self.adapter.action_dim or len(chunk) == 0:
            logger.error("Policy returned a chunk of shape %s, expected (H, %d).", chunk.shape, self.adapter.action_dim)
            self.counts["policy_error"] += 1
            return
        elapsed = self.ticks - self._request_tick if self.config.skip_elapsed else 0
        self._chunk = chunk
        self._index = min(elapsed, len(chunk))
        self._republish = True

    def _timed_infer(self, obs: RobotObservation, generation: int) -> tuple[np.ndarray, float, int]:
        """(On the worker thread.) The chunk, the inference's wall time (s) and the generation it was asked in."""
        start = time.perf_counter()
        chunk = self.infer(obs)
        return chunk, time.perf_counter() - start, generation

    def _execute_step(self, q: np.ndarray, now: float) -> JointTarget | None:
        assert self._chunk is not None, "_execute_step: called with steps remaining"
        action = self._chunk[self._index]
        self._index += 1
        if self.config.output != "trajectory":
            command, _ = self.safety.filter(self.adapter.step(action, q), q)
            self._publish_stream(command, now)
            return command
        if self._republish:
            # A trajectory for the rest of the chunk, this step included: point k due at k·dt.
            targets = self.adapter.chunk(self._chunk[self._index - 1 :], q)
            points, previous = [], q
            for k, target in enumerate(targets, start=1):
                safe, interventions = self.safety.filter(target, q, previous=previous, lead_steps=k)
                if any(r in interventions for r in REJECTIONS):
                    break  # the trajectory ends at the last safe point, where the controller then holds
                points.append(TrajectoryPoint(safe.positions, k * self.config.dt, safe.gripper))
                previous = safe.positions
            self._republish = False
            if not points:
                return self._send_hold(q, now, None)  # counted by the safety layer
            self._publish_trajectory(points, now)
            self.last_command = JointTarget(points[0].positions, points[0].gripper)
            return self.last_command
        return None  # the controller is executing the trajectory sent earlier

    def _send_hold(self, q: np.ndarray, now: float, reason: str | None) -> JointTarget:
        if reason == "estop":
            command = self.safety.filter(JointTarget(q), q)[0]  # counted by the safety layer
        elif reason is None:
            command = self.safety.hold(q)
        else:
            command = self.safety.hold(q, reason)
        self._republish = True  # a hold replaced any running trajectory
        if self.config.output != "trajectory":
            self._publish_stream(command, now)
        else:
            self._publish_trajectory([TrajectoryPoint(command.positions, self.config.dt, None)], now)
            self.last_command = command
        return command

    def _publish_stream(self, command: JointTarget, now: float) -> None:
        """One step's command: joint positions, or (``output="pose"``) the tool pose they reach."""
        kinematics = self.assembler.kinematics
        if self.config.output == "pose":
            position, quat = kinematics.arm.fk(command.positions)
            pose = PoseStamped(kinematics.base_frame, position - kinematics.base_pos, quat, now)
            self.transport.publish_pose(pose, shadow=self.config.dry_run)
        else:
            message = JointCommand(kinematics.joint_names, command.positions, command.gripper, now)
            self.transport.publish_joint_command(message, shadow=self.config.dry_run)
        self.last_command = command
        command_logger.debug("t=%.3f %scommand q=%s gripper=%s", now, self._tag(), command.positions, command.gripper)

    def _publish_trajectory(self, points: list[TrajectoryPoint], now: float) -> None:
        message = JointTrajectory(self.assembler.kinematics.joint_names, tuple(points), now)
        self.transport.publish_trajectory(message, shadow=self.config.dry_run)
        command_logger.debug(
            "t=%.3f %strajectory of %d points, first q=%s", now, self._tag(), len(points), points[0].positions
        )

    def _tag(self) -> str:
        return "[shadow] " if self.config.dry_run else ""
