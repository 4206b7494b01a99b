"""The shapes world: scene specifications, their captions and an anti-aliased renderer.

A scene is a few flat-coloured circles, squares and upright triangles on a plain light-grey
background. Six GenEval-style tasks describe scenes in words; :func:`caption` and
:func:`parse_caption` map between a :class:`SceneSpec` and its caption exactly::

    single_object  a photo of a circle
    two_object     a photo of a circle and a square
    counting       a photo of three triangles                 (two, three or four)
    colors         a photo of a red circle
    position       a photo of a square left of a circle       (left of, right of, above, below)
    color_attr     a photo of a red square and a blue triangle

In ``position`` the first object is placed relative to the second ("a square left of a
circle": the square is left of the circle), as in GenEval. Colours not named by the caption are
drawn at random (seeded) when rendering.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 80, 230),
    "yellow": (230, 180, 0),
    "purple": (150, 40, 180),
    "cyan": (0, 175, 190),
}
BACKGROUND: tuple[int, int, int] = (245, 245, 245)
TASKS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
COUNTS: tuple[int, ...] = (2, 3, 4)
NUMBER_WORDS: dict[int, str] = {2: "two", 3: "three", 4: "four"}

SUPERSAMPLE = 4
# Object size (bounding-box side) as a fraction of the image side: 9-12.8 px at 32 px.
MIN_SIZE, MAX_SIZE = 0.28, 0.40
# Minimum empty gap between two objects' bounding boxes, as a fraction of the image side.
GAP = 0.07
# Border kept free around the image, as a fraction of the image side.
BORDER = 0.03


@dataclass(frozen=True)
class Obj:
    """One object of a scene spec; ``color`` None means "any colour"."""

    shape: str
    color: str | None = None


@dataclass(frozen=True)
class SceneSpec:
    """What a caption asks for: the task, its objects, and a count or a relation where needed."""

    task: str
    objects: tuple[Obj, ...]
    count: int | None = None
    relation: str | None = None


class SceneSpecError(ValueError):
    """A scene spec or caption is not one of the shapes world's."""


def _problem(spec: SceneSpec) -> str | None:
    """Why ``spec`` is not a valid spec of its task (None when it is)."""
    if spec.task not in TASKS:
        return f"unknown task {spec.task!r}; expected one of {TASKS}"
    for obj in spec.objects:
        if obj.shape not in SHAPES:
            return f"unknown shape {obj.shape!r}"
        if obj.color is not None and obj.color not in COLORS:
            return f"unknown colour {obj.color!r}"
    n_objects = 2 if spec.task in ("two_object", "position", "color_attr") else 1
    if len(spec.objects) != n_objects:
        return f"task {spec.task} needs {n_objects} object(s), got {len(spec.objects)}"
    coloured = spec.task in ("colors", "color_attr")
    if any((o.color is not None) != coloured for o in spec.objects):
        return f"objects of task {spec.task} must {'' if coloured else 'not '}have a colour"
    return _pair_problem(spec, coloured) if n_objects == 2 else _count_and_relation_problem(spec)


def _pair_problem(spec: SceneSpec, coloured: bool) -> str | None:
    if spec.objects[0].shape == spec.objects[1].shape:
        return "the two objects must be different shapes"
    if coloured and spec.objects[0].color == spec.objects[1].color:
        return "the two objects must be different colours"
    return _count_and_relation_problem(spec)


def _count_and_relation_problem(spec: SceneSpec) -> str | None:
    if (spec.count is not None) != (spec.task == "counting"):
        return "a count is given exactly for the counting task"
    if spec.count is not None and spec.count not in COUNTS:
        return f"count must be one of {COUNTS}"
    if (spec.relation is not None) != (spec.task == "position"):
        return "a relation is given exactly for the position task"
    if spec.relation is not None and spec.relation not in RELATIONS:
        return f"relation must be one of {RELATIONS}"
    return None


def validate(spec: SceneSpec) -> SceneSpec:
    """Return ``spec`` if it is a valid spec of its task, else raise :class:`SceneSpecError`."""
    problem = _problem(spec)
    if problem is not None:
        raise SceneSpecError(f"invalid shapes scene spec {spec!r}: {problem}")
    return spec


def _noun(obj: Obj) -> str:
    return f"a {obj.color} {obj.shape}" if obj.color else f"a {obj.shape}"


def caption(spec: SceneSpec) -> str:
    """The caption of ``spec`` (see the module docstring for the templates)."""
    validate(spec)
    a = spec.objects[0]
    if spec.task == "counting":
        assert spec.count is not None
        return f"a photo of {NUMBER_WORDS[spec.count]} {a.shape}s"
    if spec.task in ("single_object", "colors"):
        return f"a photo of {_noun(a)}"
    link = spec.relation if spec.task == "position" else "and"
    return f"a photo of {_noun(a)} {link} {_noun(spec.objects[1])}"


_SHAPE = "|".join(SHAPES)
_COLOR = "|".join(COLORS)
_COUNT_RE = re.compile(rf"a photo of ({'|'.join(NUMBER_WORDS.values())}) ({_SHAPE})s")
_OBJ = rf"a (?:({_COLOR}) )?({_SHAPE})"
_PAIR_RE = re.compile(rf"a photo of {_OBJ}(?: (and|{'|'.join(RELATIONS)}) {_OBJ})?")


def parse_caption(text: str) -> SceneSpec:
    """The spec whose :func:`caption` is ``text`` (case, surrounding blanks, repeated spaces and a
    final full stop are ignored). Raises :class:`SceneSpecError` (a ``ValueError``) naming the
    text if it is not a shapes caption."""
    norm = " ".join(str(text).strip().lower().rstrip(".").split())
    if m := _COUNT_RE.fullmatch(norm):
        count = {w: n for n, w in NUMBER_WORDS.items()}[m.group(1)]
        return SceneSpec("counting", (Obj(m.group(2)),), count=count)
    m = _PAIR_RE.fullmatch(norm)
    if m is None:
        raise SceneSpecError(f"not a shapes caption: {text!r} (expected e.g. 'a photo of a red circle')")
    c1, s1, link, c2, s2 = m.groups()
    if link is None:
        spec = SceneSpec("colors" if c1 else "single_object", (Obj(s1, c1),))
    elif link == "and":
        spec = SceneSpec("color_attr" if (c1 or c2) else "two_object", (Obj(s1, c1), Obj(s2, c2)))
    else:
        spec = SceneSpec("position", (Obj(s1, c1), Obj(s2, c2)), relation=link)
    try:
        return validate(spec)
    except SceneSpecError as exc:
        raise SceneSpecError(f"not a valid shapes caption: {text!r} ({exc})") from None


def all_specs(task: str) -> list[SceneSpec]:
    """Every distinct valid spec of ``task``, in a fixed order."""
    pairs = list(itertools.permutations(SHAPES, 2))
    if task == "single_object":
        return [SceneSpec(task, (Obj(s),)) for s in SHAPES]
    if task == "two_object":
        return [SceneSpec(task, (Obj(a), Obj(b))) for a, b in pairs]
    if task == "counting":
        return [SceneSpec(task, (Obj(s),), count=n) for s in SHAPES for n in COUNTS]
    if task == "colors":
        return [SceneSpec(task, (Obj(s, c),)) for s in SHAPES for c in COLORS]
    if task == "position":
        return [SceneSpec(task, (Obj(a), Obj(b)), relation=r) for a, b in pairs for r in RELATIONS]
    if task == "color_attr":
        return [
            SceneSpec(task, (Obj(a, ca), Obj(b, cb))) for a, b in pairs for ca, cb in itertools.permutations(COLORS, 2)
        ]
    raise SceneSpecError(f"unknown task {task!r}; expected one of {TASKS}")


def sample_spec(rng: np.random.Generator, task: str) -> SceneSpec:
    """A uniformly drawn spec of ``task``."""
    specs = all_specs(task)
    return specs[int(rng.integers(len(specs)))]


# ----------------------------------------------------------------------------- rendering


def _object_list(spec: SceneSpec, rng: np.random.Generator) -> list[tuple[str, str]]:
    """The (shape, colour) of every object to draw, unspecified colours drawn at random."""
    names = list(COLORS)
    objs = [spec.objects[0]] * (spec.count or 1) if spec.task == "counting" else list(spec.objects)
    return [(o.shape, o.color or names[int(rng.integers(len(names)))]) for o in objs]


def _boxes_apart(a: tuple[float, float, float], b: tuple[float, float, float], gap: float) -> bool:
    """Whether two (cx, cy, side) boxes are at least ``gap`` apart along x or y."""
    half = (a[2] + b[2]) / 2 + gap
    return abs(a[0] - b[0]) >= half or abs(a[1] - b[1]) >= half


def _place(spec: SceneSpec, n: int, size: int, rng: np.random.Generator) -> list[tuple[float, float, float]]:
    """Seeded non-overlapping boxes (cx, cy, side) in pixels; for ``position`` the first box is
    placed in the asked relation to the second, with a clear margin."""
    gap, border = GAP * size, BORDER * size
    scale = 1.0
    for attempt in range(1000):
        if attempt and attempt % 25 == 0:
            scale *= 0.95
        sides = rng.uniform(MIN_SIZE, MAX_SIZE, n) * size * scale
        if spec.task == "position":
            boxes = _place_relation(spec.relation or "", sides, size, rng)
        else:
            boxes = _place_sequentially(sides, size, rng)
        if boxes is None:
            continue
        inside = all(border + s / 2 <= c <= size - border - s / 2 for cx, cy, s in boxes for c in (cx, cy))
        if inside and all(_boxes_apart(a, b, gap) for a, b in itertools.combinations(boxes, 2)):
            return boxes
    raise RuntimeError(f"could not place {n} objects at size {size}")  # pragma: no cover


def _place_sequentially(
    sides: np.ndarray, size: int, rng: np.random.Generator, tries: int = 40
) -> list[tuple[float, float, float]] | None:
    """Drop boxes one at a time at random free spots; None if one finds no room."""
    gap, border = GAP * size, BORDER * size
    boxes: list[tuple[float, float, float]] = []
    for side in sides:
        s = float(side)
        for _ in range(tries):
            box = (
                float(rng.uniform(border + s / 2, size - border - s / 2)),
                float(rng.uniform(border + s / 2, size - border - s / 2)),
                s,
            )
            if all(_boxes_apart(box, other, gap) for other in boxes):
                boxes.append(box)
                break
        else:
            return None
    return boxes


def _place_relation(
    relation: str, sides: np.ndarray, size: int, rng: np.random.Generator
) -> list[tuple[float, float, float]] | None:
    """Boxes where box 0 is ``relation`` box 1: along the relation's axis the boxes are separated
    by at least the gap, and across it they are offset by at most a quarter of the axial offset."""
    sa, sb = float(sides[0]), float(sides[1])
    border = BORDER * size
    axial_min = (sa + sb) / 2 + GAP * size
    axial = float(rng.uniform(axial_min, max(axial_min, size - 2 * border - (sa + sb) / 2)))
    across = float(rng.uniform(-0.25, 0.25)) * axial
    edge = border + max(sa, sb) / 2
    ca = float(rng.uniform(edge, size - edge))
    cb = ca + across
    mid = float(rng.uniform(0.0, size))
    sign = -1.0 if relation in ("left of", "above") else 1.0
    # Axial coordinates: first object at mid + sign*axial/2, second at mid - sign*axial/2.
    pa, pb = mid + sign * axial / 2, mid - sign * axial / 2
    shift = 0.0
    low = min(pa - sa / 2, pb - sb / 2) - border
    high = max(pa + sa / 2, pb + sb / 2) - (size - border)
    if low < 0:
        shift = -low
    elif high > 0:
        shift = -high
    pa, pb = pa + shift, pb + shift
    if relation in ("left of", "right of"):
        return [(pa, ca, sa), (pb, cb, sb)]
    if relation in ("above", "below"):
        return [(ca, pa, sa), (cb, pb, sb)]
    return None


def _coverage(shape: str, box: tuple[float, float, float], grid: np.ndarray) -> np.ndarray:
    """Boolean mask of ``shape`` filling the (cx, cy, side) box on supersampled pixel centres."""
    cx, cy, s = box
    xs, ys = grid
    h = s / 2
    if shape == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= h * h
    if shape == "square":
        return (np.abs(xs - cx) <= h) & (np.abs(ys - cy) <= h)
    # Upright isosceles triangle: apex at the top middle, base along the bottom of the box.
    t = (ys - (cy - h)) / s  # 0 at the apex, 1 at the base
    return (t >= 0) & (t <= 1) & (np.abs(xs - cx) <= h * t)


def render(spec: SceneSpec, size: int = 32, seed: int = 0) -> np.ndarray:
    """Draw ``spec`` as a ``(size, size, 3)`` float32 image in [0, 1].

    Placement, sizes (9-13 px at 32 px) and unspecified colours come from ``seed``; objects never
    overlap (their boxes are at least 7% of the image side apart) and ``position`` relations hold
    with a clear margin. Anti-aliased by drawing at 4x and averaging 4x4 blocks.
    """
    validate(spec)
    if size < 16:
        raise ValueError(f"render size must be at least 16 px, got {size}")
    rng = np.random.default_rng(seed)
    objects = _object_list(spec, rng)
    boxes = _place(spec, len(objects), size, rng)
    big = size * SUPERSAMPLE
    centres = (np.arange(big) + 0.5) / SUPERSAMPLE
    grid = np.meshgrid(centres, centres, indexing="xy")
    canvas = np.empty((big, big, 3), dtype=np.float32)
    canvas[:] = np.asarray(BACKGROUND, dtype=np.float32) / 255.0
    for (shape, color), box in zip(objects, boxes, strict=True):
        canvas[_coverage(shape, box, grid)] = np.asarray(COLORS[color], dtype=np.float32) / 255.0
    image = canvas.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return np.clip(image, 0.0, 1.0).astype(np.float32)
