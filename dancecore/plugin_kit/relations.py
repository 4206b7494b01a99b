"""GenEval's relative-position rule, shared by the evaluators that reproduce it (``geneval``, ``shapes``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: GenEval's margin: the fraction of the two objects' summed sizes an offset must exceed on an axis.
POSITION_MARGIN = 0.1


def relative_position(
    offset: Sequence[float], summed_size: Sequence[float], margin: float = POSITION_MARGIN
) -> set[str]:
    """Where object A is relative to object B: a subset of {"left of", "right of", "above", "below"}.

    ``offset`` is A's centre minus B's (x, y; y grows downwards) and ``summed_size`` the two
    objects' widths and heights added. As GenEval does it: each axis of the offset is shrunk towards
    0 by ``margin x summed size``; if nothing is left (below 1e-3 on both axes) no relation holds;
    otherwise the shrunk offset is divided by the length of the original one and a relation holds
    when its component exceeds 0.5 in that direction.
    """
    off = np.asarray(offset, dtype=np.float64)
    revised = np.maximum(np.abs(off) - margin * np.asarray(summed_size, dtype=np.float64), 0.0) * np.sign(off)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(off)
    found = set()
    if dx < -0.5:
        found.add("left of")
    if dx > 0.5:
        found.add("right of")
    if dy < -0.5:
        found.add("above")
    if dy > 0.5:
        found.add("below")
    return found
