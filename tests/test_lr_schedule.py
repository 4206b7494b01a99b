"""The learning-rate schedule: linear warmup, then constant or a cosine decay, counted in applied updates."""

from __future__ import annotations

import math

import pytest
import torch

from dancecore.config.schema import ConfigError, validate
from dancecore.training.lr_schedule import WarmupSchedule
from tests.conftest import TINY_RUN, deep_update


def _rates(schedule: WarmupSchedule, updates: int) -> list[float]:
    rates = []
    for _ in range(updates):
        rates.append(schedule.learning_rate())
        schedule.step()
    return rates


def test_constant_schedule_leaves_the_optimizer_alone():
    schedule = WarmupSchedule(1e-3)
    assert not schedule.active
    assert _rates(schedule, 3) == [1e-3] * 3


def test_warmup_then_cosine_matches_the_formula_written_out():
    # warmup 2, decay ends at update 6, floor 10 %: updates 0,1 warm up; 2..6 follow the cosine
    schedule = WarmupSchedule(1.0, warmup_updates=2, decay_updates=6, min_ratio=0.1)
    expected = [0.5, 1.0]
    for updates in range(2, 8):
        progress = min(1.0, (updates - 2) / 4)
        expected.append(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
    assert _rates(schedule, 8) == pytest.approx(expected, abs=1e-12)
    assert (
        expected[2] == pytest.approx(1.0) and expected[4] == pytest.approx(0.55) and expected[-1] == pytest.approx(0.1)
    )


def test_apply_sets_every_parameter_group_and_resume_restores_the_counter():
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:]}], lr=5.0)
    schedule = WarmupSchedule(2.0, decay_updates=4)
    _rates(schedule, 2)
    restored = WarmupSchedule(2.0, decay_updates=4)
    restored.load_state_dict(schedule.state_dict())
    restored.apply(optimizer)
    assert [g["lr"] for g in optimizer.param_groups] == [pytest.approx(1.0)] * 2  # halfway down the cosine


def test_decay_must_end_after_the_warmup():
    with pytest.raises(ValueError, match="after the warmup"):
        WarmupSchedule(1.0, warmup_updates=5, decay_updates=5)


def _train_errors(tmp_path, **train) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validate(deep_update(TINY_RUN, {"output_dir": str(tmp_path), "train": train}))
    return info.value.errors


def test_config_defaults_the_horizon_to_the_iterations_and_names_bad_keys(tmp_path):
    run = validate(deep_update(TINY_RUN, {"output_dir": str(tmp_path), "train": {"lr_decay": "cosine"}}))
    assert run.config.train.decay_updates == run.config.train.iterations
    assert any("train.lr_decay" in e for e in _train_errors(tmp_path, lr_decay="linear"))
    split = _train_errors(tmp_path, lr_decay="cosine", samples_per_update=2)
    assert any("lr_decay_updates must be set" in e for e in split)
    early = _train_errors(tmp_path, lr_decay="cosine", lr_warmup_updates=10, lr_decay_updates=4)
    assert any("not after the warmup" in e for e in early)
