"""`dancecore export` of a tiny FLUX: FluxPipeline.from_pretrained reproduces `dancecore eval`."""

from __future__ import annotations

import pytest

from dancecore.testing import check_diffusers_export

SAMPLER = {"name": "flow-sde", "num_steps": 3, "shift": 3.0}


@pytest.mark.parametrize(
    "policy",
    [{"name": "flux", "preset": "tiny"}, {"name": "flux", "preset": "tiny", "lora": {"rank": 2, "alpha": 4}}],
    ids=["full", "lora"],
)
def test_export_loads_in_flux_pipeline_and_reproduces_eval(policy, tmp_path):
    check = check_diffusers_export(policy, SAMPLER, tmp_path)
    assert (check.adapter_vs_merged is not None) == ("lora" in policy)
