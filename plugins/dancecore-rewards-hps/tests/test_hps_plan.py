"""`dancecore plan` counts HPS-v2.1's open_clip ViT-H-14 at its published size, on the meta device."""

from __future__ import annotations

import pytest
from dancecore_rewards_hps.reward import HPSv21


def test_vit_h_14_has_its_published_size_on_meta():
    ((model, dtype),) = HPSv21.memory_plan_modules(HPSv21.Config()).values()
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(986.1e6, rel=0.001)
    assert all(p.device.type == "meta" for p in model.parameters()) and dtype.itemsize == 4
