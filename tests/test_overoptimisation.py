"""The over-optimisation alarm on real training: configs/shapes/hacked.yaml (partial credit plus
brightness x 10, a hackable proxy) fires it; the honest run (no proxy: brightness weight 0, and
configs/shapes/grpo.yaml's learning rate 1e-4) does not. Shortened for CI: 3 iterations,
evaluations at 0, 1, 2 and 3 on 32 held-out captions (the recipe's window 2 and margin 0.1).
The full runs' figures are in docs/evaluation.md."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "configs" / "shapes" / "hacked.yaml"


def _train(tmp_path: Path, name: str, *extra: str) -> list[dict]:
    pytest.importorskip("dancecore_shapes", reason="install plugins/dancecore-shapes")
    pytest.importorskip("dancecore_flux", reason="install plugins/dancecore-flux")
    from dancecore.config.schema import load_run
    from dancecore.training.trainer import Trainer

    held_out = tmp_path / "held_out.txt"
    if not held_out.exists():
        captions = (ROOT / "configs" / "prompts" / "shapes_heldout.txt").read_text().splitlines()
        held_out.write_text("\n".join(captions[:32]) + "\n")
    overrides = [
        f"output_dir={tmp_path / name}",
        "train.iterations=3",
        "train.checkpoint_every=3",
        "train.sample_every=3",
        "eval.every=1",
        f"eval.prompts={held_out}",
        "logging.progress_bar=false",
        "logging.tensorboard=false",
        *extra,
    ]
    Trainer(load_run(RECIPE, overrides)).train(log=lambda *a: None)
    return [json.loads(line) for line in (tmp_path / name / "eval" / "history.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_the_alarm_fires_on_the_hacked_proxy_and_not_on_the_honest_run(tmp_path):
    hacked = _train(tmp_path, "hacked")
    assert [h["iteration"] for h in hacked] == [0, 1, 2, 3]
    assert hacked[-1]["eval/brightness"] > hacked[0]["eval/brightness"]  # the proxy was hacked
    assert hacked[-1]["eval/shapes_partial"] < hacked[0]["eval/shapes_partial"] - 0.1  # gold fell
    assert any("over-optimisation alarm" in h.get("alarm", "") for h in hacked)
    honest = _train(tmp_path, "honest", "rewards[1].weight=0.0", "train.learning_rate=1.0e-4")
    assert not any("alarm" in h for h in honest), honest
