"""A binary reward: any installed reward, thresholded to 1.0 (score above the threshold) or 0.0.

DanceGRPO shows GRPO also learns from such sparse 0/1 rewards (e.g. HPS-v2.1 > 0.28). A group
whose samples all land on the same side gets advantage 0, so a threshold near the middle of the
policy's current score range learns fastest.

In YAML::

    rewards:
      - name: binary
        threshold: 0.28
        reward: {name: hps-v2.1, pretrained: xswu/HPSv2}

The inner reward is resolved through the plugin registry and its options are validated by its
own ``Config`` when the run config is validated, with errors reported at their full path
(``rewards[0].reward.pretrained: ...``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from pydantic import BaseModel, Field, ValidationError, field_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from dancecore import BuildContext, ComponentConfig, PluginError, finite_or_raise, load_plugin


class BinaryReward:
    """1.0 where the inner reward's score is strictly above ``threshold``, else 0.0."""

    class Config(ComponentConfig):
        """Options of the ``binary`` reward."""

        reward: dict[str, Any] = Field(description="The inner reward: `name` plus that reward's own options.")
        threshold: float = Field(description="Scores strictly above this give 1.0, the others 0.0.")

        @field_validator("reward")
        @classmethod
        def _inner_reward_is_valid(cls, value: dict[str, Any]) -> dict[str, Any]:
            inner_config(value)
            return value

    def __init__(self, config: Config, context: BuildContext | None = None) -> None:
        self.config = config
        inner_cls, options = inner_config(config.reward)
        self.name = str(config.reward["name"])
        self.inner = inner_cls(options, context or BuildContext())

    @torch.no_grad()
    def score(self, samples: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Threshold the inner reward's scores; raises if the inner reward fails or returns a
        malformed or non-finite score (never a made-up 0 or 1)."""
        scores = self.inner.score(samples, prompts)
        expected = (samples.shape[0],)
        if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != expected:
            got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
            raise ValueError(f"inner reward {self.name!r} returned {got}, expected a tensor of shape {expected}")
        finite_or_raise(scores, f"inner reward {self.name!r}")
        return (scores.float() > self.config.threshold).float().cpu()


def inner_config(spec: dict[str, Any]) -> tuple[Any, BaseModel]:
    """Load the inner reward's class by ``spec["name"]`` and validate the rest of ``spec`` with its
    ``Config``. Errors are raised as a ``ValidationError`` located under the inner keys."""
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise _located([(("name",), "missing", "the inner reward needs a `name` (an installed reward plugin)")])
    try:
        inner_cls = load_plugin("reward", name)
    except PluginError as exc:
        raise _located([(("name",), "plugin_error", str(exc))]) from None
    options = {k: v for k, v in spec.items() if k != "name"}
    try:
        return inner_cls, inner_cls.Config.model_validate(options)
    except ValidationError as exc:
        raise _located([(tuple(e["loc"]), e["type"], e["msg"]) for e in exc.errors()]) from None


def _located(errors: list[tuple[tuple[Any, ...], str, str]]) -> ValidationError:
    """A ValidationError whose entries keep their own location; pydantic prefixes it with the
    field (``reward``) when raised inside the field validator."""
    details = [
        InitErrorDetails(
            type=PydanticCustomError(kind, message.replace("{", "{{").replace("}", "}}")), loc=loc, input=None
        )
        for loc, kind, message in errors
    ]
    return ValidationError.from_exception_data("binary reward", details)
