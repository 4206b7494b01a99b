"""`dancecore plan` on FLUX: the published architecture's parameter counts, the CLI table for the
8-GPU recipe, and the planner against the measured peak of a real CPU run (within 15 %)."""

from __future__ import annotations

import json

import pytest
import torch
from dancecore_flux.policy import TINY_SPEC, FluxPolicy

from dancecore.cli import _main
from dancecore.planning.verify import compare


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_published_flux_architecture_has_the_published_sizes():
    spec = FluxPolicy.memory_plan_spec(FluxPolicy.Config(pretrained="not/on-this-machine"))
    assert "published architecture" in spec.source
    assert _count(spec.trained) == pytest.approx(11.9e9, rel=0.005)  # FLUX.1 "12B": 11,901,408,320
    counts = {name: _count(module) for name, (module, _) in spec.frozen.items()}
    assert counts["T5 text encoder"] == pytest.approx(4.76e9, rel=0.005)  # T5 v1.1 XXL encoder
    assert counts["CLIP text encoder"] == pytest.approx(123.06e6, rel=0.001)  # CLIP ViT-L/14 text tower
    assert spec.shapes.startswith("720 x 720 px: 2,025 image + 512 text tokens")
    assert all(p.device.type == "meta" for p in spec.trained.parameters())


def test_plan_prints_the_table_and_verdict_for_the_8_gpu_recipe(capsys):
    torch.set_num_threads(1)
    assert _main(["plan", "configs/flux/hps_8gpu.yaml", "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert "11.90 B trained" in out and "| ZeRO-3 + opt offload * |" in out
    assert "verdict: cheapest setting that fits: ZeRO-2" in out
    assert "the config's setting, ZeRO-3 + opt offload:" in out and "fits" in out


@pytest.mark.slow
def test_planner_agrees_with_a_measured_cpu_run(tmp_path):
    """A small FLUX transformer (1 + 2 blocks of width 256) read from a config.json directory; the
    real run is two AdamW steps in fp32 in a fresh process, its peak from the kernel's RSS."""
    transformer = {**TINY_SPEC["transformer"], "in_channels": 64, "num_layers": 1, "num_single_layers": 2}
    transformer |= {"attention_head_dim": 128, "num_attention_heads": 2, "joint_attention_dim": 256}
    transformer |= {"pooled_projection_dim": 256, "axes_dims_rope": [16, 56, 56]}
    parts = {"transformer": transformer, "vae": TINY_SPEC["vae"], "text_encoder": TINY_SPEC["clip"]}
    parts["text_encoder_2"] = TINY_SPEC["t5"]
    for name, config in parts.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    options = {"pretrained": str(tmp_path), "resolution": 128, "max_sequence_length": 32}
    for agreement in compare("flux", options, rows=2):
        assert agreement.ratio == pytest.approx(1.0, abs=0.15), agreement
