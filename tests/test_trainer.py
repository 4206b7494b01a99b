"""The training loop on the torch-only tiny policy: exact ratios, reproducibility, resume, outputs."""

from __future__ import annotations

import json

import torch

from dancecore.checkpoint import find_latest, verify
from dancecore.training.trainer import Trainer


def _weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.engine.model_state().items()}


def _records(trainer: Trainer) -> list[dict]:
    return [
        {k: v for k, v in r.items() if k != "seconds" and not k.startswith("time/")} for r in trainer.metrics.read()
    ]


def test_ratio_is_exactly_one_before_the_first_update(tiny_run):
    trainer = Trainer(tiny_run(train={"iterations": 1, "samples_per_update": 2}))
    seen: list[torch.Tensor] = []
    original = trainer.algorithm.loss
    steps_taken = []
    engine_step = trainer.engine.step

    def record_loss(new, old, adv):
        out = original(new, old, adv)
        if not steps_taken:
            seen.append(out.ratio.clone())
        return out

    def record_step():
        steps_taken.append(1)
        return engine_step()

    trainer.algorithm.loss = record_loss
    trainer.engine.step = record_step
    trainer.train()
    assert seen, "no loss computed before the first optimizer step"
    for ratio in seen:
        assert torch.equal(ratio, torch.ones_like(ratio)), f"rho != 1 before any update: {ratio}"
    assert len(steps_taken) == 4, "8 samples with samples_per_update=2 give 4 optimizer steps"


def test_group_shares_initial_noise_and_samples_differ(tiny_run):
    trainer = Trainer(tiny_run())
    from dancecore.contracts.records import PromptBatch

    prompts = trainer.local_prompts(0)
    cond = trainer.policy.encode_prompts(PromptBatch(tuple(prompts)))
    schedule = trainer.sampler.schedule()
    traj = trainer.rollout(0, cond, schedule, torch.ones(schedule.num_steps, dtype=torch.bool))
    start = traj.latents[:, 0]
    assert torch.equal(start[0], start[3]) and torch.equal(start[4], start[7])
    assert not torch.equal(start[0], start[4]), "different prompts must get different initial noise"
    after = traj.latents[:, 1]
    assert not torch.equal(after[0], after[1]), "the SDE must make group members diverge"
    assert traj.group_ids.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]


def test_independent_noise_gives_each_sample_its_own_start(tiny_run):
    from dancecore.contracts.records import PromptBatch

    shared = Trainer(tiny_run("shared"))
    own = Trainer(tiny_run("own", optimizer={"shared_noise": False}))
    prompts = own.local_prompts(0)
    cond = own.policy.encode_prompts(PromptBatch(tuple(prompts)))
    schedule = own.sampler.schedule()
    steps = torch.ones(schedule.num_steps, dtype=torch.bool)
    start = own.rollout(0, cond, schedule, steps).latents[:, 0]
    assert len({tuple(row.flatten().tolist()) for row in start}) == start.shape[0], "every sample its own noise"
    again = own.rollout(0, cond, schedule, steps).latents[:, 0]
    assert torch.equal(start, again), "independent noise is still seeded by (seed, draw, sample)"
    assert not torch.equal(start, shared.rollout(0, cond, schedule, steps).latents[:, 0])


def test_same_seed_same_metrics_and_weights(tiny_run):
    a = Trainer(tiny_run("a"))
    a.train()
    b = Trainer(tiny_run("b"))
    b.train()
    assert _records(a) == _records(b)
    wa, wb = _weights(a), _weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    c = Trainer(tiny_run("c", seed=4))
    c.train()
    assert _records(c) != _records(a), "a different seed must give a different run"


def test_metrics_written_per_iteration(tiny_run):
    trainer = Trainer(tiny_run(train={"iterations": 2, "checkpoint_every": 5}))
    trainer.train()
    records = trainer.metrics.read()
    assert [r["iteration"] for r in records] == [0, 1]
    for key in ("reward_mean", "reward_std", "reward/brightness", "loss", "clip_fraction", "grad_norm", "seconds"):
        assert key in records[0], key
    assert (trainer.output_dir / "samples" / "iter-000000.png").is_file()
    assert (trainer.output_dir / "reward_curve.png").is_file()


def test_resume_matches_uninterrupted_run(tiny_run):
    full = Trainer(tiny_run("full", train={"iterations": 4, "checkpoint_every": 2}))
    full.train()
    first = Trainer(tiny_run("split", train={"iterations": 2, "checkpoint_every": 2}))
    first.train()
    # the second process continues with the full iteration count
    second = Trainer(tiny_run("split", train={"iterations": 4, "checkpoint_every": 2}))
    messages: list[str] = []
    second.train(resume=True, log=messages.append)
    assert any("iter-00000002" in m for m in messages)
    assert second.start_iteration == 2
    assert _records(second) == _records(full)
    wf, ws = _weights(full), _weights(second)
    assert all(torch.equal(wf[k], ws[k]) for k in wf)


def test_checkpoint_is_safetensors_with_verified_manifest(tiny_run):
    trainer = Trainer(tiny_run(train={"iterations": 2, "checkpoint_every": 1, "keep_checkpoints": 1}))
    trainer.train()
    latest, skipped = find_latest(trainer.output_dir)
    assert latest is not None and latest.name == "iter-00000002" and not skipped
    assert verify(latest) is None
    names = sorted(p.name for p in latest.iterdir())
    assert names == ["manifest.json", "model.safetensors", "optimizer.safetensors", "rank-00000.json", "state.json"]
    state = json.loads((latest / "state.json").read_text())
    assert state["iteration"] == 2 and state["data_cursor"] == 4
    assert len(list((trainer.output_dir / "checkpoints").iterdir())) == 1, "rotation keeps one"


def test_training_moves_the_weights(tiny_run):
    trainer = Trainer(tiny_run(train={"iterations": 1}))
    before = _weights(trainer)
    trainer.train()
    after = _weights(trainer)
    assert any(not torch.equal(before[k], after[k]) for k in before)
