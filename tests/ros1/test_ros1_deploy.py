"""`robo-rlft deploy` against `robo-rlft sim-robot` over ROS 1 (this folder's roscore), in real time.

The policy is trained by the main suite's session fixture; tests/test_ros1_backend.py passes its checkpoint and
its direct-simulation successes in ``ROBO_RLFT_E2E_CHECKPOINT`` / ``ROBO_RLFT_E2E_DIRECT_SUCCESSES``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from deploy_e2e import EPISODES, TASK, check_deploy_run, run_deploy_e2e

pytestmark = pytest.mark.filterwarnings("ignore:notifyAll:DeprecationWarning")


def test_deploy_over_ros1_completes_the_task(tmp_path: Path) -> None:
    checkpoint = os.environ.get("ROBO_RLFT_E2E_CHECKPOINT")
    if not checkpoint:
        pytest.skip("needs the trained policy: run through tests/test_ros1_backend.py")
    direct = int(os.environ["ROBO_RLFT_E2E_DIRECT_SUCCESSES"])
    run = run_deploy_e2e(Path(checkpoint), TASK, EPISODES, "ros1", tmp_path, env={})  # ROS_MASTER_URI: conftest
    check_deploy_run(run, direct, EPISODES)
