"""The ROS 1 backend's tests (tests/ros1), run under a ROS 1 interpreter from this one.

rospy only imports under the system Python with its Debian packages (or ROS Noetic's), never in a venv that also
holds the ROS 2 wheels, so this suite's interpreter cannot run them itself. The ROS 1 interpreter is
``$ROBO_RLFT_ROS1_PYTHON``, else ``.venv-ros1/bin/python`` in the repository. Without one the test is skipped —
unless ``ROBO_RLFT_REQUIRE_ROS1=1`` (CI), where it fails.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HOW_TO = (
    "Create the ROS 1 venv: apt-get install python3-rospy python3-rosmaster python3-roslaunch python3-sensor-msgs "
    "python3-trajectory-msgs python3-std-msgs python3-geometry-msgs; /usr/bin/python3 -m venv "
    "--system-site-packages .venv-ros1; .venv-ros1/bin/pip install torch==2.13.0; .venv-ros1/bin/pip install -e "
    '".[test]" (or point ROBO_RLFT_ROS1_PYTHON at such an interpreter).'
)


def _check(python: str) -> str | None:
    """Why ``python`` cannot run the ROS 1 tests, or ``None`` if it can."""
    if not Path(python).exists():
        return f"{python} does not exist"
    result = subprocess.run(
        [python, "-c", "import rospy, robo_rlft, pytest"], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    return None if result.returncode == 0 else f"{python} cannot import rospy, robo_rlft and pytest:\n{result.stderr}"


def _ros1_python() -> str:
    explicit = os.environ.get("ROBO_RLFT_ROS1_PYTHON")
    if explicit:
        problem = _check(explicit)
        if problem:  # asked for explicitly: a broken interpreter is an error, not a reason to skip
            pytest.fail(f"ROBO_RLFT_ROS1_PYTHON: {problem}\n{HOW_TO}")
        return explicit
    default = str(REPO / ".venv-ros1" / "bin" / "python")
    problem = _check(default)
    if problem:
        message = f"No ROS 1 interpreter ({problem}). {HOW_TO}"
        if os.environ.get("ROBO_RLFT_REQUIRE_ROS1") == "1":
            pytest.fail(f"ROBO_RLFT_REQUIRE_ROS1=1: {message}")
        pytest.skip(message)
    return default


def test_ros1_backend_under_a_ros1_interpreter(lift_policy: Path, direct_successes: int) -> None:
    """The transport round trips and the deployment end to end (the policy trained in this session)."""
    python = _ros1_python()
    env = {
        **os.environ,
        "ROBO_RLFT_E2E_CHECKPOINT": str(lift_policy),
        "ROBO_RLFT_E2E_DIRECT_SUCCESSES": str(direct_successes),
    }
    result = subprocess.run(
        [python, "-m", "pytest", "tests/ros1", "-q", "-s", "-p", "no:cacheprovider", "--timeout=400"],
        capture_output=True,
        text=True,
        timeout=500,
        cwd=REPO,
        env=env,
    )
    print(result.stdout[-3000:])
    assert result.returncode == 0, (
        f"`{python} -m pytest tests/ros1` exited with {result.returncode}:\n{result.stdout}\n{result.stderr}"
    )
