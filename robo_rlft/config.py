"""Structured configs: every default lives here once, validated at start-up.

Hydra composes these dataclasses with the YAML presets under ``configs/`` (groups ``env``,
``policy``, ``algo``, ``experiment``); ``OmegaConf.to_object`` then builds the dataclasses, whose
``__post_init__`` checks values and names the bad key, the value and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from envs import ENV_IDS
from envs.libero import SUITES as LIBERO_SUITES
from envs.registry import LIBERO_ENV_ID, TABLETOP_MULTITASK_ENV_ID, tabletop_env_ids
from envs.tabletop.multitask import check_task_list
from policies.chain import LOG_PROB_REDUCTIONS
from policies.critic import CriticConfig
from policies.diffusion import DiffusionPolicyConfig
from policies.flow import FlowPolicyConfig
from policies.gaussian import GaussianPolicyConfig
from policies.pi0 import PI0PolicyConfig
from policies.smolvla import SmolVLAPolicyConfig
from policies.vla import VLAPolicyConfig
from real_robot.transport import Topics

RATIO_UNITS: tuple[str, ...] = ("chain", "transition")


def _check_positive(section: str, obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is None or value <= 0:
            raise ValueError(f"{section}.{name} must be > 0, got {value!r}.")


def _check_choice(key: str, value: object, allowed: tuple | list) -> None:
    if value not in allowed:
        raise ValueError(f"{key}={value!r} is not allowed; choose one of {list(allowed)}.")


# Env-specific EnvConfig fields -> the env names they apply to (others must leave them at their defaults).
TABLETOP_FIELDS: tuple[str, ...] = ("task", "tasks", "reward_shaping", "action_mode")
LIBERO_FIELDS: tuple[str, ...] = ("suite", "task_id")
IMAGE_FIELDS: tuple[str, ...] = ("cameras", "image_size")
CAMERA_NAMES: tuple[str, ...] = ("agentview", "wrist")


@dataclass
class EnvConfig:
    """Which environment, and how rollouts execute action chunks.

    Attributes:
        name: registered env name (see ``envs.ENV_IDS``), ``tabletop`` or ``libero``.
        task: the tabletop task (``envs.tabletop.tasks.TASKS``); only with ``name=tabletop``.
        tasks: (tabletop) several tasks instead of ``task``, one per episode, told apart by their instruction
            (``envs.tabletop.multitask``; for language-conditioned policies). Evaluation covers every task's fixed
            init states and reports success per task.
        reward_shaping: (tabletop) add the task's dense distance terms to the sparse success reward.
        action_mode: (tabletop) ``delta_ee`` (LIBERO's 7-D delta end effector) or ``joint`` (absolute
            joint targets + gripper).
        suite, task_id: (libero) the LIBERO suite (``libero_spatial``, ``libero_object``, ``libero_goal``,
            ``libero_10``, ``libero_90``) and the task's index in it.
        cameras: (tabletop, libero) camera images to record: any of ``agentview``, ``wrist``. ``collect``
            stores them in the dataset; state-based policies never see them, so RL and evaluation of a
            state policy leave them off (rendering costs ~5x the simulation).
        image_size: (tabletop, libero) image height and width, pixels.
        num_envs: parallel envs for RL rollouts.
        act_steps: actions executed per chunk (the chunk horizon H is ``policy.horizon``).
        asynchronous: AsyncVectorEnv instead of Sync (only pays off for expensive steps).
    """

    name: str = "hopper"
    task: str | None = None
    tasks: list[str] | None = None
    reward_shaping: bool = False
    action_mode: str = "delta_ee"
    suite: str | None = None
    task_id: int | None = None
    cameras: list[str] = field(default_factory=list)
    image_size: int = 128
    num_envs: int = 16
    act_steps: int = 4
    asynchronous: bool = False

    def __post_init__(self) -> None:
        _check_choice("env.name", self.name, [*sorted(ENV_IDS), "tabletop", "libero"])
        _check_positive("env", self, "num_envs", "act_steps", "image_size")
        defaults = EnvConfig.__dataclass_fields__
        applies = {
            **{key: ("tabletop",) for key in TABLETOP_FIELDS},
            **{key: ("libero",) for key in LIBERO_FIELDS},
            **{key: ("tabletop", "libero") for key in IMAGE_FIELDS},
        }
        for key, names in applies.items():
            default = defaults[key].default_factory() if key == "cameras" else defaults[key].default
            if self.name not in names and getattr(self, key) != default:
                raise ValueError(
                    f"env.{key}={getattr(self, key)!r} only applies to env={' or env='.join(names)}, "
                    f"not env={self.name}."
                )
        if self.name == "tabletop":
            if self.tasks is not None:
                if self.task is not None:
                    raise ValueError(
                        f"env.task={self.task!r} and env.tasks={list(self.tasks)}: give one task or a list, not both "
                        "(env.task=null, or env=tabletop_multitask whose preset has none)."
                    )
                check_task_list(self.tasks, "env.tasks")
            else:
                _check_choice("env.task", self.task, sorted(tabletop_env_ids()))
            _check_choice("env.action_mode", self.action_mode, ["delta_ee", "joint"])
        if self.name == "libero":
            if self.suite is None or self.task_id is None:
                raise ValueError(
                    f"env=libero needs env.suite and env.task_id (e.g. env.suite=libero_spatial env.task_id=0), "
                    f"got suite={self.suite!r}, task_id={self.task_id!r}."
                )
            _check_choice("env.suite", self.suite, sorted(LIBERO_SUITES))
            num_tasks = LIBERO_SUITES[self.suite].num_tasks
            if not 0 <= self.task_id < num_tasks:
                raise ValueError(
                    f"env.task_id={self.task_id} is out of range: {self.suite} has tasks 0..{num_tasks - 1}."
                )
        for camera in self.cameras:
            _check_choice("env.cameras[]", camera, CAMERA_NAMES)
        if len(set(self.cameras)) != len(self.cameras):
            raise ValueError(f"env.cameras={list(self.cameras)} names a camera twice.")

    @property
    def env_id(self) -> str:
        """What ``envs.make_env`` takes: the short name, or the tabletop task's / LIBERO's registered id."""
        if self.name == "tabletop":
            return TABLETOP_MULTITASK_ENV_ID if self.tasks is not None else tabletop_env_ids()[self.task]
        return LIBERO_ENV_ID if self.name == "libero" else self.name

    def make_kwargs(self, cameras: bool = False) -> dict[str, Any]:
        """Keyword arguments of ``envs.make_env(self.env_id, ...)``.

        Args:
            cameras: include ``cameras`` and ``image_size`` (for image-based policies and data
                collection); state-based policies run without rendering.
        """
        kwargs: dict[str, Any] = {}
        if self.name == "tabletop":
            kwargs.update(reward_shaping=self.reward_shaping, action_mode=self.action_mode)
            if self.tasks is not None:
                kwargs.update(tasks=list(self.tasks))
        elif self.name == "libero":
            kwargs.update(suite=self.suite, task_id=self.task_id)
        if cameras and self.cameras:
            kwargs.update(cameras=list(self.cameras), image_size=self.image_size)
        return kwargs


@dataclass
class RunPolicyFields:
    """What every ``policy`` section adds to a policy family's own config.

    Attributes:
        pretrained: checkpoint directory to start from; ``builtin:NAME`` names a checkpoint shipped
            with the package. For ``finetune``, null means the built-in checkpoint for the env.
        critic: value network used by RL.
    """

    pretrained: str | None = None
    critic: CriticConfig = field(default_factory=CriticConfig)


@dataclass
class FlowPolicySection(FlowPolicyConfig, RunPolicyFields):
    """``policy=flow``: a rectified-flow policy (``policies.flow.FlowPolicyConfig``) and its run fields."""

    name: str = "flow"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_choice("policy.name", self.name, ["flow"])


@dataclass
class DiffusionPolicySection(DiffusionPolicyConfig, RunPolicyFields):
    """``policy=diffusion``: a DPPO-style diffusion policy (``policies.diffusion.DiffusionPolicyConfig``)."""

    name: str = "diffusion"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_choice("policy.name", self.name, ["diffusion"])


@dataclass
class GaussianPolicySection(GaussianPolicyConfig, RunPolicyFields):
    """``policy=gaussian``: the Gaussian MLP baseline (``policies.gaussian.GaussianPolicyConfig``)."""

    name: str = "gaussian"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_choice("policy.name", self.name, ["gaussian"])


@dataclass
class VLAPolicySection(VLAPolicyConfig, RunPolicyFields):
    """``policy=vla``: a π0-shaped vision-language-action policy (``policies.vla.VLAPolicyConfig``).

    It takes camera images: ``env.cameras`` must include every one of ``policy.cameras`` (checked in
    :class:`Config`). Pretraining, RL fine-tuning (PPO, GRPO) and evaluation all run through the CLI.

    Attributes:
        critic_input: what PPO's critic ``V(o)`` sees (besides the normalised state), detached from the policy:
            ``prefix``, the VLM prefix pooled over its tokens, or ``expert``, the action expert's pooled features
            (``policies.vla.VLAPolicy.critic_features``).
    """

    name: str = "vla"
    critic_input: str = "prefix"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_choice("policy.name", self.name, ["vla"])
        _check_choice("policy.critic_input", self.critic_input, ["prefix", "expert"])


@dataclass
class SmolVLAPolicySection(SmolVLAPolicyConfig, RunPolicyFields):
    """``policy=smolvla``: LeRobot's SmolVLA (``policies.smolvla.SmolVLAPolicyConfig``), started from a LeRobot
    checkpoint (``policy.pretrained=PATH``: ``config.json`` + ``model.safetensors`` + processor files).

    The architecture comes from the checkpoint; the run chooses ``vlm_path`` (where the checkpoint's SmolVLM folder
    is on this machine), ``cameras`` (our env cameras, in the order of the checkpoint's image features), the noise
    scheme and the critic.

    Attributes:
        critic_input: what PPO's critic sees besides the normalised state: ``prefix`` (the pooled VLM prefix) or
            ``expert`` (the action expert's pooled features).
    """

    name: str = "smolvla"
    critic_input: str = "prefix"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_choice("policy.name", self.name, ["smolvla"])
        _check_choice("policy.critic_input", self.critic_input, ["prefix", "expert"])


@dataclass
class PI0PolicySection(PI0PolicyConfig, RunPolicyFields):
    """``policy=pi0``: LeRobot's π0 (``policies.pi0.PI0PolicyConfig``), started from a LeRobot checkpoint
    (``policy.pretrained=PATH``: ``config.json`` + ``model.safetensors`` + processor files).

    The architecture comes from the checkpoint; the run chooses ``tokenizer_path`` (PaliGemma's tokenizer on this
    machine; LeRobot checkpoints have none), ``cameras`` (our env cameras, in the order of the checkpoint's image
    features), ``dtype``, the noise scheme and the critic.

    Attributes:
        critic_input: what PPO's critic sees besides the normalised state: ``prefix`` (the pooled PaliGemma prefix)
            or ``expert`` (the action expert's pooled features).
    """

    name: str = "pi0"
    critic_input: str = "prefix"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_choice("policy.name", self.name, ["pi0"])
        _check_choice("policy.variant", self.variant, ["pi0"])
        _check_choice("policy.critic_input", self.critic_input, ["prefix", "expert"])


@dataclass
class PI05PolicySection(PI0PolicySection):
    """``policy=pi05``: LeRobot's π0.5 (the same implementation with ``variant=pi05``; LeRobot's defaults: a 200-token
    prompt that carries the discretised state, quantile normalisation)."""

    name: str = "pi05"
    variant: str = "pi05"
    tokenizer_max_length: int = 200
    state_norm: str = "QUANTILES"
    action_norm: str = "QUANTILES"

    def __post_init__(self) -> None:
        PI0PolicyConfig.__post_init__(self)
        _check_choice("policy.name", self.name, ["pi05"])
        _check_choice("policy.variant", self.variant, ["pi05"])
        _check_choice("policy.critic_input", self.critic_input, ["prefix", "expert"])


@dataclass
class PPOConfig:
    """PPO over denoising chains (DESIGN.md §3, §6).

    Attributes:
        iterations: rollout + update cycles.
        steps_per_iteration: chunk steps per env per iteration (envs are reset at each iteration).
        gamma, gae_lambda: discount and GAE parameter per *chunk* step.
        update_epochs, minibatch_size: passes over the batch and PPO samples per gradient step (chains,
            or with ``ratio_unit=transition`` stochastic transitions, as DPPO minibatches them).
        actor_lr, critic_lr: Adam learning rates; ``lr_schedule`` decays them (``constant``/``linear``).
        clip_coef: PPO clip on the chain ratio; pairs with ``log_prob_reduction`` (see
            ``policies.chain.reduce_log_prob``).
        log_prob_reduction: ``sum`` (exact chain likelihood) or ``mean`` (per element).
        ratio_unit: ``chain`` — one ratio per whole chain (ReinFlow, Flow-Noise; with flow_sde
            ``one`` the chain's single stochastic step) — or ``transition`` — one ratio per stochastic
            denoising transition (DPPO), each reduced over its H*A elements, with the per-step clip
            schedule and the denoising discount below.
        denoising_discount: (``transition``) the advantage of step k is scaled by
            ``denoising_discount ** (K - 1 - k)``, crediting the last denoising steps most (DPPO: 0.99).
        clip_coef_first: (``transition``) clip at the earliest stochastic step; the clip rises
            exponentially (``clip_schedule_rate``) to ``clip_coef`` at the last step. Null: ``clip_coef``
            at every step.
        ent_coef: bonus on the entropy of the learned noise.
        bc_coef: weight of the BC regulariser toward the frozen pretrained policy (0: off): the
            squared distance between the deterministic action chunks of both from the same ``x_0``
            (ReinFlow's W2 term). Costs two deterministic samples per minibatch.
        vf_coef: weight of the value loss.
        target_kl: stop the epoch loop when the approximate KL exceeds it (null: never).
        max_grad_norm: gradient clipping.
        critic_warmup_iterations: first iterations update the critic only.
        reward_scaling: divide rewards by the running std of the discounted return.
        norm_adv: normalise advantages per minibatch.
        eval_every, eval_episodes: deterministic evaluation cadence (0: only at the end).
        checkpoint_every: iterations between checkpoints (also written at the end).
    """

    name: str = "ppo"
    iterations: int = 40
    steps_per_iteration: int = 250
    gamma: float = 0.99
    gae_lambda: float = 0.95
    update_epochs: int = 10
    minibatch_size: int = 1000
    actor_lr: float = 3e-4
    critic_lr: float = 1e-3
    lr_schedule: str = "constant"
    clip_coef: float = 0.01
    log_prob_reduction: str = "mean"
    ratio_unit: str = "chain"
    denoising_discount: float = 1.0
    clip_coef_first: float | None = None
    clip_schedule_rate: float = 3.0
    ent_coef: float = 0.0
    bc_coef: float = 0.0
    vf_coef: float = 0.5
    target_kl: float | None = 0.01
    max_grad_norm: float = 1.0
    critic_warmup_iterations: int = 2
    reward_scaling: bool = True
    norm_adv: bool = True
    eval_every: int = 10
    eval_episodes: int = 20
    checkpoint_every: int = 5

    def __post_init__(self) -> None:
        _check_choice("algo.name", self.name, ["ppo"])
        _check_positive(
            "algo", self, "iterations", "steps_per_iteration", "update_epochs", "minibatch_size",
            "actor_lr", "critic_lr", "clip_coef", "max_grad_norm", "checkpoint_every", "eval_episodes",
        )  # fmt: skip
        _check_choice("algo.log_prob_reduction", self.log_prob_reduction, LOG_PROB_REDUCTIONS)
        _check_choice("algo.lr_schedule", self.lr_schedule, ["constant", "linear"])
        _check_choice("algo.ratio_unit", self.ratio_unit, RATIO_UNITS)
        if not 0.0 < self.denoising_discount <= 1.0:
            raise ValueError(f"algo.denoising_discount must be in (0, 1], got {self.denoising_discount}.")
        if self.clip_coef_first is not None and self.clip_coef_first <= 0:
            raise ValueError(f"algo.clip_coef_first must be > 0 or null, got {self.clip_coef_first}.")
        for name in ("gamma", "gae_lambda"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"algo.{name} must be in [0, 1], got {getattr(self, name)}.")
        if self.target_kl is not None and self.target_kl <= 0:
            raise ValueError(f"algo.target_kl must be > 0 or null, got {self.target_kl}.")
        if self.bc_coef < 0:
            raise ValueError(f"algo.bc_coef must be >= 0, got {self.bc_coef}.")
        if self.critic_warmup_iterations < 0 or self.eval_every < 0:
            raise ValueError("algo.critic_warmup_iterations and algo.eval_every must be >= 0.")


GRPO_LOSS_AGGREGATIONS: tuple[str, ...] = ("episode", "step")


@dataclass
class GRPOConfig:
    """GRPO over denoising chains: critic-free, group-normalised returns (DESIGN.md §6).

    Attributes:
        iterations: rollout + update cycles.
        group_size: G rollouts that share one initial state; ``env.num_envs`` must be a multiple of it.
        max_chunk_steps: chunk steps after which a rollout stops (it is then scored as it stands).
        update_epochs, minibatch_size, actor_lr, max_grad_norm: optimisation of the policy.
        clip_low, clip_high: asymmetric clip of the chain ratio to ``[1 - clip_low, 1 + clip_high]``
            (DAPO's "clip-higher"); they pair with ``log_prob_reduction`` like PPO's ``clip_coef``.
        log_prob_reduction: ``sum`` or ``mean`` (see ``policies.chain.reduce_log_prob``).
        loss_aggregation: how the loss averages the chunk steps of the batch: ``episode`` — every episode
            weighs the same, its steps each ``1 / its length`` (GRPO's per-sequence ``1 / |o_i|``) — or ``step``
            — every chunk step weighs the same (DAPO's token-level mean). With a sparse success reward the
            failed episodes run to the horizon, so under ``step`` their negative advantages outweigh the
            successes' and the update mostly pushes sampled chains down (README, GRPO).
        dynamic_sampling: drop groups whose rollouts all succeed or all fail (or, in envs without a
            success signal, all have the same return): they carry no learning signal.
        target_kl: stop the epoch loop when the approximate KL exceeds it (null: never).
        eval_every, eval_episodes, checkpoint_every: as for PPO.
    """

    name: str = "grpo"
    iterations: int = 40
    group_size: int = 8
    max_chunk_steps: int = 250
    update_epochs: int = 4
    minibatch_size: int = 1000
    actor_lr: float = 3e-4
    max_grad_norm: float = 1.0
    clip_low: float = 0.01
    clip_high: float = 0.014
    log_prob_reduction: str = "mean"
    loss_aggregation: str = "episode"
    dynamic_sampling: bool = True
    target_kl: float | None = 0.01
    eval_every: int = 10
    eval_episodes: int = 20
    checkpoint_every: int = 5

    def __post_init__(self) -> None:
        _check_choice("algo.name", self.name, ["grpo"])
        _check_positive(
            "algo", self, "iterations", "group_size", "max_chunk_steps", "update_epochs", "minibatch_size",
            "actor_lr", "max_grad_norm", "clip_low", "clip_high", "checkpoint_every", "eval_episodes",
        )  # fmt: skip
        if self.group_size < 2:
            raise ValueError(
                f"algo.group_size must be >= 2 (advantages are relative to the group), got {self.group_size}."
            )
        _check_choice("algo.log_prob_reduction", self.log_prob_reduction, LOG_PROB_REDUCTIONS)
        _check_choice("algo.loss_aggregation", self.loss_aggregation, GRPO_LOSS_AGGREGATIONS)
        if self.target_kl is not None and self.target_kl <= 0:
            raise ValueError(f"algo.target_kl must be > 0 or null, got {self.target_kl}.")
        if self.eval_every < 0:
            raise ValueError(f"algo.eval_every must be >= 0, got {self.eval_every}.")


@dataclass
class CollectConfig:
    """``robo-rlft collect``: train (or load) an SB3 expert and roll it out into a dataset.

    Attributes:
        expert: a trained expert: a directory from a previous ``collect`` (``expert/``) or any SB3 model
            ``.zip`` trained on raw observations; null trains one.
        expert_steps: PPO env steps when training the expert.
        episodes: demonstration episodes to record.
        action_noise: Gaussian std added to executed expert actions — the quality knob. On Hopper
            (expert 3,273): 0.05 -> 2,849, 0.1 -> 2,105, 0.2 -> 1,099, 0.3 -> 789 mean return.
            The default 0.2 gives "medium" data (about a third of the expert), which leaves RL room to improve.
    """

    expert: str | None = None
    expert_steps: int = 1_000_000
    episodes: int = 50
    action_noise: float = 0.2

    def __post_init__(self) -> None:
        _check_positive("collect", self, "expert_steps", "episodes")
        if self.action_noise < 0:
            raise ValueError(f"collect.action_noise must be >= 0, got {self.action_noise}.")


@dataclass
class PretrainConfig:
    """``robo-rlft pretrain``: behaviour cloning with the policy's supervised loss and EMA.

    Attributes:
        dataset: path to a ``.npz`` dataset written by ``robo-rlft collect``.
        gradient_steps, batch_size, lr, weight_decay: optimisation.
        ema_decay: exponential moving average of the weights; the EMA model is what is saved.
        eval_episodes: evaluate the EMA policy at the end (0 to skip).
    """

    dataset: str | None = None
    gradient_steps: int = 10_000
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-6
    ema_decay: float = 0.995
    eval_episodes: int = 20

    def __post_init__(self) -> None:
        _check_positive("pretrain", self, "gradient_steps", "batch_size", "lr")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"pretrain.ema_decay must be in [0, 1), got {self.ema_decay}.")


SCALE_BACKENDS: tuple[str, ...] = ("local", "ray")


@dataclass
class ScaleConfig:
    """``scale=``: where RL rollouts run (``robo_rlft.scale``): ``num_workers`` workers, each stepping its slice of
    the ``env.num_envs`` training envs, in this process (``local``) or in Ray actors (``ray``).

    Attributes:
        backend: ``local`` or ``ray`` (the ``ray`` extra).
        num_workers: rollout workers; ``env.num_envs`` must divide evenly among them (GRPO: whole groups each).
        envs_per_worker: if set, ``env.num_envs`` becomes ``num_workers * envs_per_worker``.
        address: Ray cluster (``null``: start Ray on this machine; ``auto``: the cluster this machine is part of;
            ``ray://HOST:10001``: a remote cluster through Ray Client).
        cpus_per_worker: CPUs Ray reserves per worker.
        max_restarts: times Ray restarts a worker that died (its rollout is re-run from the same seeds).
        fsdp: under ``torchrun``, shard the learner's policy (parameters, gradients, Adam state) across the ranks
            with FSDP instead of replicating it (``robo_rlft.distributed``): for VLA-sized models.
        learner: where the learner (updates, evaluation, checkpoints) runs: ``driver`` (this process) or ``actor``
            (a Ray actor with ``learner_cpus`` CPUs and ``learner_gpus`` GPUs; ``backend=ray`` only), e.g. on a
            cluster's GPU node while the driver is a laptop connected through ``ray://``.
    """

    backend: str = "local"
    num_workers: int = 1
    envs_per_worker: int | None = None
    address: str | None = None
    cpus_per_worker: float = 1.0
    max_restarts: int = 3
    fsdp: bool = False
    learner: str = "driver"
    learner_cpus: float = 1.0
    learner_gpus: float = 0.0

    def __post_init__(self) -> None:
        _check_choice("scale.backend", self.backend, SCALE_BACKENDS)
        _check_choice("scale.learner", self.learner, ["driver", "actor"])
        _check_positive("scale", self, "num_workers", "cpus_per_worker", "learner_cpus")
        if self.learner_gpus < 0:
            raise ValueError(f"scale.learner_gpus must be >= 0, got {self.learner_gpus}.")
        if self.learner == "actor" and self.backend != "ray":
            raise ValueError(
                f"scale.learner=actor runs the learner in a Ray actor: it needs scale=ray (got "
                f"scale.backend={self.backend!r})."
            )
        if self.envs_per_worker is not None:
            _check_positive("scale", self, "envs_per_worker")
        if self.max_restarts < 0:
            raise ValueError(f"scale.max_restarts must be >= 0, got {self.max_restarts}.")


@dataclass
class EvalConfig:
    """``robo-rlft eval``: deterministic-sampler evaluation of a checkpoint.

    Attributes:
        checkpoint: policy checkpoint directory, or a run directory (its ``best``/``final`` policy).
        episodes: number of episodes; num_envs run in parallel.
        video: also write ``video.mp4`` of the first episode (needs ``MUJOCO_GL=egl`` or ``osmesa`` headless).
    """

    checkpoint: str | None = None
    episodes: int = 20
    num_envs: int = 10
    video: bool = False

    def __post_init__(self) -> None:
        _check_positive("eval", self, "episodes", "num_envs")


ROBOT_TRANSPORTS: tuple[str, ...] = ("ros2", "ros1")
ROBOT_OUTPUTS: tuple[str, ...] = ("stream", "trajectory", "pose")


@dataclass
class RobotConfig:
    """``robot=``: one arm behind ROS — transport, joints, limits, topics, rate (``configs/robot/``).

    Attributes:
        name: the preset's name.
        transport: ``ros2`` (rclpy, the ``ros2`` extra) or ``ros1`` (rospy from the system).
        rate_hz: control rate, Hz; the policy's training rate (the tabletop's is 20 Hz).
        output: ``stream`` (``std_msgs/Float64MultiArray`` to a position controller every tick), ``trajectory``
            (``trajectory_msgs/JointTrajectory`` per chunk, point k at k·dt) or ``pose`` (``PoseStamped`` for a
            Cartesian impedance controller).
        arm: the arm model (``real_robot.arms.ARMS``): ``panda`` (the tabletop's arm; ``joint`` and ``delta_ee``
            policies) or ``ur5e`` (a UR5e with a Robotiq 2F-85; ``delta_ee`` policies, through its own FK/IK).
        joint_names: the robot driver's arm joint names (7 for the Panda, 6 for the UR5e), in the order of the
            model's joints.
        finger_names: the driver's gripper joint names (the Panda's 2 fingers; the 2F-85's 1 ``finger_joint``).
        base_frame: ``frame_id`` of the arm's base (poses are sent relative to it).
        base_pos: (3,) where the arm's base sits in the policy's world frame, m (``null``: where the tabletop scene
            puts it, ``envs.tabletop.scene.ARM_BASE_POS``).
        max_step, max_velocity, workspace_min, workspace_max: safety limits (``real_robot.safety.SafetyLimits``,
            whose defaults ``null`` keeps); ``workspace_min: []`` disables the workspace box.
        stale_after: s; an older observation makes the loop hold (``null``: two control periods).
        replan_margin: request the next chunk when this many steps of the current one remain.
        dry_run: publish commands on the shadow topics only.
        topics: topic names (``real_robot.transport.Topics``, which documents each one's message type).
    """

    name: str = "panda_sim"
    transport: str = "ros2"
    rate_hz: float = 20.0
    output: str = "stream"
    arm: str = "panda"
    joint_names: list[str] = field(default_factory=lambda: [f"panda_joint{i}" for i in range(1, 8)])
    finger_names: list[str] = field(default_factory=lambda: ["panda_finger_joint1", "panda_finger_joint2"])
    base_frame: str = "panda_link0"
    base_pos: list[float] | None = None
    max_step: float | None = None
    max_velocity: float | None = None
    workspace_min: list[float] | None = None
    workspace_max: list[float] | None = None
    stale_after: float | None = None
    replan_margin: int = 2
    dry_run: bool = False
    topics: Topics = field(default_factory=Topics)

    def __post_init__(self) -> None:
        _check_choice("robot.transport", self.transport, ROBOT_TRANSPORTS)
        _check_choice("robot.output", self.output, ROBOT_OUTPUTS)
        _check_positive("robot", self, "rate_hz")
        from real_robot.arms import ARM_NAMES, ARMS

        _check_choice("robot.arm", self.arm, ARM_NAMES)
        arm = ARMS[self.arm]
        if len(self.joint_names) != arm.n_joints or len(self.finger_names) != len(arm.gripper_joints):
            raise ValueError(
                f"robot.arm={self.arm} needs {arm.n_joints} robot.joint_names and {len(arm.gripper_joints)} "
                f"robot.finger_names (the driver's names for the model's {list(arm.joints)} and "
                f"{list(arm.gripper_joints)}), got {list(self.joint_names)} and {list(self.finger_names)}."
            )
        if self.base_pos is not None and len(self.base_pos) != 3:
            raise ValueError(f"robot.base_pos must be [x, y, z] in metres, got {list(self.base_pos)}.")
        for camera in self.topics.cameras:
            _check_choice("robot.topics.cameras", camera, CAMERA_NAMES)


@dataclass
class DeployConfig:
    """``robo-rlft deploy``: run a checkpoint on ``robot``.

    Attributes:
        checkpoint: policy checkpoint directory or run directory (its ``best``/``final`` policy).
        duration: stop after this many seconds (``null``: until Ctrl-C).
        status_every: seconds between status lines (rate, jitter, inference latency, interventions).
        instruction: the language instruction (default: the checkpoint's task's).
    """

    checkpoint: str | None = None
    duration: float | None = None
    status_every: float = 5.0
    instruction: str | None = None

    def __post_init__(self) -> None:
        _check_positive("deploy", self, "status_every")
        if self.duration is not None:
            _check_positive("deploy", self, "duration")


@dataclass
class SimRobotSection:
    """``robo-rlft sim-robot``: a tabletop task in MuJoCo behind ``robot``'s topics (``real_robot.sim_robot``).

    Attributes:
        episodes: episodes to run, from fixed init state ``first_init_state`` on (the ones ``eval`` uses).
        first_init_state: index of the first fixed init state.
        settle_ticks: control periods between a scene reset and handing over to the policy.
        start_timeout: s to wait for the policy's first command of an episode.
    """

    episodes: int = 10
    first_init_state: int = 0
    settle_ticks: int = 5
    start_timeout: float = 60.0

    def __post_init__(self) -> None:
        _check_positive("sim_robot", self, "episodes", "settle_ticks", "start_timeout")
        if self.first_init_state < 0:
            raise ValueError(f"sim_robot.first_init_state must be >= 0, got {self.first_init_state}.")


@dataclass
class Config:
    """The whole run: one node per group plus per-verb sections.

    Attributes:
        seed: seeds torch, numpy and the envs.
        run_dir: where everything is written (default ``runs/<verb>/<timestamp>``).
        resume: a finetune run directory to continue exactly from its last checkpoint.
        device: ``cpu`` or ``cuda``.
        torch_threads: intra-op threads (0: torch's default). 1 by default: the networks are small, and
            on a 2-core machine a second torch thread fights the simulator (we measured 1 ms -> 30 ms per
            sample with 2 threads under load).
        progress: show progress bars.
    """

    env: EnvConfig = field(default_factory=EnvConfig)
    policy: Any = MISSING  # the `policy` group fills it with its family's section
    algo: Any = MISSING  # the `algo` group fills it with PPOConfig or GRPOConfig
    collect: CollectConfig = field(default_factory=CollectConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    robot: RobotConfig = field(default_factory=RobotConfig)
    deploy: DeployConfig = field(default_factory=DeployConfig)
    sim_robot: SimRobotSection = field(default_factory=SimRobotSection)
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    seed: int = 0
    run_dir: str | None = None
    resume: str | None = None
    device: str = "cpu"
    torch_threads: int = 1
    progress: bool = True

    def __post_init__(self) -> None:
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device={self.device!r} is not allowed; use 'cpu' or 'cuda[:N]'.")
        scale = self.scale
        if scale.learner == "actor" and self.device.startswith("cuda") and scale.learner_gpus <= 0:
            raise ValueError(
                f"device={self.device} with scale.learner=actor: give the learner's actor a GPU "
                "(scale.learner_gpus=1), or Ray hides every GPU from it."
            )
        if scale.envs_per_worker is not None:
            self.env.num_envs = scale.num_workers * scale.envs_per_worker
        if self.env.num_envs % scale.num_workers:
            raise ValueError(
                f"env.num_envs={self.env.num_envs} does not divide among scale.num_workers={scale.num_workers}: "
                "every worker steps the same number of envs (or set scale.envs_per_worker)."
            )
        per_worker = self.env.num_envs // scale.num_workers
        if self.algo.name == "grpo" and per_worker % self.algo.group_size:
            raise ValueError(
                f"Each of scale.num_workers={scale.num_workers} workers steps {per_worker} envs, not a multiple of "
                f"algo.group_size={self.algo.group_size}: a group's episodes must run on one worker."
            )
        if self.algo.name == "grpo" and self.env.num_envs % self.algo.group_size:
            raise ValueError(
                f"env.num_envs={self.env.num_envs} must be a multiple of algo.group_size={self.algo.group_size} "
                "(each group of rollouts shares one initial state)."
            )
        if self.policy.name in ("vla", "smolvla", "pi0", "pi05"):  # image policies: the env must render their cameras
            missing = [camera for camera in self.policy.cameras if camera not in self.env.cameras]
            if missing:
                raise ValueError(
                    f"policy={self.policy.name} takes images of policy.cameras={list(self.policy.cameras)}, but "
                    f"env.cameras={list(self.env.cameras)} lacks {missing}: the env must render every camera of the "
                    "policy; pass "
                    f"env.cameras=[{','.join(dict.fromkeys([*self.env.cameras, *self.policy.cameras]))}]."
                )
        if self.env.act_steps > self.policy.horizon:
            raise ValueError(
                f"env.act_steps={self.env.act_steps} exceeds policy.horizon={self.policy.horizon}: "
                "a chunk cannot execute more actions than it predicts."
            )


# Algorithm name -> its config schema (the `algo` group picks one).
ALGO_CONFIGS: dict[str, type] = {"ppo": PPOConfig, "grpo": GRPOConfig}
# Policy family -> its config section (the `policy` group picks one).
POLICY_SECTIONS: dict[str, type] = {
    "flow": FlowPolicySection,
    "diffusion": DiffusionPolicySection,
    "gaussian": GaussianPolicySection,
    "vla": VLAPolicySection,
    "smolvla": SmolVLAPolicySection,
    "pi0": PI0PolicySection,
    "pi05": PI05PolicySection,
}


def config_schema(algo: str = "ppo", policy: str = "flow") -> DictConfig:
    """The structured config with the ``algo`` and ``policy`` nodes typed for the chosen ones."""
    for group, name, table in (("algo", algo, ALGO_CONFIGS), ("policy", policy, POLICY_SECTIONS)):
        if name not in table:
            raise ValueError(f"Unknown {group} {name!r} ({group}={name}). Allowed: {sorted(table)}.")
    schema = OmegaConf.structured(Config)
    schema.algo = OmegaConf.structured(ALGO_CONFIGS[algo])
    schema.policy = OmegaConf.structured(POLICY_SECTIONS[policy])
    return schema


def register_configs() -> None:
    """Register the schemas with Hydra's ConfigStore (YAML presets extend them)."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    cs.store(group="env", name="base_env", node=EnvConfig)
    cs.store(group="robot", name="base_robot", node=RobotConfig)
    cs.store(group="scale", name="base_scale", node=ScaleConfig)
    for name, section in POLICY_SECTIONS.items():
        cs.store(group="policy", name=f"base_{name}", node=section)
    cs.store(group="algo", name="base_ppo", node=PPOConfig)
    cs.store(group="algo", name="base_grpo", node=GRPOConfig)
