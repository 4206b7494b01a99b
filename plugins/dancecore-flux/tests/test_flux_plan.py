"""`dancecore plan` on FLUX: the published architecture's parameter counts and the planner against
the measured peak of a real CPU run (within 15 %); the CLI table of the 8-GPU recipe is in tests/test_plan.py."""

from __future__ import annotations

import pytest
import torch
from dancecore_flux.policy import FluxPolicy

from dancecore.testing import check_memory_plan


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


def test_planner_agrees_with_a_measured_cpu_run():
    """The tiny preset trained for real on the CPU (two AdamW steps of two micro-batches, fp32), its
    live tensor bytes counted around the real kernels, against the planner's meta-device figure.
    (The process-level RSS comparison of a larger FLUX is benchmarks/plan_memory.py.)"""
    torch.set_num_threads(1)
    agreements = check_memory_plan("flux", {"preset": "tiny", "resolution": 64}, rows=2)
    assert [a.phase for a in agreements] == ["rollout", "training"]
