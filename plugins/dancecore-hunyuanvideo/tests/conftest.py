"""Shared fixtures: one tiny policy of each backbone per test session (building one takes ~2 s),
and prompts whose first-frame images are written to a temporary folder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dancecore_hunyuanvideo.skyreels_i2v import SkyReelsI2VPolicy
from dancecore_hunyuanvideo.t2v import HunyuanVideoPolicy
from PIL import Image

from dancecore import Prompt, PromptBatch


@pytest.fixture(scope="session")
def t2v() -> HunyuanVideoPolicy:
    torch.manual_seed(0)
    return HunyuanVideoPolicy(HunyuanVideoPolicy.Config(preset="tiny"))


@pytest.fixture(scope="session")
def i2v() -> SkyReelsI2VPolicy:
    torch.manual_seed(0)
    return SkyReelsI2VPolicy(SkyReelsI2VPolicy.Config(preset="tiny"))


@pytest.fixture()
def prompts() -> PromptBatch:
    return PromptBatch((Prompt("a red cube", 0), Prompt("a cat on a mat", 1), Prompt("", 2)))


def write_image(path, height: int, width: int, seed: int) -> str:
    """A random RGB picture of the given size, as PNG."""
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return str(path)


@pytest.fixture()
def make_image():
    """Write a random RGB picture: ``make_image(path, height, width, seed) -> str``."""
    return write_image


@pytest.fixture()
def image_prompts(tmp_path) -> PromptBatch:
    # Different sizes and aspect ratios: every image is cropped and resized to the video's size.
    return PromptBatch(
        (
            Prompt("a red cube", 0, write_image(tmp_path / "a.png", 64, 96, 0)),
            Prompt("a cat on a mat", 1, write_image(tmp_path / "b.png", 50, 31, 1)),
            Prompt("", 2, write_image(tmp_path / "c.png", 32, 48, 2)),
        )
    )
