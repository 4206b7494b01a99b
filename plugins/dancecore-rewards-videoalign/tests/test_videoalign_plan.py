"""`dancecore plan` counts VideoAlign's Qwen2-VL-2B at its published size (shipped config, meta device)."""

from __future__ import annotations

import torch
from dancecore_rewards_videoalign.reward import VideoAlignReward


def test_qwen2_vl_2b_has_its_published_size_on_meta():
    config = VideoAlignReward.Config(pretrained="not/on-this-machine")
    ((model, dtype),) = VideoAlignReward.memory_plan_modules(config).values()
    assert sum(p.numel() for p in model.parameters()) == 2_208_985_600  # tied embeddings
    assert dtype == torch.bfloat16 and next(model.parameters()).device.type == "meta"
