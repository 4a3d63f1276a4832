"""The newest robot messages → the observation a policy takes, and the policy's deterministic sampler as a function.

The policy sees what it saw in simulation: ``state`` (8,) is computed from the measured joints by the same arm
model and formula as :class:`envs.tabletop.env.TabletopEnv` (see :class:`real_robot.adapters.ArmKinematics`),
images are RGB uint8 (H, W, 3) right side up, and the instruction is a fixed string.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from real_robot.adapters import ArmKinematics
from real_robot.transport import Image, JointState


@dataclass(frozen=True)
class RobotObservation:
    """One assembled observation.

    Attributes:
        state: (8,) float32, the policy's ``state``: tool position (m), tool axis-angle, finger joints (m).
        joint_positions: (7,) measured arm joints, rad (what a hold command holds).
        images: camera name → (H, W, 3) uint8.
        instruction: the language instruction.
        stamp: s, loop clock: when its oldest part (the joint state or a camera's image) was received.
    """

    state: np.ndarray
    joint_positions: np.ndarray
    images: dict[str, np.ndarray] = field(default_factory=dict)
    instruction: str = ""
    stamp: float = 0.0


class ObservationAssembler:
    """Builds :class:`RobotObservation` from the newest joint state and images.

    Args:
        kinematics: the arm model (also fixes the expected joint names and order).
        cameras: camera names the policy needs; assembling raises if one has not arrived yet.
        instruction: the task's instruction.
    """

    def __init__(self, kinematics: ArmKinematics, cameras: Sequence[str] = (), instruction: str = "") -> None:
        self.kinematics = kinematics
        self.cameras = tuple(cameras)
        self.instruction = instruction

    def missing_cameras(self, images: Mapping[str, Image]) -> list[str]:
        """The policy's cameras that have not sent an image yet."""
        return [c for c in self.cameras if c not in images]

    def assemble(self, joint_state: JointState, images: Mapping[str, Image]) -> RobotObservation:
        """Raises ``ValueError`` on joint names/order that do not match, or a missing camera."""
        q, fingers = self.kinematics.split_joint_state(joint_state.names, joint_state.positions)
        missing = self.missing_cameras(images)
        if missing:
            raise ValueError(f"No image yet from camera(s) {missing}; received cameras: {sorted(images)}.")
        return RobotObservation(
            state=self.kinematics.state(q, fingers),
            joint_positions=q,
            images={c: images[c].data for c in self.cameras},
            instruction=self.instruction,
            stamp=min([joint_state.stamp, *(images[c].stamp for c in self.cameras)]),
        )


class PolicyRunner:
    """A policy's deterministic sampler as ``runner(observation) -> actions (H', A)`` in env units.

    The call path is the one simulation evaluation uses: ``policy.sample(obs, deterministic=True)``; the chunk is
    cut to ``act_steps`` (the steps the policy was trained to execute open loop).

    Args:
        policy: a loaded policy (``policies.checkpoint.load_policy``), in eval mode.
        act_steps: how many of the chunk's H actions to execute (default: all).
        seed: seeds the sampler's initial noise (deterministic sampling is deterministic given it).
        extra_state: for state policies trained on more than the 8-D ``state`` (e.g. ``object_state``): returns
            the rest of the flat observation, (obs_dim - 8,), from a perception system.
    """

    def __init__(
        self,
        policy: torch.nn.Module,
        act_steps: int | None = None,
        seed: int = 0,
        extra_state: Callable[[], np.ndarray] | None = None,
    ) -> None:
        self.policy = policy.eval()
        self.kind = getattr(policy, "observation_kind", "state")
        self.act_steps = act_steps
        self.extra_state = extra_state
        self.generator = torch.Generator().manual_seed(seed)
        if self.kind == "state" and extra_state is None and policy.obs_dim != 8:
            raise ValueError(
                f"PolicyRunner: the policy takes a {policy.obs_dim}-D observation but a robot measures only the 8-D "
                "state; pass extra_state= (e.g. object poses from perception) for the remaining "
                f"{policy.obs_dim - 8} entries."
            )

    @classmethod
    def from_checkpoint(cls, path: str | Path, **kwargs: Any) -> tuple[PolicyRunner, dict[str, Any]]:
        """Load a checkpoint; ``act_steps`` defaults to its metadata's. Returns ``(runner, metadata)``."""
        from policies.checkpoint import load_policy

        policy, metadata = load_policy(path)
        kwargs.setdefault("act_steps", metadata.get("act_steps"))
        return cls(policy, **kwargs), metadata

    def policy_input(self, obs: RobotObservation) -> Any:
        """The batch of one the policy's ``sample`` takes."""
        state = torch.as_tensor(obs.state, dtype=torch.float32)[None]  # (1, 8)
        if self.kind == "vla":
            from policies.vla_backbone import VLAObservation

            images = {c: torch.as_tensor(image)[None] for c, image in obs.images.items()}  # (1, H, W, 3)
            return VLAObservation(images, [obs.instruction], state)
        if self.extra_state is not None:
            extra = torch.as_tensor(np.asarray(self.extra_state(), dtype=np.float32))[None]
            state = torch.cat([state, extra], dim=1)  # (1, obs_dim)
        if state.shape[1] != self.policy.obs_dim:
            raise ValueError(
                f"PolicyRunner: built a {state.shape[1]}-D observation, policy takes {self.policy.obs_dim}."
            )
        return state

    @torch.no_grad()
    def __call__(self, obs: RobotObservation) -> np.ndarray:
        actions = self.policy.sample(self.policy_input(obs), deterministic=True, generator=self.generator).actions
        chunk = actions[0].cpu().numpy().astype(np.float64)  # (H, A)
        return chunk if self.act_steps is None else chunk[: self.act_steps]
