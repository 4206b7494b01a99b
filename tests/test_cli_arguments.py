"""Command-line arguments as users type them: overrides after the options, and clear messages
when a named checkpoint does not exist."""

from __future__ import annotations

import json

import pytest
import yaml

from dancecore.cli import _main, build_parser, parse_arguments
from tests.conftest import TINY_RUN, deep_update


def _config(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(deep_update(TINY_RUN, {"output_dir": str(tmp_path / "out")})))
    return path


def test_overrides_may_follow_the_options():
    args = parse_arguments(build_parser(), ["train", "run.yaml", "seed=1", "--resume", "train.iterations=5", "seed=2"])
    assert args.resume and args.config == "run.yaml"
    assert args.overrides == ["seed=1", "train.iterations=5", "seed=2"], "later overrides win, as typed"
    args = parse_arguments(build_parser(), ["eval", "run.yaml", "--checkpoint", "latest", "seed=4"])
    assert args.checkpoint == "latest" and args.overrides == ["seed=4"]


@pytest.mark.parametrize(
    "argv", [["train", "run.yaml", "--resume", "--bogus"], ["train", "run.yaml", "--resume", "stray"], ["ls", "a=b"]]
)
def test_anything_else_after_the_options_is_still_refused(argv, capsys):
    with pytest.raises(SystemExit) as info:
        parse_arguments(build_parser(), argv)
    assert info.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def test_train_resume_with_an_override_after_the_flag_trains(tmp_path):
    assert _main(["train", str(_config(tmp_path)), "--resume", "train.iterations=1"]) == 0
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == [0]


def test_eval_latest_without_a_checkpoint_says_so(tmp_path, capsys):
    assert _main(["eval", str(_config(tmp_path)), "--checkpoint", "latest"]) == 2
    err = capsys.readouterr().err
    out = tmp_path / "out"
    assert f"no checkpoint in {out} ({out / 'checkpoints'} holds none)" in err
    assert "[]" not in err and "Traceback" not in err
