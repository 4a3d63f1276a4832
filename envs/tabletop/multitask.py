"""Several tabletop tasks behind one env: language-conditioned multi-task training and evaluation.

:class:`MultiTaskTabletopEnv` holds one :class:`~envs.tabletop.env.TabletopEnv` per task and runs one of them per
episode; the instruction is what tells the policy which. Its observations keep every task's keys, with
``object_state`` zero-padded to the longest task's, so one vector env (and one dataset) can mix the tasks.

Which task an episode runs: ``reset(options={"task": name})``; else, with a seed, task ``seed % len(tasks)`` (so
consecutive seeds cycle through the tasks: a vector env reset with seeds ``s, s+1, ...`` and ``collect``'s episodes
cover them evenly); else (the vector env's automatic resets) a draw from ``self.np_random``. The fixed evaluation
init states interleave the tasks': state ``i`` is state ``i // n`` of task ``i % n`` (``n`` tasks), so the first
``k·n`` evaluation episodes cover every task ``k`` times.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np

from envs.tabletop.env import TabletopEnv
from envs.tabletop.tasks import NUM_EVAL_INIT_STATES, TASKS, TaskSpec

OBJECT_STATE_KEY = "object_state"


def check_task_list(tasks: Sequence[str], where: str = "tasks") -> list[str]:
    """``tasks`` as a list of at least two distinct task names, or a ValueError naming what is wrong."""
    tasks = list(tasks)
    unknown = [task for task in tasks if task not in TASKS]
    if len(tasks) < 2 or unknown or len(set(tasks)) != len(tasks):
        raise ValueError(
            f"{where}={tasks} must list at least two distinct tabletop tasks"
            + (f" ({unknown} are not tasks)" if unknown else "")
            + f"; choose from {sorted(TASKS)}."
        )
    return tasks


class MultiTaskTabletopEnv(gym.Env):
    """One episode of one of ``tasks`` at a time; ``kwargs`` are :class:`TabletopEnv`'s (cameras, action mode...).

    Attributes:
        tasks: the task names, in order.
        active_env: the task env of the current episode (what the scripted expert acts in).
    """

    metadata: ClassVar[dict[str, Any]] = TabletopEnv.metadata

    def __init__(self, tasks: Sequence[str], **kwargs: Any) -> None:
        self.tasks = check_task_list(tasks)
        self.envs = [TabletopEnv(task, **kwargs) for task in self.tasks]
        self.active_env = self.envs[0]
        self.object_state_size = max(env.object_state_size for env in self.envs)
        spaces = dict(self.envs[0].observation_space.spaces)
        spaces[OBJECT_STATE_KEY] = gym.spaces.Box(-np.inf, np.inf, (self.object_state_size,), np.float32)
        self.observation_space = gym.spaces.Dict(spaces)
        self.action_space = self.envs[0].action_space
        self.render_mode = self.envs[0].render_mode
        self.num_fixed_init_states = NUM_EVAL_INIT_STATES * len(self.tasks)
        self.max_episode_steps = max(env.max_episode_steps for env in self.envs)

    @property
    def task(self) -> TaskSpec:
        """The current episode's task."""
        return self.active_env.task

    @property
    def instruction(self) -> str:
        """The current episode's instruction."""
        return self.active_env.instruction

    def _pad(self, obs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        padded = np.zeros(self.object_state_size, dtype=np.float32)
        padded[: obs[OBJECT_STATE_KEY].shape[0]] = obs[OBJECT_STATE_KEY]
        return {**obs, OBJECT_STATE_KEY: padded}

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[dict, dict]:
        super().reset(seed=seed)
        options = dict(options or {})
        init_state = options.pop("init_state", None)
        if init_state is None and options.pop("fixed_init_state", False):
            if seed is None:
                raise ValueError("reset: options['fixed_init_state'] needs a seed (the fixed state's index).")
            init_state = seed % self.num_fixed_init_states
        if init_state is not None:
            if not isinstance(init_state, int | np.integer) or not 0 <= init_state < self.num_fixed_init_states:
                raise ValueError(
                    f"reset: options['init_state'] must be an int in [0, {self.num_fixed_init_states}) "
                    f"({len(self.tasks)} tasks x {NUM_EVAL_INIT_STATES}), got {init_state!r}."
                )
            options["init_state"], index = divmod(int(init_state), len(self.tasks))
        elif "task" in options:
            task = options.pop("task")
            if task not in self.tasks:
                raise ValueError(f"reset: options['task']={task!r} is not one of this env's tasks {self.tasks}.")
            index = self.tasks.index(task)
        elif seed is not None:
            index = seed % len(self.tasks)
        else:
            index = int(self.np_random.integers(len(self.tasks)))
        self.active_env = self.envs[index]
        # The task env draws its layout from its own generator, seeded from ours when no seed is given.
        task_seed = seed if seed is not None else int(self.np_random.integers(2**31))
        obs, info = self.active_env.reset(seed=task_seed, options=options or None)
        return self._pad(obs), {**info, "task": self.active_env.task.name}

    def step(self, action: np.ndarray) -> tuple[dict, float, bool, bool, dict]:
        obs, reward, terminated, truncated, info = self.active_env.step(action)
        return self._pad(obs), reward, terminated, truncated, {**info, "task": self.active_env.task.name}

    def render(self) -> np.ndarray | None:
        return self.active_env.render()

    def close(self) -> None:
        for env in self.envs:
            env.close()
