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


def _eval_run(tiny_run, tmp_path, name: str, iterations: int, prompts):
    return tiny_run(
        name,
        train={"iterations": iterations, "learning_rate": 3e-2, "checkpoint_every": 1},
        eval={"prompts": str(prompts), "every": 1, "samples_per_prompt": 2},
    )


def test_periodic_eval_runs_before_during_and_after_and_resumes_on_schedule(tiny_run, tmp_path):
    prompts = tmp_path / "held_out.txt"
    prompts.write_text("a purple pyramid\na white ring\n")
    straight = _eval_run(tiny_run, tmp_path, "straight", 4, prompts)
    Trainer(straight).train()
    history = [
        json.loads(line) for line in (straight.config.output_dir / "eval" / "history.jsonl").read_text().splitlines()
    ]
    assert [h["iteration"] for h in history] == [0, 1, 2, 3, 4]
    assert history[0]["eval/brightness"] != history[-1]["eval/brightness"]  # the weights changed
    for h in history:  # the per-iteration tables are the same numbers as `dancecore eval` writes
        results = json.loads(
            (straight.config.output_dir / "eval" / f"iter-{h['iteration']:06d}" / "results.json").read_text()
        )
        assert results["summary"]["brightness"]["mean"] == h["eval/brightness"] and len(results["samples"]) == 4
    base = evaluate(straight, prompts, tmp_path / "base-eval", samples_per_prompt=2)
    assert base.summary["brightness"]["mean"] == history[0]["eval/brightness"]
    # interrupted after 2 iterations, then resumed to 4: the same evaluations at the same iterations
    interrupted = _eval_run(tiny_run, tmp_path, "interrupted", 2, prompts)
    Trainer(interrupted).train()
    resumed = _eval_run(tiny_run, tmp_path, "interrupted", 4, prompts)
    Trainer(resumed).train(resume=True)
    again = [
        json.loads(line) for line in (resumed.config.output_dir / "eval" / "history.jsonl").read_text().splitlines()
    ]
    assert again == history


def test_eval_prompts_must_exist(tiny_run, tmp_path):
    import pytest

    from dancecore.errors import ConfigError

    with pytest.raises(ConfigError, match="eval.prompts: prompt file not found"):
        tiny_run("x", eval={"prompts": str(tmp_path / "missing.txt")})


def test_divergence_alarm_fires_when_training_reward_rises_and_gold_falls():
    from dancecore.config.schema import EvalConfig
    from dancecore.training.evaluation import divergence_alarm

    config = EvalConfig(prompts="p.txt", every=2, divergence_alarm={"window": 1, "margin": 0.05})
    metrics = [{"iteration": i, "reward_mean": 0.1 * i} for i in range(4)]  # the training reward keeps rising
    history = [
        {"iteration": 0, "eval/gold": 0.5},
        {"iteration": 2, "eval/gold": 0.52},
        {"iteration": 4, "eval/gold": 0.40},
    ]
    message = divergence_alarm(config, history, metrics)
    assert message and "eval/gold fell 0.5200 -> 0.4000" in message and "iterations 2 and 4" in message
    assert divergence_alarm(config, history[:2], metrics) is None  # gold rose
    small_drop = [*history[:2], {"iteration": 4, "eval/gold": 0.50}]
    assert divergence_alarm(config, small_drop, metrics) is None  # within the margin
    falling = [{"iteration": i, "reward_mean": 1 - 0.1 * i} for i in range(4)]
    assert divergence_alarm(config, history, falling) is None  # both fell: not over-optimisation


def test_divergence_alarm_can_stop_the_run_with_a_checkpoint(tiny_run, tmp_path):
    prompts = tmp_path / "held_out.txt"
    prompts.write_text("a purple pyramid\n")
    # the alarm's decision is tested above; here it is forced at iteration 2 to test what the loop does
    run = tiny_run(
        "alarm",
        train={"iterations": 6, "learning_rate": 3e-2, "checkpoint_every": 100},
        eval={"prompts": str(prompts), "every": 1, "divergence_alarm": {"window": 1, "margin": 1e-9, "stop": True}},
    )
    trainer = Trainer(run)
    import dancecore.training.evaluation as evaluation

    real = evaluation.divergence_alarm
    evaluation.divergence_alarm = lambda config, history, metrics: "alarm" if history[-1]["iteration"] == 2 else None
    try:
        status = trainer.train()
    finally:
        evaluation.divergence_alarm = real
    assert status == "stopped"
    history = [json.loads(line) for line in (run.config.output_dir / "eval" / "history.jsonl").read_text().splitlines()]
    assert [h["iteration"] for h in history] == [0, 1, 2] and history[-1]["alarm"] == "alarm"
    assert (run.config.output_dir / "checkpoints" / "iter-00000002").is_dir()


def test_eval_num_steps_sets_the_evaluation_schedule(tmp_path):
    """``eval.num_steps`` (Flow-GRPO evaluates with 40 steps, trains with 10) is the number of ODE steps
    of the evaluation, and ``deterministic_rollout`` (dancecore.testing) samples exactly as eval does."""
    import torch

    from dancecore.contracts.records import Prompt
    from dancecore.testing import build_component, deterministic_rollout
    from dancecore.training.evaluation import ode_samples

    policy = build_component("policy", "testing-tiny")
    sampler = build_component("sampler", "flow-sde", {"num_steps": 4})
    prompts = [Prompt("a red cube", 0)]
    device = torch.device("cpu")

    def pixels(steps):
        return ode_samples(
            policy, sampler, prompts, samples_per_prompt=1, seed=0, batch_size=1, device=device, num_steps=steps
        )[1]

    assert torch.equal(pixels(None), pixels(4)) and not torch.equal(pixels(2), pixels(4))
    from dancecore.functional.seeding import generator

    noise = policy.initial_noise(1, generator(0, "eval", 0, 0))
    ours = deterministic_rollout(policy, prompts, noise, sampler=sampler, num_steps=2)
    assert torch.equal(ours.pixels, pixels(2)) and ours.sigmas.shape == (3,)


def test_the_run_summary_reports_each_mean_and_a_rewards_overall_before_and_after(tmp_path):
    from dancecore.training.evaluation import eval_summary

    history = [
        {"iteration": 0, "eval/shapes": 0.125, "eval/shapes/colors": 0.5, "eval/shapes/overall": 0.2},
        {"iteration": 500, "eval/shapes": 0.2, "eval/shapes/colors": 0.75, "eval/shapes/overall": 0.325},
    ]
    text = eval_summary(history, tmp_path)
    assert "(iteration 0 -> 500)" in text
    assert "shapes 0.125 -> 0.200 (+0.075)" in text and "shapes/overall 0.200 -> 0.325 (+0.125)" in text
    assert "colors" not in text  # per-group breakdowns stay in results.json and the tables
    assert str(tmp_path / "eval" / "iter-000500" / "grid.png") in text
    assert eval_summary(history[:1], tmp_path) is None
