"""Failing rewards under each policy, NaN/inf kept out of advantages, losses and weights, and
property-based checks of the group advantages."""

from __future__ import annotations

import dataclasses
import math
import threading
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dancecore.checkpoint import plan_resume, verify
from dancecore.config.schema import RewardFailureConfig
from dancecore.functional.grpo import combined_advantages, group_advantages
from dancecore.training.scoring import NamedReward, RewardFailure, score_samples

RELEASE = threading.Event()
BATCH, GROUP = 8, 4
GROUP_IDS = torch.arange(BATCH) // GROUP


class Scripted:
    """A reward whose calls follow a script: each entry is a behaviour for one call (the last
    repeats)."""

    def __init__(self, *behaviours: str) -> None:
        self.behaviours = behaviours
        self.calls = 0

    def score(self, samples, prompts):
        behaviour = self.behaviours[min(self.calls, len(self.behaviours) - 1)]
        self.calls += 1
        good = torch.linspace(0.1, 0.8, samples.shape[0])
        return {
            "ok": lambda: good,
            "raise": lambda: (_ for _ in ()).throw(RuntimeError("boom")),
            "hang": lambda: (RELEASE.wait(30), good)[1],
            "nan": lambda: torch.where(torch.arange(samples.shape[0]) == 1, math.nan, good),
            "+inf": lambda: torch.where(torch.arange(samples.shape[0]) == 5, math.inf, good),
            "-inf": lambda: torch.full_like(good, -math.inf),
            "shape": lambda: good[:3],
            "dtype": lambda: good.to(torch.complex64),
            "none": lambda: None,
            "huge": lambda: torch.full_like(good, 1e300, dtype=torch.float64),
        }[behaviour]()


@pytest.fixture(autouse=True, scope="module")
def _release_hung_calls():
    yield
    RELEASE.set()


def _score(reward: Scripted, policy: str, retries: int = 2, timeout_s: float | None = 0.5):
    config = RewardFailureConfig(policy=policy, retries=retries, timeout_s=timeout_s)
    named = NamedReward("judge", 1.0, reward, plugin="judge-plugin")
    return score_samples([named], torch.rand(BATCH, 3, 4, 4), ["p"] * BATCH, GROUP_IDS, config)


FAULTS = ("raise", "hang", "nan", "+inf", "-inf", "shape", "dtype", "none", "huge")
WHOLE_CALL = {"raise", "hang", "-inf", "shape", "dtype", "none", "huge"}  # every sample affected


@pytest.mark.parametrize("fault", FAULTS)
def test_reward_fault_under_each_policy(fault):
    outcomes = []
    # fail: one call, an explicit failure naming the reward and its plugin, within the timeout
    reward = Scripted(fault)
    began = time.monotonic()
    with pytest.raises(RewardFailure) as info:
        _score(reward, "fail")
    elapsed = time.monotonic() - began
    assert reward.calls == 1 and "'judge'" in str(info.value) and "judge-plugin" in str(info.value)
    assert elapsed < 0.5 + 1.0, "timeouts honoured within 1 s"
    outcomes.append("fail")
    # retry N: exactly N + 1 calls, then the failure
    for retries in (0, 1, 3):
        reward = Scripted(fault)
        began = time.monotonic()
        with pytest.raises(RewardFailure, match=f"after {retries + 1} calls" if retries else "failed"):
            _score(reward, "retry", retries=retries)
        assert reward.calls == retries + 1
        assert time.monotonic() - began < (retries + 1) * 0.5 + 1.0
    # retry recovers when a later call succeeds, and the failed call is counted
    reward = Scripted(fault, "ok")
    result = _score(reward, "retry", retries=2)
    assert reward.calls == 2 and result.failures == 1 and result.keep.numel() == BATCH
    outcomes.append("retry")
    # skip_group: the affected groups are dropped and counted; nothing non-finite survives
    reward = Scripted(fault)
    result = _score(reward, "skip_group")
    expected_dropped = 2 if fault in WHOLE_CALL else 1
    assert reward.calls == 1 and result.failures == 1 and result.dropped_groups == expected_dropped
    assert result.keep.numel() == BATCH - GROUP * expected_dropped
    assert bool(torch.isfinite(result.scores.values).all())
    outcomes.append("skip_group")
    _FAULTS_OK.add(fault)


_FAULTS_OK: set[str] = set()


def test_reward_fault_summary(fault_report):
    fault_report.row(
        "reward raises/hangs/NaN/+-inf/shape/dtype/None/huge",
        f"{len(_FAULTS_OK)}/{len(FAULTS)} faults: fail, retry (N+1 calls, N=0,1,3), skip_group; timeouts < 1 s late",
        len(_FAULTS_OK) == len(FAULTS),
    )
    assert len(_FAULTS_OK) == len(FAULTS)


def _trainer(tiny_run, fixture_plugins, mode: str, policy: str, **train):
    from dancecore.training.trainer import Trainer

    run = tiny_run(
        f"run-{mode}-{policy}",  # one output_dir per run: a fresh run refuses another run's directory
        rewards=[{"name": "fault-reward", "mode": mode, "from_call": 1, "times": 1}],
        reward_failure={"policy": policy, "retries": 1, "timeout_s": 2.0},
        train={"iterations": 3, **train},
    )
    return Trainer(run)


def test_policy_fail_checkpoints_then_names_the_plugin(tiny_run, fixture_plugins, fault_report):
    trainer = _trainer(tiny_run, fixture_plugins, "raise", "fail", checkpoint_every=5)
    with pytest.raises(RewardFailure, match="'fault-reward' failed: raised RuntimeError: injected reward failure"):
        trainer.train(log=lambda message: None)
    plan = plan_resume(trainer.output_dir)
    ok = plan.path is not None and plan.path.name == "iter-00000001" and verify(plan.path) is None
    ok = ok and trainer.counters["reward_failures"] == 1
    fault_report.row(
        "reward failure, policy fail", "checkpoint at the failed iteration, then error naming the plugin", ok
    )
    assert ok


def test_policy_skip_group_and_retry_in_training(tiny_run, fixture_plugins, fault_report):
    trainer = _trainer(tiny_run, fixture_plugins, "nan_first_group", "skip_group")
    assert trainer.train() == "finished"
    records = trainer.metrics.read()
    skip_ok = [r["dropped_groups"] for r in records] == [0.0, 1.0, 0.0] and records[-1]["reward_failures"] == 1
    trainer = _trainer(tiny_run, fixture_plugins, "hang", "retry", checkpoint_every=5)
    assert trainer.train() == "finished"
    retry_ok = trainer.counters["reward_failures"] == 1 and trainer.rewards[0].component.calls == 4
    fault_report.row(
        "reward failure in training: skip_group / retry",
        "group dropped + counted / hang retried + counted",
        skip_ok and retry_ok,
    )
    assert skip_ok and retry_ok


def test_reward_failure_through_the_cli(forkserver, tmp_path, fault_report):
    from tests.fault.conftest import write_config

    config = write_config(
        tmp_path / "run.yaml", tmp_path / "out", rewards=[{"name": "fault-reward", "mode": "none", "from_call": 2}]
    )
    child = forkserver.run("train", str(config))
    text = child.output()
    ok = (
        child.status not in (0, None)
        and "reward 'fault-reward' failed: returned None" in text
        and "Traceback" not in text
        and plan_resume(tmp_path / "out").path.name == "iter-00000002"
    )
    fault_report.row(
        "reward failure via the CLI", f"exit {child.status}, plugin and failure named, checkpoint kept", ok
    )
    assert ok, text


# -------------------------------------------------------------------------------- NaN in the loss


def test_nan_log_prob_skips_the_update(tiny_run, fault_report):
    from dancecore.training.trainer import Trainer, TrainingError

    trainer = Trainer(tiny_run(train={"iterations": 4, "max_nonfinite_updates": 3}))
    real_step = trainer.sampler.step

    def poisoned(*args, **kwargs):
        out = real_step(*args, **kwargs)
        if kwargs.get("next_latents") is not None:  # the training pass
            out = dataclasses.replace(out, log_prob=torch.full_like(out.log_prob, math.nan))
        return out

    trainer.sampler.step = poisoned
    before = {k: v.clone() for k, v in trainer.engine.model_state().items()}
    opt_before = trainer.engine.optimizer_state()[0]
    record = trainer.iteration(0)
    unchanged = all(torch.equal(before[k], v) for k, v in trainer.engine.model_state().items())
    ok = unchanged and record["skipped_updates"] == 1 and not opt_before and not trainer.engine.optimizer_state()[0]
    trainer.iteration(1)
    with pytest.raises(TrainingError, match="3 updates in a row skipped"):
        trainer.iteration(2)
    fault_report.row("NaN injected into a log-prob", "update skipped, weights unchanged, counted; 3 in a row abort", ok)
    assert ok


def test_nonfinite_grad_norm_skips_the_update(tiny_run):
    from dancecore.training.trainer import Trainer

    trainer = Trainer(tiny_run(train={"iterations": 1}))
    before = {k: v.clone() for k, v in trainer.engine.model_state().items()}
    real_backward = trainer.engine.backward

    def poisoned(loss):
        real_backward(loss)
        next(iter(trainer.engine.params.values())).grad.view(-1)[0] = math.inf

    trainer.engine.backward = poisoned
    record = trainer.iteration(0)
    assert record["skipped_updates"] == 1 and math.isinf(record["grad_norm"])
    assert all(torch.equal(before[k], v) for k, v in trainer.engine.model_state().items())


# -------------------------------------------------------------------------- advantages, property


@st.composite
def groups(draw):
    sizes = draw(st.lists(st.integers(1, 8), min_size=1, max_size=4))
    ids = torch.cat([torch.full((n,), g) for g, n in enumerate(sizes)])
    floats = st.floats(allow_nan=False, allow_infinity=False, width=32)
    constant = draw(st.lists(st.booleans(), min_size=len(sizes), max_size=len(sizes)))
    values = []
    for n, same in zip(sizes, constant, strict=True):
        values += [draw(floats)] * n if same else draw(st.lists(floats, min_size=n, max_size=n))
    perm = draw(st.permutations(list(range(len(values)))))
    return torch.tensor(values, dtype=torch.float32), ids, torch.tensor(perm), constant


_CASES = {"n": 0}


@settings(max_examples=1000, deadline=None, derandomize=True, database=None)
@given(groups(), st.floats(0.1, 3.0))
def test_advantages_properties(case, weight):
    rewards, ids, perm, constant = case
    _CASES["n"] += 1
    adv = group_advantages(rewards, ids)
    assert bool(torch.isfinite(adv).all())
    assert float(adv.abs().max()) <= 5.0
    for g, same in enumerate(constant):
        if same:
            assert bool((adv[ids == g] == 0).all()), "a constant group gives 0"
    permuted = group_advantages(rewards[perm], ids[perm])
    assert torch.allclose(permuted, adv[perm], atol=1e-5, rtol=1e-5), "permutation-invariant"
    combined = combined_advantages(torch.stack([rewards, rewards * 0.5]), [weight, 1.0], ids)
    assert bool(torch.isfinite(combined).all()) and float(combined.abs().max()) <= 5.0


def test_advantages_property_summary(fault_report):
    fault_report.row(
        "advantages, property-based (hypothesis)",
        f"{_CASES['n']} cases: finite, |A| <= 5, constant group 0, permutation-invariant",
        _CASES["n"] >= 1000,
    )
    assert _CASES["n"] >= 1000
