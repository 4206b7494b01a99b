"""PickScore v1 as a dancecore reward: a CLIP ViT-H/14 fine-tuned on Pick-a-Pic human preferences.

As the PickScore paper and its reference code define it, the score is the CLIP logit
``logit_scale.exp() * cos(image, prompt)`` (about 18-24 for typical images; the learned scale is
about 100). The model (``yuvalkirstain/PickScore_v1``) and the processor it was trained with
(``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``: tokenizer, 224 px input, CLIP normalisation) are two
separate repositories, read offline from local directories or the Hugging Face cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from dancecore_rewards_clip.reward import (
    TINY_CLIP_SPEC,
    CLIPEmbedder,
    CLIPInputOptions,
    check_source,
    write_processor_config,
    write_tiny_clip,
)
from pydantic import Field, model_validator

from dancecore import BuildContext, finite_or_raise, materialise, resolve_pretrained, write_tiny_tokenizer


class PickScore:
    """PickScore v1: ``logit_scale.exp()`` times the cosine of CLIP-H image and prompt embeddings."""

    class Config(CLIPInputOptions):
        """Options of the ``pickscore`` reward."""

        pretrained: str | None = Field(
            "yuvalkirstain/PickScore_v1", description="PickScore CLIPModel directory or cached HF repo id."
        )
        processor: str = Field(
            "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", description="Directory or cached repo id of the tokenizer."
        )
        preset: Literal["tiny"] | None = Field(None, description="'tiny': random-init model for tests/CPU.")

        @model_validator(mode="after")
        def _one_source(self) -> PickScore.Config:
            check_source(self)
            if self.preset is not None and "processor" in self.model_fields_set:
                raise ValueError("`preset: tiny` brings its own processor; remove `processor`")
            return self

    def __init__(self, config: Config, context: BuildContext | None = None) -> None:
        context = context or BuildContext()
        self.config = config
        if config.preset == "tiny":
            root = tiny_pickscore_dir()
            model_dir, processor_dir = root / "model", root / "processor"
        else:
            model_dir = resolve_pretrained(config.pretrained or "", "PickScore")
            processor_dir = resolve_pretrained(config.processor, "PickScore processor (CLIP-H tokenizer)")
        self.embedder = CLIPEmbedder(model_dir, processor_dir, config, context.device)

    @torch.no_grad()
    def score(self, samples: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """PickScore of each sample for its prompt; videos average their frames. Returns (B,) float32 on CPU."""
        images, texts, per_sample = self.embedder.embed(samples, prompts)
        scale = self.embedder.model.logit_scale.float().exp()
        logits = scale * (images * texts).sum(dim=-1)
        return finite_or_raise(logits.view(-1, per_sample).mean(dim=1).cpu(), "PickScore")


TINY_SPEC: dict[str, Any] = {**TINY_CLIP_SPEC, "seed": 1, "logit_scale": 4.6052}  # exp(4.6052) ~ 100, as trained


def tiny_pickscore_dir() -> Path:
    """A random-init tiny PickScore in the real two-repository layout: ``model/`` and ``processor/``."""
    return materialise("tiny-pickscore", TINY_SPEC, _write_tiny_pickscore)


def _write_tiny_pickscore(root: Path) -> None:
    write_tiny_clip(root / "model", TINY_SPEC, logit_scale=TINY_SPEC["logit_scale"])
    max_length = TINY_SPEC["text_config"]["max_position_embeddings"]
    write_tiny_tokenizer(root / "processor", max_length)
    write_processor_config(root / "processor", TINY_SPEC["vision_config"]["image_size"])
