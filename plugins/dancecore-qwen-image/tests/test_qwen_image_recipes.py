"""configs/qwen-image: the recipe validates with its settings, and the tiny-preset command in its
header trains one iteration end to end through the CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dancecore.testing import load_run, recipe_overrides

ROOT = Path(__file__).resolve().parents[3]
RECIPE = "configs/qwen-image/hps.yaml"


@pytest.fixture(autouse=True)
def _at_the_root(monkeypatch):
    pytest.importorskip("dancecore_rewards_hps", reason="install plugins/dancecore-rewards-hps")
    monkeypatch.chdir(ROOT)


def test_recipe_settings():
    run = load_run(ROOT / RECIPE)
    policy, sampler, grpo = run.policy.config, run.sampler.config, run.optimizer.config
    assert (run.policy.name, policy.pretrained) == ("qwen-image", "Qwen/Qwen-Image")
    assert (policy.guidance_scale, policy.negative_prompt) == (4.0, " ")
    assert (run.sampler.name, sampler.num_steps, sampler.shift, sampler.eta) == ("flow-sde", 20, 3.0, 0.3)
    assert (grpo.group_size, grpo.timestep_fraction, grpo.clip_range) == (12, 0.6, 1e-4)
    assert [r.name for r in run.config.rewards] == ["hps-v2.1"]


@pytest.mark.slow
def test_header_command_trains_one_iteration(tmp_path):
    out = tmp_path / "run"
    overrides = [*recipe_overrides(ROOT / RECIPE), f"output_dir={out}", "train.device=cpu", "train.num_threads=1"]
    overrides += ["logging.progress_bar=false", "logging.tensorboard=false"]
    result = subprocess.run(
        [sys.executable, "-m", "dancecore.cli", "train", RECIPE, *overrides],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    [record] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert math.isfinite(record["reward/hps-v2.1"])
    # CFG inside predict: the first update sees exactly the rollout's log-probs.
    assert record["ratio_mean"] == 1.0 and math.isfinite(record["grad_norm"]) and record["grad_norm"] > 0
    assert record["reward_failures"] == 0 and record["skipped_updates"] == 0
