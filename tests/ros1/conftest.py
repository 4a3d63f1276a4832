"""ROS 1 tests: collected only where rospy imports (tests/conftest.py ignores this folder elsewhere); run by
tests/test_ros1_backend.py under a ROS 1 interpreter. Starts a private ``roscore`` for the session."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

MASTER_START_DEADLINE = 15.0  # s; roscore answers in ~1 s (FACTS.md)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session", autouse=True)
def roscore(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``roscore -p <free port>`` for the session; yields the master URI (also in ``ROS_MASTER_URI``, which rospy
    reads when the process's node starts and subprocesses inherit)."""
    import rosgraph

    home = tmp_path_factory.mktemp("ros_home")
    uri = f"http://127.0.0.1:{_free_port()}"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("ROS_MASTER_URI", uri)
        env.setenv("ROS_IP", "127.0.0.1")  # advertise loopback addresses, not a hostname that may not resolve
        env.delenv("ROS_HOSTNAME", raising=False)
        env.setenv("ROS_HOME", str(home))  # logs and roslaunch state out of ~/.ros
        env.setenv("ROS_LOG_DIR", str(home / "log"))
        log_path = Path(home) / "roscore.log"
        with open(log_path, "wb") as log:
            # Its own process group: roscore starts rosmaster and rosout as children, stopped together below.
            process = subprocess.Popen(
                ["roscore", "-p", uri.rsplit(":", 1)[1]], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            end = time.monotonic() + MASTER_START_DEADLINE
            while not rosgraph.is_master_online(master_uri=uri):
                if process.poll() is not None or time.monotonic() > end:
                    pytest.fail(
                        f"roscore did not answer at {uri} within {MASTER_START_DEADLINE} s:\n"
                        f"{log_path.read_text(errors='replace')}"
                    )
                time.sleep(0.05)
            yield uri
        finally:
            os.killpg(process.pid, signal.SIGINT)  # roscore shuts its children down on SIGINT
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
