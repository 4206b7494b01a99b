"""Deterministic seeds derived from the run seed and a purpose, so that every random draw is a
function of (seed, iteration, sample) only: runs are reproducible, resumable without replaying,
and independent of how many ranks share the work (each sample still gets its own noise)."""

from __future__ import annotations

import hashlib

import torch


def derive_seed(seed: int, purpose: str, *keys: int) -> int:
    """A 63-bit seed from the run seed, a purpose label and integer keys (stable across runs)."""
    text = ":".join([str(seed), purpose, *map(str, keys)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def generator(seed: int, purpose: str, *keys: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`derive_seed`."""
    return torch.Generator().manual_seed(derive_seed(seed, purpose, *keys))
