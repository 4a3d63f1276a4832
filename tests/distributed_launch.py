"""Launch ``robo-rlft finetune`` under ``torchrun`` with CPU processes (gloo), for the data-parallel tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_finetune(*args: str, processes: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node=processes -m robo_rlft.cli finetune *args``, one thread per process."""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}"]
    command += [f"--master_port={_free_port()}", "-m", "robo_rlft.cli", "finetune", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
