"""CLIP score as a dancecore reward: cosine similarity of CLIP image and prompt embeddings.

Works with any transformers ``CLIPModel`` checkpoint (``openai/clip-vit-large-patch14``,
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``, ...) in a local directory or the Hugging Face cache,
offline. Pixels are preprocessed in memory the way ``CLIPImageProcessor`` does (bicubic
antialiased resize of the shortest side, centre crop, normalisation) without a PNG round trip.

:class:`CLIPEmbedder` is the reusable part (PickScore, a fine-tuned CLIP, builds on it).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from dancecore import (
    DTYPES,
    TINY_TOKENIZER,
    BuildContext,
    ComponentConfig,
    finite_or_raise,
    flatten_frames,
    materialise,
    resolve_pretrained,
    write_tiny_tokenizer,
)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class CLIPInputOptions(ComponentConfig):
    """How pixels and prompts are fed to a CLIP model (shared by CLIP-based rewards)."""

    resolution: int | None = Field(
        None, ge=8, description="Side of the square model input in pixels (default: the model's, e.g. 224)."
    )
    mean: tuple[float, float, float] = Field(OPENAI_CLIP_MEAN, description="Normalisation mean (RGB).")
    std: tuple[float, float, float] = Field(OPENAI_CLIP_STD, description="Normalisation std (RGB).")
    max_length: int = Field(77, ge=2, description="Prompt tokens (longer prompts are truncated).")
    batch_size: int = Field(32, ge=1, description="Images per forward pass.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Weights dtype.")


class CLIPScore:
    """Cosine similarity between the CLIP embeddings of each sample and its prompt (in [-1, 1])."""

    class Config(CLIPInputOptions):
        """Options of the ``clip-score`` reward."""

        pretrained: str | None = Field(
            "openai/clip-vit-large-patch14", description="transformers CLIP directory or cached HF repo id."
        )
        preset: Literal["tiny"] | None = Field(None, description="'tiny': random-init CLIP for tests/CPU.")

        @model_validator(mode="after")
        def _one_source(self) -> CLIPScore.Config:
            check_source(self)
            return self

    def __init__(self, config: Config, context: BuildContext | None = None) -> None:
        context = context or BuildContext()
        self.config = config
        root = tiny_clip_dir() if config.preset == "tiny" else resolve_pretrained(config.pretrained or "", "CLIP")
        self.embedder = CLIPEmbedder(root, root, config, context.device)

    @torch.no_grad()
    def score(self, samples: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """CLIP cosine similarity of each sample with its prompt; videos average their frames.
        Returns (B,) float32 on CPU."""
        images, texts, per_sample = self.embedder.embed(samples, prompts)
        return finite_or_raise((images * texts).sum(dim=-1).view(-1, per_sample).mean(dim=1).cpu(), "CLIP score")


class CLIPEmbedder:
    """A transformers ``CLIPModel`` with its tokenizer, turning pixels and prompts into
    L2-normalised embeddings (one image and one text row per frame)."""

    def __init__(self, model_dir: Path, tokenizer_dir: Path, options: CLIPInputOptions, device: torch.device) -> None:
        from transformers import AutoTokenizer, CLIPModel

        self.options = options
        load: dict[str, Any] = {"local_files_only": True}
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, **load)
        model = CLIPModel.from_pretrained(model_dir, torch_dtype=DTYPES[options.dtype], **load)
        self.device = device
        self.model = model.to(device).eval().requires_grad_(False)
        self.resolution = options.resolution or int(self.model.config.vision_config.image_size)
        self.max_length = min(options.max_length, int(self.model.config.text_config.max_position_embeddings))

    def embed(self, samples: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Normalised image and text embeddings (fp32, one row per frame) and frames per sample.

        The model runs on the device it was built for; pixels are moved there batch by batch."""
        frames, texts, per_sample = flatten_frames(samples, prompts)
        text_features = self.text_features(texts)
        image_features = torch.cat(
            [
                self.image_features(frames[i : i + self.options.batch_size])
                for i in range(0, frames.shape[0], self.options.batch_size)
            ]
        )
        return image_features, text_features, per_sample

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised projected image embeddings of pixels in [0, 1]."""
        pixels = self.preprocess(images.to(self.device)).to(self.model.dtype)
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output
        return torch.nn.functional.normalize(self.model.visual_projection(pooled).float(), dim=-1)

    def text_features(self, texts: list[str]) -> torch.Tensor:
        """Normalised projected text embeddings, one row per text (each distinct text encoded once)."""
        unique = sorted(set(texts))
        tokens = self.tokenizer(
            unique, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        ).to(self.device)
        pooled = self.model.text_model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).pooler_output
        features = torch.nn.functional.normalize(self.model.text_projection(pooled).float(), dim=-1)
        return features.index_select(0, torch.tensor([unique.index(t) for t in texts], device=self.device))

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """CLIP's image transform on tensors in [0, 1]: bicubic antialiased resize of the shortest
        side to ``resolution``, centre crop, normalisation."""
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as tf

        size = self.resolution
        x = tf.resize(images.float(), size, interpolation=InterpolationMode.BICUBIC, antialias=True)
        x = tf.center_crop(x, [size, size])
        return tf.normalize(x, list(self.options.mean), list(self.options.std))


def check_source(config: Any) -> None:
    """``preset`` and an explicitly given ``pretrained`` exclude each other; one is needed."""
    if config.preset is not None:
        if "pretrained" in config.model_fields_set and config.pretrained is not None:
            raise ValueError("give either `pretrained` (weights) or `preset: tiny`, not both")
    elif config.pretrained is None:
        raise ValueError("give `pretrained` (a local directory or cached HF repo id) or `preset: tiny`")


TINY_CLIP_SPEC: dict[str, Any] = {
    "text_config": {
        **TINY_TOKENIZER.model_config(),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "max_position_embeddings": 77,
    },
    "vision_config": {
        "image_size": 32,
        "patch_size": 8,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
    },
    "projection_dim": 16,
    "seed": 0,
}


def tiny_clip_dir() -> Path:
    """A random-init CLIP of the real architecture in the transformers layout (model, tokenizer,
    ``preprocessor_config.json``)."""
    return materialise("tiny-clip", TINY_CLIP_SPEC, lambda root: write_tiny_clip(root, TINY_CLIP_SPEC))


def write_tiny_clip(root: Path, spec: dict[str, Any], logit_scale: float | None = None) -> None:
    """Write a tiny ``CLIPModel`` built from ``spec`` (seeded), a byte-level tokenizer and a CLIP
    image-processor config to ``root``."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(spec["seed"])
    config = CLIPConfig(
        text_config=spec["text_config"], vision_config=spec["vision_config"], projection_dim=spec["projection_dim"]
    )
    model = CLIPModel(config)
    if logit_scale is not None:
        model.logit_scale.data.fill_(logit_scale)
    model.save_pretrained(root)
    write_tiny_tokenizer(root, spec["text_config"]["max_position_embeddings"])
    write_processor_config(root, spec["vision_config"]["image_size"])


def write_processor_config(root: Path, size: int) -> None:
    """The ``preprocessor_config.json`` a CLIP checkpoint ships, for a ``size`` x ``size`` input."""
    processor = {
        "image_processor_type": "CLIPImageProcessor",
        "processor_class": "CLIPProcessor",
        "do_resize": True,
        "size": {"shortest_edge": size},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": size, "width": size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(OPENAI_CLIP_MEAN),
        "image_std": list(OPENAI_CLIP_STD),
        "do_convert_rgb": True,
    }
    (root / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
