"""What each CLI verb does: set up the run directory, load inputs, call the algorithm, report."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import platform
import random
import signal
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from envs import make_env, resolve_env_id
from policies.checkpoint import load_policy, read_checkpoint_config, save_policy
from policies.registry import policy_classes
from robo_rlft.checkpointing import latest_checkpoint
from robo_rlft.config import Config
from robo_rlft.observations import ObservationAdapter

logger = logging.getLogger("robo_rlft")

CONFIG_FILE = "config.yaml"
BUILTIN_PREFIX = "builtin:"
# Built-in pretrained checkpoints shipped in robo_rlft/assets/checkpoints/, by env name.
BUILTIN_FOR_ENV = {"hopper": "hopper_flow"}


# Loggers of our packages, whose INFO lines go to the run's log file.
_PACKAGE_LOGGERS = ("robo_rlft", "envs", "policies", "real_robot")
_run_log_handler: logging.Handler | None = None


def _seed_everything(cfg: Config) -> None:
    """Seed every RNG and set torch's threads; first thing in every verb, before any model is built
    (a checkpoint without a noise head gets a freshly initialised one)."""
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if cfg.torch_threads > 0:
        torch.set_num_threads(cfg.torch_threads)


def _setup(cfg: Config, verb: str, resume_dir: Path | None = None) -> Path:
    """Create the run directory, save the resolved config and log into it.

    A new run refuses a directory that already holds a run (its config would be overwritten);
    ``resume_dir`` continues the run there.
    """
    from robo_rlft.cli import default_run_dir

    run_dir = Path(resume_dir or cfg.run_dir or default_run_dir(verb, cfg))
    if resume_dir is None and (run_dir / CONFIG_FILE).exists():
        raise FileExistsError(
            f"run_dir {str(run_dir)!r} already holds a run; choose another run_dir"
            + (f", or continue it with resume={run_dir}." if verb == "finetune" else ".")
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CONFIG_FILE).write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    _log_to(run_dir / f"{verb}.log")
    logger.info("robo-rlft %s: writing to %s", verb, run_dir)
    return run_dir


def _log_to(path: Path) -> None:
    """Send our packages' INFO logs to ``path`` (replacing the previous run's file, if any)."""
    global _run_log_handler
    root = logging.getLogger()
    if _run_log_handler is not None:
        root.removeHandler(_run_log_handler)
        _run_log_handler.close()
    _run_log_handler = logging.FileHandler(path)
    _run_log_handler.setLevel(logging.INFO)
    _run_log_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(_run_log_handler)
    for name in _PACKAGE_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)


def resolve_checkpoint(path: str) -> Path:
    """A checkpoint directory from ``path``: ``builtin:NAME``, a policy checkpoint, or a run directory
    (its ``best/`` policy if it has one, else ``final/``)."""
    if path.startswith(BUILTIN_PREFIX):
        name = path[len(BUILTIN_PREFIX) :]
        root = resources.files("robo_rlft") / "assets" / "checkpoints"
        available = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        if name not in available:
            raise FileNotFoundError(f"No built-in checkpoint {name!r}; available: {available}.")
        return Path(str(root / name))
    candidate = Path(path)
    for sub in ("best", "final"):
        if (candidate / sub / "config.json").is_file():
            return candidate / sub
    read_checkpoint_config(candidate)  # raises a clear error if this is not a checkpoint
    return candidate


def _env_dims(
    env_name: str, env_kwargs: dict | None = None, adapter: ObservationAdapter | None = None
) -> tuple[int, int]:
    """``(obs_dim, action_dim)`` of a policy in env ``env_name`` (``adapter``: the policy's; default: state)."""
    adapter = adapter or ObservationAdapter()
    env = make_env(env_name, flatten=adapter.flatten, **(env_kwargs or {}))
    try:
        return adapter.obs_dim(env.observation_space), env.action_space.shape[0]
    finally:
        env.close()


def _new_policy(cfg: Config, obs_dim: int, action_dim: int) -> torch.nn.Module:
    model_cls, config_cls = policy_classes(cfg.policy.name)
    arch = {k: v for k, v in vars(cfg.policy).items() if k in config_cls.__dataclass_fields__}
    return model_cls(obs_dim, action_dim, config_cls(**arch))


def collect(cfg: Config, overrides: list[str]) -> None:
    """Train (or load) an SB3 expert for ``env`` and record ``collect.episodes`` demonstrations."""
    from robo_rlft.data import save_dataset
    from robo_rlft.expert import Expert, rollout_expert, rollout_scripted_expert, train_expert

    _seed_everything(cfg)
    run_dir = _setup(cfg, "collect")
    if cfg.env.name == "tabletop":  # scripted experts: nothing to train
        dataset = rollout_scripted_expert(
            cfg.env.env_id,
            cfg.collect.episodes,
            cfg.collect.action_noise,
            seed=cfg.seed,
            progress=cfg.progress,
            env_kwargs=cfg.env.make_kwargs(cameras=True),
        )
    else:
        expert_dir = Path(cfg.collect.expert) if cfg.collect.expert else None
        if expert_dir is None:
            expert_dir = train_expert(
                cfg.env.name, cfg.collect.expert_steps, run_dir / "expert", seed=cfg.seed, progress=cfg.progress
            )
        expert = Expert.load(expert_dir, env_name=cfg.env.name)
        dataset = rollout_expert(
            expert, cfg.env.name, cfg.collect.episodes, cfg.collect.action_noise, seed=cfg.seed, progress=cfg.progress
        )
    path = save_dataset(dataset, run_dir / "dataset.npz")
    returns = dataset.episode_returns()
    summary = {
        "dataset": str(path),
        "episodes": dataset.num_episodes,
        "steps": dataset.num_steps,
        "return_mean": float(returns.mean()),
        "return_std": float(returns.std()),
    }
    (run_dir / "collect.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


def pretrain(cfg: Config, overrides: list[str]) -> None:
    """Behaviour-clone ``policy`` on ``pretrain.dataset``, from scratch or from ``policy.pretrained`` (a checkpoint
    of ours or a LeRobot SmolVLA); writes ``final/`` and ``eval.json``."""
    from robo_rlft.algos.bc import pretrain_bc
    from robo_rlft.data import load_dataset
    from robo_rlft.evaluation import evaluate_policy, policy_metadata

    _seed_everything(cfg)
    if not cfg.pretrain.dataset:
        raise ValueError("pretrain.dataset is required: pass pretrain.dataset=PATH (made by `robo-rlft collect`).")
    dataset = load_dataset(cfg.pretrain.dataset)
    data_env = dataset.meta.get("env")
    if data_env is not None and resolve_env_id(data_env) != resolve_env_id(cfg.env.env_id):
        raise ValueError(f"Dataset was recorded on env {data_env!r} but the config's env is {cfg.env.env_id!r}.")
    model_cls = policy_classes(cfg.policy.name)[0]
    adapter = ObservationAdapter.for_policy(model_cls, cfg.policy)
    obs_dim, action_dim = _env_dims(cfg.env.env_id, cfg.env.make_kwargs(), adapter)
    adapter.check_dataset(dataset, cfg.env.env_id, obs_dim, action_dim, cfg.env.image_size)
    pretrained = cfg.policy.pretrained
    if pretrained is None:
        policy = _new_policy(cfg, obs_dim, action_dim)
    else:
        # SFT continues from a checkpoint: another framework's (a LeRobot SmolVLA) or ours. Its normaliser is reset
        # from this dataset (robo_rlft.algos.bc.set_normalizer_from_dataset).
        if hasattr(model_cls, "accepts_external_checkpoint") and model_cls.accepts_external_checkpoint(pretrained):
            policy = model_cls.from_external_checkpoint(pretrained, obs_dim, action_dim, cfg.policy)
        else:
            policy, _ = load_policy(resolve_checkpoint(pretrained), cfg.policy.name, obs_dim, action_dim)
        cfg = _with_checkpoint_architecture(cfg, policy)
    run_dir = _setup(cfg, "pretrain")
    policy = pretrain_bc(cfg, run_dir, policy, dataset)
    metadata = {
        **policy_metadata(cfg, "robo-rlft pretrain", cameras=adapter.uses_images),
        "dataset": str(cfg.pretrain.dataset),
    }
    save_policy(policy, run_dir / "final", metadata, include_noise=False)
    if cfg.pretrain.eval_episodes:
        result = evaluate_policy(
            policy,
            cfg.env.env_id,
            cfg.pretrain.eval_episodes,
            cfg.env.act_steps,
            device=cfg.device,
            env_kwargs=cfg.env.make_kwargs(cameras=adapter.uses_images),
        )
        _write_eval(run_dir, result)


def finetune(cfg: Config, overrides: list[str]) -> None:
    """Online RL fine-tuning (``algo``) of ``policy.pretrained``; ``resume=RUN_DIR`` continues a run."""
    from robo_rlft.algos.grpo import train_grpo
    from robo_rlft.algos.ppo import train_ppo
    from robo_rlft.cli import config_from_saved
    from robo_rlft.distributed import Distributed

    _seed_everything(cfg)
    # Under torchrun: a data-parallel learner (robo_rlft.distributed); rank 0 alone writes the run directory.
    distributed = Distributed.from_env(cfg.device)
    if distributed.enabled and cfg.scale.learner == "actor":
        raise ValueError("Under torchrun the learner is torchrun's processes: use scale.learner=driver.")
    if cfg.resume:
        run_dir = Path(cfg.resume)
        saved = run_dir / CONFIG_FILE
        if not saved.is_file():
            raise FileNotFoundError(f"Cannot resume: {saved} not found (is {str(run_dir)!r} a finetune run?).")
        # The run's own config, with this command line's overrides on top (e.g. more iterations).
        cfg = config_from_saved(saved, [o for o in overrides if not o.startswith("resume=")])
        done = json.loads((latest_checkpoint(run_dir) / "state.json").read_text())["iteration"]
        if done >= cfg.algo.iterations:
            raise ValueError(
                f"Run {str(run_dir)!r} already finished {done} iterations (algo.iterations={cfg.algo.iterations}); "
                f"pass algo.iterations=N with N > {done} to continue it."
            )
        if distributed.is_main:
            _setup(cfg, "finetune", resume_dir=run_dir)
        distributed.barrier()
        policy = None
    else:
        pretrained = cfg.policy.pretrained or (
            BUILTIN_PREFIX + BUILTIN_FOR_ENV[cfg.env.name] if cfg.env.name in BUILTIN_FOR_ENV else None
        )
        if pretrained is None:
            raise ValueError(
                f"No pretrained policy for env={cfg.env.name!r}: pass policy.pretrained=PATH (a checkpoint from "
                f"`robo-rlft pretrain`). Built-in checkpoints exist for {sorted(BUILTIN_FOR_ENV)}."
            )
        adapter = ObservationAdapter.for_policy(policy_classes(cfg.policy.name)[0], cfg.policy)
        obs_dim, action_dim = _env_dims(cfg.env.env_id, cfg.env.make_kwargs(), adapter)
        model_cls = policy_classes(cfg.policy.name)[0]
        if hasattr(model_cls, "accepts_external_checkpoint") and model_cls.accepts_external_checkpoint(pretrained):
            # Another framework's checkpoint (a LeRobot SmolVLA): the run's policy section locates its assets.
            policy = model_cls.from_external_checkpoint(pretrained, obs_dim, action_dim, cfg.policy)
        else:
            policy, _ = load_policy(resolve_checkpoint(pretrained), cfg.policy.name, obs_dim, action_dim)
        # The exploration settings are a fine-tuning choice: the config's apply to the loaded policy.
        policy = policy.configure_finetuning(cfg.policy)
        cfg = _with_checkpoint_architecture(cfg, policy)
        run_dir = distributed.broadcast(_setup(cfg, "finetune") if distributed.is_main else None)
    train = train_ppo if cfg.algo.name == "ppo" else train_grpo
    try:
        if cfg.scale.learner == "actor":
            from robo_rlft.scale import run_in_learner_actor

            args = (train, cfg, run_dir, torch.get_rng_state(), policy, policy is None)
            result = run_in_learner_actor(cfg.scale, _learn_in_actor, *args)
        else:
            result = train(cfg, run_dir, policy, resume=policy is None, distributed=distributed)
    finally:
        distributed.close()
    if distributed.is_main:
        _write_eval(run_dir, result)


def _learn_in_actor(
    train: Callable[..., dict[str, Any]],
    cfg: Config,
    run_dir: Path,
    rng_state: torch.Tensor,
    policy: torch.nn.Module | None,
    resume: bool,
) -> dict[str, Any]:
    """The learner's start in its Ray actor (``scale.learner=actor``): the driver's seeds and torch RNG stream, so
    the run is the one the driver would have made, and the run's log file."""
    _seed_everything(cfg)
    torch.set_rng_state(rng_state)
    _log_to(run_dir / "finetune.log")
    logger.info("The learner runs in a Ray actor (pid %d on %s).", os.getpid(), platform.node())
    return train(cfg, run_dir, policy, resume=resume)


def _with_checkpoint_architecture(cfg: Config, policy: torch.nn.Module) -> Config:
    """The config with ``policy.*`` architecture fields taken from the loaded checkpoint.

    The checkpoint defines the network, so differing config values are reported and replaced;
    ``env.act_steps`` is re-checked against the checkpoint's horizon.
    """
    arch = {k: v for k, v in vars(policy.config).items() if k not in policy.FINETUNE_FIELDS}
    differing = {k: (getattr(cfg.policy, k), v) for k, v in arch.items() if getattr(cfg.policy, k) != v}
    if differing:
        logger.info(
            "Architecture from the checkpoint: %s",
            ", ".join(f"policy.{k}={theirs} (config had {mine})" for k, (mine, theirs) in differing.items()),
        )
    if cfg.env.act_steps > policy.horizon:
        raise ValueError(
            f"env.act_steps={cfg.env.act_steps} exceeds the checkpoint's policy.horizon={policy.horizon}; "
            f"pass env.act_steps=N with N <= {policy.horizon}."
        )
    return dataclasses.replace(cfg, policy=dataclasses.replace(cfg.policy, **arch))


def evaluate(cfg: Config, overrides: list[str]) -> None:
    """Evaluate ``eval.checkpoint`` with the deterministic sampler; writes ``eval.json`` (+ video)."""
    from robo_rlft.evaluation import evaluate_policy, record_video

    _seed_everything(cfg)
    if not cfg.eval.checkpoint:
        raise ValueError("eval.checkpoint is required: a checkpoint directory, a run directory, or builtin:NAME.")
    checkpoint = resolve_checkpoint(cfg.eval.checkpoint)
    policy, metadata = load_policy(checkpoint)
    run_dir = _setup(cfg, "eval")
    # The checkpoint's env (with its options) unless it predates them; then the config's.
    if "env" in metadata:
        env_name, env_kwargs = metadata["env"], metadata.get("env_kwargs", {})
    else:
        env_name = cfg.env.env_id
        env_kwargs = cfg.env.make_kwargs(cameras=ObservationAdapter.for_policy(policy).uses_images)
    act_steps = metadata.get("act_steps", cfg.env.act_steps)
    policy.to(cfg.device)
    result = evaluate_policy(
        policy, env_name, cfg.eval.episodes, act_steps, cfg.eval.num_envs, device=cfg.device, env_kwargs=env_kwargs
    )
    result["checkpoint"] = str(checkpoint)
    result["env"] = env_name
    if cfg.eval.video:
        video = record_video(policy, env_name, act_steps, run_dir / "video.mp4", env_kwargs=env_kwargs)
        result["video"] = str(video)
    _write_eval(run_dir, result)


def _write_eval(run_dir: Path, result: dict) -> None:
    (run_dir / "eval.json").write_text(json.dumps(result, indent=2))
    ci = result["return_ci95"]
    line = f"eval: return {result['return_mean']:.1f} ± {ci:.1f} (95% CI) over {result['episodes']} episodes"
    if result.get("success_rate") is not None:
        lo, hi = result["success_ci95"]
        line += f", success {result['success_rate']:.2f} [{lo:.2f}, {hi:.2f}]"
    for task, outcome in result.get("success_by_task", {}).items():
        line += f"\n  {task}: success {outcome['success_rate']:.2f} over {outcome['episodes']} episodes"
    print(f"{line}\n-> {run_dir / 'eval.json'}")


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (a process manager stopping us) ends the run like Ctrl-C: cleanly, with its report written."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def deploy(cfg: Config, overrides: list[str]) -> None:
    """Run ``deploy.checkpoint`` on ``robot`` until Ctrl-C or ``deploy.duration``; logs every command sent."""
    from real_robot.deploy import build_deployment

    _seed_everything(cfg)
    if not cfg.deploy.checkpoint:
        raise ValueError("deploy.checkpoint is required: a checkpoint directory or a run directory.")
    checkpoint = resolve_checkpoint(cfg.deploy.checkpoint)
    run_dir = _setup(cfg, "deploy")
    # Every command sent, one line each, in its own file (DEBUG: too many for the console).
    command_log = logging.FileHandler(run_dir / "commands.log")
    command_log.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    command_logger = logging.getLogger("real_robot.commands")
    command_logger.setLevel(logging.DEBUG)
    command_logger.propagate = False
    command_logger.addHandler(command_log)
    deployment = build_deployment(cfg.robot, checkpoint, instruction=cfg.deploy.instruction)
    try:
        with _sigterm_as_interrupt():
            deployment.run(cfg.deploy.duration, cfg.deploy.status_every)
    finally:
        deployment.close()
        command_logger.removeHandler(command_log)
        command_log.close()
    status = deployment.loop.status()
    report = {"checkpoint": str(checkpoint), "robot": cfg.robot.name, "transport": cfg.robot.transport}
    report.update(dataclasses.asdict(status))
    (run_dir / "deploy.json").write_text(json.dumps(report, indent=2))
    print(f"deploy: {status.line()}\n-> {run_dir / 'deploy.json'}, {run_dir / 'commands.log'}")


def sim_robot(cfg: Config, overrides: list[str]) -> None:
    """Run ``sim_robot.episodes`` episodes of a tabletop task behind ``robot``'s topics; writes ``sim_robot.json``."""
    from real_robot.deploy import build_sim_robot
    from robo_rlft.stats import wilson_ci95

    _seed_everything(cfg)
    if cfg.env.name != "tabletop":
        raise ValueError(f"sim-robot runs a tabletop task; pass env=tabletop env.task=..., not env={cfg.env.name}.")
    section = cfg.sim_robot
    last = section.first_init_state + section.episodes
    fixed = _fixed_init_state_count()
    if last > fixed:
        raise ValueError(
            f"sim_robot.first_init_state + sim_robot.episodes = {last} exceeds the task's {fixed} fixed init states."
        )
    run_dir = _setup(cfg, "sim-robot")
    env_kwargs = {**cfg.env.make_kwargs(), "image_size": cfg.env.image_size}
    robot = build_sim_robot(
        cfg.robot,
        cfg.env.env_id,
        env_kwargs,
        settle_ticks=section.settle_ticks,
        start_timeout=section.start_timeout,
    )
    logger.info(
        "Simulated %s: %s over %s, init states %d..%d.",
        cfg.robot.name,
        cfg.env.task,
        cfg.robot.transport,
        section.first_init_state,
        last - 1,
    )
    try:
        with _sigterm_as_interrupt():
            robot.run(range(section.first_init_state, last))
    except KeyboardInterrupt:
        logger.info("Interrupted after %d episodes.", len(robot.reports))
    finally:
        robot.endpoint.close()
        robot.env.close()
    successes = sum(r.success for r in robot.reports)
    episodes = len(robot.reports)
    result: dict = {"env": cfg.env.env_id, "robot": cfg.robot.name, "transport": cfg.robot.transport}
    result["episodes"] = episodes
    result["success_rate"] = successes / episodes if episodes else None
    result["success_ci95"] = list(wilson_ci95(successes, episodes)[1:]) if episodes else None
    result["reports"] = [dataclasses.asdict(r) for r in robot.reports]
    (run_dir / "sim_robot.json").write_text(json.dumps(result, indent=2))
    print(f"sim-robot: {successes}/{episodes} episodes succeeded\n-> {run_dir / 'sim_robot.json'}")


def _fixed_init_state_count() -> int:
    from envs.tabletop.env import TabletopEnv

    return TabletopEnv.num_fixed_init_states
