"""Env observations and dataset steps -> what a policy's ``sample`` and ``pretrain_loss`` take, in one place.

A policy class says what it takes with its attribute ``observation_kind``:

- ``"state"`` (policies without the attribute: flow, diffusion, Gaussian): the flat state vector
  ``[state, object_state]`` of ``envs.make_env`` (Dict observations flattened), as a ``(B, obs_dim)`` tensor;
- ``"vla"`` (:class:`policies.vla.VLAPolicy`): its cameras' images, the 8-D ``state`` and the language
  instruction, as a :class:`policies.vla_backbone.VLAObservation`. Its envs keep Dict observations and render
  the cameras, and its ``obs_dim`` is the size of ``state``.

Verbs, evaluation and the RL algorithms build one :class:`ObservationAdapter` per policy and use it for the env
options (``flatten``), the policy's ``obs_dim``, each observation batch, the critic's input, rollout storage
(:class:`ObservationBuffer`) and the dataset; nothing else branches on the policy family.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np
import torch

from envs import make_vector_env
from policies.vla_backbone import CAMERA_IMAGE_KEYS, STATE_KEY, VLAObservation
from robo_rlft.data import DemoDataset

if TYPE_CHECKING:
    from robo_rlft.config import EnvConfig

STATE_KIND = "state"
VLA_KIND = "vla"
OBSERVATION_KINDS: tuple[str, ...] = (STATE_KIND, VLA_KIND)
# What the VLA's critic sees (``policy.critic_input``): the pooled VLM prefix or the pooled action-expert features.
CRITIC_INPUTS: tuple[str, ...] = ("prefix", "expert")
# What the user runs to record images into a dataset (named in errors).
_COLLECT_HINT = "robo-rlft collect env=tabletop env.task=... env.cameras=[{cameras}]"


def add_batch_dim(obs: Any) -> Any:
    """One env's observation (an array or a Dict of arrays) as a batch of one."""
    if isinstance(obs, Mapping):
        return {key: np.asarray(value)[None] for key, value in obs.items()}
    return np.asarray(obs)[None]


def stack_observations(items: Sequence[Any]) -> Any:
    """Single-env observations (arrays, or Dicts of arrays, e.g. a vector env's ``info["final_obs"][rows]``) as one
    batch: ``(B, ...)`` arrays, or a Dict of them."""
    if isinstance(items[0], Mapping):
        return {key: np.stack([np.asarray(item[key]) for item in items]) for key in items[0]}
    return np.stack([np.asarray(item) for item in items])


@dataclass(frozen=True)
class ObservationAdapter:
    """Turns env observations (and dataset steps) into a policy's input.

    Attributes:
        kind: one of ``OBSERVATION_KINDS``.
        cameras: (``vla``) the policy's cameras, in the order its prefix takes them.
    """

    kind: str = STATE_KIND
    cameras: tuple[str, ...] = ()
    critic_input: str = "prefix"

    def __post_init__(self) -> None:
        if self.kind not in OBSERVATION_KINDS:
            raise ValueError(f"observation_kind={self.kind!r} is not allowed; choose one of {list(OBSERVATION_KINDS)}.")
        if self.uses_images and not self.cameras:
            raise ValueError("An image-based policy needs at least one camera (policy.cameras is empty).")
        if self.critic_input not in CRITIC_INPUTS:
            raise ValueError(
                f"policy.critic_input={self.critic_input!r} is not allowed; choose one of {list(CRITIC_INPUTS)}."
            )

    @classmethod
    def for_policy(
        cls, policy: torch.nn.Module | type, config: Any | None = None, critic_input: str = "prefix"
    ) -> ObservationAdapter:
        """The adapter of a policy instance, or of a policy class with its config (before it is built).

        ``critic_input`` (``vla``; ``policy.critic_input``): what :meth:`critic_features` gives the VLA's critic.
        """
        kind = getattr(policy, "observation_kind", STATE_KIND)
        config = policy.config if config is None else config
        return cls(kind, tuple(config.cameras) if kind == VLA_KIND else (), critic_input)

    @property
    def uses_images(self) -> bool:
        """The policy needs camera images: its envs render ``cameras`` (``EnvConfig.make_kwargs(cameras=True)``)."""
        return self.kind == VLA_KIND

    @property
    def flatten(self) -> bool:
        """``flatten`` of ``envs.make_env`` / ``make_vector_env``: state policies take the flat vector."""
        return not self.uses_images

    def training_envs(self, env: EnvConfig, horizon: int) -> gym.vector.VectorEnv:
        """The vector env RL rolls out in: ``env.num_envs`` chunked copies of ``env``'s env, rendering the
        cameras and keeping Dict observations when the policy takes images."""
        return make_vector_env(
            env.env_id,
            env.num_envs,
            horizon,
            env.act_steps,
            env.asynchronous,
            env.make_kwargs(cameras=self.uses_images),
            flatten=self.flatten,
        )

    def obs_dim(self, observation_space: gym.Space) -> int:
        """The policy's ``obs_dim`` in an env made with :attr:`flatten`: the flat size, or the ``state`` size."""
        if self.uses_images:
            return int(observation_space[STATE_KEY].shape[0])
        return int(observation_space.shape[0])

    def instructions(self, env: gym.Env | gym.vector.VectorEnv) -> list[str] | None:
        """The current language instruction of each env (``env.instruction``); None for state policies."""
        if not self.uses_images:
            return None
        if isinstance(env, gym.vector.VectorEnv):
            return [str(text) for text in env.get_attr("instruction")]
        return [str(env.get_wrapper_attr("instruction"))]

    def __call__(
        self, obs: Any, instructions: Sequence[str] | None, device: str | torch.device
    ) -> torch.Tensor | VLAObservation:
        """A batch of env observations -> the policy's input.

        Args:
            obs: state policies: ``(B, obs_dim)`` array; ``vla``: a batched Dict observation
                (``<camera>_image (B, H, W, 3)`` uint8, ``state (B, 8)``, ...).
            instructions: ``B`` instructions (``vla``; see :meth:`instructions`), ignored otherwise.
        """
        if not self.uses_images:
            return torch.as_tensor(obs, dtype=torch.float32, device=device)
        if instructions is None:
            raise ValueError("An image-based policy needs the instructions of the observations; got None.")
        return VLAObservation.from_env(obs, instructions, self.cameras, device=device)

    # ---- the critic ----------------------------------------------------------------------------------------

    def critic_dim(self, policy: torch.nn.Module) -> int:
        """``D``, the size of :meth:`critic_features`: ``obs_dim`` for state policies; for the VLA the pooled prefix
        (VLM width) or expert features (expert width), plus its ``obs_dim`` (the state)."""
        if not self.uses_images:
            return int(policy.obs_dim)
        return int(policy.critic_feature_dim(self.critic_input))

    def critic_features(self, policy: torch.nn.Module, obs: torch.Tensor | VLAObservation) -> torch.Tensor:
        """``(B, D)`` what the PPO critic ``V`` takes of a batch of policy inputs, detached from the policy.

        State policies: the normalised observation (``policy.normalizer.normalize_obs``). ``vla``: its pooled
        prefix (or expert) features concatenated with its normalised state
        (:meth:`policies.vla.VLAPolicy.critic_features`).
        """
        if not self.uses_images:
            return policy.normalizer.normalize_obs(obs)
        return policy.critic_features(obs, self.critic_input)

    def sample_with_critic_features(
        self, policy: torch.nn.Module, obs: torch.Tensor | VLAObservation
    ) -> tuple[Any, torch.Tensor]:
        """A stochastic ``policy.sample(obs)`` (a ``ChainSample``) and :meth:`critic_features` of the same batch;
        the VLA runs its VLM once for both."""
        if not self.uses_images:
            return policy.sample(obs), policy.normalizer.normalize_obs(obs)
        return policy.sample_with_critic_features(obs, self.critic_input)

    # ---- rollout storage -----------------------------------------------------------------------------------

    def new_buffer(self, num_steps: int, num_envs: int, observation_space: gym.Space) -> ObservationBuffer:
        """Storage for ``(T=num_steps, N=num_envs)`` policy inputs of a vector env with ``observation_space``
        (its ``single_observation_space``)."""
        return ObservationBuffer(self, num_steps, num_envs, observation_space)

    # ---- datasets ------------------------------------------------------------------------------------------

    def check_dataset(
        self, dataset: DemoDataset, env_name: str, obs_dim: int, action_dim: int, image_size: int | None = None
    ) -> None:
        """Raise a ValueError naming what ``dataset`` lacks for this policy in env ``env_name`` of these dims.

        ``image_size`` (``env.image_size``, ``vla``): the size the env renders at evaluation, which the dataset's
        images must have been recorded at.
        """
        if not self.uses_images:
            if (dataset.obs_dim, dataset.act_dim) != (obs_dim, action_dim):
                raise ValueError(
                    f"Dataset dims (obs {dataset.obs_dim}, action {dataset.act_dim}) do not match env {env_name!r} "
                    f"(obs {obs_dim}, action {action_dim})."
                )
            return
        self._check_images_and_instructions(dataset)
        state_slice = self._state_slice(dataset)
        state_dim = state_slice.stop - state_slice.start
        if (state_dim, dataset.act_dim) != (obs_dim, action_dim):
            raise ValueError(
                f"Dataset dims (state {state_dim}, action {dataset.act_dim}) do not match env {env_name!r} "
                f"(state {obs_dim}, action {action_dim})."
            )
        sizes = {camera: dataset.images[camera].shape[1:3] for camera in self.cameras}
        if image_size is not None and any(size != (image_size, image_size) for size in sizes.values()):
            shown = {camera: f"{h}x{w}" for camera, (h, w) in sizes.items()}
            raise ValueError(
                f"The dataset's images are {shown} but env.image_size="
                f"{image_size}: evaluation would render another size; pass the collect run's env.image_size."
            )

    def dataset_inputs(self, dataset: DemoDataset) -> tuple[torch.Tensor | VLAObservation, dict[str, np.ndarray]]:
        """The policy input of every dataset step (row ``t`` pairs with ``dataset.action_chunks(H)[1][t]``) and
        the normaliser's statistics (``Normalizer.from_stats``).

        Returns:
            State policies: ``(N, obs_dim)`` float32 tensor and ``dataset.stats()``. ``vla``: a ``VLAObservation``
            of N rows (images shared with the dataset, on the CPU; the policy moves each minibatch) and the stats
            with ``obs_mean``/``obs_std`` of the ``state`` dims only. Its ``object_state`` holds the dataset's other
            observation dims (the objects' poses), z-scored with the dataset's statistics: the target of the VLA's
            auxiliary object loss (``policy.object_loss_weight``), None when the observations are only ``state``.
        """
        if not self.uses_images:
            return torch.as_tensor(dataset.observations, dtype=torch.float32), dataset.stats()
        self._check_images_and_instructions(dataset)
        state_slice = self._state_slice(dataset)
        stats = dataset.stats()
        others = np.ones(dataset.obs_dim, dtype=bool)
        others[state_slice] = False  # every dim that is not the robot's state: the objects' poses
        object_state = None
        if others.any():
            z_scored = (dataset.observations[:, others] - stats["obs_mean"][others]) / stats["obs_std"][others]
            object_state = torch.as_tensor(z_scored, dtype=torch.float32)  # (N, object_dim)
        stats = {**stats, "obs_mean": stats["obs_mean"][state_slice], "obs_std": stats["obs_std"][state_slice]}
        inputs = VLAObservation(
            images={camera: torch.from_numpy(dataset.images[camera]) for camera in self.cameras},  # (N, H, W, 3)
            instructions=[str(text) for text in dataset.instructions],
            state=torch.as_tensor(dataset.observations[:, state_slice], dtype=torch.float32),  # (N, state_dim)
            object_state=object_state,
        )
        return inputs, stats

    def prepare_pretraining(self, policy: torch.nn.Module, inputs: torch.Tensor | VLAObservation) -> None:
        """Give ``policy`` its pretraining-only modules before the optimiser is built: for a VLA with
        ``policy.object_loss_weight > 0``, the object head sized to ``inputs.object_state`` (of
        :meth:`dataset_inputs`). :meth:`finish_pretraining` removes them."""
        # getattr: image policies without the option (SmolVLA) have no object head.
        if self.uses_images and getattr(policy.config, "object_loss_weight", 0.0) > 0:
            object_dim = 0 if inputs.object_state is None else inputs.object_state.shape[1]
            policy.add_object_head(object_dim)
        if hasattr(policy, "prepare_pretraining"):  # the policy's own pretraining choices (SmolVLA's state projection)
            policy.prepare_pretraining()

    def finish_pretraining(self, policy: torch.nn.Module) -> None:
        """Undo what :meth:`prepare_pretraining` did, so the saved policy is the one RL and deployment load."""
        if getattr(policy, "object_head", None) is not None:
            policy.remove_object_head()
        if hasattr(policy, "finish_pretraining"):
            policy.finish_pretraining()

    def _check_images_and_instructions(self, dataset: DemoDataset) -> None:
        record = _COLLECT_HINT.format(cameras=",".join(self.cameras))
        missing = [camera for camera in self.cameras if camera not in dataset.images]
        if missing:
            raise ValueError(
                f"The dataset has no images of cameras {missing} (it has {sorted(dataset.images) or 'none'}), which "
                f"policy.cameras={list(self.cameras)} needs; record them at collect time: `{record}`."
            )
        if dataset.instructions is None:
            raise ValueError(f"The dataset has no instructions, which the VLA needs; record a new one: `{record}`.")

    @staticmethod
    def _state_slice(dataset: DemoDataset) -> slice:
        """Where ``state`` sits in the dataset's flat observations (``meta["observation_layout"]``, in order)."""
        layout = dataset.meta.get("observation_layout")
        if not isinstance(layout, dict) or STATE_KEY not in layout:
            raise ValueError(
                f"The dataset's meta has no observation_layout with {STATE_KEY!r} (got {layout!r}), so its state "
                "cannot be told apart from the object state; record it with `robo-rlft collect` on env=tabletop."
            )
        start = 0
        for key, size in layout.items():
            if key == STATE_KEY:
                return slice(start, start + int(size))
            start += int(size)
        raise AssertionError("unreachable: STATE_KEY is in the layout")


class ObservationBuffer:
    """Pre-allocated ``(T, N, ...)`` rollout storage of policy inputs (CPU), indexed like a ``(T, N)`` tensor.

    State policies: one float32 ``(T, N, obs_dim)`` tensor. ``vla``: per camera a uint8 ``(T, N, H, W, 3)`` tensor,
    the float32 ``(T, N, state_dim)`` state and a ``(T, N)`` object array of instructions, so a rollout keeps its
    images at one byte per pixel and the update rebuilds the exact inputs the chains were sampled at.
    """

    def __init__(
        self, adapter: ObservationAdapter, num_steps: int, num_envs: int, observation_space: gym.Space
    ) -> None:
        self.adapter = adapter
        shape = (num_steps, num_envs)
        self.state = torch.zeros(*shape, adapter.obs_dim(observation_space))
        self.images: dict[str, torch.Tensor] = {}
        self.instructions: np.ndarray | None = None
        if adapter.uses_images:
            for camera in adapter.cameras:
                space = observation_space[CAMERA_IMAGE_KEYS[camera]]
                self.images[camera] = torch.zeros(*shape, *space.shape, dtype=torch.uint8)
            self.instructions = np.full(shape, "", dtype=object)

    def store(self, t: int, obs: torch.Tensor | VLAObservation) -> None:
        """Keep step ``t``'s batch of ``N`` policy inputs (as the adapter made them)."""
        if not self.adapter.uses_images:
            self.state[t] = obs
            return
        self.state[t] = obs.state
        for camera, images in self.images.items():
            images[t] = obs.images[camera]
        self.instructions[t] = obs.instructions

    def _replace(
        self, state: torch.Tensor, images: dict[str, torch.Tensor], instructions: np.ndarray | None
    ) -> ObservationBuffer:
        buffer = object.__new__(ObservationBuffer)
        buffer.adapter, buffer.state, buffer.images, buffer.instructions = self.adapter, state, images, instructions
        return buffer

    def head(self, num_steps: int) -> ObservationBuffer:
        """The first ``num_steps`` steps (views, no copy)."""
        return self._replace(
            self.state[:num_steps],
            {camera: images[:num_steps] for camera, images in self.images.items()},
            None if self.instructions is None else self.instructions[:num_steps],
        )

    def padded(self, num_steps: int) -> ObservationBuffer:
        """``num_steps`` steps: these, then zeros (empty instructions) — for slices of different lengths."""
        extra = num_steps - self.state.shape[0]
        if extra <= 0:
            return self.head(num_steps)

        def pad(tensor: torch.Tensor) -> torch.Tensor:
            return torch.cat([tensor, tensor.new_zeros(extra, *tensor.shape[1:])])

        instructions = None
        if self.instructions is not None:
            instructions = np.concatenate([self.instructions, np.full((extra, self.instructions.shape[1]), "", object)])
        return self._replace(pad(self.state), {c: pad(images) for c, images in self.images.items()}, instructions)

    @staticmethod
    def concat_envs(buffers: Sequence[ObservationBuffer]) -> ObservationBuffer:
        """Buffers of disjoint env slices (same ``T``) → one ``(T, ΣN)`` buffer, envs in the given order."""
        first = buffers[0]
        if len(buffers) == 1:
            return first
        instructions = None
        if first.instructions is not None:
            instructions = np.concatenate([buffer.instructions for buffer in buffers], axis=1)
        return first._replace(
            torch.cat([buffer.state for buffer in buffers], dim=1),
            {camera: torch.cat([buffer.images[camera] for buffer in buffers], dim=1) for camera in first.images},
            instructions,
        )

    def flat(self) -> torch.Tensor | VLAObservation:
        """Every stored input, ``T * N`` rows in ``(t, n)`` order (``[T, N, ...] -> [T * N, ...]``)."""
        if not self.adapter.uses_images:
            return self.state.flatten(0, 1)
        return VLAObservation(
            images={camera: images.flatten(0, 1) for camera, images in self.images.items()},  # (T*N, H, W, 3)
            instructions=[str(text) for text in self.instructions.reshape(-1)],
            state=self.state.flatten(0, 1),  # (T*N, state_dim)
        )

    def __getitem__(self, index: Any) -> torch.Tensor | VLAObservation:
        """The inputs at ``index`` of the ``(T, N)`` grid (an int, a tuple, a ``(T, N)`` bool mask...).

        State policies get the indexed tensor; ``vla`` a :class:`VLAObservation`, so the index must leave one
        batch dimension (a step ``t``, or a ``(T, N)`` mask).
        """
        if not self.adapter.uses_images:
            return self.state[index]
        state = self.state[index]
        if state.ndim != 2:
            raise IndexError(
                f"A VLA observation batch needs one batch dimension; index {index!r} leaves {state.ndim - 1}."
            )
        rows = index.cpu().numpy() if isinstance(index, torch.Tensor) else index
        return VLAObservation(
            images={camera: images[index] for camera, images in self.images.items()},
            instructions=[str(text) for text in np.asarray(self.instructions[rows]).reshape(-1)],
            state=state,
        )
