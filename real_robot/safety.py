"""The safety layer: every command passes :meth:`SafetyLayer.filter` between the policy and the robot.

Checks, in order (each one that changes the command counts an *intervention* under its name):

1. ``estop`` — the e-stop latch is engaged: hold (the measured joint positions), until :meth:`SafetyLayer.reset`.
2. ``nonfinite`` — NaN/inf (or a wrong shape) anywhere in the command: rejected, hold.
3. ``position_limit`` — targets clipped into ``[q_min, q_max]``.
4. ``step_limit`` — the change from the previous command larger than ``max_step`` (rad per control period):
   the whole change is scaled down so the worst joint meets its limit (the direction of motion is kept).
5. ``velocity_limit`` — the target further from the *measured* position than ``max_velocity · dt`` (how fast a
   position servo will drive toward it): scaled down the same way.
6. ``workspace`` — the tool (FK on the arm model) would leave the box: the command is **clamped back** along
   the joint-space segment from the previous command to the largest fraction whose tool position is inside
   (bisection). If the arm is already outside the box, only commands that bring the tool closer to the box
   pass; others are rejected (hold, counted as ``workspace_reject``).

A hold never moves the arm: it is the measured joint positions with the gripper left as it is.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from envs.tabletop.robot import Q_MAX, Q_MIN
from envs.tabletop.scene import TABLE_HEIGHT
from real_robot.adapters import ArmKinematics, JointTarget
from real_robot.arms import get_arm

logger = logging.getLogger(__name__)

INTERVENTIONS: tuple[str, ...] = (
    "estop",
    "nonfinite",
    "position_limit",
    "step_limit",
    "velocity_limit",
    "workspace",
    "workspace_reject",
    "stale_observation",
    "deadline_miss",
    "policy_error",
)
# Interventions that replace the command by a hold (the others only shorten it).
REJECTIONS: tuple[str, ...] = ("estop", "nonfinite", "workspace_reject")
_WORKSPACE_BISECTIONS = 12  # fraction resolution 2⁻¹² of one step
# Position limits are kept this far inside the arm's own (rad): a controller that is asked for exactly its limit
# may fault on overshoot.
JOINT_LIMIT_MARGIN = 0.02


@dataclass(frozen=True)
class SafetyLimits:
    """Limits for one arm. Defaults are conservative, and the Panda's; widen them only after dry runs.

    Attributes:
        q_min, q_max: (n,) joint position limits, rad (default the Panda's, 0.02 rad inside; another arm's from
            :meth:`for_arm`).
        max_step: largest change of any joint between consecutive commands, rad per control period.
        max_velocity: largest ``|target - measured| / dt`` of any joint, rad/s (the Panda's limits are 2.175 /
            2.61 rad/s).
        workspace_min, workspace_max: (3,) tool-centre-point box in the policy's world frame, m (the tabletop
            scene's: the table top, from 1 cm above it to 0.7 m above); ``None`` disables the check.
        dt: control period, s.
    """

    q_min: np.ndarray = field(default_factory=lambda: Q_MIN + JOINT_LIMIT_MARGIN)
    q_max: np.ndarray = field(default_factory=lambda: Q_MAX - JOINT_LIMIT_MARGIN)
    max_step: float = 0.15
    max_velocity: float = 1.5
    workspace_min: np.ndarray | None = field(default_factory=lambda: np.array([-0.45, -0.55, TABLE_HEIGHT + 0.01]))
    workspace_max: np.ndarray | None = field(default_factory=lambda: np.array([0.5, 0.55, TABLE_HEIGHT + 0.7]))
    dt: float = 0.05

    def __post_init__(self) -> None:
        q_min, q_max = np.asarray(self.q_min, dtype=np.float64), np.asarray(self.q_max, dtype=np.float64)
        if q_min.ndim != 1 or q_min.shape != q_max.shape or np.any(q_min >= q_max):
            raise ValueError(f"SafetyLimits: q_min < q_max must be (n,) arrays of one length, got {q_min} and {q_max}.")
        for name in ("max_step", "max_velocity", "dt"):
            if not getattr(self, name) > 0.0:
                raise ValueError(f"SafetyLimits: {name} must be > 0, got {getattr(self, name)}.")
        if (self.workspace_min is None) != (self.workspace_max is None):
            raise ValueError("SafetyLimits: give both workspace_min and workspace_max, or neither.")
        if self.workspace_min is not None and np.any(np.asarray(self.workspace_min) >= np.asarray(self.workspace_max)):
            raise ValueError(
                f"SafetyLimits: workspace_min {self.workspace_min} must be below workspace_max {self.workspace_max}."
            )

    @property
    def n_joints(self) -> int:
        """n, the number of arm joints these limits are for."""
        return len(self.q_min)

    @classmethod
    def for_arm(cls, arm: str, **overrides: Any) -> SafetyLimits:
        """Limits for arm ``arm`` (a key of :data:`real_robot.arms.ARMS`): its joint limits,
        :data:`JOINT_LIMIT_MARGIN` inside, and the defaults (or ``overrides``) for the rest.

        The workspace box stays the tabletop's: it is in the policy's world frame, not the arm's."""
        spec = get_arm(arm)
        limits: dict[str, Any] = {
            "q_min": spec.q_min + JOINT_LIMIT_MARGIN,
            "q_max": spec.q_max - JOINT_LIMIT_MARGIN,
        }
        limits.update(overrides)
        return cls(**limits)


class SafetyLayer:
    """Filters joint targets against :class:`SafetyLimits` and holds an e-stop latch.

    Thread-safe for the e-stop (an e-stop callback may arrive on any thread); ``filter`` is called by one loop.

    Args:
        limits: the limits.
        kinematics: the arm model, for the workspace check.
    """

    def __init__(self, limits: SafetyLimits, kinematics: ArmKinematics) -> None:
        if limits.n_joints != kinematics.n_joints:
            raise ValueError(
                f"SafetyLayer: the limits are for {limits.n_joints} joints but the arm model "
                f"{kinematics.arm_name!r} has {kinematics.n_joints}; build them with "
                f"SafetyLimits.for_arm({kinematics.arm_name!r})."
            )
        self.limits = limits
        self.kinematics = kinematics
        self.counts: Counter[str] = Counter()
        self._previous: np.ndarray | None = None
        self._estop_reason: str | None = None
        self._lock = threading.Lock()

    # -- e-stop latch --------------------------------------------------------------------------------

    def trigger(self, reason: str) -> None:
        """Engage the e-stop latch: from now on every command is a hold, until :meth:`reset`."""
        with self._lock:
            if self._estop_reason is None:
                logger.error("E-stop engaged: %s", reason)
                self._estop_reason = reason

    def reset(self) -> None:
        """Release the latch (an explicit operator action). The next command's step limit starts from the arm."""
        with self._lock:
            if self._estop_reason is not None:
                logger.warning("E-stop reset (was: %s)", self._estop_reason)
            self._estop_reason = None
            self._previous = None

    def restart_from(self, current: np.ndarray) -> None:
        """The next command's step limit starts from ``current`` (n,) rad: after a pause the arm may have been moved
        (a scene reset), and the last command sent is no reference for the next one."""
        self._previous = np.asarray(current, dtype=np.float64).copy()

    @property
    def engaged(self) -> bool:
        """Whether the e-stop latch is engaged."""
        return self._estop_reason is not None

    @property
    def estop_reason(self) -> str | None:
        """Why the latch was engaged (``None`` when released)."""
        return self._estop_reason

    # -- filtering -----------------------------------------------------------------------------------

    def hold(self, current: np.ndarray, reason: str | None = None) -> JointTarget:
        """A command that keeps the arm where it is (``current`` (n,) rad); counts ``reason`` if given."""
        if reason is not None:
            self.counts[reason] += 1
        q = np.asarray(current, dtype=np.float64).copy()
        self._previous = q
        return JointTarget(q, None)

    def filter(
        self,
        command: JointTarget,
        current: np.ndarray,
        *,
        previous: np.ndarray | None = None,
        lead_steps: int = 1,
    ) -> tuple[JointTarget, tuple[str, ...]]:
        """Make ``command`` safe to send.

        Args:
            command: the policy's target.
            current: (n,) measured joint positions, rad.
            previous: (n,) the command before this one, rad (default: the last one this layer passed, or
                ``current`` after a reset); a trajectory passes its previous point.
            lead_steps: how many control periods ahead of ``current`` the command is due (1 when streaming,
                k for a trajectory's k-th point): the velocity bound is ``max_velocity · dt · lead_steps``.

        Returns:
            ``(safe_command, interventions)``: the command to send and the names of the checks that changed it; if
            one of :data:`REJECTIONS` is among them, the command is a hold of ``current``.
        """
        current = np.asarray(current, dtype=np.float64)
        if self.engaged:
            return self.hold(current, "estop"), ("estop",)
        q = np.asarray(command.positions, dtype=np.float64)
        gripper = command.gripper
        if (
            q.shape != (self.limits.n_joints,)
            or not np.all(np.isfinite(q))
            or (gripper is not None and not np.isfinite(gripper))
        ):
            logger.warning("Rejected a non-finite command %s (gripper %s): holding.", q, gripper)
            return self.hold(current, "nonfinite"), ("nonfinite",)
        if previous is None:
            previous = current if self._previous is None else self._previous
        limits = self.limits
        interventions: list[str] = []

        clipped = np.clip(q, limits.q_min, limits.q_max)
        if not np.array_equal(clipped, q):
            interventions.append("position_limit")
        q = _scale_toward(previous, clipped, limits.max_step)
        if q is not clipped:
            interventions.append("step_limit")
        bounded = _scale_toward(current, q, limits.max_velocity * limits.dt * lead_steps)
        if bounded is not q:
            interventions.append("velocity_limit")
        q = bounded
        if limits.workspace_min is not None:
            inside = self._workspace_clamp(previous, q)
            if inside is None:
                self.counts.update([*interventions, "workspace_reject"])
                return self.hold(current), (*interventions, "workspace_reject")
            if inside is not q:
                interventions.append("workspace")
            q = inside

        self.counts.update(interventions)
        self._previous = q
        gripper = None if gripper is None else float(np.clip(gripper, 0.0, 1.0))
        return JointTarget(q, gripper), tuple(interventions)

    def _box_distance(self, q: np.ndarray) -> float:
        """Distance (m) from the tool at ``q`` to the workspace box; 0 inside."""
        pos = self.kinematics.tool_position(q)
        outside = np.maximum(self.limits.workspace_min - pos, 0.0) + np.maximum(pos - self.limits.workspace_max, 0.0)
        return float(np.linalg.norm(outside))

    def _workspace_clamp(self, start: np.ndarray, q: np.ndarray) -> np.ndarray | None:
        """``q`` if its tool is inside the box; else the furthest point toward it from ``start`` that is; ``None``
        to reject (``start`` is outside too and ``q`` does not get closer)."""
        distance = self._box_distance(q)
        if distance == 0.0:
            return q
        start_distance = self._box_distance(start)
        if start_distance > 0.0:
            return q if distance < start_distance else None
        low, high = 0.0, 1.0  # fraction of start → q; inside at low, outside at high
        for _ in range(_WORKSPACE_BISECTIONS):
            mid = 0.5 * (low + high)
            if self._box_distance(start + mid * (q - start)) == 0.0:
                low = mid
            else:
                high = mid
        return start + low * (q - start)


def _scale_toward(origin: np.ndarray, q: np.ndarray, max_change: float) -> np.ndarray:
    """``q`` itself if no joint is more than ``max_change`` from ``origin``; else origin + the change scaled so the
    largest joint change is ``max_change`` (a new array)."""
    delta = q - origin
    largest = float(np.abs(delta).max())
    if largest <= max_change:
        return q
    return origin + delta * (max_change / largest)
