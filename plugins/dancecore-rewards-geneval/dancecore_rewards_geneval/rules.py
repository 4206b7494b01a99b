"""GenEval's rules on detected objects, as pure functions (no model: tested with constructed detections).

The facts, from GenEval's evaluation script (Ghosh et al., 2023):

- a detection is kept when its score is strictly above 0.3 (0.9 for ``counting`` prompts); per
  class the kept detections are ordered by score, at most 16; no non-maximum suppression;
- an ``include`` clause of ``count`` n needs at least n kept objects of its class; its colour and
  position are checked on the n most confident ones only;
- colour: each of those n objects is classified (zero-shot CLIP over :data:`~.prompts.COLORS`) and
  all n must have the colour asked for;
- position: every one of those n objects must stand in the relation to every object of the
  target clause (which must itself have matched), by :func:`relative_position`;
- an ``exclude`` clause of count n fails the prompt when n or more objects of its class are kept
  (counting prompts exclude count + 1, so the count must be exact).

Flow-GRPO's reward server adds a *strict* verdict and a partial-credit *score*
(:func:`flow_grpo_score`): every clause needs exactly its count, and the score averages per-clause
terms.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

import dancecore
from dancecore_rewards_geneval.prompts import COLORS, Clause, Spec

THRESHOLD = 0.3
"""Detection score above which an object is kept (strictly above)."""
COUNTING_THRESHOLD = 0.9
"""The same for ``counting`` prompts."""
MAX_OBJECTS = 16
"""Kept objects per class at most (the most confident ones)."""
POSITION_THRESHOLD = 0.1
"""Position margin: the centre offset is reduced by this fraction of the two boxes' summed sizes."""


@dataclass(frozen=True, eq=False)
class Detection:
    """One detected instance: the GenEval class name, its score, its box ``(x0, y0, x1, y1)`` in
    pixels (y grows downwards) and its binary mask ``(H, W)`` at the image's resolution (or None)."""

    label: str
    score: float
    box: tuple[float, float, float, float]
    mask: np.ndarray | None = field(default=None, repr=False)


ColorClassifier = Callable[[str, Sequence[Detection]], list[str]]
"""``(class name, objects) -> one colour name per object`` (GenEval's zero-shot CLIP classifier)."""


def kept_objects(detections: Sequence[Detection], tag: str) -> dict[str, list[Detection]]:
    """The objects GenEval keeps, per class, most confident first: score strictly above
    :data:`THRESHOLD` (:data:`COUNTING_THRESHOLD` for ``counting``), at most :data:`MAX_OBJECTS`."""
    threshold = COUNTING_THRESHOLD if tag == "counting" else THRESHOLD
    by_class: dict[str, list[Detection]] = {}
    for det in sorted(detections, key=lambda d: -d.score):
        kept = by_class.setdefault(det.label, [])
        if det.score > threshold and len(kept) < MAX_OBJECTS:
            kept.append(det)
    return {label: kept for label, kept in by_class.items() if kept}


def relative_position(a: Detection, b: Detection) -> set[str]:
    """Where ``a`` is relative to ``b`` (GenEval's rule on box centres and sizes).

    The centre offset ``a - b`` is shrunk towards 0 by :data:`POSITION_THRESHOLD` times the summed
    widths (x) and heights (y) of the two boxes; no relation holds when both shrunk components are
    below 1e-3 pixels. Otherwise a relation holds when its shrunk component, divided by the length
    of the full offset, exceeds 0.5 in that direction (y grows downwards: "above" is negative).
    """
    boxes = np.asarray([a.box, b.box], dtype=np.float64).reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=1)
    dim_a, dim_b = np.abs(boxes[:, 1] - boxes[:, 0])
    return dancecore.relative_position(center_a - center_b, dim_a + dim_b, POSITION_THRESHOLD)


@dataclass(frozen=True)
class Verdict:
    """GenEval's verdict on one image (``correct``), Flow-GRPO's strict verdict and partial-credit
    ``score``, and GenEval's reasons for a wrong image."""

    correct: bool
    strict: bool
    score: float
    reason: str


def _position_holds(clause: Clause, found: Sequence[Detection], groups: list[list[Detection] | None]) -> bool | None:
    """Whether every object of ``found`` is in the clause's relation to every object of its target
    group; None when the target group did not match."""
    assert clause.position is not None
    relation, target = clause.position
    if groups[target] is None:
        return None
    targets = groups[target] or []
    return all(relation in relative_position(obj, other) for obj in found for other in targets)


def geneval_correct(spec: Spec, objects: dict[str, list[Detection]], colors: ColorClassifier) -> tuple[bool, str]:
    """GenEval's verdict: whether the image satisfies ``spec`` given its kept ``objects``, and why not."""
    correct, reasons = True, []
    groups: list[list[Detection] | None] = []
    for clause in spec.include:
        found = objects.get(clause.cls, [])[: clause.count]
        matched = len(found) >= clause.count
        if not matched:
            reasons.append(f"expected {clause.cls}>={clause.count}, found {len(found)}")
        if matched and clause.color is not None:
            named = colors(clause.cls, found)
            if named.count(clause.color) < clause.count:
                matched = False
                seen = ", ".join(f"{named.count(c)} {c}" for c in COLORS if c in named)
                reasons.append(f"expected {clause.color} {clause.cls}>={clause.count}, found {seen}")
        if matched and clause.position is not None:
            holds = _position_holds(clause, found, groups)
            if not holds:
                matched = False
                reasons.append(
                    f"{clause.cls} is not {clause.position[0]} its target" + ("" if holds is False else " (no target)")
                )
        correct = correct and matched
        groups.append(found if matched else None)
    for clause in spec.exclude:
        if len(objects.get(clause.cls, [])) >= clause.count:
            correct = False
            reasons.append(f"expected {clause.cls}<{clause.count}, found {len(objects[clause.cls])}")
    return correct, "; ".join(reasons)


def flow_grpo_score(spec: Spec, objects: dict[str, list[Detection]], colors: ColorClassifier) -> tuple[bool, float]:
    """Flow-GRPO's strict verdict and partial-credit score (its reward server's definition).

    Per include clause of count n with k kept objects: a count term ``1 - |n - k| / n`` (negative
    when k > 2n; not clamped, as published). When k != n the clause fails and a clause with a colour
    or a position adds a 0 term. When k == n: a colour adds ``1 - |n - m| / n`` (m objects of the
    colour; the clause fails unless m == n); a position whose target matched adds 1 when it holds,
    and 0 followed by 1 when it does not (as published); one whose target failed adds 0. The score
    is the mean of the terms; ``strict`` holds when every clause matched. Exclude clauses are not used.
    """
    strict, terms = True, []
    groups: list[list[Detection] | None] = []
    for clause in spec.include:
        found = objects.get(clause.cls, [])
        terms.append(1 - abs(clause.count - len(found)) / clause.count)
        matched = len(found) == clause.count
        if not matched and (clause.color is not None or clause.position is not None):
            terms.append(0.0)
        if matched and clause.color is not None:
            m = colors(clause.cls, found).count(clause.color)
            terms.append(1 - abs(clause.count - m) / clause.count)
            matched = m == clause.count
        if matched and clause.position is not None:
            holds = _position_holds(clause, found, groups)
            matched = bool(holds)
            terms += [1.0] if holds else ([0.0] if holds is None else [0.0, 1.0])
        strict = strict and matched
        groups.append(found if matched else None)
    return strict, sum(terms) / len(terms)


def judge(spec: Spec, detections: Sequence[Detection], colors: ColorClassifier) -> Verdict:
    """Both verdicts and the score of one image from all its detections (thresholded here).

    Colours are classified at most once per (class, objects) asked, so the two rules share them."""
    cache: dict[tuple[str, tuple[int, ...]], list[str]] = {}

    def cached(cls: str, found: Sequence[Detection]) -> list[str]:
        key = (cls, tuple(id(d) for d in found))
        if key not in cache:
            cache[key] = colors(cls, found)
        return cache[key]

    objects = kept_objects(detections, spec.tag)
    correct, reason = geneval_correct(spec, objects, cached)
    strict, score = flow_grpo_score(spec, objects, cached)
    return Verdict(correct, strict, score, reason)
