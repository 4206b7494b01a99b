"""The reward conformance kit: ``check_reward_plugin``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from dancecore.testing.helpers import sample_images
from dancecore.testing.kits import _build, _config, _load


def check_reward_plugin(
    name: str | type,
    options: dict[str, Any] | None = None,
    *,
    image_size: int = 32,
    prompts: Sequence[str] | None = None,
) -> Any:
    """Check that the installed reward plugin ``name`` honours the ``Reward`` contract.

    It must: be discoverable through the ``dancecore.rewards`` entry point; have a nested pydantic
    ``Config`` with ``extra="forbid"`` that accepts ``options`` and rejects an unknown key; build as
    ``cls(config, BuildContext())``; return one finite float per sample as a tensor of shape (B,);
    be deterministic; not depend on batch composition (scores of a sub-batch equal those in the
    full batch); not require gradients; and leave the input tensor unchanged. Returns the built
    reward for further plugin-specific checks.
    """
    label, cls = _load("reward", name)
    reward = _build(label, cls, _config(label, cls, options), None)
    images = sample_images(4, image_size)
    before = images.clone()
    prompts = list(prompts) if prompts is not None else ["a red apple", "a blue car", "a cat", "an empty room"]
    assert len(prompts) == 4, "check_reward_plugin scores four images: give four prompts"
    scores = reward.score(images, prompts)
    assert isinstance(scores, torch.Tensor), f"{label}: score() returned {type(scores).__name__}, not a tensor"
    assert scores.shape == (4,), f"{label}: score() returned shape {tuple(scores.shape)}, expected (4,)"
    assert scores.is_floating_point(), f"{label}: score() returned dtype {scores.dtype}, expected floating point"
    assert bool(torch.isfinite(scores).all()), f"{label}: score() returned non-finite values {scores.tolist()}"
    assert not scores.requires_grad, f"{label}: scores require grad; score under torch.no_grad()"
    assert torch.equal(images, before), f"{label}: score() modified its input in place"
    again = reward.score(images, prompts)
    assert torch.allclose(scores, again, atol=1e-6), (
        f"{label}: not deterministic ({scores.tolist()} vs {again.tolist()})"
    )
    part = reward.score(images[1:3], prompts[1:3])
    assert torch.allclose(part, scores[1:3], atol=1e-4), (
        f"{label}: scores depend on the rest of the batch ({part.tolist()} vs {scores[1:3].tolist()})"
    )
    return reward


# ------------------------------------------------------------------------------------ policies
