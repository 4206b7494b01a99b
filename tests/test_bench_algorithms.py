"""The time-to-target bookkeeping of benchmarks/algorithms.py, on constructed curves."""

from __future__ import annotations

import pytest

from benchmarks.algorithms import RECIPES, Run, markdown, run_all, summarise, time_to


def _run(recipe: str, seed: int, curve: list[tuple[float, int, float]], calls: int = 10) -> Run:
    run = Run(recipe, seed, step=lambda it: None, evaluate=lambda: 0.0, calls=lambda: calls * curve[-1][1])
    run.curve = curve
    run.iterations = curve[-1][1]
    run.iteration_seconds = [curve[-1][0] / max(1, curve[-1][1])] * curve[-1][1]
    return run


def test_time_to_target_is_the_first_evaluation_at_or_above_it():
    curve = [(0.0, 0, 0.20), (50.0, 5, 0.24), (100.0, 10, 0.35), (150.0, 15, 0.30)]
    assert time_to(curve, 0.25) == 100.0
    assert time_to(curve, 0.35) == 100.0  # at the target counts
    assert time_to(curve, 0.36) is None
    assert time_to(curve, 0.20) == 0.0


def test_summary_and_speedups_over_seeds():
    base = 0.2
    runs = [
        _run("dancegrpo", 0, [(0.0, 0, base), (100.0, 10, 0.26), (200.0, 20, 0.30)]),
        _run("dancegrpo", 1, [(0.0, 0, base), (100.0, 10, 0.22), (200.0, 20, 0.21)]),
        _run("fast", 0, [(0.0, 0, base), (50.0, 10, 0.31), (200.0, 40, 0.40)], calls=4),
        _run("fast", 1, [(0.0, 0, base), (50.0, 10, 0.26), (200.0, 40, 0.38)], calls=4),
    ]
    summary = summarise(runs, base, [0.05, 0.15])
    slow, fast = summary["dancegrpo"], summary["fast"]
    assert slow["time_to_target"]["+0.05"] == {"reached": "1/2", "mean_seconds": 100.0}
    assert slow["time_to_target"]["+0.15"] == {"reached": "0/2", "mean_seconds": None}
    assert fast["time_to_target"]["+0.05"] == {"reached": "2/2", "mean_seconds": 50.0}
    assert fast["time_to_target"]["+0.15"] == {"reached": "2/2", "mean_seconds": 200.0}
    assert fast["final_mean"] == pytest.approx(0.39) and fast["final_std"] == pytest.approx(0.01)
    assert fast["network_calls_per_iteration"] == 4 and fast["seconds_per_iteration"] == 5.0
    table = markdown(summary, base, 200.0, ["dancegrpo"])
    assert "50 s (2/2), 2.0x vs dancegrpo" in table
    assert "not reached (0/2)" in table


def test_round_robin_interleaves_runs_and_evaluates_on_schedule():
    order: list[str] = []
    runs = []
    for name in ("a", "b"):
        run = Run(name, 0, step=lambda it, n=name: order.append(n), evaluate=lambda: 0.5, calls=lambda: 0)
        runs.append(run)
    run_all(runs, base=0.1, budget=1e-3, eval_every=1e9, log=lambda m: None)
    assert order[:2] == ["a", "b"]  # one iteration each in turn
    for run in runs:
        assert run.curve[0] == (0.0, 0, 0.1) and run.curve[-1][2] == 0.5  # base, then the final evaluation
        assert run.seconds >= 1e-3


def test_every_recipe_config_exists():
    for recipe, config in RECIPES.items():
        if config is not None:
            assert config.is_file(), recipe


def test_every_ablation_variant_is_a_valid_config_change():
    from benchmarks.ablations import VARIANTS
    from benchmarks.algorithms import GRPO
    from dancecore.config.schema import load_run

    base = load_run(GRPO, ["output_dir=x"])
    for name, overrides in VARIANTS.items():
        run = load_run(GRPO, [*overrides, "output_dir=x"])
        changed = run.algorithm.config != base.algorithm.config or run.sampler.config != base.sampler.config
        changed = changed or run.rewards[0].config != base.rewards[0].config
        assert changed == bool(overrides), name


def test_workers_share_every_run_exactly_once():
    from benchmarks.algorithms import shard_of

    specs = [(recipe, seed) for seed in range(3) for recipe in RECIPES]
    shards = [shard_of(specs, f"{k}/2") for k in range(2)]
    assert sorted(shards[0] + shards[1]) == sorted(specs)
    assert abs(len(shards[0]) - len(shards[1])) <= 1
    assert {r for r, _ in shards[0]} == set(RECIPES)  # a worker steps every recipe (alternating), not half of them
    assert shard_of(specs, None) == specs
    with pytest.raises(ValueError, match="--shard 2/2"):
        shard_of(specs, "2/2")


def test_a_workers_record_merges_back_into_the_same_summary():
    import json

    from benchmarks.algorithms import from_record, record

    base = 0.2
    runs = [
        _run("dancegrpo", 0, [(0.0, 0, base), (100.0, 10, 0.26), (200.0, 20, 0.30)]),
        _run("fast", 1, [(0.0, 0, base), (50.0, 10, 0.31), (200.0, 40, 0.40)], calls=4),
    ]
    merged = [from_record(json.loads(json.dumps(record(r)))) for r in runs]
    assert summarise(merged, base, [0.05]) == summarise(runs, base, [0.05])
    with pytest.raises(RuntimeError, match="measured by a worker"):
        merged[0].step(0)
