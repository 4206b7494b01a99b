"""`dancecore plan` on HunyuanVideo / SkyReels: the published architecture's parameter counts and shapes."""

from __future__ import annotations

import pytest
from dancecore_hunyuanvideo.skyreels_i2v import SkyReelsI2VPolicy
from dancecore_hunyuanvideo.t2v import HunyuanVideoPolicy


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_published_hunyuanvideo_architecture_has_the_published_sizes():
    spec = HunyuanVideoPolicy.memory_plan_spec(HunyuanVideoPolicy.Config(pretrained="not/on-this-machine"))
    assert _count(spec.trained) == pytest.approx(12.82e9, rel=0.005)  # HunyuanVideo "13B": 12,821,012,544
    counts = {name: _count(module) for name, (module, _) in spec.frozen.items()}
    assert counts["Llama text encoder"] == pytest.approx(7.505e9, rel=0.001)  # llava-llama-3-8b, no LM head
    assert "latents (14, 60, 106), 22,260 video + 256 text tokens" in spec.shapes


def test_skyreels_doubles_the_input_channels_and_runs_two_branches():
    spec = SkyReelsI2VPolicy.memory_plan_spec(SkyReelsI2VPolicy.Config(pretrained="not/on-this-machine"))
    assert spec.trained.config.in_channels == 32 and "CFG (2 branches)" in spec.shapes
