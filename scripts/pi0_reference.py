"""Record LeRobot's π0 / π0.5 parameter names and shapes in ``tests/fixtures/pi0/``, and check a real-size import.

LeRobot 0.4.2's π0 cannot run here: it needs LeRobot's patched ``transformers`` fork (a git dependency that cannot
be installed here) and its smallest sizes (gemma_2b + gemma_300m) hold 3.5B parameters. What can be checked is done
in two processes, as in ``scripts/smolvla_fixtures.py`` (whose venv helper this reuses):

1. ``python scripts/pi0_reference.py``: creates a throwaway venv (default ``/tmp/lerobot-pi-ref``; ~5 GB, a few
   minutes the first time) with ``lerobot[smolvla]==0.4.2`` through ``smolvla_fixtures.ensure_venv`` (that extra is
   LeRobot's plain ``transformers<5`` dependency; its PyPI wheel declares no ``pi`` extra, because the fork is
   git-only) and re-runs itself inside it with ``--inside``.
2. Inside, with PyPI ``transformers`` 4.57, it makes the fork's two constructor-visible differences by hand:
   the fork's ``transformers.models.siglip.check`` module (the version check ``PI0Pytorch`` runs) is provided so the
   constructor runs, and, for π0.5, the action expert's RMSNorms are rebuilt as the fork's adaptive ``GemmaRMSNorm``
   (``cond_dim`` set: a ``dense`` ``Linear(cond_dim, 3 * dim)`` instead of ``weight``), with the fork's own rule
   (``cond_dim = config.adarms_cond_dim if config.use_adarms else None``, applied to every decoder layer's
   ``input_layernorm`` / ``post_attention_layernorm`` and to the model's final ``norm``; openpi
   ``src/openpi/models_pytorch/transformers_replace/models/gemma/modeling_gemma.py``). It then builds ``PI0Policy`` and
   ``PI05Policy`` with their default (real-size) configs on the meta device and writes every state-dict key and
   shape. Which keys ``save_pretrained`` leaves out (tied weights, deduplicated by ``safetensors.save_model``) is
   measured by saving a miniature of the same module tree (the Gemma sizes and the vision depth patched small) and
   applied to the real-size listing.

``--real-size-check`` (run with robo-rlft's own Python, no LeRobot needed) writes a random state dict with exactly
the fixture's keys and shapes in LeRobot's layout (config.json, model.safetensors, processor files), loads it with
:func:`policies.pi0_lerobot.load_lerobot_pi0_checkpoint`, runs a forward pass (a deterministic action chunk) on CPU,
and writes the numbers to ``benchmarks/results/pi0_import.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "pi0"
RESULTS = REPO / "benchmarks" / "results" / "pi0_import.md"
# LeRobot's policy type -> (fixture file, module, policy class, config class).
FAMILIES = {
    "pi0": ("pi0_keys.json", "lerobot.policies.pi0", "PI0Policy", "PI0Config"),
    "pi05": ("pi05_keys.json", "lerobot.policies.pi05", "PI05Policy", "PI05Config"),
}
# The config fields that define the architecture (or the shapes of its inputs), recorded with the keys.
ARCH_FIELDS = (
    "paligemma_variant",
    "action_expert_variant",
    "dtype",
    "chunk_size",
    "max_state_dim",
    "max_action_dim",
    "num_inference_steps",
    "min_period",
    "max_period",
    "image_resolution",
    "tokenizer_max_length",
    "normalization_mapping",
)
FORK_SOURCE = (
    "openpi src/openpi/models_pytorch/transformers_replace/models/gemma/modeling_gemma.py (GemmaRMSNorm with cond_dim, "
    "GemmaDecoderLayer/GemmaModel norms built with cond_dim = adarms_cond_dim if use_adarms else None)"
)


# ---- step 2: inside the LeRobot venv ----------------------------------------------------------------------


def _install_fork_shims() -> None:
    """The two parts of LeRobot's transformers fork that its π0 constructors see, rebuilt on PyPI transformers."""
    import types

    import torch
    from torch import nn

    # PI0Pytorch.__init__ refuses to build unless the fork's `transformers.models.siglip.check` module says it is
    # installed; that module only exists in the fork and only answers this question.
    check = types.ModuleType("transformers.models.siglip.check")
    check.check_whether_transformers_replace_is_installed_correctly = lambda: True
    sys.modules["transformers.models.siglip.check"] = check

    class AdaptiveGemmaRMSNorm(nn.Module):
        """The fork's GemmaRMSNorm with ``cond_dim`` set: its parameters are a ``dense`` layer, not ``weight``."""

        def __init__(self, dim: int, eps: float, cond_dim: int) -> None:
            super().__init__()
            self.eps, self.dim, self.cond_dim = eps, dim, cond_dim
            self.dense = nn.Linear(cond_dim, dim * 3, bias=True)
            nn.init.zeros_(self.dense.weight)

    def adapt_expert_norms(expert: nn.Module) -> None:
        config = expert.config
        cond_dim = getattr(config, "adarms_cond_dim", None) if getattr(config, "use_adarms", False) else None
        if cond_dim is None:
            return
        eps = config.rms_norm_eps
        device = next(expert.parameters()).device
        with torch.device(device):
            for layer in expert.model.layers:
                layer.input_layernorm = AdaptiveGemmaRMSNorm(config.hidden_size, eps, cond_dim)
                layer.post_attention_layernorm = AdaptiveGemmaRMSNorm(config.hidden_size, eps, cond_dim)
            expert.model.norm = AdaptiveGemmaRMSNorm(config.hidden_size, eps, cond_dim)

    # PaliGemmaWithExpertModel builds the expert with use_adarms / adarms_cond_dim in its config (PyPI transformers
    # keeps them as plain attributes); rebuild its norms right after construction, before the dtype pass.
    from lerobot.policies.pi0 import modeling_pi0
    from lerobot.policies.pi05 import modeling_pi05

    for module in (modeling_pi0, modeling_pi05):
        original = module.PaliGemmaWithExpertModel.to_bfloat16_for_selected_params

        def patched(self, precision="bfloat16", _original=original):
            adapt_expert_norms(self.gemma_expert)
            return _original(self, precision)

        module.PaliGemmaWithExpertModel.to_bfloat16_for_selected_params = patched


def _build(family: str, **overrides):
    """LeRobot's policy of ``family`` with its default config (plus ``overrides``), on the current device."""
    import importlib

    import torch

    _, module_name, policy_name, config_name = FAMILIES[family]
    module = importlib.import_module(module_name)
    config = getattr(module, config_name)(device="cpu", **overrides)
    # PI0Policy.__init__ ends with self.model.to(config.device), which would copy meta tensors; keep them where built.
    original_to = torch.nn.Module.to
    torch.nn.Module.to = lambda self, *args, **kwargs: self
    try:
        return getattr(module, policy_name)(config), config
    finally:
        torch.nn.Module.to = original_to


def _saved_key_rule(family: str) -> tuple[list[str], list[str]]:
    """Which state-dict keys LeRobot's ``save_pretrained`` drops: save a miniature of the same module tree.

    Returns ``(dropped keys, kept keys that are shared with a dropped one)``, in the real model's names.
    """
    from lerobot.policies.pi0 import modeling_pi0
    from lerobot.policies.pi05 import modeling_pi05
    from safetensors import safe_open
    from transformers.models.auto import CONFIG_MAPPING

    module = modeling_pi0 if family == "pi0" else modeling_pi05
    tiny = module.GemmaConfig(width=16, depth=2, mlp_dim=32, num_heads=2, num_kv_heads=1, head_dim=8)
    real_get, real_paligemma = module.get_gemma_config, CONFIG_MAPPING["paligemma"]

    def small_paligemma(**kwargs):
        config = real_paligemma(**kwargs)
        config.vision_config.num_hidden_layers = 1
        config.vision_config.hidden_size = 16
        config.vision_config.num_attention_heads = 2
        return config

    module.get_gemma_config = lambda variant: tiny
    CONFIG_MAPPING._extra_content["paligemma"] = small_paligemma
    try:
        policy, _ = _build(family)
        with tempfile.TemporaryDirectory() as tmp:
            policy.save_pretrained(Path(tmp))
            with safe_open(Path(tmp) / "model.safetensors", "pt") as saved:
                saved_keys = set(saved.keys())
    finally:
        module.get_gemma_config = real_get
        del CONFIG_MAPPING._extra_content["paligemma"]
    state = policy.state_dict()
    dropped = sorted(set(state) - saved_keys)
    pointers = {state[key].data_ptr() for key in dropped}
    shared = sorted(k for k in saved_keys if state[k].data_ptr() in pointers)
    assert len(shared) == len(dropped), f"every dropped key {dropped} must be a tied duplicate of a saved one"
    return dropped, shared


def inside(out_dir: Path) -> None:
    """Write ``pi0_keys.json`` and ``pi05_keys.json`` from LeRobot's own constructors."""
    import lerobot
    import torch
    import transformers

    _install_fork_shims()
    out_dir.mkdir(parents=True, exist_ok=True)
    for family, (filename, *_rest) in FAMILIES.items():
        dropped, shared = _saved_key_rule(family)
        with torch.device("meta"):
            policy, config = _build(family)
        state = policy.state_dict()
        missing = [k for k in dropped + shared if k not in state]
        assert not missing, f"the miniature's dropped/shared keys {missing} are not in the real-size model"
        keys = {k: list(v.shape) for k, v in state.items() if k not in dropped}
        arch = {}
        for name in ARCH_FIELDS:
            value = getattr(config, name)
            if isinstance(value, dict):
                value = {k: str(getattr(v, "value", v)) for k, v in value.items()}
            arch[name] = list(value) if isinstance(value, tuple) else value
        expert_config = policy.model.paligemma_with_expert.gemma_expert.config
        record = {
            "family": family,
            "versions": {
                "lerobot": lerobot.__version__,
                "transformers": transformers.__version__,
                "torch": torch.__version__,
            },
            "config": arch,
            "num_keys": len(keys),
            "num_parameters": sum(v.numel() for k, v in state.items() if k not in dropped),
            "keys": keys,
            "omitted_by_save_pretrained": {key: list(state[key].shape) for key in dropped},
            "shared_with_omitted": shared,
            "how_obtained": {
                "constructor": (
                    f"lerobot {lerobot.__version__} {FAMILIES[family][2]}({FAMILIES[family][3]}()) built under "
                    f"torch.device('meta') with PyPI transformers {transformers.__version__}; "
                    "transformers.models.siglip.check (fork-only version check) stubbed to pass"
                ),
                "expert_norms": (
                    f"adaptive (use_adarms=True): rebuilt after construction as {FORK_SOURCE}"
                    if getattr(expert_config, "use_adarms", False)
                    else "plain GemmaRMSNorm (weight), identical in PyPI transformers and the fork"
                ),
                "saved_keys": (
                    "state_dict keys minus those safetensors.save_model drops as tied duplicates, measured by "
                    "PI0Policy.save_pretrained on a miniature (Gemma width 16, depth 2; SigLIP width 16, depth 1) "
                    "of the same module tree"
                ),
            },
        }
        (out_dir / filename).write_text(json.dumps(record, indent=1) + "\n")
        print(f"{family}: {len(keys)} keys, {record['num_parameters'] / 1e9:.3f}B parameters, dropped {dropped}")
        del policy, state


# ---- the real-size import check (robo-rlft's environment) ---------------------------------------------------


def real_size_check(family: str, tokenizer_dir: Path | None, work_dir: Path, dtype: str) -> str:
    """Write a random real-size checkpoint in LeRobot's layout from the fixture, load it, run one forward pass."""
    import torch

    sys.path.insert(0, str(REPO))
    from policies.pi0_lerobot import load_lerobot_pi0_checkpoint, write_random_lerobot_checkpoint
    from policies.vla_backbone import VLAObservation

    torch.manual_seed(0)
    fixture = json.loads((FIXTURES / FAMILIES[family][0]).read_text())
    checkpoint = work_dir / f"{family}-random"
    start = time.perf_counter()
    write_random_lerobot_checkpoint(checkpoint, fixture, state_dim=8, action_dim=7, cameras=["agentview", "wrist"])
    write_s = time.perf_counter() - start
    size_gb = sum(f.stat().st_size for f in checkpoint.iterdir()) / 1e9
    start = time.perf_counter()
    overrides = {"tokenizer_path": str(tokenizer_dir), "dtype": dtype}
    policy = load_lerobot_pi0_checkpoint(checkpoint, state_dim=8, action_dim=7, overrides=overrides).eval()
    load_s = time.perf_counter() - start
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    images = {name: torch.randint(0, 256, (1, 224, 224, 3), dtype=torch.uint8) for name in ("agentview", "wrist")}
    obs = VLAObservation(images, ["put the red cube in the bowl"], torch.randn(1, 8))
    start = time.perf_counter()
    with torch.no_grad():
        sample = policy.sample(obs, deterministic=True, generator=torch.Generator().manual_seed(0))
    forward_s = time.perf_counter() - start
    finite = bool(torch.isfinite(sample.actions).all())
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    counts = policy.parameter_counts()
    parameters = (counts["paligemma"] + counts["expert"]) / 1e9
    return (
        f"| {family} | {fixture['num_keys']} | {parameters:.3f}B | {dtype} | "
        f"{size_gb:.1f} GB | {write_s:.0f} s | {load_s:.0f} s | {forward_s:.1f} s | {tuple(sample.actions.shape)} "
        f"finite={finite} | {rss_loaded:.1f} / {rss_peak:.1f} GB |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--venv", type=Path, default=Path("/tmp/lerobot-pi-ref"), help="throwaway LeRobot venv")
    parser.add_argument("--out", type=Path, default=FIXTURES)
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--real-size-check", choices=sorted(FAMILIES), nargs="*", default=None)
    parser.add_argument("--tokenizer", type=Path, default=None, help="PaliGemma tokenizer folder (default: a stand-in)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16", help="PaliGemma weights")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/pi0-real-size"))
    args = parser.parse_args()
    if args.inside:
        inside(args.out)
        return
    if args.real_size_check is not None:
        sys.path.insert(0, str(REPO))
        from policies.pi0_lerobot import write_stand_in_tokenizer

        args.work_dir.mkdir(parents=True, exist_ok=True)
        words = ["put", "the", "red", "cube", "in", "bowl"]
        tokenizer = args.tokenizer or write_stand_in_tokenizer(args.work_dir / "tokenizer", words, vocab_size=257_152)
        rows = [real_size_check(f, tokenizer, args.work_dir, args.dtype) for f in args.real_size_check or FAMILIES]
        header = (
            "| family | keys | parameters | PaliGemma dtype | checkpoint | write | load | forward (10 steps) | actions "
            "| RSS after load / peak |\n|---|---|---|---|---|---|---|---|---|---|"
        )
        command = "python scripts/pi0_reference.py --real-size-check " + " ".join(args.real_size_check or FAMILIES)
        report = "\n".join([header, *rows])
        print(report)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(_results_page(command, report, args.dtype))
        return
    sys.path.insert(0, str(REPO / "scripts"))
    from smolvla_fixtures import ensure_venv

    python = ensure_venv(args.venv)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run([str(python), __file__, "--inside", "--out", str(args.out)], check=True, env=env)


def _results_page(command: str, table: str, dtype: str) -> str:
    import platform

    import torch

    return (
        "# π0 / π0.5 import at real size (random weights, CPU)\n\n"
        f"Command: `{command}` (torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs).\n\n"
        "A random state dict with exactly the keys and shapes of `tests/fixtures/pi0/*_keys.json` (LeRobot 0.4.2's own "
        "constructors, default sizes: PaliGemma gemma_2b + SigLIP So400m/14, action expert gemma_300m) is written in "
        "LeRobot's checkpoint layout, loaded by `policies.pi0_lerobot.load_lerobot_pi0_checkpoint` (strict: no "
        "missing, unexpected or wrong-shaped key) and sampled once (deterministic Euler chain, 10 steps, one "
        f"observation with two 224x224 cameras). The PaliGemma weights are held in {dtype}, the action expert in "
        "float32. The tokenizer is a word-level stand-in with PaliGemma's special tokens (the real one is not in a "
        "LeRobot checkpoint and cannot be downloaded here). RSS is the process's peak resident set size so far "
        "(ru_maxrss; both families run in one process, so the second row's includes the first's).\n\n"
        f"{table}\n"
    )


if __name__ == "__main__":
    main()
