"""Shared fixtures: a tiny run config on the torch-only ``testing-tiny`` policy (no diffusers, no
plugin needed) that trains in milliseconds per iteration on CPU. Tests that need a real
architecture name ``{"name": "flux", "preset": "tiny"}`` (see ``TINY_FLUX``)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent

TINY_RUN: dict[str, Any] = {
    "seed": 3,
    "prompts": {"texts": ["a red cube", "a blue sphere", "a green cone", "a yellow torus"]},
    "policy": {"name": "testing-tiny"},
    "sampler": {"name": "flow-sde", "num_steps": 4, "shift": 3.0, "eta": 0.3},
    "optimizer": {"name": "grpo", "group_size": 4, "clip_range": 1e-3, "timestep_fraction": 0.6},
    "rewards": [{"name": "brightness", "weight": 1.0}],
    "train": {
        "iterations": 2,
        "prompts_per_iteration": 2,
        "micro_batch_size": 4,
        "learning_rate": 1e-3,
        "checkpoint_every": 1,
        "num_threads": 1,
    },
    "logging": {"progress_bar": False, "tensorboard": False},
}


#: The policy block of a tiny FLUX of the real architecture (needs plugins/dancecore-flux).
TINY_FLUX: dict[str, Any] = {"name": "flux", "preset": "tiny"}


def deep_update(base: dict[str, Any], updates: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge ``updates`` into a copy of ``base``."""
    out = copy.deepcopy(base)
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_update(out[key], value)
        else:
            out[key] = value
    return out


@pytest.fixture
def tiny_run(tmp_path: Path):
    """Factory: a validated tiny run (``ResolvedRun``) writing under ``tmp_path``."""
    from dancecore.config.schema import validate

    def make(output: str = "run", **updates: Any):
        data = deep_update(TINY_RUN, {"output_dir": str(tmp_path / output), **updates})
        return validate(data)

    return make


def run_cli(
    *args: str, cwd: Path = ROOT, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run the ``dancecore`` CLI in a subprocess (same interpreter), capturing output."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "dancecore.cli", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` need CUDA: without it they are skipped, saying so."""
    gpu_tests = [item for item in items if "gpu" in item.keywords]
    if not gpu_tests:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible); run `make gpu-check` on a GPU machine")
    for item in gpu_tests:
        item.add_marker(skip)
