"""Regenerate the SmolVLA reference fixtures in ``tests/fixtures/smolvla/`` from LeRobot itself.

LeRobot 0.4.2 cannot share robo-rlft's environment (it pins torch < 2.8 and transformers 4.57), so this
script runs in two processes:

1. ``python scripts/smolvla_fixtures.py`` (any Python >= 3.10 with ``venv``): creates a throwaway venv
   (default ``/tmp/lerobot-ref``; ~156 s and 6.6 GB the first time, it pulls a CUDA torch 2.7.1) with
   ``lerobot[smolvla]==0.4.2`` and re-runs itself inside it with ``--inside``.
2. Inside that venv it builds a tiny random SmolVLM folder (SmolVLM/Idefics3 layout, a WordLevel tokenizer
   made offline with ``tokenizers`` that defines every special token SmolVLA reads), a tiny randomly
   initialised ``SmolVLAPolicy`` on it (``vlm_model_name=<folder>``, ``load_vlm_weights=False``), saves it
   with ``save_pretrained`` together with its pre/post-processors (normalisation stats included), and records
   its action chunks for fixed inputs (two cameras, state, instructions of different lengths) and fixed noise.

Written (about 2 MB)::

    tests/fixtures/smolvla/
        SmolVLM-tiny/          the VLM folder (config, tokenizer, processor config; no weights: the
                               checkpoint holds them, as load_vlm_weights=False means)
        checkpoint/            LeRobot's layout: config.json, model.safetensors and the
                               policy_{pre,post}processor*.{json,safetensors} files with the stats
        reference.npz          inputs (uint8 images, state), noise, the model's normalised 32-D chunk, its
                               first-step velocity and the post-processed (env-unit) actions
        reference.json         instructions, shapes and versions

The checkpoint's ``config.json`` stores the VLM folder as the absolute path it was built at (a temporary
directory that no longer exists afterwards), exactly like a real LeRobot checkpoint moved to another machine:
loaders must be told where the folder is (``policy.vlm_path=...``).

Then, unless ``--skip-export``, the script exports the fixture checkpoint through robo-rlft's own SmolVLA
(``policies.smolvla_lerobot.export_lerobot_checkpoint``, run in the current interpreter of step 1, i.e. robo-rlft's
venv) and loads the export back into LeRobot, checking that LeRobot predicts the same chunk from it.

Usage (from the repository root, in robo-rlft's venv)::

    python scripts/smolvla_fixtures.py [--venv /tmp/lerobot-ref] [--skip-export]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "smolvla"
LEROBOT_REQUIREMENT = "lerobot[smolvla]==0.4.2"

# The tiny model: every size is small enough that the fixture weighs ~2 MB and runs in milliseconds.
IMAGE_SIZE = 32  # SmolVLA resizes (with padding) every camera image to this square
CHUNK_SIZE = 8
N_ACTION_STEPS = 4
NUM_STEPS = 4
STATE_DIM = 8  # the tabletop suite's state
ACTION_DIM = 7  # LIBERO's delta end-effector action
CAMERAS = ("agentview", "wrist")
INSTRUCTIONS = ["lift the red cube", "put the can on the plate and then stop"]
SEED = 0

SPECIAL_TOKENS = {"unk_token": "<unk>", "pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}
# SmolVLM's extra special tokens (SmolVLA reads fake_image_token_id and global_image_token_id from them).
EXTRA_TOKENS = {
    "fake_image_token": "<fake_token_around_image>",
    "image_token": "<image>",
    "global_image_token": "<global-img>",
    "end_of_utterance_token": "<end_of_utterance>",
}
ROW_COL_TOKENS = [f"<row_{r}_col_{c}>" for r in range(1, 5) for c in range(1, 5)]


# ---- step 1: the throwaway venv ---------------------------------------------------------------------------


def ensure_venv(venv: Path) -> Path:
    """The venv's python, creating the venv and installing LeRobot into it when missing."""
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    probe = subprocess.run([str(python), "-c", "import lerobot.policies.smolvla"], capture_output=True)
    if probe.returncode != 0:
        subprocess.run([str(python), "-m", "pip", "install", LEROBOT_REQUIREMENT], check=True)
    return python


def export_and_check(python: Path) -> None:
    """Export the fixture checkpoint with robo-rlft's SmolVLA and load the export back into LeRobot."""
    sys.path.insert(0, str(REPO))
    from policies.smolvla_lerobot import export_lerobot_checkpoint, load_lerobot_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        policy = load_lerobot_checkpoint(
            FIXTURES / "checkpoint", vlm_path=FIXTURES / "SmolVLM-tiny", state_dim=STATE_DIM, action_dim=ACTION_DIM
        )
        exported = export_lerobot_checkpoint(policy, Path(tmp) / "exported")
        out = subprocess.run(
            [str(python), __file__, "--inside", "--check-export", str(exported)],
            capture_output=True,
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        )
        print(out.stdout, out.stderr, sep="\n")
        if out.returncode != 0:
            raise SystemExit("LeRobot could not load robo-rlft's export (see above).")


# ---- step 2: inside the LeRobot venv ----------------------------------------------------------------------


def build_tiny_smolvlm(path: Path) -> None:
    """A random tiny SmolVLM (Idefics3 layout) with an offline WordLevel tokenizer and an Idefics3 processor."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    special = [*SPECIAL_TOKENS.values(), *EXTRA_TOKENS.values(), *ROW_COL_TOKENS]
    word_level = Tokenizer(models.WordLevel(unk_token=SPECIAL_TOKENS["unk_token"]))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    words = sorted({w for text in INSTRUCTIONS for w in text.split()} | {"User:", "Assistant:", "pick", "place"})
    word_level.train_from_iterator(words, trainers.WordLevelTrainer(special_tokens=special, min_frequency=1))
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=word_level, **SPECIAL_TOKENS, extra_special_tokens=EXTRA_TOKENS
    )
    config = transformers.SmolVLMConfig(
        image_token_id=tokenizer.convert_tokens_to_ids(EXTRA_TOKENS["image_token"]),
        scale_factor=2,  # (32 / 8)^2 = 16 patches -> 4 image tokens per camera after the pixel shuffle
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": IMAGE_SIZE,
            "patch_size": 8,
        },
        text_config={
            "model_type": "llama",
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": len(tokenizer),
            "pad_token_id": tokenizer.pad_token_id,
            "max_position_embeddings": 256,
        },
    )
    torch.manual_seed(SEED)
    model = transformers.SmolVLMForConditionalGeneration(config).float()
    image_processor = transformers.Idefics3ImageProcessor(
        do_image_splitting=False,
        size={"longest_edge": IMAGE_SIZE},
        max_image_size={"longest_edge": IMAGE_SIZE},
    )
    processor = transformers.Idefics3Processor(image_processor, tokenizer, image_seq_len=4)
    model.save_pretrained(path)
    processor.save_pretrained(path)


def _features() -> tuple[dict, dict]:
    from lerobot.configs.types import FeatureType, PolicyFeature

    inputs = {
        f"observation.images.{camera}": PolicyFeature(type=FeatureType.VISUAL, shape=(3, 64, 64)) for camera in CAMERAS
    }
    inputs["observation.state"] = PolicyFeature(type=FeatureType.STATE, shape=(STATE_DIM,))
    outputs = {"action": PolicyFeature(type=FeatureType.ACTION, shape=(ACTION_DIM,))}
    return inputs, outputs


def _inputs(rng) -> dict:
    """Fixed inputs: a square and a non-square camera (so resize-with-padding is exercised), the state."""
    import numpy as np

    batch = len(INSTRUCTIONS)
    return {
        "agentview": rng.integers(0, 256, size=(batch, 64, 64, 3), dtype=np.uint8),
        "wrist": rng.integers(0, 256, size=(batch, 40, 48, 3), dtype=np.uint8),
        "state": rng.normal(size=(batch, STATE_DIM)).astype(np.float32),
    }


def _lerobot_batch(arrays: dict) -> dict:
    import torch

    batch = {
        f"observation.images.{camera}": torch.from_numpy(arrays[camera]).permute(0, 3, 1, 2).float() / 255.0
        for camera in CAMERAS
    }
    batch["observation.state"] = torch.from_numpy(arrays["state"])
    batch["task"] = list(INSTRUCTIONS)
    return batch


def _predict(policy, preprocessor, postprocessor, arrays: dict, noise) -> dict:
    """LeRobot's own inference path: preprocessor -> predict_action_chunk(noise) -> postprocessor."""
    import torch

    with torch.no_grad():
        batch = preprocessor(_lerobot_batch(arrays))
        images, img_masks = policy.prepare_images(batch)
        state = policy.prepare_state(batch)
        tokens, masks = batch["observation.language.tokens"], batch["observation.language.attention_mask"]
        chunk = policy.model.sample_actions(images, img_masks, tokens, masks, state, noise=noise.clone())
        # The velocity of the first denoising step (time 1, x = noise), to localise a mismatch.
        prefix_embs, prefix_pad, prefix_att = policy.model.embed_prefix(images, img_masks, tokens, masks, state=state)
        from lerobot.policies.smolvla.modeling_smolvla import make_att_2d_masks

        _, cache = policy.model.vlm_with_expert.forward(
            attention_mask=make_att_2d_masks(prefix_pad, prefix_att),
            position_ids=torch.cumsum(prefix_pad, dim=1) - 1,
            past_key_values=None,
            inputs_embeds=[prefix_embs, None],
            use_cache=True,
            fill_kv_cache=True,
        )
        velocity = policy.model.denoise_step(prefix_pad, cache, noise.clone(), torch.ones(noise.shape[0]))
        policy.reset()
        actions = postprocessor(policy.predict_action_chunk(batch, noise=noise.clone()))
    return {
        "tokens": tokens.numpy(),
        "token_mask": masks.numpy(),
        "chunk_normalized": chunk.numpy(),
        "velocity_t1": velocity.numpy(),
        "actions": actions.numpy(),
    }


def inside(out_dir: Path) -> None:
    """Build, save and record the reference in the LeRobot venv."""
    import lerobot
    import numpy as np
    import torch
    import transformers
    from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy
    from lerobot.policies.smolvla.processor_smolvla import make_smolvla_pre_post_processors

    torch.set_num_threads(1)
    rng = np.random.default_rng(SEED)
    with tempfile.TemporaryDirectory(prefix="smolvla-vlm-") as tmp:
        # Built in a temporary directory: the checkpoint then names a folder that is gone, as on a user's machine.
        vlm_dir = Path(tmp) / "SmolVLM-tiny"
        build_tiny_smolvlm(vlm_dir)
        inputs, outputs = _features()
        config = SmolVLAConfig(
            vlm_model_name=str(vlm_dir),
            load_vlm_weights=False,
            input_features=inputs,
            output_features=outputs,
            chunk_size=CHUNK_SIZE,
            n_action_steps=N_ACTION_STEPS,
            num_steps=NUM_STEPS,
            resize_imgs_with_padding=(IMAGE_SIZE, IMAGE_SIZE),
            num_vlm_layers=4,
            self_attn_every_n_layers=2,
            expert_width_multiplier=0.75,
            device="cpu",
            push_to_hub=False,
        )
        torch.manual_seed(SEED)
        policy = SmolVLAPolicy(config).eval()
        # Default init leaves some layers at zero-ish scales; random weights everywhere make the check sharper.
        with torch.no_grad():
            for name, param in policy.model.named_parameters():
                if "vlm_with_expert.vlm" not in name:
                    param.copy_(torch.randn_like(param) * (0.2 if param.ndim > 1 else 0.05))
                if name.endswith("norm.weight"):
                    param.copy_(1.0 + 0.1 * torch.randn_like(param))
        stats = {
            "observation.state": {
                "mean": torch.from_numpy(rng.normal(size=STATE_DIM).astype(np.float32)),
                "std": torch.from_numpy(rng.uniform(0.5, 2.0, size=STATE_DIM).astype(np.float32)),
            },
            "action": {
                "mean": torch.from_numpy(rng.normal(size=ACTION_DIM).astype(np.float32)),
                "std": torch.from_numpy(rng.uniform(0.1, 1.0, size=ACTION_DIM).astype(np.float32)),
            },
        }
        preprocessor, postprocessor = make_smolvla_pre_post_processors(config, dataset_stats=stats)
        arrays = _inputs(rng)
        noise = torch.from_numpy(rng.normal(size=(len(INSTRUCTIONS), CHUNK_SIZE, 32)).astype(np.float32))
        recorded = _predict(policy, preprocessor, postprocessor, arrays, noise)

        shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.mkdir(parents=True)
        checkpoint = out_dir / "checkpoint"
        policy.save_pretrained(checkpoint)
        preprocessor.save_pretrained(checkpoint)
        postprocessor.save_pretrained(checkpoint)
        # The VLM's own weights are not needed (load_vlm_weights=False: the checkpoint holds the VLM's weights).
        shutil.copytree(vlm_dir, out_dir / "SmolVLM-tiny", ignore=shutil.ignore_patterns("*.safetensors"))

        # The saved checkpoint must reproduce the recording (so the fixture is self-consistent).
        with torch.no_grad():
            reloaded = SmolVLAPolicy.from_pretrained(checkpoint).eval()
        again = _predict(reloaded, preprocessor, postprocessor, arrays, noise)
        drift = float(np.abs(again["actions"] - recorded["actions"]).max())
        assert drift < 1e-5, f"reloaded LeRobot checkpoint differs from the recording by {drift}"

    np.savez_compressed(
        out_dir / "reference.npz",
        agentview=arrays["agentview"],
        wrist=arrays["wrist"],
        state=arrays["state"],
        noise=noise.numpy(),
        **recorded,
    )
    meta = {
        "instructions": INSTRUCTIONS,
        "cameras": {camera: f"observation.images.{camera}" for camera in CAMERAS},
        "state_dim": STATE_DIM,
        "action_dim": ACTION_DIM,
        "chunk_size": CHUNK_SIZE,
        "num_steps": NUM_STEPS,
        "vlm_path_at_build": str(vlm_dir),
        "versions": {
            "lerobot": lerobot.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
    }
    (out_dir / "reference.json").write_text(json.dumps(meta, indent=2) + "\n")
    for item in out_dir.rglob("*"):  # safetensors writes 0600 files; fixtures are plain repository files
        item.chmod(0o755 if item.is_dir() else 0o644)
    print(f"wrote {out_dir}; actions {recorded['actions'].shape}, reload drift {drift:.2e}")


def check_export(exported: Path) -> None:
    """Load robo-rlft's export into LeRobot and compare its chunk with the recording."""
    import numpy as np
    import torch
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy
    from lerobot.processor import PolicyProcessorPipeline
    from lerobot.processor.converters import policy_action_to_transition, transition_to_policy_action

    torch.set_num_threads(1)
    reference = np.load(FIXTURES / "reference.npz")
    policy = SmolVLAPolicy.from_pretrained(exported).eval()
    preprocessor = PolicyProcessorPipeline.from_pretrained(exported, config_filename="policy_preprocessor.json")
    postprocessor = PolicyProcessorPipeline.from_pretrained(
        exported,
        config_filename="policy_postprocessor.json",
        to_transition=policy_action_to_transition,
        to_output=transition_to_policy_action,
    )
    arrays = {"agentview": reference["agentview"], "wrist": reference["wrist"], "state": reference["state"]}
    got = _predict(policy, preprocessor, postprocessor, arrays, torch.from_numpy(reference["noise"]))
    diff = float(np.abs(got["actions"] - reference["actions"]).max())
    print(f"LeRobot on robo-rlft's export: max |actions - reference| = {diff:.2e}")
    if diff > 1e-4:
        raise SystemExit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--venv", type=Path, default=Path("/tmp/lerobot-ref"), help="throwaway LeRobot venv")
    parser.add_argument("--out", type=Path, default=FIXTURES)
    parser.add_argument("--skip-export", action="store_true", help="do not round-trip robo-rlft's export")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--check-export", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside:
        if args.check_export is not None:
            check_export(args.check_export)
        else:
            inside(args.out)
        return
    python = ensure_venv(args.venv)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run([str(python), __file__, "--inside", "--out", str(args.out)], check=True, env=env)
    if not args.skip_export:
        export_and_check(python)


if __name__ == "__main__":
    main()
