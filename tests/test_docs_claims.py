"""What the guides say about the code is true of the code: the reward contract and a page per
bundled policy plugin."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import torch

from dancecore import FlatFrames, flatten_frames

ROOT = Path(__file__).resolve().parent.parent
REWARD_GUIDE = ROOT / "docs" / "writing-a-reward-plugin.md"


def test_the_reward_guide_describes_flatten_frames_as_it_is():
    text = " ".join(REWARD_GUIDE.read_text().split())
    frames = flatten_frames(torch.rand(2, 3, 3, 4, 4), ["a", "b"])
    assert isinstance(frames, FlatFrames) and len(frames) == 3
    assert f"returns three things, a `FlatFrames({', '.join(FlatFrames._fields)})`" in text
    assert frames.frames.shape == (6, 3, 4, 4) and frames.texts == ["a"] * 3 + ["b"] * 3 and frames.per_sample == 3
    assert "dancecore.plugin_kit" not in text, "plugins import only `dancecore`"


def test_the_reward_guide_says_pixels_arrive_on_the_cpu():
    text = " ".join(REWARD_GUIDE.read_text().split())
    assert "on the device the run uses" not in text and "**on the CPU**" in text
    # the two places that hand pixels to rewards move them to the CPU first
    sampling = (ROOT / "dancecore" / "training" / "sampling.py").read_text()
    evaluation = (ROOT / "dancecore" / "training" / "evaluation.py").read_text()
    assert re.search(r"policy\.decode\([^\n]*\)\.cpu\(\)", sampling)
    assert re.search(r"policy\.decode\([^\n]*\)\.cpu\(\)", evaluation)


def test_every_bundled_policy_has_its_page():
    names = []
    for pyproject in sorted((ROOT / "plugins").glob("*/pyproject.toml")):
        entry_points = tomllib.loads(pyproject.read_text())["project"].get("entry-points", {})
        names += list(entry_points.get("dancecore.policies", {}))
    assert "flux" in names and "sd" in names
    pages = {p.stem for p in (ROOT / "docs" / "policies").glob("*.md")}
    missing = [n for n in names if n not in pages and n.split("-")[0] not in pages]
    assert not missing, f"no docs/policies page for {missing}"
    flux = (ROOT / "docs" / "policies" / "flux.md").read_text()
    assert "# Policy `flux`" in flux and "configs/flux/hps.yaml" in flux
