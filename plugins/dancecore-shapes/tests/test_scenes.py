"""Scene specs, captions and the renderer."""

from __future__ import annotations

import numpy as np
import pytest
from dancecore_shapes.scenes import (
    BACKGROUND,
    COLORS,
    SHAPES,
    TASKS,
    Obj,
    SceneSpec,
    SceneSpecError,
    all_specs,
    caption,
    parse_caption,
    render,
    sample_spec,
)


def test_vocabulary() -> None:
    assert SHAPES == ("circle", "square", "triangle")
    assert TASKS == ("single_object", "two_object", "counting", "colors", "position", "color_attr")
    palette = np.asarray([*COLORS.values(), BACKGROUND], dtype=float)
    distances = np.linalg.norm(palette[:, None] - palette[None], axis=-1)
    assert distances[~np.eye(len(palette), dtype=bool)].min() > 100  # clearly distinct colours


@pytest.mark.parametrize("task", TASKS)
def test_caption_round_trip(task: str) -> None:
    specs = all_specs(task)
    captions = [caption(s) for s in specs]
    assert len(set(captions)) == len(specs)
    assert all(parse_caption(c) == s for c, s in zip(captions, specs, strict=True))
    assert all(parse_caption(f"  {c.upper()}. ") == s for c, s in zip(captions, specs, strict=True))


def test_caption_templates() -> None:
    assert caption(SceneSpec("single_object", (Obj("circle"),))) == "a photo of a circle"
    assert caption(SceneSpec("two_object", (Obj("circle"), Obj("square")))) == "a photo of a circle and a square"
    assert caption(SceneSpec("counting", (Obj("triangle"),), count=3)) == "a photo of three triangles"
    assert caption(SceneSpec("colors", (Obj("circle", "red"),))) == "a photo of a red circle"
    spec = SceneSpec("position", (Obj("square"), Obj("circle")), relation="left of")
    assert caption(spec) == "a photo of a square left of a circle"
    spec = SceneSpec("color_attr", (Obj("square", "red"), Obj("triangle", "blue")))
    assert caption(spec) == "a photo of a red square and a blue triangle"


@pytest.mark.parametrize(
    "text",
    [
        "a red apple",
        "a photo of a circle and a circle",
        "a photo of a red circle and a square",
        "a photo of a red circle and a red square",
        "a photo of five circles",
        "a photo of a red circle left of a blue square",
        "a photo of a circle beside a square",
        "",
    ],
)
def test_parse_rejects(text: str) -> None:
    with pytest.raises(SceneSpecError, match="caption") as info:
        parse_caption(text)
    assert repr(text) in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "spec",
    [
        SceneSpec("nope", (Obj("circle"),)),
        SceneSpec("single_object", (Obj("hexagon"),)),
        SceneSpec("single_object", (Obj("circle", "red"),)),
        SceneSpec("counting", (Obj("circle"),), count=7),
        SceneSpec("counting", (Obj("circle"),)),
        SceneSpec("position", (Obj("circle"), Obj("square")), relation="near"),
        SceneSpec("colors", (Obj("circle", "pink"),)),
    ],
)
def test_invalid_specs(spec: SceneSpec) -> None:
    with pytest.raises(SceneSpecError):
        caption(spec)
    with pytest.raises(SceneSpecError):
        render(spec)


def test_spec_counts() -> None:
    counts = {t: len(all_specs(t)) for t in TASKS}
    assert counts == {
        "single_object": 3,
        "two_object": 6,
        "counting": 9,
        "colors": 18,
        "position": 24,
        "color_attr": 180,
    }
    with pytest.raises(SceneSpecError):
        all_specs("nope")


def test_sample_spec() -> None:
    rng = np.random.default_rng(0)
    for task in TASKS:
        drawn = {sample_spec(rng, task) for _ in range(50)}
        assert drawn <= set(all_specs(task)) and len(drawn) > 1


@pytest.mark.parametrize("size", [32, 64])
def test_render_basics(size: int) -> None:
    spec = SceneSpec("counting", (Obj("square"),), count=4)
    image = render(spec, size, seed=3)
    assert image.shape == (size, size, 3) and image.dtype == np.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert np.array_equal(image, render(spec, size, seed=3))
    assert not np.array_equal(image, render(spec, size, seed=4))
    background = np.asarray(BACKGROUND) / 255.0
    assert np.allclose(image[0, 0], background) and np.allclose(image[-1, -1], background)
    # Anti-aliased: some pixels are neither background nor a palette colour.
    palette = np.asarray([*COLORS.values(), BACKGROUND]) / 255.0
    nearest = np.abs(image.reshape(-1, 1, 3) - palette[None]).max(-1).min(-1)
    assert (nearest > 0.05).any()


def test_render_rejects_tiny() -> None:
    with pytest.raises(ValueError, match="16"):
        render(all_specs("single_object")[0], size=8)
