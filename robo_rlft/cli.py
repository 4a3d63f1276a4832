"""``robo-rlft <verb> key=value ...`` — Hydra composition over the structured configs."""

from __future__ import annotations

import difflib
import logging
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from robo_rlft.config import ALGO_CONFIGS, POLICY_SECTIONS, Config, config_schema, register_configs

logger = logging.getLogger("robo_rlft")


def _find_config_dir() -> Path:
    """``configs/`` of a source checkout (editable install), else the copy a wheel ships in the package."""
    source = Path(__file__).resolve().parent.parent / "configs"
    return source if (source / "config.yaml").is_file() else Path(__file__).resolve().parent / "configs"


CONFIG_DIR = _find_config_dir()

VERBS: dict[str, str] = {
    "collect": "train (or load) an SB3 expert and record a demonstration dataset",
    "pretrain": "behaviour-clone a policy on a dataset (flow matching + EMA)",
    "finetune": "online RL fine-tuning of a pretrained policy (PPO over denoising chains)",
    "eval": "evaluate a checkpoint with its deterministic sampler (eval.json, optional video)",
    "deploy": "run a checkpoint on a robot through ROS (robot=...): control loop, safety layer, status line",
    "sim-robot": "a tabletop task in MuJoCo behind a robot's ROS topics, to deploy to without hardware",
}

USAGE = """usage: robo-rlft <verb> [key=value ...] [--help]

verbs:
{verbs}

Config groups (pick with group=name): env={envs}  policy={policies}  algo={algos}  robot={robots}
  scale={scales}  experiment={experiments}
Any field can be overridden, e.g. `robo-rlft finetune env=walker2d algo.iterations=100 run_dir=runs/w2d`.
`robo-rlft <verb> --help` prints the composed config for that verb.
"""


class ConfigError(ValueError):
    """A bad command line or config value; the message says what is wrong and what is allowed."""


def _group_options(group: str) -> list[str]:
    """Preset names of a config group (the YAML files in ``configs/<group>/``)."""
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def usage() -> str:
    verbs = "\n".join(f"  {name:<9} {text}" for name, text in VERBS.items())
    return USAGE.format(
        verbs=verbs,
        envs="|".join(_group_options("env")),
        policies="|".join(_group_options("policy")),
        algos="|".join(_group_options("algo")),
        robots="|".join(_group_options("robot")),
        scales="|".join(_group_options("scale")),
        experiments="|".join(_group_options("experiment")) or "(none)",
    )


def _explain(exc: Exception, groups: dict[str, str]) -> str:
    """Rewrite Hydra's composition errors so they name the key and list the allowed values."""
    message = str(exc)
    missing_option = re.search(r"Could not find '(\w+)/([^']+)'", message)
    if missing_option:
        group, name = missing_option.groups()
        return f"Unknown {group} {name!r} ({group}={name}). Allowed: {_group_options(group)}."
    explained = _explain_unknown_key(f"{message}\n{exc.__cause__}", groups)
    if explained is None and exc.__cause__ is not None:  # e.g. a value of the wrong type
        explained = f"{message}: {str(exc.__cause__).splitlines()[0]}"
    return explained or message


def _explain_unknown_key(message: str, groups: dict[str, str]) -> str | None:
    """Turn Hydra's 'Key X is not in struct' into a message listing the allowed keys of that node."""
    match = re.search(r"Could not override '([\w.]+)'", message) or re.search(r"full_key: ([\w.]+)", message)
    if not match or not re.search(r"Key '\w+' (is )?not in", message):
        return None
    full_key = match.group(1)
    parent, _, leaf = full_key.rpartition(".")
    node = config_schema(**groups)
    for part in filter(None, parent.split(".")):
        if part not in node:
            return f"Unknown config key {full_key!r}: {part!r} is not a section. Sections: {sorted(node.keys())}."
        node = node[part]
    allowed = sorted(node.keys()) if isinstance(node, DictConfig) else []
    close = difflib.get_close_matches(leaf, allowed, n=1, cutoff=0.5)
    hint = f" Did you mean '{parent + '.' if parent else ''}{close[0]}'?" if close else ""
    return f"Unknown config key {full_key!r}.{hint} Allowed keys under {parent or 'the top level'!r}: {allowed}."


# The typed groups and their defaults (configs/config.yaml).
DEFAULT_GROUPS = {"algo": "ppo", "policy": "flow"}


def _selected_groups(overrides: list[str]) -> dict[str, str]:
    """The ``algo``/``policy`` choices of a command line (valid ones only; defaults otherwise)."""
    tables = {"algo": ALGO_CONFIGS, "policy": POLICY_SECTIONS}
    selected = dict(DEFAULT_GROUPS)
    for override in overrides:
        group, _, name = override.partition("=")
        if group in selected and name in tables[group]:
            selected[group] = name
    return selected


def compose_config(overrides: list[str]) -> Config:
    """Compose and validate the config; raises :class:`ConfigError` with a readable message."""
    register_configs()
    if not CONFIG_DIR.is_dir():
        raise ConfigError(f"Config directory {CONFIG_DIR} not found; reinstall robo-rlft (`pip install -e .`).")
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
        return OmegaConf.to_object(cfg)
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(_explain(exc, _selected_groups(overrides))) from None
    except ValueError as exc:  # a dataclass __post_init__ rejected a value
        raise ConfigError(str(exc)) from None


def config_from_saved(path: Path, overrides: list[str]) -> Config:
    """A run's saved ``config.yaml`` with ``key=value`` overrides on top (used to resume)."""
    saved = OmegaConf.load(path)
    groups = {group: saved.get(group, {}).get("name", DEFAULT_GROUPS[group]) for group in DEFAULT_GROUPS}
    try:
        node = OmegaConf.merge(config_schema(**groups), saved, OmegaConf.from_dotlist(overrides))
        return OmegaConf.to_object(node)
    except OmegaConfBaseException as exc:
        raise ConfigError(_explain(exc, groups)) from None
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def default_run_dir(verb: str, cfg: Config) -> Path:
    return Path("runs") / verb / f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.env.name}"


def _run_verb(verb: str, cfg: Config, overrides: list[str]) -> None:
    # Imported here so `robo-rlft --help` and config errors stay fast.
    from robo_rlft import commands

    handlers: dict[str, Callable[[Config, list[str]], None]] = {
        "collect": commands.collect,
        "pretrain": commands.pretrain,
        "finetune": commands.finetune,
        "eval": commands.evaluate,
        "deploy": commands.deploy,
        "sim-robot": commands.sim_robot,
    }
    handlers[verb](cfg, overrides)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    verb, overrides = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"robo-rlft: unknown verb {verb!r}; choose one of {list(VERBS)}.\n\n{usage()}", file=sys.stderr)
        return 2
    show_config = any(a in ("-h", "--help") for a in overrides)
    overrides = [a for a in overrides if a not in ("-h", "--help")]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = compose_config(overrides)
        if show_config:
            print(f"robo-rlft {verb}: {VERBS[verb]}\n\n{OmegaConf.to_yaml(OmegaConf.structured(cfg))}")
            return 0
        _run_verb(verb, cfg, overrides)
    except (ConfigError, ValueError, FileNotFoundError, FileExistsError, KeyError) as exc:
        print(f"robo-rlft {verb}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"robo-rlft {verb}: interrupted; the last checkpoint is intact.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
