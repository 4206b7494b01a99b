"""EMA of the trained weights: the update rule, its schedule, checkpoints and bit-exact resume, eval."""

from __future__ import annotations

import json

import pytest
import torch

from dancecore.checkpoint import read_checkpoint
from dancecore.config.schema import EmaConfig
from dancecore.evaluate import evaluate
from dancecore.training.ema import EmaWeights
from dancecore.training.trainer import Trainer


class _Engine:
    def __init__(self, weights: dict[str, torch.Tensor]) -> None:
        self.weights = weights

    def model_state(self) -> dict[str, torch.Tensor]:
        return self.weights


def test_update_rule_and_schedule():
    engine = _Engine({"w": torch.tensor([1.0, 2.0])})
    ema = EmaWeights(EmaConfig(decay=0.75, every=2), engine, torch.device("cpu"))
    engine.weights = {"w": torch.tensor([5.0, 6.0])}
    assert [ema.due(n) for n in range(5)] == [False, False, True, False, True]
    ema.update()
    assert torch.allclose(ema.tensors["w"], 0.75 * torch.tensor([1.0, 2.0]) + 0.25 * torch.tensor([5.0, 6.0]))
    assert ema.tensors["w"].dtype == torch.float32


def _ema_run(tiny_run, name: str, iterations: int, prompts=None):
    extra = {"eval": {"prompts": str(prompts), "every": 0}} if prompts else {}
    return tiny_run(
        name,
        train={
            "iterations": iterations,
            "learning_rate": 3e-2,
            "checkpoint_every": 1,
            "samples_per_update": 2,
            "ema": {"decay": 0.5, "every": 3},
        },
        **extra,
    )


def test_ema_is_checkpointed_and_resumes_bit_exactly(tiny_run):
    straight = Trainer(_ema_run(tiny_run, "straight", 4))
    straight.train()
    final = read_checkpoint(straight.output_dir / "checkpoints" / "iter-00000004")
    assert final.ema is not None and set(final.ema) == set(final.model)
    assert any(not torch.equal(final.ema[k], final.model[k]) for k in final.model)  # an average, not a copy
    interrupted = Trainer(_ema_run(tiny_run, "resumed", 2))
    interrupted.train()
    resumed = Trainer(_ema_run(tiny_run, "resumed", 4))
    resumed.train(resume=True)
    again = read_checkpoint(resumed.output_dir / "checkpoints" / "iter-00000004")
    assert all(torch.equal(again.ema[k], final.ema[k]) for k in final.ema)
    assert all(torch.equal(again.model[k], final.model[k]) for k in final.model)


def test_a_resume_that_forgets_the_ema_is_caught(tiny_run, monkeypatch):
    from dancecore.errors import CheckpointError

    Trainer(_ema_run(tiny_run, "forgot", 3)).train()
    monkeypatch.setenv("DANCECORE_FAULT_SKIP_RESTORE", "ema")
    with pytest.raises(CheckpointError, match="EMA weights"):
        Trainer(_ema_run(tiny_run, "forgot", 4)).train(resume=True)


def test_eval_uses_the_ema_weights(tiny_run, tmp_path):
    prompts = tmp_path / "held_out.txt"
    prompts.write_text("a purple pyramid\n")
    run = _ema_run(tiny_run, "evaluated", 4, prompts)
    trainer = Trainer(run)
    trainer.train()
    history = [json.loads(line) for line in (run.config.output_dir / "eval" / "history.jsonl").read_text().splitlines()]
    assert [h["weights"] for h in history] == ["ema", "ema"]
    ema = evaluate(run, prompts, tmp_path / "ema", checkpoint="latest", ema=True)
    trained = evaluate(run, prompts, tmp_path / "trained", checkpoint="latest")
    assert ema.summary["brightness"]["mean"] == history[-1]["eval/brightness"]
    assert ema.summary["brightness"]["mean"] != trained.summary["brightness"]["mean"]


def test_ramped_decay_is_diffusion_nfts_old_policy_schedule():
    engine = _Engine({"w": torch.tensor([0.0])})
    nft = EmaWeights(EmaConfig(decay=0.5, every=1, ramp=0.001), engine, torch.device("cpu"))
    assert [nft.decay_at(u) for u in (0, 1, 250, 500, 5000)] == pytest.approx([0.0, 0.001, 0.25, 0.5, 0.5])
    ocr = EmaWeights(EmaConfig(decay=0.999, every=1, ramp=0.0075, ramp_after=75), engine, torch.device("cpu"))
    assert [ocr.decay_at(u) for u in (10, 75, 175, 10_000)] == pytest.approx([0.0, 0.0, 0.75, 0.999])
    engine.weights = {"w": torch.tensor([4.0])}
    nft.update(250)  # 0.25 * 0 + 0.75 * 4
    assert nft.tensors["w"].item() == pytest.approx(3.0)


def test_rollouts_and_v_old_sample_with_the_ema_when_asked(tiny_run):
    """DiffusionNFT's old policy: the rollout and the no-gradient v_old pass see the EMA weights,
    the training pass the trained ones; and it resumes bit-exactly."""

    from dancecore.config.schema import validate
    from tests.conftest import TINY_RUN, deep_update

    out = tiny_run("unused").config.output_dir.parent

    def run(name: str, iterations: int):
        train = {
            "iterations": iterations,
            "learning_rate": 3e-2,
            "checkpoint_every": 1,
            "samples_per_update": 4,
            "ema": {"decay": 0.9, "every": 1, "ramp": 0.3, "rollout": True},
        }
        data = deep_update(TINY_RUN, {"output_dir": str(out / name), "train": train})
        data.pop("optimizer")
        data["algorithm"] = {"name": "diffusion-nft", "group_size": 4, "timesteps_per_sample": 1}
        return validate(data)

    trainer = Trainer(run("old-policy", 3))
    first = next(iter(trainer.engine.model_state()))
    seen: list[tuple[bool, bool]] = []  # (gradient enabled, weights == EMA)
    predict = trainer.policy.predict

    def recording(*args, **kwargs):
        current = trainer.engine.model_state()[first]
        ema = trainer.ema.tensors[first]
        seen.append((torch.is_grad_enabled(), torch.equal(current.float(), ema)))
        return predict(*args, **kwargs)

    trainer.policy.predict = recording
    trainer.train()
    assert all(is_ema for grad, is_ema in seen if not grad)  # rollout and v_old: the old policy
    assert not all(is_ema for grad, is_ema in seen if grad)  # training: the trained weights, once they moved
    final = read_checkpoint(trainer.output_dir / "checkpoints" / "iter-00000003")
    assert any(not torch.equal(final.ema[k], final.model[k]) for k in final.model)
    Trainer(run("old-policy-resumed", 2)).train()
    resumed = Trainer(run("old-policy-resumed", 3))
    resumed.train(resume=True)
    again = read_checkpoint(resumed.output_dir / "checkpoints" / "iter-00000003")
    assert all(torch.equal(again.ema[k], final.ema[k]) for k in final.ema)
    assert all(torch.equal(again.model[k], final.model[k]) for k in final.model)


def test_ema_rollout_is_refused_on_deepspeed(tiny_run):
    from dancecore.config.schema import ConfigError

    with pytest.raises(ConfigError, match="train.ema.rollout"):
        tiny_run("ds", train={"ema": {"rollout": True}}, distributed={"backend": "deepspeed"})
