"""The command line: clear one-line errors with exit code 2, plugin listing without imports."""

from __future__ import annotations

import yaml

from tests.conftest import ROOT, TINY_RUN, deep_update, run_cli


def _write(tmp_path, data, name="run.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_validate_ok(tmp_path):
    path = _write(tmp_path, {**TINY_RUN, "output_dir": str(tmp_path / "out")})
    result = run_cli("validate", str(path))
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout and "testing-tiny" in result.stdout
    assert not (tmp_path / "out").exists(), "validate must not create outputs or load models"


def test_validate_reports_every_error_without_traceback(tmp_path):
    data = deep_update(TINY_RUN, {"output_dir": str(tmp_path / "out"), "polcy": {"name": "flux"}})
    data["train"]["iterations"] = "ten"
    data["rewards"][0]["name"] = "brightnes"
    data["prompts"] = {"path": str(tmp_path / "nope.txt")}
    result = run_cli("validate", str(_write(tmp_path, data)))
    assert result.returncode == 2
    err = result.stderr
    assert "Traceback" not in err
    for expected in ("polcy: unknown key", "train.iterations", "rewards[0].name", "brightnes"):
        assert expected in err, (expected, err)


def test_missing_config_file(tmp_path):
    result = run_cli("train", str(tmp_path / "missing.yaml"))
    assert result.returncode == 2 and "config file not found" in result.stderr and "Traceback" not in result.stderr


def test_bad_override_is_a_clear_error(tmp_path):
    path = _write(tmp_path, {**TINY_RUN, "output_dir": str(tmp_path / "out")})
    result = run_cli("validate", str(path), "train.iterationz=3")
    assert result.returncode == 2 and "train.iterationz: unknown key" in result.stderr


def test_plugins_lists_packages_and_versions():
    result = run_cli("plugins")
    assert result.returncode == 0
    assert "flow-sde" in result.stdout and "dancecore 0.1.0" in result.stdout and "dancecore-flux" in result.stdout


def test_train_then_resume_via_cli(tmp_path):
    data = deep_update(TINY_RUN, {"output_dir": str(tmp_path / "out")})
    path = _write(tmp_path, data)
    first = run_cli("train", str(path), "train.iterations=1")
    assert first.returncode == 0, first.stderr
    second = run_cli("train", str(path), "train.iterations=2", "--resume")
    assert second.returncode == 0, second.stderr
    assert "resumed from iter-00000001" in second.stdout + second.stderr
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2


def test_a_fresh_run_refuses_an_earlier_runs_output_dir(tmp_path):
    data = deep_update(TINY_RUN, {"output_dir": str(tmp_path / "out")})
    path = _write(tmp_path, data)
    assert run_cli("train", str(path), "train.iterations=1").returncode == 0
    metrics = (tmp_path / "out" / "metrics.jsonl").read_text()
    again = run_cli("train", str(path), "train.iterations=1")
    assert again.returncode == 2, again.stderr
    assert (
        "already holds a run" in again.stderr and "--resume" in again.stderr and str(tmp_path / "out") in again.stderr
    )
    assert "Traceback" not in again.stderr
    assert (tmp_path / "out" / "metrics.jsonl").read_text() == metrics  # the earlier run is untouched
    shown = run_cli("train", str(path), "train.iterations=1", "--resume")  # what `make quickstart` runs
    assert shown.returncode == 0, shown.stderr
    assert "resumed from iter-00000001" in shown.stdout + shown.stderr
    assert (tmp_path / "out" / "metrics.jsonl").read_text() == metrics  # a finished run is shown, not retrained


def test_missing_weights_directory_is_a_clear_error(tmp_path):
    data = deep_update(TINY_RUN, {"output_dir": str(tmp_path / "out")})
    data["policy"] = {"name": "flux", "pretrained": str(tmp_path / "no-such-flux")}
    result = run_cli("train", str(_write(tmp_path, data)))
    assert result.returncode == 2, result.stderr
    assert "no-such-flux" in result.stderr and "Traceback" not in result.stderr


def test_ls_lists_recipes():
    result = run_cli("ls")
    assert result.returncode == 0 and "quickstart.yaml" in result.stdout
    assert (ROOT / "configs" / "quickstart.yaml").is_file()


def test_validate_reports_deepspeed_passthrough_conflicts(tmp_path):
    data = deep_update(TINY_RUN, {"output_dir": str(tmp_path / "out")})
    data["distributed"] = {"backend": "deepspeed", "zero_stage": 2, "deepspeed_config": {"fp16": {"enabled": True}}}
    result = run_cli("validate", str(_write(tmp_path, data)))
    assert result.returncode == 2 and "distributed.deepspeed_config.fp16" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
