"""`dancecore eval --compare A B`: the difference of two evaluations and its standard error."""

from __future__ import annotations

import json
import math

import pytest

from dancecore.cli import main
from dancecore.evaluate import evaluate
from dancecore.outputs.compare import CompareError, compare_results, format_comparison
from dancecore.training.trainer import Trainer


def _results(path, scores, prompts=None, groups=None):
    prompts = prompts or [f"p{i}" for i in range(len(scores))]
    rows = []
    for i, (prompt, score) in enumerate(zip(prompts, scores, strict=True)):
        row = {"prompt_index": i, "sample": 0, "prompt": prompt, "r": score}
        if groups:
            row["group/r"] = groups[i]
        rows.append(row)
    summary = {"r": {"mean": sum(scores) / len(scores), "std": 0.0, "n": float(len(scores))}}
    path.mkdir(parents=True, exist_ok=True)
    (path / "results.json").write_text(json.dumps({"weights": path.name, "summary": summary, "samples": rows}))
    return path


def test_paired_standard_error_by_hand(tmp_path):
    a = _results(tmp_path / "a", [0.0, 1.0, 0.0, 1.0])
    b = _results(tmp_path / "b", [1.0, 1.0, 0.0, 1.0])
    (d,) = compare_results(a, b / "results.json")
    diffs = [1.0, 0.0, 0.0, 0.0]  # per item, B - A
    mean = sum(diffs) / 4
    se = math.sqrt(sum((x - mean) ** 2 for x in diffs) / 3 / 4)
    assert d.paired and d.a == 0.5 and d.b == 0.75 and d.diff == 0.25
    assert d.stderr == pytest.approx(se) and d.z == pytest.approx(0.25 / se)


def test_unpaired_when_the_items_differ(tmp_path):
    a = _results(tmp_path / "a", [0.0, 1.0, 1.0])
    b = _results(tmp_path / "b", [1.0, 1.0], prompts=["q0", "q1"])
    (d,) = compare_results(a, b)
    var_a = sum((x - 2 / 3) ** 2 for x in [0.0, 1.0, 1.0]) / 2
    assert not d.paired and d.stderr == pytest.approx(math.sqrt(var_a / 3 + 0.0 / 2))
    assert "unpaired" in format_comparison([d], "A", "B")


def test_groups_and_their_overall(tmp_path):
    groups = ["x", "x", "y", "y"]
    a = _results(tmp_path / "a", [0.0, 1.0, 0.0, 0.0], groups=groups)
    b = _results(tmp_path / "b", [1.0, 1.0, 1.0, 0.0], groups=groups)
    rows = {d.name: d for d in compare_results(a, b)}
    assert list(rows) == ["r", "r/x", "r/y", "r/overall"]
    assert rows["r/x"].diff == 0.5 and rows["r/y"].diff == 0.5
    assert rows["r/overall"].a == pytest.approx((0.5 + 0.0) / 2) and rows["r/overall"].diff == pytest.approx(0.5)
    expected = math.sqrt(rows["r/x"].stderr ** 2 + rows["r/y"].stderr ** 2) / 2
    assert rows["r/overall"].stderr == pytest.approx(expected) and expected > 0


def test_bad_results_are_named(tmp_path):
    with pytest.raises(CompareError, match="nowhere"):
        compare_results(tmp_path / "nowhere", tmp_path / "nowhere")
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(CompareError, match="not a dancecore eval"):
        compare_results(tmp_path / "x.json", tmp_path / "x.json")


def test_cli_compares_base_and_checkpoint(tiny_run, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\na blue sphere\na green cone\n")
    run = tiny_run("train", train={"iterations": 1, "learning_rate": 3e-2})
    Trainer(run).train()
    evaluate(run, prompts, tmp_path / "base", samples_per_prompt=2)
    evaluate(run, prompts, tmp_path / "tuned", samples_per_prompt=2, checkpoint="latest")
    capsys.readouterr()
    assert main(["eval", "--compare", str(tmp_path / "base"), str(tmp_path / "tuned" / "results.json")]) == 0
    out = capsys.readouterr().out
    (d,) = compare_results(tmp_path / "base", tmp_path / "tuned")
    assert d.paired and d.n == 6 and d.diff != 0 and d.stderr > 0
    assert f"| brightness | {d.a:.4f} | {d.b:.4f} | {d.diff:+.4f} | {d.stderr:.4f} |" in out
    assert main(["eval", "--compare", str(tmp_path / "base"), str(tmp_path / "none")]) == 2
    assert main(["eval"]) == 2
    err = capsys.readouterr().err
    assert "none" in err and "--compare" in err and "Traceback" not in err
