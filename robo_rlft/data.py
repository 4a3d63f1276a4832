"""Demonstration datasets: the in-memory :class:`DemoDataset` and its on-disk ``.npz`` format.

A dataset is a flat sequence of ``N`` environment steps from one or more episodes, stored back to
back. Step ``t`` holds the observation the policy saw, the action the env executed, the reward it
returned and two end-of-episode flags. Every episode ends with exactly one step whose ``terminals``
or ``truncations`` flag is set (both may be set: Gymnasium reports a termination on the time-limit
step as both), so episode boundaries need no separate index.

File format (version 1)
-----------------------
One file written by ``np.savez_compressed`` (a zip of ``.npy`` arrays, readable with
``np.load(path)`` and no pickle), holding:

=================  ==================  =======  ===========================================================
key                shape               dtype    meaning
=================  ==================  =======  ===========================================================
``observations``   ``(N, obs_dim)``    float32  observation at step t (raw, not normalised)
``actions``        ``(N, act_dim)``    float32  action executed at step t (after any added noise / clipping)
``rewards``        ``(N,)``            float32  reward for step t
``terminals``      ``(N,)``            bool     the env terminated after step t (no bootstrap from its value)
``truncations``    ``(N,)``            bool     the episode was cut after step t (time limit / end of
                                                collection); the next state's value still counts
``meta_json``      ``()``              str      JSON object: how the data was made (``env``, ``source``,
                                                ``expert_path``, ``action_noise``, ``seed``, ...)
``format_version`` ``()``              int64    ``1``
=================  ==================  =======  ===========================================================

Optional keys (tabletop / LIBERO collections with ``env.cameras``; readers that do not need them ignore them):

=====================  =================  =======  ======================================================
key                    shape              dtype    meaning
=====================  =================  =======  ======================================================
``<camera>_image``     ``(N, H, W, 3)``   uint8    RGB image of camera ``agentview`` / ``wrist`` at step t,
                                                   right side up (the observation key of the same name)
``instructions``       ``(N,)``           str      the language instruction of step t's episode
=====================  =================  =======  ======================================================

Use :func:`save_dataset` / :func:`load_dataset`; saving is atomic (a temporary file in the target
directory renamed over the destination), so a crash never leaves a half-written dataset behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from policies.checkpoint import apply_umask

FORMAT_VERSION = 1
ARRAY_KEYS: tuple[str, ...] = ("observations", "actions", "rewards", "terminals", "truncations")
IMAGE_SUFFIX = "_image"
INSTRUCTIONS_KEY = "instructions"
META_KEY = "meta_json"
VERSION_KEY = "format_version"

# Floor on the per-dimension observation std returned by `DemoDataset.stats`. A dimension that is
# (almost) constant in the demos (e.g. a contact force that is always zero) would otherwise be divided
# by ~0 and turn the first off-distribution value seen during online RL into an enormous network
# input. 1e-2 is far below the spread of every informative MuJoCo locomotion feature yet caps that
# blow-up at x100 per unit of deviation.
OBS_STD_FLOOR = 1e-2


@dataclass(eq=False)
class DemoDataset:
    """A flat sequence of ``N`` steps from back-to-back episodes.

    Attributes:
        observations: ``(N, obs_dim)`` float32, the observation at each step.
        actions: ``(N, act_dim)`` float32, the executed action at each step.
        rewards: ``(N,)`` float32.
        terminals: ``(N,)`` bool, true env termination after this step.
        truncations: ``(N,)`` bool, episode cut after this step (time limit or end of collection).
        meta: JSON-serialisable dict saying how the data was made (by convention ``env``, ``source``,
            ``action_noise``, ``seed``, ...).
        images: camera name -> ``(N, H, W, 3)`` uint8 RGB frames at each step (empty: no images).
        instructions: ``(N,)`` str, the language instruction of each step's episode, or None.

    Raises:
        ValueError: on wrong dtypes, shapes or lengths, non-finite values, an empty dataset, a last step
            that does not end an episode, or a ``meta`` that is not JSON-serialisable.
    """

    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    terminals: np.ndarray
    truncations: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)
    images: dict[str, np.ndarray] = field(default_factory=dict)
    instructions: np.ndarray | None = None

    def __post_init__(self) -> None:
        expected = {
            "observations": (2, np.float32, "(N, obs_dim)"),
            "actions": (2, np.float32, "(N, act_dim)"),
            "rewards": (1, np.float32, "(N,)"),
            "terminals": (1, np.bool_, "(N,)"),
            "truncations": (1, np.bool_, "(N,)"),
        }
        # Check, never coerce: a dataclass that silently rewrites its fields hides bugs upstream.
        for name, (ndim, dtype, shape_doc) in expected.items():
            value = getattr(self, name)
            if not isinstance(value, np.ndarray):
                raise ValueError(f"{name} must be a numpy array of shape {shape_doc}, got {type(value).__name__}.")
            if value.ndim != ndim:
                raise ValueError(f"{name} must have shape {shape_doc}, got shape {value.shape}.")
            if value.dtype != dtype:
                raise ValueError(
                    f"{name} must have dtype {np.dtype(dtype).name}, got {value.dtype}; "
                    f"convert with np.asarray({name}, dtype=np.{np.dtype(dtype).name})."
                )
        n = len(self.observations)
        if n == 0:
            raise ValueError("observations is empty: a DemoDataset needs at least one step.")
        for name in ARRAY_KEYS[1:]:
            got = len(getattr(self, name))
            if got != n:
                raise ValueError(
                    f"{name} has {got} steps but observations has {n}: every array needs the same "
                    f"length N (got {name} shape {getattr(self, name).shape}, observations shape "
                    f"{self.observations.shape})."
                )
        for name in ("observations", "actions"):
            if getattr(self, name).shape[1] == 0:
                raise ValueError(f"{name} must have at least one dimension, got shape {getattr(self, name).shape}.")
        for name in ("observations", "actions", "rewards"):
            bad = ~np.isfinite(getattr(self, name))
            if bad.any():
                first = np.argwhere(bad)[0].tolist()
                raise ValueError(f"{name} has {int(bad.sum())} non-finite values (NaN/inf), first at index {first}.")
        if not (self.terminals[-1] or self.truncations[-1]):
            raise ValueError(
                f"the last step (index {n - 1}) does not end an episode: set terminals[-1] or "
                "truncations[-1] (truncations for data cut at the end of collection)."
            )
        for camera, frames in self.images.items():
            if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4:
                raise ValueError(
                    f"images[{camera!r}] must be a uint8 array of shape (N, H, W, 3), got "
                    f"{getattr(frames, 'dtype', type(frames).__name__)} {getattr(frames, 'shape', '')}."
                )
            if frames.shape[0] != n or frames.shape[3] != 3:
                raise ValueError(f"images[{camera!r}] has shape {frames.shape}; expected ({n}, H, W, 3).")
        if self.instructions is not None and (
            not isinstance(self.instructions, np.ndarray)
            or self.instructions.dtype.kind != "U"
            or self.instructions.shape != (n,)
        ):
            raise ValueError(
                f"instructions must be a str array of shape ({n},), got "
                f"{getattr(self.instructions, 'dtype', type(self.instructions).__name__)} "
                f"{getattr(self.instructions, 'shape', '')}."
            )
        if not isinstance(self.meta, dict):
            raise ValueError(f"meta must be a dict, got {type(self.meta).__name__}.")
        try:
            json.dumps(self.meta)
        except TypeError as err:
            raise ValueError(f"meta must be JSON-serialisable (it is saved as JSON): {err}.") from err

    # ---- shape helpers -------------------------------------------------------------------------------

    @property
    def num_steps(self) -> int:
        """Number of steps ``N``."""
        return len(self.observations)

    @property
    def obs_dim(self) -> int:
        return self.observations.shape[1]

    @property
    def act_dim(self) -> int:
        return self.actions.shape[1]

    @property
    def episode_ends(self) -> np.ndarray:
        """``(E,)`` int64: index of the last step of each episode."""
        return np.flatnonzero(self.terminals | self.truncations)

    @property
    def num_episodes(self) -> int:
        return len(self.episode_ends)

    def episode_slices(self) -> list[slice]:
        """One ``slice`` into the step arrays per episode, in order."""
        ends = self.episode_ends + 1
        starts = np.concatenate([[0], ends[:-1]])
        return [slice(int(s), int(e)) for s, e in zip(starts, ends, strict=True)]

    def episode_lengths(self) -> np.ndarray:
        """``(E,)`` int64: number of steps in each episode."""
        return np.diff(np.concatenate([[0], self.episode_ends + 1]))

    def episode_returns(self) -> np.ndarray:
        """``(E,)`` float64: undiscounted sum of rewards of each episode (summed in float64)."""
        starts = np.concatenate([[0], self.episode_ends[:-1] + 1])
        return np.add.reduceat(self.rewards.astype(np.float64), starts)

    # ---- model inputs --------------------------------------------------------------------------------

    def stats(self) -> dict[str, np.ndarray]:
        """Normalisation statistics over all steps.

        Returns:
            ``obs_mean``, ``obs_std`` (floored at ``OBS_STD_FLOOR``), each ``(obs_dim,)``;
            ``action_min``, ``action_max``, each ``(act_dim,)``. All float32.
        """
        obs = self.observations.astype(np.float64)  # float64 so the variance of large N is accurate
        return {
            "obs_mean": obs.mean(axis=0).astype(np.float32),
            "obs_std": np.maximum(obs.std(axis=0), OBS_STD_FLOOR).astype(np.float32),
            "action_min": self.actions.min(axis=0),
            "action_max": self.actions.max(axis=0),
        }

    def action_chunks(self, horizon: int) -> tuple[np.ndarray, np.ndarray]:
        """One (observation, next-``horizon``-actions) training pair per step.

        Args:
            horizon: chunk length ``H`` >= 1.

        Returns:
            ``obs`` ``(N, obs_dim)`` and ``chunks`` ``(N, H, act_dim)`` with
            ``chunks[t, h] = actions[t + h]`` inside the episode of step ``t``. A chunk that runs past
            its episode's last step repeats that episode's last action (DPPO's convention: the policy
            learns to "hold" at the end rather than see actions of the next, unrelated episode or zeros
            that were never executed). Chunks never mix two episodes.
        """
        if not isinstance(horizon, (int, np.integer)) or isinstance(horizon, bool) or horizon < 1:
            raise ValueError(f"horizon must be an int >= 1, got {horizon!r}.")
        # Last step index of the episode each step belongs to.
        ends = self.episode_ends
        episode_of_step = np.repeat(np.arange(len(ends)), self.episode_lengths())  # (N,)
        last_of_step = ends[episode_of_step]  # (N,)
        idx = np.arange(self.num_steps)[:, None] + np.arange(horizon)[None, :]  # (N, H)
        idx = np.minimum(idx, last_of_step[:, None])  # pad by repeating the episode's last action
        return self.observations.copy(), self.actions[idx]  # (N, obs_dim), (N, H, act_dim)


# ---- file I/O --------------------------------------------------------------------------------------------


def save_dataset(ds: DemoDataset, path: str | os.PathLike[str]) -> Path:
    """Write ``ds`` to ``path`` (exactly that name; ``.npz`` recommended), atomically.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {key: getattr(ds, key) for key in ARRAY_KEYS}
    arrays.update({f"{camera}{IMAGE_SUFFIX}": frames for camera, frames in ds.images.items()})
    if ds.instructions is not None:
        arrays[INSTRUCTIONS_KEY] = ds.instructions
    arrays[META_KEY] = np.array(json.dumps(ds.meta, sort_keys=True))
    arrays[VERSION_KEY] = np.array(FORMAT_VERSION, dtype=np.int64)
    # Temp file in the destination directory so os.replace is an atomic rename on the same filesystem.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **arrays)
        apply_umask(Path(tmp_name))  # mkstemp makes the file private (0600)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def load_dataset(path: str | os.PathLike[str]) -> DemoDataset:
    """Read a dataset written by :func:`save_dataset` (format version 1); validates it.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: keys missing, unsupported ``format_version`` or invalid contents.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Dataset file not found: {path}")
    with np.load(path, allow_pickle=False) as npz:
        missing = [k for k in (*ARRAY_KEYS, META_KEY, VERSION_KEY) if k not in npz.files]
        if missing:
            raise ValueError(f"{path} is not a robo_rlft dataset: missing keys {missing} (found {sorted(npz.files)}).")
        version = int(npz[VERSION_KEY])
        if version != FORMAT_VERSION:
            raise ValueError(f"{path} has format_version {version}; this robo_rlft reads version {FORMAT_VERSION}.")
        arrays = {key: npz[key] for key in ARRAY_KEYS}
        images = {key[: -len(IMAGE_SUFFIX)]: npz[key] for key in npz.files if key.endswith(IMAGE_SUFFIX)}
        instructions = npz[INSTRUCTIONS_KEY] if INSTRUCTIONS_KEY in npz.files else None
        meta = json.loads(str(npz[META_KEY]))
    return DemoDataset(**arrays, meta=meta, images=images, instructions=instructions)
