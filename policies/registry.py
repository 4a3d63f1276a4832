"""Explicit registry of policy families: config name -> (model class, config dataclass)."""

from __future__ import annotations

from policies.diffusion import DiffusionPolicy, DiffusionPolicyConfig
from policies.flow import FlowPolicy, FlowPolicyConfig
from policies.gaussian import GaussianPolicy, GaussianPolicyConfig
from policies.pi0 import PI0Policy, PI0PolicyConfig
from policies.smolvla import SmolVLAPolicy, SmolVLAPolicyConfig
from policies.vla import VLAPolicy, VLAPolicyConfig

POLICIES: dict[str, tuple[type, type]] = {
    "flow": (FlowPolicy, FlowPolicyConfig),
    "diffusion": (DiffusionPolicy, DiffusionPolicyConfig),
    "gaussian": (GaussianPolicy, GaussianPolicyConfig),
    "vla": (VLAPolicy, VLAPolicyConfig),
    "smolvla": (SmolVLAPolicy, SmolVLAPolicyConfig),
    # One implementation, two LeRobot families (PI0PolicyConfig.variant): π0 and π0.5.
    "pi0": (PI0Policy, PI0PolicyConfig),
    "pi05": (PI0Policy, PI0PolicyConfig),
}


def policy_classes(name: str) -> tuple[type, type]:
    """``(model class, config class)`` for a registered policy name."""
    if name not in POLICIES:
        raise ValueError(f"Unknown policy {name!r}. Allowed: {sorted(POLICIES)}.")
    return POLICIES[name]
