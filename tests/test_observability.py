"""TensorBoard by default (rank 0 only), wandb only when asked for, the progress bar's ETA."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch

from dancecore.config.schema import apply_overrides, load_yaml_file, validate
from dancecore.outputs.observers import ObservabilityError, Observers, open_observers, scalar_tags

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "configs" / "smoke.yaml"
TINY = ["train.prompts_per_iteration=1", "optimizer.group_size=4", "sampler.num_steps=4"]


def _config(tmp_path: Path, *overrides: str):  # -> ResolvedRun
    pytest.importorskip("dancecore_flux")
    data = load_yaml_file(QUICKSTART)
    apply_overrides(data, [f"output_dir={tmp_path / 'run'}", *TINY, *overrides])
    return validate(data)


def test_scalar_tags_group_metrics_and_phases() -> None:
    record = {
        "iteration": 3,
        "reward_mean": 0.5,
        "reward/hps": 0.3,
        "clip_fraction": 0.1,
        "grad_norm": 2.0,
        "seconds": 1.5,
        "skipped_updates": 1,
        "new_counter": 4.0,
        "note": "text",
        "flag": True,
        "time/rollout_s": 0.7,
        "time/update_s": 0.6,
    }
    tags = scalar_tags(record)
    assert tags == {
        "reward/mean": 0.5,
        "reward/hps": 0.3,
        "train/clip_fraction": 0.1,
        "train/grad_norm": 2.0,
        "time/iteration_s": 1.5,
        "health/skipped_updates": 1.0,
        "metrics/new_counter": 4.0,
        "time/rollout_s": 0.7,
        "time/update_s": 0.6,
    }


def test_training_writes_tensorboard_scalars_and_sample_images_with_an_eta_bar(tmp_path: Path, capsys) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dancecore.training.trainer import Trainer

    run = _config(tmp_path, "train.iterations=3", "train.sample_every=1", "logging.progress_bar=true")
    assert Trainer(run).train(log=lambda message: None) == "finished"
    assert "ETA" in capsys.readouterr().err  # tqdm writes the bar to stderr

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for tag in (
        "reward/mean",
        "reward/brightness",
        "train/clip_fraction",
        "train/grad_norm",
        "time/rollout_s",
        "time/update_s",
        "time/iteration_s",
    ):
        assert tag in scalars, sorted(scalars)
    assert [e.step for e in events.Scalars("reward/mean")] == [0, 1, 2]
    images = events.Images("samples")
    assert [e.step for e in images] == [0, 1, 2]
    assert images[0].width == 4 * 32 and images[0].height == 32  # one row of G = 4 samples at 32 px


def test_other_ranks_write_nothing(tmp_path: Path) -> None:
    observers = open_observers(_config(tmp_path).config, tmp_path / "run", enabled=False)
    observers.scalars(0, {"reward_mean": 1.0})
    observers.close()
    assert observers.writers == [] and not (tmp_path / "run" / "tensorboard").exists()


def _hide_module(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Make ``import name`` fail as if the package were not installed."""
    monkeypatch.setitem(sys.modules, name, None)


def test_the_default_install_has_tensorboard_so_the_quickstart_logs_without_a_note(tmp_path: Path) -> None:
    import tomllib

    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.split(">")[0].split("=")[0].split(" ")[0] == "tensorboard" for d in dependencies)
    messages: list[str] = []
    observers = open_observers(_config(tmp_path).config, tmp_path / "run", log=messages.append)
    try:
        assert messages == []
        assert [type(w).__name__ for w in observers.writers] == ["TensorBoardWriter"]
    finally:
        observers.close()


def test_missing_tensorboard_by_default_is_a_note_not_a_failure(tmp_path: Path, monkeypatch) -> None:
    _hide_module(monkeypatch, "torch.utils.tensorboard")
    messages: list[str] = []
    observers = open_observers(_config(tmp_path).config, tmp_path / "run", log=messages.append)
    assert observers.writers == []
    assert len(messages) == 1 and "pip install 'dancecore[tensorboard]'" in messages[0]


def test_missing_tensorboard_asked_for_explicitly_is_an_error(tmp_path: Path, monkeypatch) -> None:
    _hide_module(monkeypatch, "torch.utils.tensorboard")
    with pytest.raises(ObservabilityError, match="logging.tensorboard=false"):
        open_observers(_config(tmp_path, "logging.tensorboard=true").config, tmp_path / "run")


def test_wandb_is_not_imported_unless_enabled(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    open_observers(_config(tmp_path, "logging.tensorboard=false").config, tmp_path / "run").close()
    assert "wandb" not in sys.modules


def test_wandb_missing_is_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    _hide_module(monkeypatch, "wandb")
    with pytest.raises(ObservabilityError, match=r"pip install 'dancecore\[wandb\]'"):
        open_observers(_config(tmp_path, "logging.tensorboard=false", "logging.wandb=true").config, tmp_path / "run")


def test_wandb_receives_scalars_and_images(tmp_path: Path, monkeypatch) -> None:
    calls: list[tuple] = []

    class FakeRun:
        def log(self, values, step):
            calls.append(("log", step, values))

        def finish(self):
            calls.append(("finish",))

    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: calls.append(("init", kwargs["project"])) or FakeRun()  # type: ignore[attr-defined]
    fake.Image = lambda array: ("image", array.shape)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "wandb", fake)
    config = _config(tmp_path, "logging.tensorboard=false", "logging.wandb=true", "logging.wandb_project=demo").config
    observers = open_observers(config, tmp_path / "run")
    observers.scalars(5, {"iteration": 5, "reward_mean": 0.25, "time/rollout_s": 0.1})
    observers.images(5, torch.zeros(2, 3, 8, 8), columns=2)
    observers.close()
    assert calls[0] == ("init", "demo")
    assert calls[1] == ("log", 5, {"reward/mean": 0.25, "time/rollout_s": 0.1})
    assert calls[2] == ("log", 5, {"samples": ("image", (8, 16, 3))})
    assert calls[3] == ("finish",)


def test_a_failing_backend_is_dropped_with_one_warning() -> None:
    class Broken:
        def scalars(self, step, values):
            raise OSError("disk full")

        def image(self, step, tag, image):
            raise AssertionError("not reached")

        def close(self):
            raise AssertionError("not reached")

    messages: list[str] = []
    observers = Observers([Broken()], log=messages.append)
    observers.scalars(0, {"reward_mean": 1.0})
    observers.scalars(1, {"reward_mean": 1.0})
    observers.images(1, torch.zeros(1, 3, 4, 4))
    observers.close()
    assert len(messages) == 1 and "disk full" in messages[0]
