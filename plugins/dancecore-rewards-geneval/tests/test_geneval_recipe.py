"""configs/eval/geneval.yaml: the documented tiny-preset `dancecore eval` command runs end to end
(tiny FLUX, tiny Mask2Former and CLIP) and prints GenEval's six-task table."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from dancecore_rewards_geneval.prompts import TASKS, generate_suite, write_jsonl

ROOT = Path(__file__).resolve().parents[3]
RECIPE = ROOT / "configs" / "eval" / "geneval.yaml"


def header_command(path: Path) -> list[str]:
    """The words of the ``# dancecore eval ... policy.preset=tiny ...`` command of the header."""
    lines = [line.lstrip("#").strip() for line in path.read_text().splitlines() if line.startswith("#")]
    start = next(i for i, line in enumerate(lines) if line.startswith("dancecore eval") and "preset=tiny" in line)
    command = ""
    for line in lines[start:]:
        command += " " + line.rstrip("\\")
        if not line.endswith("\\"):
            break
    return shlex.split(command)


@pytest.mark.slow
def test_the_tiny_geneval_eval_prints_the_six_task_table(tmp_path):
    pytest.importorskip("dancecore_flux", reason="install plugins/dancecore-flux")
    words = header_command(RECIPE)
    assert words[:3] == ["dancecore", "eval", "configs/eval/geneval.yaml"]
    suite = generate_suite()
    one_per_task = [next(s for s in suite if s.tag == t) for t in TASKS]
    write_jsonl(one_per_task, tmp_path / "six.jsonl")
    args = [w for w in words[3:] if not w.startswith("--output") and not w.startswith("outputs/")]
    result = subprocess.run(
        [sys.executable, "-m", "dancecore.cli", "eval", str(RECIPE), *args, "train.num_threads=1"]
        + ["--prompts", str(tmp_path / "six.jsonl"), "--output", str(tmp_path / "ev")],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    for task in [*TASKS, "overall"]:
        assert f"| {task} | 0.0000 |" in result.stdout  # random weights: nothing passes the thresholds
    rows = json.loads((tmp_path / "ev" / "results.json").read_text())["samples"]
    assert [r["group/geneval"] for r in rows] == list(TASKS)  # one sample per prompt (--samples-per-prompt 1)
