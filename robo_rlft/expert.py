"""Expert policies that generate demonstrations (trained here: nothing can be downloaded).

An expert is Stable-Baselines3 PPO with VecNormalize observation normalisation, saved as a
self-describing directory (no pickled VecNormalize):

- ``expert.zip``: SB3's own model format (``PPO.load``).
- ``obs_normalizer.npz``: ``mean``, ``var`` (float64, ``(obs_dim,)``), ``clip_obs``, ``epsilon``; the
  policy sees ``clip((obs - mean) / sqrt(var + epsilon), -clip_obs, clip_obs)``, exactly as
  VecNormalize computes it.
- ``expert.json``: env name and id, training budget, seed, hyper-parameters, final evaluation return.

:func:`rollout_expert` turns an expert into a :class:`~robo_rlft.data.DemoDataset`; its
``action_noise`` (Gaussian std added to the executed action) is the data-quality knob: 0 gives expert
data, larger values give progressively worse ("medium") data.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

import envs
from robo_rlft.data import ARRAY_KEYS, IMAGE_SUFFIX, DemoDataset

logger = logging.getLogger(__name__)

MODEL_FILE = "expert.zip"
NORMALIZER_FILE = "obs_normalizer.npz"
META_FILE = "expert.json"

# Measured on this project's CPUs: learns Hopper to return ~480 in 250k steps at ~3,800 env steps/s
# on one core with 8 envs. Small net + low initial std: locomotion needs precise, not exploratory, control.
PPO_KWARGS: dict[str, Any] = {
    "n_steps": 256,
    "batch_size": 256,
    "n_epochs": 10,
    "learning_rate": 3e-4,
    "gae_lambda": 0.95,
    "gamma": 0.99,
    "clip_range": 0.2,
    "policy_kwargs": {"net_arch": [64, 64], "log_std_init": -0.5},
}


@contextmanager
def _progress(enabled: bool, description: str, total: int) -> Iterator[tuple[Any, Any]]:
    """Yields ``(progress, task_id)`` of a rich progress bar, or ``(None, None)`` when disabled."""
    if not enabled:
        yield None, None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, TextColumn("{task.fields[info]}")) as bar:
        yield bar, bar.add_task(description, total=total, info="")


# ---- the expert -------------------------------------------------------------------------------------


class Expert:
    """A trained PPO expert with its observation normaliser; acts deterministically.

    Use :meth:`load`; ``model`` is the SB3 ``PPO`` object, ``meta`` the contents of ``expert.json``.
    """

    def __init__(
        self,
        model: Any,
        obs_mean: np.ndarray,
        obs_var: np.ndarray,
        clip_obs: float,
        epsilon: float,
        meta: dict[str, Any],
        path: Path | None = None,
    ) -> None:
        obs_shape = model.observation_space.shape
        if obs_mean.shape != obs_shape or obs_var.shape != obs_shape:
            raise ValueError(
                f"observation normaliser shapes mean {obs_mean.shape} / var {obs_var.shape} do not match "
                f"the model's observation space {obs_shape}."
            )
        self.model = model
        self.obs_mean = obs_mean.astype(np.float64)
        self.obs_var = obs_var.astype(np.float64)
        self.clip_obs = float(clip_obs)
        self.epsilon = float(epsilon)
        self.meta = meta
        self.path = path

    @property
    def env_name(self) -> str:
        return self.meta["env"]

    @property
    def obs_dim(self) -> int:
        return self.model.observation_space.shape[0]

    @property
    def act_dim(self) -> int:
        return self.model.action_space.shape[0]

    @classmethod
    def load(cls, path: str | Path, env_name: str | None = None) -> Expert:
        """Load an expert directory written by :func:`train_expert`, or a plain SB3 ``.zip``.

        Args:
            path: the directory holding ``expert.zip``, ``obs_normalizer.npz`` and ``expert.json``; or
                any SB3 model zip (PPO, SAC, TD3, A2C, DDPG) trained on raw observations, which then
                needs ``env_name``.
            env_name: when given, the env the caller means to use; must be the expert's env.

        Raises:
            FileNotFoundError: the directory or one of its files is missing (named in the message).
            ValueError: ``env_name`` differs from the env the expert was trained on, or is missing
                for a plain zip, or the zip is no SB3 model.
        """
        path = Path(path)
        if path.suffix == ".zip" and path.is_file():
            return cls._load_sb3_zip(path, env_name)
        from stable_baselines3 import PPO

        for name in (META_FILE, NORMALIZER_FILE, MODEL_FILE):
            if not (path / name).is_file():
                raise FileNotFoundError(
                    f"Expert file missing: {path / name} (an expert directory holds {MODEL_FILE}, "
                    f"{NORMALIZER_FILE} and {META_FILE}; create one with train_expert, or pass an SB3 .zip)."
                )
        meta = json.loads((path / META_FILE).read_text())
        if env_name is not None and envs.resolve_env_id(env_name) != envs.resolve_env_id(meta["env"]):
            raise ValueError(
                f"Expert at {path} was trained on env {meta['env']!r}, but env {env_name!r} was requested."
            )
        with np.load(path / NORMALIZER_FILE, allow_pickle=False) as npz:
            norm = {k: npz[k] for k in ("mean", "var", "clip_obs", "epsilon")}
        model = PPO.load(path / MODEL_FILE, device="cpu")
        return cls(
            model,
            obs_mean=norm["mean"],
            obs_var=norm["var"],
            clip_obs=float(norm["clip_obs"]),
            epsilon=float(norm["epsilon"]),
            meta=meta,
            path=path,
        )

    @classmethod
    def _load_sb3_zip(cls, path: Path, env_name: str | None) -> Expert:
        """A bare SB3 model zip: no observation normaliser (identity), env given by the caller."""
        import stable_baselines3 as sb3

        if env_name is None:
            raise ValueError(f"Loading the plain SB3 zip {path} needs the env it was trained on (env_name).")
        errors = []
        for algo in (sb3.PPO, sb3.SAC, sb3.TD3, sb3.A2C, sb3.DDPG):
            try:
                model = algo.load(path, device="cpu")
                break
            except Exception as exc:  # SB3 raises assorted errors for a zip of another algorithm
                errors.append(f"{algo.__name__}: {type(exc).__name__}")
        else:
            raise ValueError(f"{path} is not a loadable SB3 model zip ({'; '.join(errors)}).")
        shape = model.observation_space.shape
        return cls(
            model,
            obs_mean=np.zeros(shape),
            obs_var=np.ones(shape),
            clip_obs=np.inf,
            epsilon=0.0,
            meta={"env": env_name, "source": f"sb3 zip ({type(model).__name__})"},
            path=path,
        )

    def normalize_obs(self, obs: np.ndarray) -> np.ndarray:
        """VecNormalize's formula, float64 maths then float32 like ``VecNormalize.normalize_obs``."""
        norm = (np.asarray(obs, dtype=np.float64) - self.obs_mean) / np.sqrt(self.obs_var + self.epsilon)
        return np.clip(norm, -self.clip_obs, self.clip_obs).astype(np.float32)

    def act(self, obs: np.ndarray) -> np.ndarray:
        """Deterministic action(s), clipped to the action space.

        Args:
            obs: raw observations ``(B, obs_dim)`` or one ``(obs_dim,)``.

        Returns:
            float32 actions ``(B, act_dim)`` or ``(act_dim,)`` matching the input.
        """
        obs = np.asarray(obs)
        if obs.ndim not in (1, 2) or obs.shape[-1] != self.obs_dim:
            raise ValueError(f"obs must have shape (B, {self.obs_dim}) or ({self.obs_dim},), got {obs.shape}.")
        single = obs.ndim == 1
        actions, _ = self.model.predict(self.normalize_obs(obs[None] if single else obs), deterministic=True)
        actions = actions.astype(np.float32)  # (B, act_dim)
        return actions[0] if single else actions


# ---- training ---------------------------------------------------------------------------------------


def _evaluate(expert: Expert, env_name: str, episodes: int, seed: int) -> tuple[float, float]:
    """Mean and std of the deterministic return over ``episodes`` episodes."""
    ds = rollout_expert(expert, env_name, num_episodes=episodes, action_noise=0.0, seed=seed)
    returns = ds.episode_returns()
    return float(returns.mean()), float(returns.std())


def train_expert(
    env_name: str,
    total_steps: int,
    out_dir: str | Path,
    seed: int = 0,
    num_envs: int = 8,
    progress: bool = False,
    *,
    eval_episodes: int = 5,
    log_every: int = 100_000,
) -> Path:
    """Train a PPO expert (hyper-parameters :data:`PPO_KWARGS`) and save it into ``out_dir``.

    Args:
        env_name: short env name (``hopper``) or id.
        total_steps: environment steps, summed over the ``num_envs`` parallel envs; SB3 rounds it up to
            whole rollouts of ``n_steps * num_envs`` (``expert.json`` records the steps actually run).
        out_dir: directory to write (created; existing expert files are overwritten).
        seed: seeds PPO and the training envs.
        num_envs: parallel (in-process) training envs.
        progress: show a rich progress bar.
        eval_episodes: deterministic evaluation episodes at the end (seeds ``10_000 + seed + i``, apart
            from the training seeds); the mean return is saved in ``expert.json``.
        log_every: log steps/s and the mean training-episode return every this many steps.

    Returns:
        ``out_dir``.
    """
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import VecNormalize

    env_id = envs.resolve_env_id(env_name)  # raises ValueError on an unknown name, before any work
    for name, value, low in (
        ("total_steps", total_steps, 1),
        ("num_envs", num_envs, 1),
        ("log_every", log_every, 1),
    ):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}.")
    if eval_episodes < 0:
        raise ValueError(f"eval_episodes must be >= 0, got {eval_episodes}.")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    venv = make_vec_env(lambda: envs.make_env(env_name), n_envs=num_envs, seed=seed)
    venv = VecNormalize(venv, norm_obs=True, norm_reward=True, gamma=PPO_KWARGS["gamma"])
    model = PPO("MlpPolicy", venv, seed=seed, device="cpu", verbose=0, **PPO_KWARGS)

    start = time.perf_counter()

    class _LogCallback(BaseCallback):
        """Logs throughput and training-episode returns; advances the progress bar."""

        def __init__(self, bar: Any, task: Any) -> None:
            super().__init__()
            self.bar, self.task = bar, task
            self.next_log = log_every

        def _mean_train_return(self) -> float:
            infos = self.model.ep_info_buffer  # Monitor's raw (un-normalised) episode returns, last 100
            return float(np.mean([info["r"] for info in infos])) if infos else float("nan")

        def _on_rollout_end(self) -> None:
            # Once per rollout (n_steps x num_envs steps), not per step: redrawing costs time.
            if self.bar is not None:
                info = f"train return {self._mean_train_return():.1f}"
                self.bar.update(self.task, completed=self.num_timesteps, info=info)

        def _on_step(self) -> bool:
            steps = self.num_timesteps
            if steps >= self.next_log:
                elapsed = time.perf_counter() - start
                logger.info(
                    "%s: %d steps, %.0f s, %.0f steps/s, mean train-episode return %.1f",
                    env_name,
                    steps,
                    elapsed,
                    steps / elapsed,
                    self._mean_train_return(),
                )
                self.next_log += log_every
            return True

    with _progress(progress, f"train expert {env_name}", total_steps) as (bar, task):
        model.learn(total_timesteps=total_steps, callback=_LogCallback(bar, task))
    train_seconds = time.perf_counter() - start

    model.save(out_dir / MODEL_FILE)
    obs_rms = venv.obs_rms
    np.savez(
        out_dir / NORMALIZER_FILE,
        mean=obs_rms.mean,
        var=obs_rms.var,
        clip_obs=np.float64(venv.clip_obs),
        epsilon=np.float64(venv.epsilon),
    )
    meta: dict[str, Any] = {
        "env": env_name,
        "env_id": env_id,
        "algo": "stable_baselines3.PPO",
        "total_steps": int(model.num_timesteps),
        "seed": seed,
        "num_envs": num_envs,
        "ppo_kwargs": PPO_KWARGS,
        "train_seconds": round(train_seconds, 1),
    }
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2))
    venv.close()

    if eval_episodes > 0:
        expert = Expert.load(out_dir, env_name)
        mean, std = _evaluate(expert, env_name, eval_episodes, seed=10_000 + seed)
        meta.update(eval_return_mean=mean, eval_return_std=std, eval_episodes=eval_episodes)
        (out_dir / META_FILE).write_text(json.dumps(meta, indent=2))
        logger.info("%s expert: eval return %.1f ± %.1f over %d episodes", env_name, mean, std, eval_episodes)
    logger.info("saved %s expert (%d steps, %.0f s) to %s", env_name, model.num_timesteps, train_seconds, out_dir)
    return out_dir


# ---- demonstrations ---------------------------------------------------------------------------------


def rollout_expert(
    expert: Expert,
    env_name: str,
    num_episodes: int,
    action_noise: float = 0.0,
    seed: int = 0,
    progress: bool = False,
) -> DemoDataset:
    """Roll the expert out and record the executed steps as a :class:`DemoDataset`.

    Episode ``i`` resets the env with seed ``seed + i`` and draws its action noise from its own
    generator seeded with ``(seed + i, 1)``, so an episode is reproducible on its own and its noise
    stream differs from the env's reset stream (seeded with ``seed + i`` alone).

    Args:
        expert: the expert to roll out.
        env_name: env to roll out in; must be the expert's env.
        num_episodes: number of complete episodes (each ends by termination or the time limit).
        action_noise: std of Gaussian noise added to the expert's action before execution; the noisy
            action is clipped to the action space and is what the dataset stores.
        seed: base seed.
        progress: show a rich progress bar.

    Returns:
        The dataset; ``meta`` records env, expert path and training info, noise, seed and returns.
    """
    if envs.resolve_env_id(env_name) != envs.resolve_env_id(expert.env_name):
        raise ValueError(f"Expert was trained on env {expert.env_name!r}, but env {env_name!r} was requested.")
    if num_episodes < 1:
        raise ValueError(f"num_episodes must be >= 1, got {num_episodes}.")
    if not np.isfinite(action_noise) or action_noise < 0:
        raise ValueError(f"action_noise must be a finite std >= 0, got {action_noise}.")

    env = envs.make_env(env_name)
    if env.observation_space.shape != (expert.obs_dim,) or env.action_space.shape != (expert.act_dim,):
        raise ValueError(
            f"env {env_name!r} spaces obs {env.observation_space.shape} / action {env.action_space.shape} "
            f"differ from the expert's obs ({expert.obs_dim},) / action ({expert.act_dim},)."
        )
    assert isinstance(env.action_space, gym.spaces.Box), "locomotion envs have Box action spaces"
    low, high = env.action_space.low, env.action_space.high

    obs_buf, act_buf, rew_buf, term_buf, trunc_buf = [], [], [], [], []
    with _progress(progress, f"rollout {env_name} noise={action_noise}", num_episodes) as (bar, task):
        for i in range(num_episodes):
            noise_rng = np.random.default_rng([seed + i, 1])
            obs, _ = env.reset(seed=seed + i)
            done = False
            while not done:
                action = expert.act(obs)
                if action_noise > 0:
                    action = action + noise_rng.normal(0.0, action_noise, size=action.shape)
                action = np.clip(action, low, high).astype(np.float32)
                next_obs, reward, terminated, truncated, _ = env.step(action)
                obs_buf.append(obs)
                act_buf.append(action)
                rew_buf.append(reward)
                term_buf.append(terminated)
                trunc_buf.append(truncated)
                obs, done = next_obs, terminated or truncated
            if bar is not None:
                bar.update(task, advance=1)
    env.close()

    meta = {
        "env": env_name,
        "env_id": envs.resolve_env_id(env_name),
        "source": "expert_rollout",
        "expert_path": str(expert.path.resolve()) if expert.path is not None else None,
        "expert": {k: expert.meta.get(k) for k in ("total_steps", "seed", "eval_return_mean")},
        "action_noise": float(action_noise),
        "seed": seed,
        "num_episodes": num_episodes,
    }
    ds = DemoDataset(
        observations=np.asarray(obs_buf, dtype=np.float32),
        actions=np.asarray(act_buf, dtype=np.float32),
        rewards=np.asarray(rew_buf, dtype=np.float32),
        terminals=np.asarray(term_buf, dtype=bool),
        truncations=np.asarray(trunc_buf, dtype=bool),
        meta=meta,
    )
    returns = ds.episode_returns()
    ds.meta.update(return_mean=float(returns.mean()), return_std=float(returns.std()))
    logger.info(
        "%s rollout (noise %.3g): %d episodes, %d steps, return %.1f ± %.1f",
        env_name,
        action_noise,
        num_episodes,
        ds.num_steps,
        returns.mean(),
        returns.std(),
    )
    return ds


def rollout_scripted_expert(
    env_id: str,
    num_episodes: int,
    action_noise: float = 0.0,
    seed: int = 0,
    progress: bool = False,
    env_kwargs: dict[str, Any] | None = None,
) -> DemoDataset:
    """Demonstrations from a tabletop task's scripted expert (``envs.tabletop.expert``).

    Episode ``i`` starts from the randomised training init state of reset seed ``seed + i``;
    ``action_noise`` is the expert's own noise knob. Observations are the flat state vectors the
    policies see (``envs.make_env`` wraps Dict observations), actions the executed ones. With cameras
    in ``env_kwargs`` the dataset also holds each step's images; it always holds the instructions.
    """
    from envs.tabletop.expert import expert_for

    if num_episodes < 1 or not np.isfinite(action_noise) or action_noise < 0:
        raise ValueError(f"need num_episodes >= 1 and action_noise >= 0, got {num_episodes}, {action_noise}.")
    flat_env = envs.make_env(env_id, **(env_kwargs or {}))
    # make_env flattens the Dict observation for state policies; the images come from the Dict below it.
    env = flat_env.env
    cameras = [key for key in env.observation_space.spaces if key.endswith(IMAGE_SUFFIX)]
    columns: dict[str, list] = {key: [] for key in (*ARRAY_KEYS, *cameras)}
    successes, instructions = [], []
    try:
        with _progress(progress, f"scripted expert {env_id} noise={action_noise}", num_episodes) as (bar, task):
            for i in range(num_episodes):
                obs, info = env.reset(seed=seed + i)
                # A multi-task env runs one of its tasks per episode: the expert acts in that task's env.
                task_env = getattr(env.unwrapped, "active_env", env.unwrapped)
                expert = expert_for(task_env, noise=action_noise, seed=seed + i)
                expert.reset()
                done = False
                while not done:
                    action = expert.act()
                    next_obs, reward, terminated, truncated, info = env.step(action)
                    done = terminated or truncated
                    row = (flat_env.observation(obs), action, reward, terminated, done and not terminated)
                    for key, value in zip(ARRAY_KEYS, row, strict=True):
                        columns[key].append(value)
                    for key in cameras:
                        columns[key].append(obs[key])
                    instructions.append(task_env.instruction)
                    obs = next_obs
                successes.append(bool(info["is_success"]))
                if bar is not None:
                    bar.update(task, advance=1, info=f"success {np.mean(successes):.2f}")
    finally:
        flat_env.close()
    dataset = DemoDataset(
        observations=np.asarray(columns["observations"], dtype=np.float32),
        actions=np.asarray(columns["actions"], dtype=np.float32),
        rewards=np.asarray(columns["rewards"], dtype=np.float32),
        terminals=np.asarray(columns["terminals"], dtype=bool),
        truncations=np.asarray(columns["truncations"], dtype=bool),
        images={key[: -len(IMAGE_SUFFIX)]: np.stack(columns[key]) for key in cameras},
        instructions=np.asarray(instructions),
        meta={
            "env": env_id,
            "env_kwargs": dict(env_kwargs or {}),
            "source": "scripted expert",
            "instructions": sorted(set(instructions)),
            # How the flat observation splits into the env's Dict keys, in order.
            "observation_layout": {
                key: int(env.observation_space[key].shape[0])
                for key in flat_env.KEYS
                if key in env.observation_space.spaces
            },
            "action_noise": float(action_noise),
            "seed": seed,
            "num_episodes": num_episodes,
            "success_rate": float(np.mean(successes)),
        },
    )
    logger.info("%s scripted expert (noise %.3g): success %.2f", env_id, action_noise, np.mean(successes))
    return dataset
