"""HPS v2.1 as a dancecore reward: an open_clip ViT-H-14 fine-tuned on human preference pairs.

The score of an image for a prompt is the cosine similarity of its image and text embeddings
(no logit scale), exactly as the ``hpsv2`` package computes it: ``diag(img @ txt.T)`` on
L2-normalised features. Images are preprocessed in memory as HPS's evaluation transform does
(bicubic antialiased resize of the longest side, zero padding to a square, CLIP normalisation),
without a PNG round trip.

Weights: the HPS checkpoint ``HPS_v2.1_compressed.pt`` (a ``{"state_dict": ...}`` file from the
``xswu/HPSv2`` repository) in a local directory or the Hugging Face cache, read with
``torch.load(weights_only=True)`` into the open_clip architecture named by ``architecture``.
The ``tiny`` preset writes a random-init model of the same architecture family (open_clip's
``CLIP`` with a small vision and text transformer) and loads it through the same code.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from dancecore import (
    DTYPES,
    BuildContext,
    ComponentConfig,
    WeightsNotFoundError,
    finite_or_raise,
    flatten_frames,
    materialise,
    on_meta,
    resolve_pretrained,
)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class HPSv21:
    """Human Preference Score v2.1: cosine similarity of HPS image and text embeddings (about 0.2-0.4)."""

    class Config(ComponentConfig):
        """Options of the ``hps-v2.1`` reward."""

        pretrained: str | None = Field(
            "xswu/HPSv2",
            description="Directory or cached HF repo id holding `checkpoint`, or the checkpoint file itself.",
        )
        checkpoint: str = Field(
            "HPS_v2.1_compressed.pt", description="Checkpoint file name inside `pretrained` (not used by presets)."
        )
        architecture: str = Field(
            "ViT-H-14", description="open_clip model name, or 'local-dir:PATH' with an open_clip_config.json."
        )
        preset: Literal["tiny"] | None = Field(None, description="'tiny': random-init model for tests/CPU.")
        resolution: int | None = Field(
            None, ge=8, description="Side of the square model input in pixels (default: the model's, 224)."
        )
        mean: tuple[float, float, float] = Field(OPENAI_CLIP_MEAN, description="Normalisation mean (RGB).")
        std: tuple[float, float, float] = Field(OPENAI_CLIP_STD, description="Normalisation std (RGB).")
        batch_size: int = Field(32, ge=1, description="Images per forward pass.")
        dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Weights dtype.")

        @model_validator(mode="after")
        def _one_source(self) -> HPSv21.Config:
            if self.preset is not None:
                explicit = self.model_fields_set
                clash = sorted(
                    k for k in ("pretrained", "architecture") if k in explicit and getattr(self, k) is not None
                )
                if clash:
                    raise ValueError(f"`preset: tiny` brings its own weights and architecture; remove {clash}")
            elif self.pretrained is None:
                raise ValueError("give `pretrained` (where HPS_v2.1_compressed.pt is) or `preset: tiny`")
            if self.architecture.startswith("hf-hub:"):
                raise ValueError("'hf-hub:' architectures would download at run time; use a name or 'local-dir:'")
            return self

    def __init__(self, config: Config, context: BuildContext | None = None) -> None:
        import open_clip

        context = context or BuildContext()
        self.config = config
        architecture, checkpoint = _locate(config)
        with _quiet_open_clip():  # it logs "initialized randomly": the weights are loaded just below
            model = open_clip.create_model(architecture, pretrained=None, load_weights=False, device="cpu")
        try:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        except Exception as exc:  # a truncated download, a pickle with code, a different format
            raise RuntimeError(f"cannot read HPS checkpoint {checkpoint}: {type(exc).__name__}: {exc}") from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        state = {k.removeprefix("module."): v for k, v in state.items()}
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise RuntimeError(
                f"HPS checkpoint {checkpoint} does not fit the open_clip architecture {architecture!r}: {exc}"
            ) from None
        self.device, self.dtype = context.device, DTYPES[config.dtype]
        self.model = model.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(architecture)
        image_size = self.model.visual.image_size
        self.resolution = config.resolution or int(image_size[0] if isinstance(image_size, tuple) else image_size)

    @classmethod
    def memory_plan_modules(cls, config: Config) -> dict[str, tuple[torch.nn.Module, torch.dtype]]:
        """The open_clip model on the meta device, in its configured dtype (``dancecore plan``)."""
        import open_clip

        architecture = f"local-dir:{tiny_hps_dir()}" if config.preset == "tiny" else config.architecture
        with _quiet_open_clip():
            model = on_meta(
                lambda: open_clip.create_model(architecture, pretrained=None, load_weights=False, device="meta")
            )
        return {f"open_clip {config.architecture if config.preset is None else 'tiny'}": (model, DTYPES[config.dtype])}

    @torch.no_grad()
    def score(self, samples: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """HPS v2.1 of each sample for its prompt; videos average their frames. Returns (B,) on CPU.

        The model runs on the device it was built for (``BuildContext.device``); the pixels are
        moved there micro-batch by micro-batch."""
        frames, texts, per_sample = flatten_frames(samples, prompts)
        device = self.device
        text_features = self._text_features(texts, device)
        scores = []
        for start in range(0, frames.shape[0], self.config.batch_size):
            images = self.preprocess(frames[start : start + self.config.batch_size].to(device))
            image_features = self.model.encode_image(images.to(self.dtype), normalize=True)
            rows = text_features[start : start + self.config.batch_size]
            scores.append((image_features.float() * rows).sum(dim=-1))
        return finite_or_raise(torch.cat(scores).view(-1, per_sample).mean(dim=1).cpu(), "HPS v2.1")

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """HPS's evaluation transform on tensors in [0, 1]: bicubic (antialiased) resize of the
        longest side to ``resolution``, zero padding to a centred square, normalisation."""
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as tf

        size = self.resolution
        x = images.float()
        height, width = x.shape[-2:]
        scale = size / float(max(height, width))
        if scale != 1.0:
            new_height, new_width = round(height * scale), round(width * scale)
            x = tf.resize(x, [new_height, new_width], interpolation=InterpolationMode.BICUBIC, antialias=True)
            pad_h, pad_w = size - new_height, size - new_width
            x = tf.pad(x, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0.0)
        return tf.normalize(x, list(self.config.mean), list(self.config.std))

    def _text_features(self, texts: list[str], device: torch.device) -> torch.Tensor:
        """Normalised text features for every row, encoding each distinct prompt once."""
        unique = sorted(set(texts))
        tokens = self.tokenizer(unique).to(device)
        features = self.model.encode_text(tokens, normalize=True).float()
        index = torch.tensor([unique.index(t) for t in texts], device=device)
        return features.index_select(0, index)


@contextlib.contextmanager
def _quiet_open_clip() -> Iterator[None]:
    """Silence open_clip's root-logger warnings while it builds a model we fill ourselves."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def _locate(config: HPSv21.Config) -> tuple[str, Path]:
    """The open_clip architecture identifier and the checkpoint file to load."""
    if config.preset == "tiny":
        root = tiny_hps_dir()
        return f"local-dir:{root}", root / TINY_CHECKPOINT
    source = Path(config.pretrained or "").expanduser()
    if source.is_file():
        return config.architecture, source
    root = resolve_pretrained(config.pretrained or "", "HPS v2.1")
    checkpoint = root / config.checkpoint
    if not checkpoint.is_file():
        raise WeightsNotFoundError(
            f"HPS v2.1 checkpoint {config.checkpoint!r} not found in {root} (from {config.pretrained!r}); "
            "download it once with `huggingface-cli download xswu/HPSv2 HPS_v2.1_compressed.pt`"
        )
    return config.architecture, checkpoint


TINY_CHECKPOINT = "HPS_v2.1_compressed.pt"

#: The open_clip ``CLIP`` architecture of ViT-H-14 with tiny towers; same tokenizer (vocab, context).
TINY_MODEL_CFG: dict[str, Any] = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
TINY_SPEC: dict[str, Any] = {"model_cfg": TINY_MODEL_CFG, "seed": 0}


def tiny_hps_dir() -> Path:
    """A random-init tiny HPS: ``open_clip_config.json`` plus ``HPS_v2.1_compressed.pt`` (about 2M parameters)."""
    return materialise("tiny-hps-v2.1", TINY_SPEC, write_tiny_hps)


def write_tiny_hps(root: Path) -> None:
    """Write the tiny model in the layout the plugin reads: an open_clip config and an HPS-style
    ``{"state_dict": ...}`` checkpoint."""
    import open_clip

    root.mkdir(parents=True, exist_ok=True)
    config = {
        "model_cfg": TINY_MODEL_CFG,
        "preprocess_cfg": {"mean": list(OPENAI_CLIP_MEAN), "std": list(OPENAI_CLIP_STD)},
    }
    (root / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    torch.manual_seed(TINY_SPEC["seed"])
    with _quiet_open_clip():
        model = open_clip.create_model(f"local-dir:{root}", load_weights=False)
    torch.save({"state_dict": model.state_dict()}, root / TINY_CHECKPOINT)
