"""`dancecore eval`: deterministic scoring of base weights and checkpoints."""

from __future__ import annotations

import json

import yaml

from dancecore.evaluate import evaluate
from dancecore.training.trainer import Trainer
from tests.conftest import TINY_RUN, deep_update, run_cli


def test_eval_is_deterministic_and_sees_the_checkpoint(tiny_run, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\n\na blue sphere\n")
    run = tiny_run("train", train={"iterations": 2, "learning_rate": 3e-2})
    Trainer(run).train()
    base = evaluate(run, prompts, tmp_path / "e1", samples_per_prompt=2)
    again = evaluate(run, prompts, tmp_path / "e2", samples_per_prompt=2)
    tuned = evaluate(run, prompts, tmp_path / "e3", samples_per_prompt=2, checkpoint="latest")
    assert base.rows == again.rows
    assert len(base.rows) == 4 and base.summary["brightness"]["n"] == 4
    assert [r["brightness"] for r in tuned.rows] != [r["brightness"] for r in base.rows]
    for name in ("results.json", "results.csv", "results.md", "grid.png"):
        assert (tmp_path / "e1" / name).is_file()
    table = (tmp_path / "e1" / "results.md").read_text()
    assert "| brightness |" in table
    assert json.loads((tmp_path / "e3" / "results.json").read_text())["weights"].endswith("iter-00000002")


def test_eval_cli_and_bad_prompt_file(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(deep_update(TINY_RUN, {"output_dir": str(tmp_path / "out")})))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt key"}\n')
    result = run_cli("eval", str(config), "--prompts", str(bad))
    assert result.returncode == 2 and "bad.jsonl:2" in result.stderr and "Traceback" not in result.stderr
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "a red cube"}\n')
    result = run_cli("eval", str(config), "--prompts", str(good), "--output", str(tmp_path / "ev"))
    assert result.returncode == 0, result.stderr
    assert "| brightness |" in result.stdout and (tmp_path / "ev" / "grid.png").is_file()
