"""The ``shapes`` reward: 1.0 where an image shows what its shapes caption asks for, else 0.0.

The verdict is exact (GenEval's rules, computed from pixels by
:mod:`dancecore_shapes.evaluator`), so the reward cannot be fooled the way a learned reward model
can. With ``partial_credit: true`` it is the fraction of the caption's sub-conditions that hold
(each object present, right colour, right relation; counting: ``1 - |found - asked| / asked``).

In YAML::

    rewards:
      - name: shapes
        partial_credit: false
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from dancecore import BuildContext, ComponentConfig, flatten_frames
from dancecore_shapes.evaluator import detect, partial_credit, soft_partial_credit, verdict
from dancecore_shapes.geneval import task_table
from dancecore_shapes.scenes import SceneSpec, SceneSpecError, parse_caption


class NotAShapesPrompt(ValueError):
    """A prompt given to the ``shapes`` reward is not a shapes caption; the message names it."""


class ShapesReward:
    """GenEval-style correctness of shapes scenes: 1.0 correct, 0.0 wrong (or partial credit)."""

    class Config(ComponentConfig):
        """Options of the ``shapes`` reward."""

        partial_credit: bool = Field(
            False, description="Score the fraction of satisfied sub-conditions instead of 1/0."
        )

        soft_shapes: bool = Field(
            False,
            description="With partial_credit: grade each 'shape present' by how clearly a candidate is that "
            "shape (a denser training signal; the verdict is unchanged).",
        )

    def __init__(self, config: Config, context: BuildContext | None = None) -> None:
        self.config = config
        self._specs: dict[str, SceneSpec] = {}

    def spec(self, prompt: str) -> SceneSpec:
        """The scene spec of ``prompt``; raises :class:`NotAShapesPrompt` if it is not a caption."""
        if prompt not in self._specs:
            try:
                self._specs[prompt] = parse_caption(prompt)
            except SceneSpecError as exc:
                raise NotAShapesPrompt(f"shapes reward: {exc}") from None
        return self._specs[prompt]

    @torch.no_grad()
    def score(self, samples: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """One score per sample of ``samples`` in [0, 1] for its caption in ``prompts``: images
        ``(B, 3, H, W)``, or videos ``(B, F, 3, H, W)`` scored as the mean over their frames."""
        flat = flatten_frames(samples, prompts)
        specs = [self.spec(p) for p in flat.texts]  # every prompt checked before any work
        pixels = flat.frames.detach().float().cpu().permute(0, 2, 3, 1).numpy()
        judge = partial_credit if self.config.partial_credit else verdict
        if self.config.partial_credit and self.config.soft_shapes:
            judge = soft_partial_credit
        values = [float(judge(spec, detect(image))) for spec, image in zip(specs, pixels, strict=True)]
        return torch.tensor(values, dtype=torch.float32).view(-1, flat.per_sample).mean(dim=1)

    def groups(self, prompts: Sequence[str]) -> list[str]:
        """The task type of each caption (evaluation rows carry it, for standard errors per task)."""
        return [self.spec(p).task for p in prompts]

    def summarize(self, prompts: Sequence[str], scores: Sequence[float]) -> dict[str, float]:
        """GenEval's table: the accuracy of each task type present, and ``overall`` (their mean);
        evaluation tables (``dancecore eval``, the run's ``eval:``) show it next to the mean."""
        return task_table(prompts, scores)
