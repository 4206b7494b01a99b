"""Config checks that policy plugins share (raise ``ValueError`` inside a pydantic validator, which
dancecore reports naming the key)."""

from __future__ import annotations


def check_one_weights_source(pretrained: str | None, preset: str | None) -> None:
    """A policy loads either real weights (``pretrained``) or a tiny preset, never both or neither."""
    if (pretrained is None) == (preset is None):
        raise ValueError("give exactly one of `pretrained` (weights) or `preset: tiny`")


def check_multiple(name: str, value: int | None, multiple: int) -> None:
    """``value`` (when set) must be a multiple of ``multiple``; the error suggests the two nearest."""
    if value is not None and value % multiple:
        lower = value - value % multiple
        raise ValueError(f"{name} must be a multiple of {multiple}, got {value} (try {lower} or {lower + multiple})")


def check_frame_count(name: str, value: int | None, compression: int) -> None:
    """``value`` (when set) must be ``compression * k + 1``: a causal video VAE that compresses time by
    ``compression`` maps F frames to (F - 1) / compression + 1 latent frames. The error suggests the
    two nearest valid counts."""
    if value is not None and (value - 1) % compression:
        lower = value - (value - 1) % compression
        raise ValueError(
            f"{name} must be {compression}k + 1 (a video VAE maps F frames to (F - 1) / {compression} + 1 "
            f"latent frames), got {value} (try {lower} or {lower + compression})"
        )
