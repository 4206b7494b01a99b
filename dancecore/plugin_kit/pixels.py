"""Checks every reward plugin makes on what it is given and on what it returns.

Rewards receive pixels in [0, 1], images ``(B, 3, H, W)`` or videos ``(B, F, 3, H, W)``, with one
prompt per sample (see :class:`dancecore.contracts.protocols.Reward`). A wrong input raises a ``ValueError``
that names what is wrong, and a NaN or infinite score raises instead of becoming a number.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

#: Slack on the [0, 1] range: decoders in low precision overshoot by a rounding error.
RANGE_TOLERANCE = 1e-3


class FlatFrames(NamedTuple):
    """A batch of samples seen as single images, each with its prompt."""

    frames: torch.Tensor
    """``(B * F, 3, H, W)`` pixels in [0, 1]."""
    texts: list[str]
    """One prompt per frame: each sample's prompt repeated ``per_sample`` times."""
    per_sample: int
    """Frames per sample ``F`` (1 for images)."""


def check_pixels(samples: torch.Tensor, prompts: Sequence[str]) -> None:
    """Raise ``ValueError`` unless ``samples`` are ``(B, 3, H, W)`` images or ``(B, F, 3, H, W)``
    videos with finite pixels in [0, 1] (within :data:`RANGE_TOLERANCE`) and ``prompts`` has one
    entry per sample."""
    if not isinstance(samples, torch.Tensor) or samples.ndim not in (4, 5) or samples.shape[-3] != 3:
        shape = tuple(samples.shape) if isinstance(samples, torch.Tensor) else type(samples).__name__
        raise ValueError(f"expected (B, 3, H, W) images or (B, F, 3, H, W) videos, got {shape}")
    batch = samples.shape[0]
    if isinstance(prompts, str) or len(prompts) != batch:
        given = 1 if isinstance(prompts, str) else len(prompts)
        raise ValueError(f"expected {batch} prompts (one per sample), got {given}")
    if not samples.numel():
        return
    if not torch.isfinite(samples).all():
        raise ValueError("samples contain NaN or infinite pixels")
    low, high = float(samples.min()), float(samples.max())
    if low < -RANGE_TOLERANCE or high > 1.0 + RANGE_TOLERANCE:
        raise ValueError(f"expected pixels in [0, 1], got values in [{low:.3f}, {high:.3f}] (pixels in [-1, 1]?)")


def flatten_frames(samples: torch.Tensor, prompts: Sequence[str]) -> FlatFrames:
    """Check a batch with :func:`check_pixels` and view it as single images: the frames (clamped
    to [0, 1]), one prompt per frame, and the frames per sample."""
    check_pixels(samples, prompts)
    per_sample = 1 if samples.ndim == 4 else samples.shape[1]
    frames = samples.reshape(-1, *samples.shape[-3:]).clamp(0, 1)
    texts = [str(p) for p in prompts for _ in range(per_sample)]
    return FlatFrames(frames, texts, per_sample)


def finite_or_raise(scores: torch.Tensor, what: str) -> torch.Tensor:
    """Return ``scores`` unchanged, or raise ``FloatingPointError`` naming ``what`` and the samples
    (rows of ``scores``) holding a NaN or infinite value."""
    finite = torch.atleast_1d(torch.isfinite(scores))
    if not finite.all():
        bad = torch.nonzero(~finite.reshape(finite.shape[0], -1).all(dim=1)).flatten().tolist()
        raise FloatingPointError(f"{what} produced non-finite scores for samples {bad}")
    return scores
