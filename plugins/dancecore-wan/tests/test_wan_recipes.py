"""configs/wan-t2v: both recipes validate with their settings, the tiny-preset commands in their
headers validate, and the one-frame HPS recipe trains one iteration end to end through the CLI."""

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
T2I, VIDEO = "configs/wan-t2v/hps_t2i.yaml", "configs/wan-t2v/videoalign_14b.yaml"


@pytest.fixture(autouse=True)
def _at_the_root(monkeypatch):
    pytest.importorskip("dancecore_rewards_hps", reason="install plugins/dancecore-rewards-hps")
    pytest.importorskip("dancecore_rewards_videoalign", reason="install plugins/dancecore-rewards-videoalign")
    monkeypatch.chdir(ROOT)


def test_t2i_recipe_has_dancegrpo_settings():
    run = load_run(ROOT / T2I)
    policy, sampler, grpo = run.policy.config, run.sampler.config, run.optimizer.config
    assert (run.policy.name, policy.pretrained) == ("wan-t2v", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
    assert (policy.height, policy.width, policy.num_frames, policy.guidance_scale) == (512, 512, 1, 5.0)
    assert "worst quality" in policy.negative_prompt
    assert (sampler.num_steps, sampler.shift, sampler.eta) == (20, 3.0, 0.3)
    assert (grpo.group_size, grpo.timestep_fraction, grpo.clip_range) == (12, 0.6, 1e-4)
    assert [r.name for r in run.config.rewards] == ["hps-v2.1"]


def test_video_recipe_is_the_14b_model_with_the_video_settings():
    run = load_run(ROOT / VIDEO)
    policy, grpo = run.policy.config, run.optimizer.config
    assert policy.pretrained == "Wan-AI/Wan2.1-T2V-14B-Diffusers" and policy.num_frames == 33
    assert (policy.height, policy.width, policy.guidance_scale) == (480, 832, 5.0)
    assert (grpo.group_size, grpo.best_of) == (24, 4)
    assert [r.display_name for r in run.config.rewards] == ["VQ", "MQ"]


@pytest.mark.parametrize("recipe", [T2I, VIDEO])
def test_header_command_validates_with_tiny_presets(recipe):
    run = load_run(ROOT / recipe, recipe_overrides(ROOT / recipe))
    assert run.policy.config.preset == "tiny" and all(r.config.preset == "tiny" for r in run.rewards)


@pytest.mark.slow
def test_t2i_header_command_trains_one_iteration(tmp_path):
    out = tmp_path / "run"
    overrides = [*recipe_overrides(ROOT / T2I), f"output_dir={out}", "train.device=cpu", "train.num_threads=1"]
    overrides += ["logging.progress_bar=false", "logging.tensorboard=false"]
    result = subprocess.run(
        [sys.executable, "-m", "dancecore.cli", "train", T2I, *overrides],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    [record] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert math.isfinite(record["reward/hps-v2.1"])
    assert record["ratio_mean"] == 1.0 and math.isfinite(record["grad_norm"]) and record["grad_norm"] > 0
    assert record["reward_failures"] == 0 and record["skipped_updates"] == 0
    assert list((out / "checkpoints").iterdir())
