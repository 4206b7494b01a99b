"""Checks of a config against the machine: prompt files beside the config (or in the working
directory), and a training device this machine has, both at ``dancecore validate``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from dancecore.config.schema import ConfigError, load_run
from dancecore.training.prompts import load_prompts
from tests.conftest import ROOT, TINY_RUN, deep_update


def _config(directory: Path, **updates) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "run.yaml"
    path.write_text(yaml.safe_dump({**deep_update(TINY_RUN, {"output_dir": "out"}), **updates}))
    return path


def _errors(path: Path, *overrides: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_run(path, list(overrides))
    return info.value.errors


def test_a_prompt_file_beside_the_config_is_found_from_any_working_directory(tmp_path, monkeypatch):
    config = _config(tmp_path / "runs" / "cats", prompts={"path": "prompts.txt"})
    (tmp_path / "runs" / "cats" / "prompts.txt").write_text("a cat\na kitten\n")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    run = load_run(config)
    assert run.config.prompts.path == tmp_path / "runs" / "cats" / "prompts.txt"
    assert [p.text for p in load_prompts(run.config.prompts)] == ["a cat", "a kitten"]
    assert run.config.output_dir == Path("out"), "outputs stay relative to the working directory"


def test_a_path_relative_to_the_working_directory_still_works_and_the_configs_directory_wins(tmp_path, monkeypatch):
    config = _config(tmp_path / "configs", prompts={"path": "data/p.txt"}, eval={"prompts": "data/p.txt"})
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "p.txt").write_text("from the working directory\n")
    monkeypatch.chdir(tmp_path)
    run = load_run(config)
    assert run.config.prompts.path == Path("data/p.txt") and run.config.eval.prompts == Path("data/p.txt")
    (tmp_path / "configs" / "data").mkdir()
    (tmp_path / "configs" / "data" / "p.txt").write_text("beside the config\n")
    run = load_run(config)
    assert [p.text for p in load_prompts(run.config.prompts)] == ["beside the config"]
    assert run.config.eval.prompts == tmp_path / "configs" / "data" / "p.txt"


def test_a_missing_prompt_file_names_the_key_and_both_places(tmp_path, monkeypatch):
    config = _config(tmp_path / "configs", prompts={"path": "nope.txt"}, eval={"prompts": "gone.txt"})
    monkeypatch.chdir(tmp_path)
    errors = _errors(config)
    assert len(errors) == 2
    assert errors[0].startswith("prompts.path: prompt file not found: nope.txt")
    assert str(tmp_path / "configs") in errors[0] and f"working directory {tmp_path}" in errors[0]
    assert errors[1].startswith("eval.prompts: prompt file not found: gone.txt")


def test_the_bundled_recipes_read_their_prompts_from_the_repository_root(monkeypatch):
    pytest.importorskip("dancecore_flux")
    monkeypatch.chdir(ROOT)
    run = load_run(Path("configs/smoke.yaml"))
    assert run.config.prompts.path == Path("configs/prompts/quickstart.txt")


@pytest.mark.parametrize("device", ["tpu:7", "cuda0", "gpu"])
def test_an_unknown_device_is_a_config_error_naming_the_key(tmp_path, device):
    (message,) = _errors(_config(tmp_path), f"train.device={device}")
    assert message.startswith(f"train.device: unknown device '{device}'")


def test_cuda_without_a_gpu_is_a_config_error_at_validate(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (message,) = _errors(_config(tmp_path), "train.device=cuda")
    assert message.startswith("train.device: 'cuda' but this machine has no usable CUDA GPU")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    (message,) = _errors(_config(tmp_path), "train.device=cuda:2")
    assert message == "train.device: 'cuda:2' but this machine has 2 CUDA GPU(s) (cuda:0 to cuda:1)"
    assert load_run(_config(tmp_path), ["train.device=cuda:1"]).config.train.device == "cuda:1"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_validate_refuses_tpu_and_cuda_on_this_machine_with_exit_code_2(tmp_path, capsys):
    from dancecore.cli import _main

    config = _config(tmp_path)
    for device in ("tpu:7", "cuda"):
        assert _main(["validate", str(config), f"train.device={device}"]) == 2
        err = capsys.readouterr().err
        assert f"  train.device: {device!r}" in err.replace("unknown device ", "") and "Traceback" not in err


def test_frame_count_check_names_the_key_and_the_nearest_valid_counts():
    import dancecore

    for ok in (None, 1, 5, 53):
        dancecore.check_frame_count("num_frames", ok, 4)
    with pytest.raises(ValueError, match=r"num_frames must be 4k \+ 1 .*got 7 \(try 5 or 9\)"):
        dancecore.check_frame_count("num_frames", 7, 4)
    with pytest.raises(ValueError, match=r"frames must be 8k \+ 1 .*got 4 \(try 1 or 9\)"):
        dancecore.check_frame_count("frames", 4, 8)
