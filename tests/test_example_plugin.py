"""The documented third-party reward plugin installs, passes the conformance kit and trains."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from tests.conftest import ROOT, TINY_RUN, deep_update, run_cli

EXAMPLE = ROOT / "examples" / "dancecore-reward-colorfulness"


@pytest.fixture(scope="module")
def installed_example(tmp_path_factory):
    """Install the example into a private directory (not the shared venv) and return it."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(EXAMPLE),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return target


def _env(target):
    return {"PYTHONPATH": os.pathsep.join([str(target), str(ROOT)])}


def test_example_is_about_thirty_lines():
    code = (EXAMPLE / "dancecore_reward_colorfulness" / "__init__.py").read_text().splitlines()
    assert len(code) <= 35


def test_example_passes_its_own_conformance_tests(installed_example):
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE / "tests")],
        env={**os.environ, **_env(installed_example)},
        capture_output=True,
        text=True,
        cwd=installed_example,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_example_is_listed_and_trains(installed_example, tmp_path):
    listed = run_cli("plugins", env=_env(installed_example))
    assert "colorfulness" in listed.stdout and "dancecore-reward-colorfulness 0.1.0" in listed.stdout
    data = deep_update(TINY_RUN, {"output_dir": str(tmp_path / "out"), "train": {"iterations": 1}})
    data["rewards"] = [{"name": "colorfulness", "scale": 2.0}]
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(data))
    result = run_cli("train", str(config), env=_env(installed_example))
    assert result.returncode == 0, result.stderr
    record = yaml.safe_load((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[0])
    assert record["reward/colorfulness"] > 0
