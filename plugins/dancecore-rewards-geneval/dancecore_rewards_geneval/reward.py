"""The ``geneval`` reward: GenEval's verdict (or Flow-GRPO's strict verdict or partial-credit score)
for each image, from transformers' Mask2Former and CLIP.

Which objects, counts, colours and positions a prompt asks for comes from its GenEval spec, looked
up by the prompt's text: in the JSON-lines file named by ``metadata`` (GenEval's
``evaluation_metadata.jsonl`` format; the same file serves as the run's prompt file, since
dancecore reads its ``prompt`` field and ignores the rest), or by default in GenEval's own 553
prompts (:func:`~.prompts.generate_suite`). A prompt with no spec is an error naming it.

``output``: ``correct`` (GenEval's benchmark verdict, 0/1), ``strict`` (Flow-GRPO's: exact counts
for every clause, 0/1) or ``score`` (Flow-GRPO's partial credit, see
:func:`~.rules.flow_grpo_score`). Evaluation tables break the mean down by task
(``summarize``): the six task accuracies and ``overall``, their unweighted mean, as GenEval reports.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from dancecore_rewards_clip.reward import CLIPEmbedder, CLIPInputOptions, tiny_clip_dir
from pydantic import Field, model_validator

from dancecore import (
    BuildContext,
    ComponentConfig,
    PromptFileError,
    check_pixels,
    finite_or_raise,
    resolve_pretrained,
)
from dancecore_rewards_geneval.colors import ColorClassifier
from dancecore_rewards_geneval.detector import SCALE, TINY_SCALE, InstanceSegmenter, tiny_mask2former_dir
from dancecore_rewards_geneval.prompts import TASKS, Spec, generate_suite, read_jsonl
from dancecore_rewards_geneval.rules import Verdict, judge


class GenEvalReward:
    """GenEval on transformers: one number per image (see the module docstring)."""

    class Config(ComponentConfig):
        """Options of the ``geneval`` reward."""

        detector: str | None = Field(
            "facebook/mask2former-swin-small-coco-instance",
            description="transformers Mask2Former COCO-instance directory or cached HF repo id (GenEval: Swin-S).",
        )
        clip: str | None = Field(
            "openai/clip-vit-large-patch14", description="transformers CLIP directory or cached HF repo id."
        )
        preset: Literal["tiny"] | None = Field(
            None, description="'tiny': random-init Mask2Former and CLIP of the real architectures (tests/CPU)."
        )
        output: Literal["correct", "strict", "score"] = Field(
            "correct",
            description="correct: GenEval's verdict; strict: Flow-GRPO's strict verdict; score: its partial credit.",
        )
        metadata: Path | None = Field(
            None, description="JSON lines with GenEval specs (tag, include, exclude, prompt); default: GenEval's 553."
        )
        batch_size: int = Field(8, ge=1, description="Images per Mask2Former forward pass.")
        dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Weights dtype.")
        quantize: bool = Field(True, description="Round pixels to 8 bits first, as GenEval reads PNG files.")

        @model_validator(mode="after")
        def _one_source(self) -> GenEvalReward.Config:
            explicit = {"detector", "clip"} & self.model_fields_set
            if self.preset is not None and any(getattr(self, k) is not None for k in explicit):
                raise ValueError("give either `detector`/`clip` (weights) or `preset: tiny`, not both")
            if self.preset is None and (self.detector is None or self.clip is None):
                raise ValueError(
                    "give `detector` and `clip` (local directories or cached HF repo ids) or `preset: tiny`"
                )
            return self

    def __init__(self, config: Config, context: BuildContext | None = None) -> None:
        context = context or BuildContext()
        self.config = config
        self.specs = load_specs(config.metadata)
        tiny = config.preset == "tiny"
        detector_dir = tiny_mask2former_dir() if tiny else resolve_pretrained(config.detector or "", "Mask2Former")
        clip_dir = tiny_clip_dir() if tiny else resolve_pretrained(config.clip or "", "CLIP")
        self.segmenter = InstanceSegmenter(detector_dir, context.device, config.dtype, TINY_SCALE if tiny else SCALE)
        embedder = CLIPEmbedder(clip_dir, clip_dir, CLIPInputOptions(dtype=config.dtype), context.device)
        self.colors = ColorClassifier(embedder)

    def spec(self, prompt: str) -> Spec:
        """The GenEval spec of ``prompt``; ``ValueError`` naming it when there is none."""
        try:
            return self.specs[prompt]
        except KeyError:
            where = self.config.metadata or "GenEval's 553 prompts"
            raise ValueError(f"geneval: no GenEval spec for prompt {prompt!r} in {where} (set `metadata:`)") from None

    def verdicts(self, samples: torch.Tensor, prompts: Sequence[str]) -> list[Verdict]:
        """GenEval's and Flow-GRPO's verdicts on each image (B, 3, H, W) in [0, 1]."""
        check_pixels(samples, prompts)
        if samples.ndim != 4:
            raise ValueError(f"geneval scores images (B, 3, H, W), got {tuple(samples.shape)}")
        specs = [self.spec(str(p)) for p in prompts]  # every prompt checked before any model runs
        images = samples.detach().clamp(0, 1)
        if self.config.quantize:
            images = (images * 255).round() / 255
        found = []
        for start in range(0, images.shape[0], self.config.batch_size):
            found += self.segmenter(images[start : start + self.config.batch_size])
        out = []
        for image, spec, detections in zip(images, specs, found, strict=True):
            out.append(judge(spec, detections, lambda name, objs, image=image: self.colors(image, name, objs)))
        return out

    @torch.no_grad()
    def score(self, samples: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """The configured ``output`` per image: (B,) float32 on CPU."""
        verdicts = self.verdicts(samples, prompts)
        values = [float(getattr(v, self.config.output)) for v in verdicts]
        return finite_or_raise(torch.tensor(values, dtype=torch.float32), "geneval")

    def groups(self, prompts: Sequence[str]) -> list[str]:
        """The GenEval task of each prompt (evaluation rows carry it, for standard errors per task)."""
        return [self.spec(str(p)).tag for p in prompts]

    def summarize(self, prompts: Sequence[str], scores: Sequence[float]) -> dict[str, float]:
        """Mean per GenEval task (in GenEval's order, tasks present only) and ``overall``, their mean."""
        return task_table([self.spec(str(p)).tag for p in prompts], scores)


def task_table(tags: Sequence[str], scores: Sequence[float]) -> dict[str, float]:
    """Mean score per task, in :data:`~.prompts.TASKS` order, plus ``overall`` (the unweighted mean
    of the task means, GenEval's score)."""
    if len(tags) != len(scores) or not tags:
        raise ValueError(f"task_table needs as many scores as tags (got {len(tags)} and {len(scores)}), at least one")
    per_task: dict[str, list[float]] = {}
    for tag, value in zip(tags, scores, strict=True):
        per_task.setdefault(tag, []).append(float(value))
    table = {t: sum(per_task[t]) / len(per_task[t]) for t in TASKS if t in per_task}
    table["overall"] = sum(table.values()) / len(table)
    return table


def load_specs(metadata: Path | None) -> dict[str, Spec]:
    """Prompt text -> spec, from ``metadata`` (JSON lines) or GenEval's 553 prompts. A missing or
    malformed file, or a prompt given twice with different specs, is a ``PromptFileError`` naming it."""
    if metadata is not None and not metadata.is_file():
        raise PromptFileError(f"geneval: metadata file not found: {metadata}")
    try:
        listed = read_jsonl(metadata) if metadata is not None else generate_suite()
    except ValueError as exc:
        raise PromptFileError(f"geneval metadata: {exc}") from None
    specs: dict[str, Spec] = {}
    for spec in listed:
        if specs.setdefault(spec.prompt, spec) != spec:
            raise PromptFileError(f"geneval: prompt {spec.prompt!r} has two different specs in {metadata}")
    return specs
