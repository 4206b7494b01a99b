"""configs/sd3: the recipe validates with Flow-GRPO's settings, and the tiny-preset command in its
header trains one iteration end to end through the CLI (with a held-out evaluation at 3 steps)."""

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
RECIPE = "configs/sd3/pickscore.yaml"


@pytest.fixture(autouse=True)
def _at_the_root(monkeypatch):
    pytest.importorskip("dancecore_rewards_pickscore", reason="install plugins/dancecore-rewards-pickscore")
    monkeypatch.chdir(ROOT)


def test_recipe_has_flow_grpo_settings():
    run = load_run(ROOT / RECIPE)
    policy, sampler, grpo = run.policy.config, run.sampler.config, run.optimizer.config
    assert run.policy.name == "sd3" and policy.pretrained == "stabilityai/stable-diffusion-3.5-medium"
    assert (policy.resolution, policy.guidance_scale) == (512, 4.5)
    assert policy.lora is not None and (policy.lora.rank, policy.lora.alpha) == (32, 64)
    assert (run.sampler.name, sampler.num_steps, sampler.shift, sampler.eta, sampler.noise) == (
        "flow-sde",
        10,
        3.0,
        0.7,
        "flow-grpo",
    )
    assert run.config.eval is not None and run.config.eval.num_steps == 40
    assert (grpo.group_size, grpo.timestep_fraction, grpo.clip_range, grpo.kl_beta) == (24, 0.99, 1e-4, 0.01)
    assert run.config.train.ema is not None and run.config.train.ema.decay == 0.9
    assert [r.name for r in run.config.rewards] == ["pickscore"]


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
    assert math.isfinite(record["reward/pickscore"])
    # CFG inside predict: the first update sees exactly the rollout's log-probs.
    assert record["ratio_mean"] == 1.0 and math.isfinite(record["grad_norm"]) and record["grad_norm"] > 0
    assert record["reward_failures"] == 0 and record["skipped_updates"] == 0
    evaluations = sorted(p.name for p in (out / "eval").iterdir() if p.is_dir())
    assert evaluations == ["iter-000000", "iter-000001"], evaluations
