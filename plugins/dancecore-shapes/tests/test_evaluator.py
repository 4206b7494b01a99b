"""The evaluator: exact on rendered ground truth, robust to mild degradations, and it catches
deliberately wrong scenes.

Robustness levels (at 32 px; at 64 px the blur sigma doubles): Gaussian blur sigma 0.7 px,
additive Gaussian noise std 0.05, JPEG quality 70 (4:2:0), and all three together at
blur 0.5 px + noise 0.03 + JPEG 70.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from conftest import add_noise, gaussian_blur, jpeg
from dancecore_shapes.evaluator import (
    Detection,
    detect,
    partial_credit,
    relations,
    shape_likeness,
    soft_conditions,
    soft_partial_credit,
    to_hwc,
    verdict,
)
from dancecore_shapes.scenes import COLORS, RELATIONS, SHAPES, TASKS, Obj, SceneSpec, all_specs, render

OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
ACROSS = {"left of": "above", "right of": "below", "above": "right of", "below": "left of"}


def _check(spec: SceneSpec, image: np.ndarray, where: str) -> None:
    detections = detect(image)
    assert verdict(spec, detections), f"{where}: {spec} judged wrong; detections {detections}"
    assert partial_credit(spec, detections) == 1.0


def _subset(task: str, size: int) -> list[SceneSpec]:
    specs = all_specs(task)
    return specs[:: max(1, len(specs) // size)]


@pytest.mark.parametrize("task", TASKS)
def test_ground_truth_32px(task: str) -> None:
    for spec in all_specs(task):
        for seed in range(3):
            _check(spec, render(spec, 32, seed), f"32px seed {seed}")


@pytest.mark.parametrize("task", TASKS)
def test_ground_truth_64px(task: str) -> None:
    for i, spec in enumerate(all_specs(task)):
        _check(spec, render(spec, 64, seed=100 + i), "64px")


def _degrade(image: np.ndarray, kind: str, seed: int, scale: float) -> np.ndarray:
    if kind == "blur":
        return gaussian_blur(image, 0.7 * scale)
    if kind == "noise":
        return add_noise(image, 0.05, seed)
    if kind == "jpeg":
        return jpeg(image, 70)
    return jpeg(add_noise(gaussian_blur(image, 0.5 * scale), 0.03, seed), 70)


@pytest.mark.parametrize("kind", ["blur", "noise", "jpeg", "all"])
@pytest.mark.parametrize("size", [32, 64])
def test_robust_to_degradations(kind: str, size: int) -> None:
    per_task = 24 if size == 32 else 8
    seeds = range(2) if size == 32 else range(1)
    for task in TASKS:
        for spec in _subset(task, per_task):
            for seed in seeds:
                image = _degrade(render(spec, size, seed).astype(np.float64), kind, seed, size / 32)
                _check(spec, image, f"{kind} {size}px seed {seed}")


def _wrong_scenes(spec: SceneSpec) -> list[SceneSpec]:
    """Scenes that must fail ``spec``: wrong shape, count, colour, relation or a missing object."""
    objs = spec.objects
    other = {s: next(t for t in SHAPES if t != s) for s in SHAPES}
    if spec.task == "single_object":
        return [SceneSpec("single_object", (Obj(other[objs[0].shape]),))]
    if spec.task == "two_object":
        return [SceneSpec("single_object", (Obj(o.shape),)) for o in objs]
    if spec.task == "counting":
        counts = [n for n in (spec.count - 1, spec.count + 1) if n in (2, 3, 4)]
        wrong = [SceneSpec("counting", objs, count=n) for n in counts]
        if spec.count == 2:
            wrong.append(SceneSpec("single_object", objs))
        return wrong
    if spec.task == "colors":
        colour = next(c for c in COLORS if c != objs[0].color)
        return [
            SceneSpec("colors", (Obj(objs[0].shape, colour),)),
            SceneSpec("colors", (Obj(other[objs[0].shape], objs[0].color),)),
        ]
    if spec.task == "position":
        rel = spec.relation
        return [
            SceneSpec("position", objs, relation=OPPOSITE[rel]),
            SceneSpec("position", objs, relation=ACROSS[rel]),
            SceneSpec("position", objs[::-1], relation=rel),
            SceneSpec("single_object", objs[:1]),
        ]
    a, b = objs
    return [
        SceneSpec("color_attr", (Obj(a.shape, b.color), Obj(b.shape, a.color))),
        SceneSpec("colors", (a,)),
        SceneSpec("color_attr", (a, Obj(b.shape, next(c for c in COLORS if c not in (a.color, b.color))))),
    ]


@pytest.mark.parametrize("task", TASKS)
def test_wrong_scenes_are_caught(task: str) -> None:
    for i, spec in enumerate(_subset(task, 30)):
        for wrong in _wrong_scenes(spec):
            for seed in range(2):
                detections = detect(render(wrong, 32, seed=i * 7 + seed))
                assert not verdict(spec, detections), f"{wrong} (seed {seed}) passed as {spec}"
                assert partial_credit(spec, detections) < 1.0


def test_partial_credit_values() -> None:
    spec = SceneSpec("color_attr", (Obj("square", "red"), Obj("triangle", "blue")))
    half = SceneSpec("color_attr", (Obj("square", "red"), Obj("triangle", "green")))
    assert partial_credit(spec, detect(render(half, 32))) == 0.75
    assert partial_credit(spec, detect(render(SceneSpec("colors", (Obj("circle", "red"),)), 32))) == 0.0
    three = SceneSpec("counting", (Obj("circle"),), count=3)
    assert partial_credit(three, detect(render(SceneSpec("counting", (Obj("circle"),), count=4), 32))) == pytest.approx(
        2 / 3
    )
    pos = SceneSpec("position", (Obj("circle"), Obj("square")), relation="left of")
    swapped = SceneSpec("position", (Obj("circle"), Obj("square")), relation="right of")
    assert partial_credit(pos, detect(render(swapped, 32))) == pytest.approx(2 / 3)


def test_soft_credit_is_exact_on_ground_truth_and_grades_blobs() -> None:
    for task in TASKS:
        for i, spec in enumerate(_subset(task, 6)):
            detections = detect(render(spec, 32, seed=i))
            assert soft_partial_credit(spec, detections) == pytest.approx(1.0, abs=0.02), spec
            exact, soft = conditions_pair(spec, detections)
            assert all(s >= e for s, e in zip(soft, exact, strict=True))
    # a square whose corners are cut off (an octagon) is less clearly a square than a square,
    # and more clearly one than a circle: the soft credit orders them; the verdict cannot
    square = detect(render(SceneSpec("colors", (Obj("square", "red"),)), 32, seed=1))[0]
    circle = detect(render(SceneSpec("colors", (Obj("circle", "red"),)), 32, seed=1))[0]
    octagon = Detection("circle", "red", square.box, square.centroid, square.area, square.asymmetry, SQUARENESS_MID)
    assert shape_likeness(square, "square") > shape_likeness(octagon, "square") > shape_likeness(circle, "square")
    assert shape_likeness(circle, "circle") > 0.9 > 0.1 > shape_likeness(circle, "triangle")
    wrong_colour = SceneSpec("colors", (Obj("square", "blue"),))
    assert soft_conditions(wrong_colour, [square]) == [1.0, 0.0], "present, wrong colour: as the exact test"
    assert soft_conditions(wrong_colour, [circle]) == [0.0, 0.0], "no blue candidate: no soft credit either"
    assert 0.0 < soft_conditions(SceneSpec("colors", (Obj("square", "red"),)), [octagon])[0] < 1.0


SQUARENESS_MID = 0.25  # just below the square threshold (0.28)


def conditions_pair(spec: SceneSpec, detections: list[Detection]) -> tuple[list[float], list[float]]:
    from dancecore_shapes.evaluator import conditions

    return conditions(spec, detections), soft_conditions(spec, detections)


def test_counting_ignores_other_shapes_and_blank_is_empty() -> None:
    blank = np.full((32, 32, 3), 235 / 255.0)
    assert detect(blank) == []
    spec = SceneSpec("two_object", (Obj("circle"), Obj("square")))
    assert verdict(SceneSpec("counting", (Obj("circle"),), count=2), detect(render(spec, 32))) is False
    assert verdict(SceneSpec("single_object", (Obj("square"),)), detect(render(spec, 32))) is True


def test_detection_fields_and_layouts() -> None:
    spec = SceneSpec("position", (Obj("triangle"), Obj("circle")), relation="above")
    image = render(spec, 32, seed=5)
    found = detect(image)
    assert all(isinstance(d, Detection) for d in found)
    assert [d.shape for d in found] and {d.shape for d in found} == {"triangle", "circle"}
    tri = next(d for d in found if d.shape == "triangle")
    circ = next(d for d in found if d.shape == "circle")
    assert relations(tri, circ) == {"above"} and relations(circ, tri) == {"below"}
    x0, y0, x1, y1 = tri.box
    assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 and x0 <= tri.centroid[0] <= x1
    chw = torch.from_numpy(image).permute(2, 0, 1)
    assert detect(chw) == found
    assert np.allclose(to_hwc(chw), image)
    with pytest.raises(ValueError, match="shape"):
        detect(np.zeros((32, 32)))


def test_random_noise_images_do_not_crash() -> None:
    rng = np.random.default_rng(0)
    for _ in range(5):
        found = detect(rng.random((32, 32, 3)))
        assert all(d.shape in SHAPES and d.color in COLORS for d in found)


def test_relations_geometry() -> None:
    def box(cx: float, cy: float, s: float = 0.3) -> Detection:
        return Detection("circle", "red", (cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2), (cx, cy), 1.0, 0.0, 0.0)

    assert relations(box(0.25, 0.5), box(0.75, 0.5)) == {"left of"}
    assert relations(box(0.5, 0.8), box(0.5, 0.2)) == {"below"}
    assert relations(box(0.5, 0.5), box(0.52, 0.5)) == set()  # within the margin
    assert relations(box(0.2, 0.2), box(0.8, 0.8)) == {"left of", "above"}
    assert set(RELATIONS) == set(OPPOSITE)
    assert len(list(itertools.permutations(SHAPES, 2))) == 6


def test_rendered_relations_are_unambiguous() -> None:
    for i, spec in enumerate(all_specs("position")):
        for seed in range(3):
            found = detect(render(spec, 32, seed=i * 3 + seed))
            a, b = (next(d for d in found if d.shape == o.shape) for o in spec.objects)
            assert relations(a, b) == {spec.relation}, (spec, seed)
