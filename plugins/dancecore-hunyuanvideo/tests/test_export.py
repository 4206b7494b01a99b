"""`dancecore export` of a tiny HunyuanVideo: HunyuanVideoPipeline.from_pretrained reproduces `dancecore eval`."""

from __future__ import annotations

import pytest

from dancecore.testing import check_diffusers_export

SAMPLER = {"name": "flow-sde", "num_steps": 3, "shift": 5.0, "eta": 0.25}


@pytest.mark.parametrize(
    "policy",
    [
        {"name": "hunyuanvideo", "preset": "tiny"},
        {"name": "hunyuanvideo", "preset": "tiny", "lora": {"rank": 2, "alpha": 4}},
    ],
    ids=["full", "lora"],
)
def test_export_loads_in_hunyuanvideo_pipeline_and_reproduces_eval(policy, tmp_path):
    check = check_diffusers_export(policy, SAMPLER, tmp_path)
    print(check)
