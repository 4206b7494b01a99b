"""The FLUX paper recipes run end-to-end on CPU with the tiny presets (through the CLI)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
TINY = [
    "policy.pretrained=null",
    "policy.preset=tiny",
    "policy.resolution=32",
    "policy.max_sequence_length=32",
    "sampler.num_steps=4",
    "optimizer.group_size=2",
    "train.prompts_per_iteration=1",
    "distributed.backend=none",
    "train.mixed_precision=no",
    "train.device=cpu",
    "train.num_threads=1",
    "logging.progress_bar=false",
    "logging.tensorboard=false",
]

pytestmark = pytest.mark.slow


def _train(recipe: str, out: Path, *extra: str) -> list[dict]:
    pytest.importorskip("dancecore_rewards_hps", reason="install plugins/dancecore-rewards-hps")
    result = subprocess.run(
        [sys.executable, "-m", "dancecore.cli", "train", recipe, f"output_dir={out}", *TINY, *extra],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_flux_hps_clip_recipe(tmp_path):
    records = _train(
        "configs/flux/hps_clip.yaml",
        tmp_path / "run",
        "train.iterations=2",
        "rewards[0].pretrained=null",
        "rewards[0].preset=tiny",
        "rewards[1].pretrained=null",
        "rewards[1].preset=tiny",
    )
    assert [r["iteration"] for r in records] == [0, 1]
    first = records[0]
    names = sorted(k for k in first if k.startswith("reward/"))
    assert len(names) == 2, names
    hps = next(k for k in names if "hps" in k)
    clip = next(k for k in names if "clip" in k)
    assert first["reward_mean"] == pytest.approx(0.7 * first[hps] + 1.4 * first[clip], abs=1e-5)
    assert first["ratio_mean"] == 1.0 and math.isfinite(first["grad_norm"])
