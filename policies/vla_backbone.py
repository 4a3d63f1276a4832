"""The vision-language backbone of the VLA policy: observation batch, preprocessing and prefix features.

The backbone is any image-text-to-text model ``transformers`` loads from a local directory, minus its LM
head: we only need the last hidden states of the prefix ``[image tokens of every camera, instruction
tokens]``. How image placeholders are laid out in the token sequence differs by family, so each supported
family has a small :class:`PromptLayout`; the layouts reproduce what the family's own ``transformers``
processor emits (``tests/test_vla.py`` checks this for Idefics3), without its image processor: images are
resized and normalised in torch (as LeRobot's SmolVLA does), because the processors' fast paths need
torchvision, which has no build matching our CPU torch (FACTS.md, "Tiny VLMs offline").

``transformers``, ``tokenizers`` and ``peft`` are optional dependencies, imported lazily through
:func:`require_vla_dependencies`.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

logger = logging.getLogger(__name__)

# robo-rlft declares these dependencies; the hint helps an environment that has drifted from them.
VLA_INSTALL_HINT = "pip install 'transformers>=5.24,<6' 'tokenizers>=0.23' 'peft>=0.21'"
# Camera name -> key of its image in a tabletop observation (envs/tabletop/env.py).
CAMERA_IMAGE_KEYS: dict[str, str] = {"agentview": "agentview_image", "wrist": "wrist_image"}
STATE_KEY = "state"
# ``vlm_path`` value that builds the random tiny VLM of :func:`build_tiny_vlm` in memory (tests, smoke runs).
TINY_VLM = "tiny"
# Its default image size (policy.tiny_image_size): 32 px, 4 tokens per image.
TINY_IMAGE_SIZE = 32
# Files of a VLM directory that preprocessing needs besides the model config and tokenizer; copied verbatim
# into checkpoints so `AutoProcessor.from_pretrained(<checkpoint>/vlm)` keeps working.
_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "chat_template.jinja", "chat_template.json")
# SigLIP's normalisation, used by both supported families, when the VLM folder has no processor config.
_DEFAULT_IMAGE_MEAN = (0.5, 0.5, 0.5)
_DEFAULT_IMAGE_STD = (0.5, 0.5, 0.5)


def require_vla_dependencies() -> Any:
    """Import and return ``transformers``, or raise an ImportError with the install command."""
    try:
        import transformers
    except ImportError as err:
        raise ImportError(f"policy=vla needs transformers, tokenizers and peft: {VLA_INSTALL_HINT}") from err
    if int(transformers.__version__.split(".")[0]) < 5:
        raise ImportError(f"policy=vla needs transformers>=5, found {transformers.__version__}: {VLA_INSTALL_HINT}")
    return transformers


# ---- observations -----------------------------------------------------------------------------------------


@dataclass
class VLAObservation:
    """A batch of VLA observations.

    Attributes:
        images: camera name -> ``(B, H, W, 3)`` uint8 RGB, right side up.
        instructions: ``B`` language instructions.
        state: ``(B, state_dim)`` proprioception in env units (the tabletop ``state``).
        object_state: ``(B, object_dim)`` the objects' poses, z-scored over the demonstrations, or None. A
            training target only (``VLAPolicyConfig.object_loss_weight``): the policy never reads it to act,
            so env observations, rollouts and deployment leave it None.
    """

    images: dict[str, torch.Tensor]
    instructions: list[str]
    state: torch.Tensor
    object_state: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.state.shape[0]

    def __getitem__(self, rows: torch.Tensor | slice) -> VLAObservation:
        """The observations of ``rows`` (an index tensor, on any device, or a slice)."""
        if isinstance(rows, torch.Tensor):
            rows = rows.cpu()  # images and states may live on another device than the minibatch indices
        index = torch.arange(self.batch_size)[rows].tolist()
        return VLAObservation(
            {name: image[index] for name, image in self.images.items()},
            [self.instructions[i] for i in index],
            self.state[index],
            None if self.object_state is None else self.object_state[index],
        )

    def to(self, device: torch.device | str) -> VLAObservation:
        images = {name: image.to(device) for name, image in self.images.items()}
        object_state = None if self.object_state is None else self.object_state.to(device)
        return VLAObservation(images, self.instructions, self.state.to(device), object_state)

    def validate(self, cameras: Sequence[str], state_dim: int) -> None:
        """Raise a ValueError naming what does not fit a policy with ``cameras`` and ``state_dim``."""
        batch = self.batch_size
        if self.state.ndim != 2 or self.state.shape[1] != state_dim:
            raise ValueError(f"VLAObservation.state must be (B, {state_dim}), got {tuple(self.state.shape)}.")
        if len(self.instructions) != batch:
            raise ValueError(f"VLAObservation has {len(self.instructions)} instructions for a batch of {batch}.")
        if self.object_state is not None and (self.object_state.ndim != 2 or self.object_state.shape[0] != batch):
            raise ValueError(
                f"VLAObservation.object_state must be (B={batch}, object_dim), got {tuple(self.object_state.shape)}."
            )
        missing = [c for c in cameras if c not in self.images]
        if missing:
            raise ValueError(f"VLAObservation lacks images of cameras {missing}; it has {sorted(self.images)}.")
        for name in cameras:
            image = self.images[name]
            if image.dtype != torch.uint8 or image.ndim != 4 or image.shape[0] != batch or image.shape[-1] != 3:
                raise ValueError(
                    f"VLAObservation.images[{name!r}] must be uint8 (B={batch}, H, W, 3), "
                    f"got {image.dtype} {tuple(image.shape)}."
                )

    @classmethod
    def from_env(
        cls,
        obs: Mapping[str, Any] | Sequence[Mapping[str, Any]],
        instructions: str | Sequence[str],
        cameras: Sequence[str] = tuple(CAMERA_IMAGE_KEYS),
        device: torch.device | str = "cpu",
    ) -> VLAObservation:
        """Build a batch from tabletop observations.

        Args:
            obs: a vector env's batched observation dict (``agentview_image (B, H, W, 3)``, ``state (B, 8)``)
                or a list of single-env observation dicts.
            instructions: one per env (``info["instruction"]``), or one string for the whole batch.
            cameras: cameras to take images from (``agentview``, ``wrist``).
        """
        keys = [CAMERA_IMAGE_KEYS[c] for c in cameras if c in CAMERA_IMAGE_KEYS]
        unknown = [c for c in cameras if c not in CAMERA_IMAGE_KEYS]
        if unknown:
            raise ValueError(f"Unknown cameras {unknown}; allowed: {list(CAMERA_IMAGE_KEYS)}.")
        if isinstance(obs, Mapping):
            batched = {k: np.asarray(obs[k]) for k in (*keys, STATE_KEY) if k in obs}
        else:
            batched = {k: np.stack([np.asarray(o[k]) for o in obs]) for k in (*keys, STATE_KEY) if k in obs[0]}
        missing = [k for k in (*keys, STATE_KEY) if k not in batched]
        if missing:
            raise KeyError(
                f"Observation lacks {missing}; create the env with cameras={list(cameras)} "
                f"(it has {sorted(obs if isinstance(obs, Mapping) else obs[0])})."
            )
        batch = batched[STATE_KEY].shape[0]
        texts = [instructions] * batch if isinstance(instructions, str) else list(instructions)
        images = {c: torch.as_tensor(batched[CAMERA_IMAGE_KEYS[c]], device=device) for c in cameras}
        state = torch.as_tensor(batched[STATE_KEY], dtype=torch.float32, device=device)
        return cls(images, texts, state)


@dataclass
class Prefix:
    """The backbone's output for a batch of observations.

    Attributes:
        features: ``(B, L, D)`` last hidden states of the prefix tokens (D = the VLM's text width).
        mask: ``(B, L)`` bool, False at padding after a short instruction.
    """

    features: torch.Tensor
    mask: torch.Tensor


# ---- prompt layouts ---------------------------------------------------------------------------------------


class PromptLayout:
    """Token ids of one family's prefix ``[images..., instruction]``, and how its base model is called."""

    def __init__(self, vlm_config: Any, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.image_token_id = int(vlm_config.image_token_id)

    def _token_id(self, token: str) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            raise ValueError(f"The VLM tokenizer has no token {token!r}, which the prompt layout needs.")
        return int(token_id)

    def image_ids(self, num_images: int) -> list[int]:
        raise NotImplementedError

    def text_ids(self, instruction: str) -> list[int]:
        return self.tokenizer(instruction, add_special_tokens=False)["input_ids"]

    def model_inputs(self, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Extra keyword inputs of the base model: ``pixel_values (B, N, 3, S, S)``, ``input_ids (B, L)``."""
        raise NotImplementedError


class Idefics3Layout(PromptLayout):
    """SmolVLM / Idefics3 without image splitting: per image
    ``<fake_token_around_image><global-img><image>*n<fake_token_around_image>``, then the instruction."""

    def __init__(self, vlm_config: Any, tokenizer: Any) -> None:
        super().__init__(vlm_config, tokenizer)
        vision = vlm_config.vision_config
        self.tokens_per_image = int((vision.image_size // vision.patch_size) ** 2 / vlm_config.scale_factor**2)
        self.fake_id = self._token_id("<fake_token_around_image>")
        self.global_id = self._token_id("<global-img>")

    def image_ids(self, num_images: int) -> list[int]:
        one = [self.fake_id, self.global_id, *[self.image_token_id] * self.tokens_per_image, self.fake_id]
        return one * num_images

    def model_inputs(self, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"pixel_values": pixel_values}  # (B, N, 3, S, S): Idefics3 takes images per sample


class PaliGemmaLayout(PromptLayout):
    """PaliGemma: ``<image>*n`` per image, ``<bos>``, the instruction, ``\\n``; the whole prefix attends
    bidirectionally (token_type_ids = 0)."""

    def __init__(self, vlm_config: Any, tokenizer: Any) -> None:
        super().__init__(vlm_config, tokenizer)
        self.tokens_per_image = int(vlm_config.text_config.num_image_tokens)
        self.bos_id = int(tokenizer.bos_token_id)

    def image_ids(self, num_images: int) -> list[int]:
        return [self.image_token_id] * self.tokens_per_image * num_images + [self.bos_id]

    def text_ids(self, instruction: str) -> list[int]:
        return self.tokenizer(instruction + "\n", add_special_tokens=False)["input_ids"]

    def model_inputs(self, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        # PaliGemma takes a flat (B*N, 3, S, S) image batch, scattered into the placeholders in order.
        return {"pixel_values": pixel_values.flatten(0, 1), "token_type_ids": torch.zeros_like(input_ids)}


# model_type of the VLM config -> its layout.
LAYOUTS: dict[str, type[PromptLayout]] = {
    "idefics3": Idefics3Layout,
    "smolvlm": Idefics3Layout,
    "paligemma": PaliGemmaLayout,
}


# ---- the backbone -----------------------------------------------------------------------------------------


def _read_processor_files(vlm_dir: Path) -> dict[str, str]:
    return {name: (vlm_dir / name).read_text() for name in _PROCESSOR_FILES if (vlm_dir / name).is_file()}


def _image_stats(processor_files: Mapping[str, str]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``image_mean``/``image_std`` from the VLM's processor config (SigLIP's 0.5/0.5 when it has none)."""
    for name in ("processor_config.json", "preprocessor_config.json"):
        if name in processor_files:
            data = json.loads(processor_files[name])
            data = data.get("image_processor", data)
            if "image_mean" in data and "image_std" in data:
                return tuple(data["image_mean"]), tuple(data["image_std"])
    logger.info("The VLM folder has no processor config with image_mean/image_std; using SigLIP's 0.5/0.5.")
    return _DEFAULT_IMAGE_MEAN, _DEFAULT_IMAGE_STD


def check_vlm_dir(vlm_dir: Path) -> None:
    """Raise FileNotFoundError naming what a VLM directory lacks (a config and a tokenizer)."""
    if not vlm_dir.is_dir():
        raise FileNotFoundError(
            f"No VLM directory at {str(vlm_dir)!r}: policy.vlm_path must be a local folder written by "
            f"`save_pretrained` (config.json, tokenizer files, weights) or {TINY_VLM!r}."
        )
    missing = [f for f in ("config.json", "tokenizer_config.json") if not (vlm_dir / f).is_file()]
    if missing:
        raise FileNotFoundError(f"VLM directory {str(vlm_dir)!r} is missing {missing}.")


class VLMBackbone(nn.Module):
    """A VLM base model (no LM head) plus its tokenizer and image preprocessing.

    ``forward(obs)`` maps a :class:`VLAObservation` to the :class:`Prefix` features. Its parameters live
    under ``vlm.`` (so they are saved with the policy); the tokenizer and processor config are assets that
    :meth:`save_assets` writes beside them.
    """

    def __init__(self, vlm: nn.Module, tokenizer: Any, processor_files: Mapping[str, str], max_text_tokens: int):
        super().__init__()
        model_type = vlm.config.model_type
        if model_type not in LAYOUTS:
            raise ValueError(
                f"VLM model_type {model_type!r} has no prompt layout; supported families: {sorted(LAYOUTS)}."
            )
        self.vlm = vlm
        self.tokenizer = tokenizer
        self.processor_files = dict(processor_files)
        self.layout = LAYOUTS[model_type](vlm.config, tokenizer)
        self.max_text_tokens = max_text_tokens
        self.image_size = int(vlm.config.vision_config.image_size)
        self.hidden_size = int(vlm.config.text_config.hidden_size)
        mean, std = _image_stats(self.processor_files)
        self.register_buffer("image_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_dir(cls, vlm_dir: str | Path, max_text_tokens: int, load_weights: bool = True) -> VLMBackbone:
        """Load from a ``save_pretrained`` folder; ``load_weights=False`` builds from its config only (the
        weights then come from a policy checkpoint)."""
        transformers = require_vla_dependencies()
        vlm_dir = Path(vlm_dir)
        check_vlm_dir(vlm_dir)
        config = transformers.AutoConfig.from_pretrained(vlm_dir)
        # Loaded through the image-text-to-text auto class (the one every VLM family registers); its base
        # model ``.model`` is kept and the LM head dropped, since only the prefix's hidden states are used.
        auto_class = transformers.AutoModelForImageTextToText
        if load_weights:
            vlm, info = auto_class.from_pretrained(vlm_dir, dtype=torch.float32, output_loading_info=True)
            if info["missing_keys"]:
                raise ValueError(f"VLM weights in {str(vlm_dir)!r} lack {sorted(info['missing_keys'])}.")
        else:
            vlm = auto_class.from_config(config)
        tokenizer = transformers.AutoTokenizer.from_pretrained(vlm_dir)
        return cls(vlm.model.float(), tokenizer, _read_processor_files(vlm_dir), max_text_tokens)

    @classmethod
    def tiny(cls, max_text_tokens: int, seed: int = 0, image_size: int = TINY_IMAGE_SIZE) -> VLMBackbone:
        """The random tiny Idefics3 of :func:`build_tiny_vlm`, in memory."""
        vlm, tokenizer, processor = _tiny_vlm_parts(seed, image_size)
        with tempfile.TemporaryDirectory() as tmp:  # the processor's files exactly as save_pretrained writes them
            processor.save_pretrained(tmp)
            files = _read_processor_files(Path(tmp))
        return cls(vlm.model, tokenizer, files, max_text_tokens)

    def save_assets(self, vlm_dir: Path) -> None:
        """Write the VLM config, tokenizer and processor config (no weights) to ``vlm_dir``."""
        vlm_dir.mkdir(parents=True, exist_ok=True)
        self.vlm.config.save_pretrained(vlm_dir)
        self.tokenizer.save_pretrained(vlm_dir)
        for name, text in self.processor_files.items():
            (vlm_dir / name).write_text(text)

    # ---- preprocessing ----
    def pixel_values(self, obs: VLAObservation, cameras: Sequence[str]) -> torch.Tensor:
        """``(B, N, 3, S, S)`` float: each camera's uint8 image resized to the vision tower's S and normalised."""
        per_camera = []
        for name in cameras:
            image = obs.images[name].to(self.image_mean.device).permute(0, 3, 1, 2).float() / 255.0  # (B, 3, H, W)
            if image.shape[-2:] != (self.image_size, self.image_size):
                image = F.interpolate(
                    image, (self.image_size, self.image_size), mode="bilinear", antialias=True, align_corners=False
                )
            per_camera.append((image - self.image_mean) / self.image_std)
        # Contiguous: Idefics3 views it as (B*N, 3, S, S). It also drops images that are exactly 0 everywhere
        # as padding, which a normalised uint8 image (never exactly 0.5 grey at every pixel) is not.
        return torch.stack(per_camera, 1).contiguous()

    def input_ids(self, instructions: Sequence[str], num_images: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids (B, L), attention_mask (B, L))``: image placeholders then the instruction, right-padded.

        Instructions longer than ``max_text_tokens`` are cut (logged once per call), so the prefix length
        and the memory it costs are bounded.
        """
        image_ids = self.layout.image_ids(num_images)
        texts = [self.layout.text_ids(text) for text in instructions]
        if any(len(t) > self.max_text_tokens for t in texts):
            logger.warning("Instruction longer than %d tokens cut to fit.", self.max_text_tokens)
        rows = [image_ids + t[: self.max_text_tokens] for t in texts]
        length = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(rows), length), pad, dtype=torch.long)
        mask = torch.zeros(len(rows), length, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        return ids, mask

    def forward(self, obs: VLAObservation, cameras: Sequence[str]) -> Prefix:
        """The prefix features of ``obs``: one VLM forward over images and instructions."""
        device = self.image_mean.device
        pixel_values = self.pixel_values(obs, cameras)
        input_ids, attention_mask = self.input_ids(obs.instructions, len(cameras))
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        out = self.vlm(
            input_ids=input_ids,
            attention_mask=attention_mask,
            use_cache=False,
            **self.layout.model_inputs(pixel_values, input_ids),
        )
        return Prefix(out.last_hidden_state, attention_mask.bool())


# ---- the tiny preset --------------------------------------------------------------------------------------

# The tabletop suite's instructions (envs/tabletop/tasks.py) plus their words in other orders: the tiny
# tokenizer's vocabulary. Unknown words map to <unk>, so a new task never breaks it.
TINY_INSTRUCTIONS = (
    "lift the red cube",
    "put the red cube on the plate",
    "push the red cube to the plate",
    "open the drawer",
    "close the drawer",
    "put both cubes on the plate",
    "put the can and the red cube in the basket",
    "put the red cube in the bowl and close the drawer",
    "put the cube on the left on the plate",
    "put the cube on the right in the bowl",
    "put the cube next to the bowl on the plate",
    "put the cube next to the plate in the bowl",
    "put the can in the basket",
    "put the green block in the basket",
    "put the red cube in the basket",
    "put the red cube in the bowl",
)
# Every special token the Idefics3 processor and model use; missing ones silently become <unk> (FACTS.md).
_TINY_SPECIAL_TOKENS = {
    "unk_token": "<unk>",
    "pad_token": "<pad>",
    "bos_token": "<|im_start|>",
    "eos_token": "<end_of_utterance>",
}
_TINY_EXTRA_TOKENS = {
    "fake_image_token": "<fake_token_around_image>",
    "image_token": "<image>",
    "global_image_token": "<global-img>",
    "end_of_utterance_token": "<end_of_utterance>",
}
# The tiny VLM's patch size and pixel-shuffle factor: an S-pixel image gives (S / 16)^2 image tokens.
_TINY_PATCH, _TINY_SCALE = 8, 2


def check_tiny_image_size(image_size: int) -> None:
    """Raise a ValueError unless ``image_size`` is a positive multiple of 16 (whole patches after the shuffle)."""
    step = _TINY_PATCH * _TINY_SCALE
    if image_size < step or image_size % step:
        raise ValueError(
            f"policy.tiny_image_size must be a positive multiple of {step} (patch {_TINY_PATCH} x pixel shuffle "
            f"{_TINY_SCALE}), got {image_size}; e.g. 32 (4 tokens per image) or 64 (16 tokens per image)."
        )


def _tiny_vlm_parts(seed: int, image_size: int = TINY_IMAGE_SIZE) -> tuple[nn.Module, Any, Any]:
    """A random tiny Idefics3 (SmolVLM layout) for ``image_size`` images, its WordLevel tokenizer, its processor."""
    check_tiny_image_size(image_size)
    transformers = require_vla_dependencies()
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
    from transformers.models.idefics3.processing_idefics3 import Idefics3Processor

    special = list(dict.fromkeys([*_TINY_SPECIAL_TOKENS.values(), *_TINY_EXTRA_TOKENS.values()]))
    word_level = Tokenizer(models.WordLevel(unk_token=_TINY_SPECIAL_TOKENS["unk_token"]))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    # Sorted words make the vocabulary independent of the order the trainer sees them in.
    words = sorted({w for text in TINY_INSTRUCTIONS for w in text.split()} | {"User:", "Assistant:", "\n"})
    word_level.train_from_iterator(words, trainers.WordLevelTrainer(special_tokens=special, min_frequency=1))
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=word_level, **_TINY_SPECIAL_TOKENS, extra_special_tokens=_TINY_EXTRA_TOKENS
    )
    patch, scale = _TINY_PATCH, _TINY_SCALE  # 32 px: (32/8)^2 = 16 patches -> 4 image tokens after the shuffle
    config = transformers.Idefics3Config(
        image_token_id=tokenizer.convert_tokens_to_ids(_TINY_EXTRA_TOKENS["image_token"]),
        scale_factor=scale,
        vision_config={
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": image_size,
            "patch_size": patch,
        },
        text_config={
            "model_type": "llama",
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": len(tokenizer),
            "pad_token_id": tokenizer.pad_token_id,
            "max_position_embeddings": 512,
        },
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = transformers.AutoModelForImageTextToText.from_config(config).float()
    image_processor = Idefics3ImageProcessorPil(
        do_image_splitting=False,
        size={"longest_edge": image_size},
        max_image_size={"longest_edge": image_size},
    )
    processor = Idefics3Processor(image_processor, tokenizer, image_seq_len=model.model.image_seq_len)
    return model, tokenizer, processor


def build_tiny_vlm(path: str | Path, seed: int = 0, image_size: int = TINY_IMAGE_SIZE) -> Path:
    """Write a random tiny Idefics3 VLM (SmolVLM layout, ~0.5M parameters; 32x32 images with 4 tokens each by
    default, ``(image_size / 16)^2`` tokens otherwise) with its tokenizer and processor to ``path``, in the format
    ``save_pretrained`` uses. Nothing is downloaded.
    """
    path = Path(path)
    model, _, processor = _tiny_vlm_parts(seed, image_size)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
