"""`dancecore plan` on SD v1.4: the published architecture's parameter counts; the tiny preset's plan."""

from __future__ import annotations

import pytest
from dancecore_sd.policy import StableDiffusionPolicy

from dancecore.testing import plan_activations


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_published_sd14_architecture_has_the_published_sizes():
    spec = StableDiffusionPolicy.memory_plan_spec(StableDiffusionPolicy.Config(pretrained="not/on-this-machine"))
    assert _count(spec.trained) == pytest.approx(859.52e6, rel=0.001)  # the SD v1 UNet, "860M"
    assert _count(spec.frozen["VAE"][0]) == pytest.approx(83.65e6, rel=0.001)
    assert "CFG (2 rows per sample)" in spec.shapes


def test_tiny_preset_activations_grow_with_the_micro_batch():
    spec = StableDiffusionPolicy.memory_plan_spec(StableDiffusionPolicy.Config(preset="tiny"))
    one, four = plan_activations(spec, 1), plan_activations(spec, 4)
    assert 0 < one.rollout_peak <= one.train_peak and 3 * one.saved <= four.saved <= 5 * one.saved
