"""The distribution ships every package, the Hydra presets, the built-in checkpoint and the tabletop init states."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parent.parent


def test_every_python_package_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for top in ("robo_rlft", "envs", "policies", "real_robot")
        for init in (ROOT / top).rglob("__init__.py")
    }
    assert on_disk <= listed, f"packages missing from pyproject.toml: {sorted(on_disk - listed)}"


@pytest.mark.slow
def test_wheel_ships_configs_checkpoint_and_init_states(tmp_path):
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run([*pip_wheel, "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("robo_rlft-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    presets = {f"robo_rlft/configs/{p.relative_to(ROOT / 'configs')}" for p in (ROOT / "configs").rglob("*.yaml")}
    assert presets and presets <= names, sorted(presets - names)
    builtin = ROOT / "robo_rlft" / "assets" / "checkpoints"
    shipped = {f"robo_rlft/assets/checkpoints/{p.relative_to(builtin)}" for p in builtin.rglob("*") if p.is_file()}
    assert shipped and shipped <= names, sorted(shipped - names)
    init_states = {f"envs/tabletop/init_states/{p.name}" for p in (ROOT / "envs/tabletop/init_states").glob("*.npz")}
    assert init_states and init_states <= names, sorted(init_states - names)
