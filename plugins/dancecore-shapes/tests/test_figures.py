"""The before/after figure keeps each chosen row of both grids, in order, at the given scale."""

from __future__ import annotations

import json

import numpy as np
import pytest
from dancecore_shapes.figures import GAP, HEADER, LABEL_WIDTH, before_after, evaluated_captions, main
from PIL import Image


def _grid(path, rows: int, value_of) -> None:
    pixels = np.zeros((rows * 4, 8, 3), dtype=np.uint8)
    for r in range(rows):
        pixels[r * 4 : (r + 1) * 4] = value_of(r)
    Image.fromarray(pixels).save(path)


def test_rows_of_both_grids_side_by_side(tmp_path):
    _grid(tmp_path / "a.png", 5, lambda r: 10 * r)
    _grid(tmp_path / "b.png", 5, lambda r: 100 + 10 * r)
    captions = [f"a photo of caption {i}" for i in range(5)]
    fig = np.asarray(before_after(tmp_path / "a.png", tmp_path / "b.png", captions, [3, 1], scale=2))
    header = HEADER
    assert fig.shape == (header + 2 * 4 * 2, LABEL_WIDTH + (2 * 8 + GAP) * 2, 3)
    for i, row in enumerate([3, 1]):
        top = header + i * 8
        assert (fig[top : top + 8, LABEL_WIDTH : LABEL_WIDTH + 16] == 10 * row).all()
        right = LABEL_WIDTH + (8 + GAP) * 2
        assert (fig[top : top + 8, right : right + 16] == 100 + 10 * row).all()
    narrow = before_after(tmp_path / "a.png", tmp_path / "b.png", captions, [0], scale=1, columns=1)
    assert narrow.size == (LABEL_WIDTH + 2 * 4 + GAP, header + 4)


def test_grids_that_do_not_match_the_captions_are_refused(tmp_path):
    _grid(tmp_path / "a.png", 5, lambda r: 0)
    _grid(tmp_path / "b.png", 4, lambda r: 0)
    with pytest.raises(ValueError, match="differ in size"):
        before_after(tmp_path / "a.png", tmp_path / "b.png", ["x"] * 5, [0])
    with pytest.raises(ValueError, match="not 3 rows"):
        before_after(tmp_path / "a.png", tmp_path / "a.png", ["x"] * 3, [0], tile=7)
    with pytest.raises(ValueError, match="outside"):
        before_after(tmp_path / "a.png", tmp_path / "a.png", ["x"] * 5, [9])


def test_the_command_labels_rows_with_the_prompts_each_evaluation_scored(tmp_path):
    for name, base in (("before", 0), ("after", 100)):
        (tmp_path / name).mkdir()
        _grid(tmp_path / name / "grid.png", 3, lambda r, base=base: base + 10 * r)
        samples = [{"prompt_index": i, "sample": k, "prompt": f"a photo of p{i}"} for i in (2, 0, 1) for k in (0, 1)]
        (tmp_path / name / "results.json").write_text(json.dumps({"samples": samples}))
    assert evaluated_captions(tmp_path / "before") == ["a photo of p0", "a photo of p1", "a photo of p2"]
    main([str(tmp_path / "before"), str(tmp_path / "after"), str(tmp_path / "fig.png"), "--rows", "2", "--scale", "1"])
    fig = np.asarray(Image.open(tmp_path / "fig.png"))
    assert (fig[HEADER : HEADER + 4, LABEL_WIDTH : LABEL_WIDTH + 8] == 20).all()
    (tmp_path / "after" / "results.json").write_text(json.dumps({"samples": samples[:2]}))
    with pytest.raises(SystemExit):
        main([str(tmp_path / "before"), str(tmp_path / "after"), str(tmp_path / "fig.png")])
    with pytest.raises(ValueError, match="not a dancecore evaluation result"):
        evaluated_captions(tmp_path)
