"""The newest robot messages → the observation a policy takes, and the policy's deterministic sampler as a function.

The policy sees what it saw in simulation: ``state`` (8,) is computed from the measured joints by the same arm
model and formula as :class:`envs.tabletop.env.TabletopEnv` (see :class:`real_robot.adapters.ArmKinematics`),
images are RGB uint8 (H, W, 3) right side up, the instruction is a fixed string, and a state policy trained on
the simulator's ``object_state`` gets it from a perception system's topic (the simulated robot publishes the
true one).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from real_robot.adapters import STATE_DIM, ArmKinematics
from real_robot.transport import Image, JointState, ObjectState


@dataclass(frozen=True)
class RobotObservation:
    """One assembled observation.

    Attributes:
        state: (8,) float32, the policy's ``state``: tool position (m), tool axis-angle, finger joints (m).
        joint_positions: (7,) measured arm joints, rad (what a hold command holds).
        images: camera name → (H, W, 3) uint8.
        instruction: the language instruction.
        object_state: (K,) float32 perception output, for policies that take it; ``None`` otherwise.
        stamp: s, loop clock: when its oldest part (joint state, a camera's image, object state) was received.
    """

    state: np.ndarray
    joint_positions: np.ndarray
    images: dict[str, np.ndarray] = field(default_factory=dict)
    instruction: str = ""
    object_state: np.ndarray | None = None
    stamp: float = 0.0


class ObservationAssembler:
    """Builds :class:`RobotObservation` from the newest joint state and images.

    Args:
        kinematics: the arm model (also fixes the expected joint names and order).
        cameras: camera names the policy needs; assembling raises if one has not arrived yet.
        instruction: the task's instruction.
        object_state_dim: K, the length of the perception output the policy takes (0: none).
    """

    def __init__(
        self,
        kinematics: ArmKinematics,
        cameras: Sequence[str] = (),
        instruction: str = "",
        object_state_dim: int = 0,
    ) -> None:
        if object_state_dim < 0:
            raise ValueError(f"ObservationAssembler: object_state_dim must be >= 0, got {object_state_dim}.")
        self.kinematics = kinematics
        self.cameras = tuple(cameras)
        self.instruction = instruction
        self.object_state_dim = object_state_dim

    def missing_inputs(self, images: Mapping[str, Image], object_state: ObjectState | None) -> list[str]:
        """The policy's inputs besides the joint state that have not arrived yet (camera names, ``object_state``)."""
        missing = [c for c in self.cameras if c not in images]
        if self.object_state_dim and object_state is None:
            missing.append("object_state")
        return missing

    def assemble(
        self, joint_state: JointState, images: Mapping[str, Image], object_state: ObjectState | None = None
    ) -> RobotObservation:
        """Raises ``ValueError`` on joint names/order that do not match, a missing input, or an object state of the
        wrong length."""
        q, fingers = self.kinematics.split_joint_state(joint_state.names, joint_state.positions)
        missing = self.missing_inputs(images, object_state)
        if missing:
            raise ValueError(f"No message yet from {missing}; received cameras: {sorted(images)}.")
        stamps = [joint_state.stamp, *(images[c].stamp for c in self.cameras)]
        values = None
        if self.object_state_dim:
            assert object_state is not None, "assemble: checked by missing_inputs"
            if object_state.values.shape != (self.object_state_dim,):
                raise ValueError(
                    f"object_state has shape {object_state.values.shape}; the policy takes ({self.object_state_dim},)."
                )
            values = object_state.values.astype(np.float32)
            stamps.append(object_state.stamp)
        return RobotObservation(
            state=self.kinematics.state(q, fingers),
            joint_positions=q,
            images={c: images[c].data for c in self.cameras},
            instruction=self.instruction,
            object_state=values,
            stamp=min(stamps),
        )


class PolicyRunner:
    """A policy's deterministic sampler as ``runner(observation) -> actions (H', A)`` in env units.

    The call path is the one simulation evaluation uses: ``policy.sample(obs, deterministic=True)``; the chunk is
    cut to ``act_steps`` (the steps the policy was trained to execute open loop).

    A state policy trained on more than the 8-D ``state`` (the simulator's flat ``state`` + ``object_state``)
    takes the rest from the observation's ``object_state`` (:attr:`object_state_dim` entries).

    Args:
        policy: a loaded policy (``policies.checkpoint.load_policy``), in eval mode.
        act_steps: how many of the chunk's H actions to execute (default: all).
        seed: seeds the sampler's initial noise (deterministic sampling is deterministic given it).
    """

    def __init__(self, policy: torch.nn.Module, act_steps: int | None = None, seed: int = 0) -> None:
        self.policy = policy.eval()
        self.kind = getattr(policy, "observation_kind", "state")
        self.act_steps = act_steps
        self.generator = torch.Generator().manual_seed(seed)
        self.object_state_dim = policy.obs_dim - STATE_DIM if self.kind == "state" else 0
        if self.object_state_dim < 0:
            raise ValueError(
                f"PolicyRunner: the policy takes a {policy.obs_dim}-D observation, less than the robot's "
                f"{STATE_DIM}-D state: it was not trained on the tabletop arm."
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
        if self.object_state_dim:
            if obs.object_state is None:
                raise ValueError(
                    f"PolicyRunner: the policy takes a {self.object_state_dim}-D object_state besides the state; "
                    "the observation has none (publish it on the object_state topic)."
                )
            extra = torch.as_tensor(np.asarray(obs.object_state, dtype=np.float32))[None]
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
