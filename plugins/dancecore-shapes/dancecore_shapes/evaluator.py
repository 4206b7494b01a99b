"""Exact GenEval-style verdicts for shapes scenes, computed from pixels.

:func:`detect` finds the objects of an image: each pixel is explained as a mix of the background
and one palette colour (``p = bg + a * (c - bg)``); the colour that explains it best (smallest
residual) labels it when its mix ``a`` is at least one half. Connected same-colour pixels form a
component; tiny specks are dropped. The shape comes from rotation-invariant moments of the
component's soft mask (``a`` over the component grown by one pixel):

- circles and squares are point-symmetric, triangles are not: the normalised third-order moments
  ``|E[z^3]|`` and ``|E[z^2 conj(z)]|`` (``z = x + iy`` about the centroid, normalised by
  ``E[|z|^2]^1.5``) are about 0 for the first two and 0.6-0.8 for a triangle (over 0.3 even after
  JPEG at 32 px); above :data:`ODD_TRIANGLE` it is a triangle;
- a circle is isotropic at fourth order, a square is not: ``|E[z^4]| / E[|z|^2]^2`` is 0 for a
  circle and 0.6 for a square (0.45-0.6 after blur or JPEG at 32 px); above :data:`SQUARENESS` it
  is a square. Both measures are rotation invariant.

:func:`verdict` then scores a :class:`~dancecore_shapes.scenes.SceneSpec` as GenEval does
(Ghosh et al., 2023): the most prominent (largest) detection of a shape stands for it, counting
needs the exact count, and positions use GenEval's relative-position rule with its 0.1 threshold.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

import dancecore
from dancecore_shapes.scenes import BACKGROUND, COLORS, SceneSpec

_NAMES = tuple(COLORS)
_BG = np.asarray(BACKGROUND, dtype=np.float64) / 255.0
_DIRS = np.stack([np.asarray(COLORS[n], dtype=np.float64) / 255.0 - _BG for n in _NAMES])  # (C, 3)

MIN_MIX = 0.5  # a pixel is an object's when at least half of it is the object's colour
MAX_RESIDUAL = 0.3  # distance (0-1 RGB units) from the background-colour segment still accepted
MIN_AREA = 0.012  # components smaller than this fraction of the image are specks
ODD_TRIANGLE = 0.22  # third-order asymmetry above this: a triangle
SQUARENESS = 0.28  # fourth-order anisotropy above this: a square, else a circle
POSITION_THRESHOLD = 0.1  # GenEval's relative-position threshold (fraction of the box sizes)


@dataclass(frozen=True)
class Detection:
    """One object found in an image. Coordinates are fractions of the image width/height."""

    shape: str
    color: str
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 of the pixels at least half covered
    centroid: tuple[float, float]
    area: float  # soft area in pixels
    asymmetry: float  # third-order moment measure (triangles high)
    anisotropy: float  # fourth-order moment measure (squares high)

    @property
    def center(self) -> tuple[float, float]:
        """Centre of the box, as GenEval uses it."""
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2


def to_hwc(image: Any) -> np.ndarray:
    """``image`` as a float64 ``(H, W, 3)`` numpy array; accepts numpy or torch, (3,H,W) or (H,W,3)."""
    if hasattr(image, "detach"):
        image = image.detach().float().cpu().numpy()
    array = np.asarray(image, dtype=np.float64)
    if array.ndim != 3 or 3 not in (array.shape[0], array.shape[-1]):
        raise ValueError(f"expected an image of shape (3, H, W) or (H, W, 3), got {array.shape}")
    if array.shape[-1] != 3:
        array = np.moveaxis(array, 0, -1)
    return array


def _label_pixels(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel: the palette index explaining it (-1 for background) and every colour's mix."""
    diff = image - _BG  # (H, W, 3)
    norms = (_DIRS**2).sum(axis=1)  # (C,)
    mix = np.einsum("hwk,ck->chw", diff, _DIRS) / norms[:, None, None]  # (C, H, W)
    residual = np.linalg.norm(diff[None] - mix[..., None] * _DIRS[:, None, None, :], axis=-1)
    residual = np.where(mix >= MIN_MIX, residual, np.inf)
    best = residual.argmin(axis=0)
    ok = np.take_along_axis(residual, best[None], axis=0)[0] <= MAX_RESIDUAL
    return np.where(ok, best, -1), mix


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a boolean mask, each as an (N, 2) array of (row, col)."""
    seen = np.zeros_like(mask, dtype=bool)
    h, w = mask.shape
    found = []
    for r0, c0 in zip(*np.nonzero(mask), strict=True):
        if seen[r0, c0]:
            continue
        seen[r0, c0] = True
        stack, pixels = [(int(r0), int(c0))], []
        while stack:
            r, c = stack.pop()
            pixels.append((r, c))
            for rr in (r - 1, r, r + 1):
                for cc in (c - 1, c, c + 1):
                    if 0 <= rr < h and 0 <= cc < w and mask[rr, cc] and not seen[rr, cc]:
                        seen[rr, cc] = True
                        stack.append((rr, cc))
        found.append(np.asarray(pixels))
    return found


def _moments(weights: np.ndarray) -> tuple[float, float, float, float, float]:
    """Soft area, centroid (x, y) in pixel units, third-order asymmetry, fourth-order anisotropy."""
    h, w = weights.shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    area = float(weights.sum())
    cx, cy = float((weights * xs).sum() / area), float((weights * ys).sum() / area)
    z = (xs - cx) + 1j * (ys - cy)
    m2 = float((weights * np.abs(z) ** 2).sum() / area)
    odd = np.hypot(abs((weights * z**3).sum() / area), abs((weights * z**2 * np.conj(z)).sum() / area))
    aniso = abs((weights * z**4).sum() / area) / m2**2
    return area, cx, cy, float(odd / m2**1.5), float(aniso)


def detect(image: Any) -> list[Detection]:
    """The objects in ``image`` (numpy or torch, (3,H,W) or (H,W,3), values in [0, 1]), largest first."""
    pixels = to_hwc(image)
    h, w, _ = pixels.shape
    labels, mix = _label_pixels(pixels)
    detections = []
    for index, name in enumerate(_NAMES):
        for comp in _components(labels == index):
            region = np.zeros((h, w), dtype=bool)
            region[comp[:, 0], comp[:, 1]] = True
            padded = np.pad(region, 1)
            grown = np.zeros_like(region)
            for dr in range(3):
                for dc in range(3):
                    grown |= padded[dr : dr + h, dc : dc + w]
            grown &= (labels == -1) | region
            weights = np.where(grown, np.clip(mix[index], 0.0, 1.0), 0.0)
            if weights.sum() < MIN_AREA * h * w:
                continue
            area, cx, cy, odd, aniso = _moments(weights)
            if odd > ODD_TRIANGLE:
                shape = "triangle"
            elif aniso > SQUARENESS:
                shape = "square"
            else:
                shape = "circle"
            box = (comp[:, 1].min() / w, comp[:, 0].min() / h, (comp[:, 1].max() + 1) / w, (comp[:, 0].max() + 1) / h)
            detections.append(Detection(shape, name, box, (cx / w, cy / h), area, odd, aniso))
    return sorted(detections, key=lambda d: -d.area)


def _largest(detections: Sequence[Detection], shape: str) -> Detection | None:
    """The most prominent (largest) detection of ``shape``: GenEval's top-confidence instance."""
    return next((d for d in detections if d.shape == shape), None)


def relations(a: Detection, b: Detection) -> set[str]:
    """Where ``a`` is relative to ``b``: GenEval's ``relative_position`` on the two boxes.

    The centre offset is shrunk by ``POSITION_THRESHOLD`` times the summed box sizes on each axis;
    a relation holds where the shrunk offset along it exceeds half the full offset's length.
    Image y grows downwards, so "above" is a negative y offset.
    """
    (ax, ay), (bx, by) = a.center, b.center
    dims = np.array([a.box[2] - a.box[0] + b.box[2] - b.box[0], a.box[3] - a.box[1] + b.box[3] - b.box[1]])
    return dancecore.relative_position((ax - bx, ay - by), dims, POSITION_THRESHOLD)


def conditions(spec: SceneSpec, detections: Sequence[Detection]) -> list[float]:
    """The sub-conditions of ``spec`` as numbers in [0, 1] (1 = satisfied); all are 1 exactly when
    GenEval would count the image correct.

    single_object: the shape is present. two_object: each shape is present. counting: one number,
    ``max(0, 1 - |found - asked| / asked)`` (1 only for the exact count; other shapes are ignored).
    colors: the shape is present; its largest instance has the colour. position: each shape is
    present; their largest instances are in the relation. color_attr: for each object, the shape
    is present and its largest instance has the colour. Extra objects of other shapes are ignored.
    """
    objs = spec.objects
    if spec.task == "counting":
        asked = spec.count or 1
        found = sum(d.shape == objs[0].shape for d in detections)
        return [max(0.0, 1.0 - abs(found - asked) / asked)]
    picks = [_largest(detections, o.shape) for o in objs]
    result = [float(p is not None) for p in picks]
    if spec.task in ("colors", "color_attr"):
        result += [float(p is not None and p.color == o.color) for o, p in zip(objs, picks, strict=True)]
    if spec.task == "position":
        a, b = picks
        result.append(float(a is not None and b is not None and spec.relation in relations(a, b)))
    return result


SOFT_SCALE = 0.05  # width of the soft shape decision around ODD_TRIANGLE / SQUARENESS


def _sigmoid(x: float) -> float:
    return float(1.0 / (1.0 + np.exp(-x)))


def shape_likeness(detection: Detection, shape: str) -> float:
    """How clearly ``detection`` is a ``shape``, in (0, 1): the product of the logistic margins of
    the moment tests that :func:`detect` applies (above 0.5 about when it is classified so)."""
    triangle = _sigmoid((detection.asymmetry - ODD_TRIANGLE) / SOFT_SCALE)
    if shape == "triangle":
        return triangle
    square = _sigmoid((detection.anisotropy - SQUARENESS) / SOFT_SCALE)
    return (1.0 - triangle) * (square if shape == "square" else 1.0 - square)


def soft_conditions(spec: SceneSpec, detections: Sequence[Detection]) -> list[float]:
    """:func:`conditions` with each "shape present" graded by :func:`shape_likeness` (the clearest
    candidate of the caption's colour where it names one, else of any colour): a dense reward that
    also credits a blob becoming more clearly the asked-for shape. Colour, count and relation
    conditions are as in :func:`conditions`."""
    exact = conditions(spec, detections)
    if spec.task == "counting":
        return exact
    soft = list(exact)
    for i, obj in enumerate(spec.objects):
        pool = [d for d in detections if spec.task not in ("colors", "color_attr") or d.color == obj.color]
        soft[i] = max([exact[i], *(shape_likeness(d, obj.shape) for d in pool)])
    return soft


def verdict(spec: SceneSpec, detections: Sequence[Detection]) -> bool:
    """Whether the detections satisfy ``spec`` exactly as GenEval scores its task."""
    return all(c == 1.0 for c in conditions(spec, detections))


def partial_credit(spec: SceneSpec, detections: Sequence[Detection]) -> float:
    """The mean of :func:`conditions`: 1.0 exactly when :func:`verdict` is True."""
    parts = conditions(spec, detections)
    return float(sum(parts) / len(parts))


def soft_partial_credit(spec: SceneSpec, detections: Sequence[Detection]) -> float:
    """The mean of :func:`soft_conditions`: 1.0 when :func:`verdict` is True (up to the margins)."""
    parts = soft_conditions(spec, detections)
    return float(sum(parts) / len(parts))


def evaluate(image: Any, spec: SceneSpec) -> bool:
    """Shorthand for ``verdict(spec, detect(image))``."""
    return verdict(spec, detect(image))
