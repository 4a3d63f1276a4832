"""Deployment to real arms (issue: Deploy). This package's core is pure Python: no ROS import anywhere in it.

- :mod:`real_robot.transport` — message-shaped dataclasses, the :class:`~real_robot.transport.Transport` protocol a
  ROS 2 / ROS 1 backend implements, and :class:`~real_robot.transport.InMemoryTransport` for tests.
- :mod:`real_robot.adapters` — the arm model: joint states → the policy's 8-D ``state``; action chunks
  (``joint`` or ``delta_ee``) → joint targets.
- :mod:`real_robot.observation` — observation assembly and the policy's deterministic sampler as a function.
- :mod:`real_robot.safety` — limits, workspace box, NaN rejection and the e-stop latch between policy and robot.
- :mod:`real_robot.loop` — the fixed-rate control loop with inference on a worker thread and a watchdog.
"""
