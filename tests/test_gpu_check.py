"""The GPU check (``make gpu-check``, benchmarks/gpu/): its code paths at tiny size on CPU, so they
cannot rot, and on CUDA (tests marked ``gpu``, skipped without one) the bf16 facts at real size."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("dancecore_flux")
pytest.importorskip("dancecore_sd")
pytest.importorskip("dancecore_hunyuanvideo")

from benchmarks.gpu.check import run  # noqa: E402
from benchmarks.gpu.networks import WORKLOADS, workload  # noqa: E402

DEVICE = torch.device("cpu")


def test_tiny_path_measures_every_step_and_writes_the_report(tmp_path):
    torch.set_num_threads(1)
    report = run(tiny=True, device=DEVICE, repeats=1, out=tmp_path / "gpu.json")
    assert json.loads((tmp_path / "gpu.json").read_text()) == report
    rows = {(r["workload"], r["step"]): r for r in report["rows"]}
    for w in WORKLOADS:
        steps = ("rollout", "train", "train+ckpt", "attention:sdpa", "attention:native", "attention:native train+ckpt")
        for step in steps:
            row = rows[(w.name, step)]
            assert row["status"] == "ok" and row["seconds"] > 0 and row["tflop"] > 0, row
        # The counter sees the backward pass: about twice the forward's FLOPs on top of it.
        ratio = rows[(w.name, "train")]["tflop"] / rows[(w.name, "rollout")]["tflop"]
        assert 2.5 < ratio < 3.5, (w.name, ratio)
        assert report["networks"][w.name]["parameters"] > 0
    # rho == 1 exactly between rollout and replay, with and without gradient checkpointing.
    assert len(report["rho"]) == 2 * len(WORKLOADS) and all(r["exactly_one"] for r in report["rho"])
    diffs = [b["max_abs_diff_vs_sdpa"] for b in report["attention_backends"] if b["backend"] == "native"]
    assert len(diffs) == len(WORKLOADS) and max(diffs) < 1e-4
    assert report["grpo_iteration"]["ratio_mean"] == 1.0
    if not torch.cuda.is_available():
        assert any("needs CUDA" in s for s in report["skipped"])
        for w in WORKLOADS:
            status = rows[(w.name, "attention:xformers")]["status"]
            assert status.startswith("skipped:") and "CUDA" in status
        assert rows[("sd", "attention:flash")]["status"].startswith("skipped: 'flash' is not offered")


def test_published_architectures_build_at_their_published_sizes():
    """The shipped config.json dicts, built on the meta device: FLUX.1 11.9B, SD1.4's UNet 860M, HunyuanVideo 12.8B."""
    assert workload("flux").parameter_count() == 11_901_408_320
    assert workload("sd").parameter_count() == 859_520_964
    assert workload("hunyuanvideo").parameter_count() == 12_821_012_544


@pytest.mark.gpu
def test_real_size_sd_on_cuda_has_rho_one_in_bf16(tmp_path):
    """On a GPU: the real SD1.4 UNet in bf16, rho == 1 exactly and the backends agree (the full
    table of every network is ``make gpu-check``)."""
    report = run(tiny=False, device=torch.device("cuda"), only=["sd"], repeats=1, out=tmp_path / "gpu.json")
    assert all(r["exactly_one"] and r["dtype"] == "bfloat16" for r in report["rho"])
    assert all(b["max_abs_diff_vs_sdpa"] < 0.1 for b in report["attention_backends"])
    assert report["grpo_iteration"]["ratio_mean"] == 1.0
