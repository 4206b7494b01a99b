"""Lifecycle hooks, through a fixture hook plugin installed on a private site directory."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from tests.conftest import TINY_RUN, deep_update, run_cli

SITE = Path(__file__).parent / "fixtures" / "hooks_site"


def _env(log: Path) -> dict[str, str]:
    return {
        "PYTHONPATH": os.pathsep.join([str(SITE), os.environ.get("PYTHONPATH", "")]),
        "DANCECORE_HOOK_LOG": str(log),
    }


@pytest.mark.slow
def test_hooks_see_the_run_in_order(tmp_path: Path) -> None:
    log = tmp_path / "hooks.jsonl"
    config = tmp_path / "run.yaml"
    data = deep_update(
        TINY_RUN, {"output_dir": str(tmp_path / "out"), "train": {"iterations": 2, "checkpoint_every": 1}}
    )
    config.write_text(yaml.safe_dump(json.loads(json.dumps(data, default=str))))
    result = run_cli("train", str(config), env=_env(log))
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert [e["event"] for e in events] == [
        "run_start",
        "iteration_end",
        "checkpoint_saved",
        "iteration_end",
        "checkpoint_saved",
        "run_end",
    ]
    assert events[0]["iterations"] == 2 and events[-1]["status"] == "finished"
    assert [e["iteration"] for e in events if e["event"] == "checkpoint_saved"] == [1, 2]
    assert all(e["exists"] for e in events if e["event"] == "checkpoint_saved")
    assert all(e["has_reward"] for e in events if e["event"] == "iteration_end")


def test_a_hook_plugin_adds_a_command(tmp_path: Path) -> None:
    result = run_cli("hello-hooks", env=_env(tmp_path / "unused.jsonl"))
    assert result.returncode == 0 and "hello from a hook plugin" in result.stdout, result.stderr


def test_a_blocked_hook_plugin_is_not_loaded(tmp_path: Path) -> None:
    env = {**_env(tmp_path / "unused.jsonl"), "DANCECORE_BLOCK_PLUGINS": "hook-fixture"}
    result = run_cli("hello-hooks", env=env)
    assert result.returncode != 0 and "hello from a hook plugin" not in result.stdout
