"""The Algorithm contract: GRPO is one implementation; a second one (reward-weighted regression,
the worked example of docs/architecture.md) trains the quickstart through the same core services;
an old-style ``optimizer`` plugin (objective only) still trains, with GRPO's exact numbers."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from pydantic import Field

from dancecore import BuildContext, ComponentConfig, ConfigError, Rollout, TrainingServices
from dancecore.builtins.algorithms import GRPO
from dancecore.config.schema import ResolvedComponent, load_run, validate
from dancecore.contracts.protocols import Algorithm
from dancecore.functional.grpo import combined_advantages, trainable_steps
from dancecore.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


class RewardWeightedRegression:
    """Reward-weighted regression: maximise sum_b w_b log p(x_{t+1} | x_t) with w = softmax(A / T)."""

    class Config(ComponentConfig):
        group_size: int = Field(8, ge=2)
        temperature: float = Field(1.0, gt=0)

    def __init__(self, config: Config, context: BuildContext | None = None) -> None:
        self.config = config
        self.group_size = config.group_size

    def train(self, rollout: Rollout, services: TrainingServices) -> dict[str, float]:
        traj, keep = rollout.trajectory, rollout.keep
        adv = combined_advantages(rollout.scores.values, rollout.scores.weights, rollout.kept_group_ids)
        weights = torch.zeros(traj.num_samples)
        weights[keep] = torch.softmax(adv / self.config.temperature, 0) * keep.numel()
        steps = trainable_steps(rollout.stochastic)
        samples = keep.repeat_interleave(steps.numel())
        losses = []
        for batch in services.replay(rollout, samples, steps.repeat(keep.numel())):
            w = weights[batch.samples].to(services.device)
            loss = -batch.real_rows(w * batch.step.log_prob).sum() / samples.numel()
            services.backward(loss)
            losses.append(float(loss))
        norm = services.optimizer_step()
        return {"loss": sum(losses), "grad_norm": norm, "clip_fraction": 0.0}


class ObjectiveOnly:
    """An old-style ``dancecore.optimizers`` plugin: GRPO's four methods, no training pass."""

    Config = GRPO.Config

    def __init__(self, config: GRPO.Config, context: BuildContext | None = None) -> None:
        self.config = config
        inner = GRPO(config)
        self.advantages, self.select_samples = inner.advantages, inner.select_samples
        self.select_steps, self.loss = inner.select_steps, inner.loss


def _quickstart(tmp_path: Path, name: str, iterations: int):
    overrides = [
        f"output_dir={tmp_path / name}",
        f"train.iterations={iterations}",
        "logging.progress_bar=false",
        "logging.tensorboard=false",
        "train.checkpoint_every=1000",
        "train.sample_every=0",
    ]
    return load_run(ROOT / "configs" / "smoke.yaml", overrides)


def _with_algorithm(run, name: str, cls: type, **options):
    return dataclasses.replace(run, algorithm=ResolvedComponent("algorithm", name, cls, cls.Config(**options)))


def _metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_grpo_honours_the_algorithm_contract() -> None:
    assert isinstance(GRPO(GRPO.Config()), Algorithm)
    assert not isinstance(ObjectiveOnly(GRPO.Config()), Algorithm)


@pytest.mark.slow
def test_reward_weighted_regression_trains_the_quickstart(tmp_path: Path) -> None:
    run = _with_algorithm(_quickstart(tmp_path, "rwr", 30), "rwr", RewardWeightedRegression, temperature=0.5)
    trainer = Trainer(run)
    assert trainer.train() == "finished"
    records = _metrics(run.config.output_dir)
    first = records[0]["reward_mean"]
    last = sum(r["reward_mean"] for r in records[-5:]) / 5
    assert last > first + 5 * records[0]["reward_std"], (first, last)  # brightness rises, as with GRPO


@pytest.mark.slow
def test_an_objective_only_optimizer_plugin_trains_exactly_like_grpo(tmp_path: Path) -> None:
    grpo = _quickstart(tmp_path, "grpo", 3)
    legacy = _with_algorithm(
        _quickstart(tmp_path, "legacy", 3), "legacy", ObjectiveOnly, **grpo.algorithm.config.model_dump()
    )
    Trainer(grpo).train()
    Trainer(legacy).train()
    drop = ("seconds",)
    strip = [
        {k: v for k, v in r.items() if k not in drop and not k.startswith("time/")}
        for r in _metrics(grpo.config.output_dir)
    ]
    strip2 = [
        {k: v for k, v in r.items() if k not in drop and not k.startswith("time/")}
        for r in _metrics(legacy.config.output_dir)
    ]
    assert json.dumps(strip) == json.dumps(strip2)


def test_the_algorithm_key_and_its_old_name(tiny_run) -> None:
    base = tiny_run().config.model_dump(mode="json", by_alias=True)
    spec = {"name": "grpo", "group_size": 4}
    old = {k: v for k, v in base.items() if k != "algorithm"} | {"optimizer": spec}
    new = {k: v for k, v in base.items() if k != "algorithm"} | {"algorithm": spec}
    assert validate(old).algorithm.config.group_size == validate(new).algorithm.config.group_size == 4
    with pytest.raises(ConfigError, match="not both"):
        validate({**new, "optimizer": spec})
    with pytest.raises(ConfigError, match=r"optimizer\.clip_rang: unknown key"):
        validate(old | {"optimizer": {**spec, "clip_rang": 1}})
    with pytest.raises(ConfigError, match=r"algorithm\.clip_rang: unknown key"):
        validate(new | {"algorithm": {**spec, "clip_rang": 1}})


@pytest.mark.parametrize("lora", [False, True], ids=["frozen-copy", "lora-disabled"])
def test_kl_to_the_reference_is_zero_before_the_first_update_and_grows_after(tiny_run, lora):
    policy = {
        "name": "flux",
        "preset": "tiny",
        **({"lora": {"rank": 4, "target_modules": ["to_q", "to_v"]}} if lora else {}),
    }
    run = tiny_run(
        f"kl-{lora}",
        policy=policy,
        optimizer={"name": "grpo", "group_size": 4, "clip_range": 1e-2, "kl_beta": 0.5},
        train={"iterations": 3, "learning_rate": 3e-2},
    )
    trainer = Trainer(run)
    assert trainer.reference is not None and trainer.reference.adapters_off is lora
    before = {k: v.clone() for k, v in trainer.policy.module.state_dict().items()}
    trainer.train()
    kls = [r["kl"] for r in trainer.metrics.read()]
    assert kls[0] == 0.0  # the reference is the starting point: no KL before any update
    assert kls[-1] > 0.0
    if not lora:  # the frozen copy keeps the starting weights while the network moves
        reference = trainer.reference.copy.state_dict()
        assert all(torch.equal(reference[k], before[k]) for k in before)
        assert any(not torch.equal(trainer.policy.module.state_dict()[k], before[k]) for k in before)


def test_without_kl_there_is_no_reference(tiny_run):
    trainer = Trainer(tiny_run("nokl"))
    assert trainer.reference is None and "kl" not in trainer.iteration(0)
