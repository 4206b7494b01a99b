"""Conformance kit for plugin authors: call these from your own tests.

Example, in a third-party reward package's ``tests/test_conformance.py``::

    from dancecore.testing import check_reward_plugin

    def test_my_reward_conforms():
        check_reward_plugin("my-reward", {"some_option": 1})

Each check raises ``AssertionError`` with a message saying what the plugin got wrong.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import ValidationError

from dancecore import registry
from dancecore.config.schema import load_run, validate
from dancecore.contracts.protocols import BuildContext
from dancecore.functional.grpo import group_advantages, trainable_steps
from dancecore.outputs.video import write_video
from dancecore.registry import contract_problems
from dancecore.registry import load as load_plugin
from dancecore.training.prompts import read_prompt_file

__all__ = [
    "build_component",
    "check_reward_plugin",
    "contract_problems",
    "group_advantages",
    "load_plugin",
    "load_run",
    "read_prompt_file",
    "sample_images",
    "trainable_steps",
    "validate",
    "write_video",
]


def build_component(kind: str, name: str, options: dict[str, Any] | None = None, context: BuildContext | None = None) -> Any:
    """Build the installed component ``name`` of ``kind`` ('policy', 'sampler', 'reward', 'optimizer')
    from its options, as a run would (``cls(cls.Config(**options), context)``)."""
    cls = load_plugin(kind, name)
    return cls(cls.Config.model_validate(options or {}), context or BuildContext())


def sample_images(batch: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Random images in [0, 1], shape (batch, 3, size, size), from a fixed seed."""
    return torch.rand((batch, 3, size, size), generator=torch.Generator().manual_seed(seed))


def check_reward_plugin(name: str, options: dict[str, Any] | None = None, *, image_size: int = 32) -> Any:
    """Check that the installed reward plugin ``name`` honours the ``Reward`` contract.

    It must: be discoverable through the ``dancecore.rewards`` entry point; have a nested pydantic
    ``Config`` with ``extra="forbid"`` that accepts ``options`` and rejects an unknown key; build as
    ``cls(config, BuildContext())``; return one finite float per sample as a tensor of shape (B,);
    be deterministic; not depend on batch composition (scores of a sub-batch equal those in the
    full batch); not require gradients; and leave the input tensor unchanged. Returns the built
    reward for further plugin-specific checks.
    """
    names = {p.name for p in registry.installed("reward")}
    assert name in names, f"reward {name!r} is not registered under the 'dancecore.rewards' entry-point group"
    cls = registry.load("reward", name)
    config = cls.Config.model_validate(options or {})
    try:
        cls.Config.model_validate({**(options or {}), "surely_not_an_option": 1})
    except ValidationError:
        pass
    else:
        raise AssertionError(f"{name}: Config accepted an unknown key; set model_config extra='forbid'")
    reward = cls(config, BuildContext())
    images = sample_images(4, image_size)
    before = images.clone()
    prompts = ["a red apple", "a blue car", "a cat", "an empty room"]
    scores = reward.score(images, prompts)
    assert isinstance(scores, torch.Tensor), f"{name}: score() returned {type(scores).__name__}, not a tensor"
    assert scores.shape == (4,), f"{name}: score() returned shape {tuple(scores.shape)}, expected (4,)"
    assert scores.is_floating_point(), f"{name}: score() returned dtype {scores.dtype}, expected floating point"
    assert bool(torch.isfinite(scores).all()), f"{name}: score() returned non-finite values {scores.tolist()}"
    assert not scores.requires_grad, f"{name}: scores require grad; score under torch.no_grad()"
    assert torch.equal(images, before), f"{name}: score() modified its input in place"
    again = reward.score(images, prompts)
    assert torch.allclose(scores, again, atol=1e-6), f"{name}: not deterministic ({scores.tolist()} vs {again.tolist()})"
    part = reward.score(images[1:3], prompts[1:3])
    assert torch.allclose(part, scores[1:3], atol=1e-4), (
        f"{name}: scores depend on the rest of the batch ({part.tolist()} vs {scores[1:3].tolist()})"
    )
    return reward
