"""``train.overlap_reward``: each micro-batch is decoded and scored in a background thread while the
rollout goes on; the run's numbers are exactly those of scoring after the rollout."""

from __future__ import annotations

import dataclasses
import json
import math
import threading

import torch

from dancecore import ComponentConfig
from dancecore.config.schema import ResolvedComponent
from dancecore.training.trainer import Trainer

torch.set_num_threads(1)


def _metrics(run) -> list[dict]:
    records = [json.loads(line) for line in (run.config.output_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "seconds" and not k.startswith("time/")} for r in records]


class ThreadRecordingBrightness:
    """Mean pixel value; records each call's batch size and thread, and gives NaN to sample 0 of
    every call whose first prompt is 'a red cube' (a failure for skip_group to drop)."""

    calls: list[tuple[int, str]] = []

    class Config(ComponentConfig):
        nan_red: bool = False

    def __init__(self, config, context=None) -> None:
        self.config = config

    def score(self, samples, prompts):
        self.calls.append((samples.shape[0], threading.current_thread().name))
        scores = samples.float().mean(dim=(1, 2, 3))
        if self.config.nan_red and prompts[0] == "a red cube":
            scores[0] = math.nan
        return scores


def _with_reward(run, **options):
    reward = ResolvedComponent(
        "reward", "recorder", ThreadRecordingBrightness, ThreadRecordingBrightness.Config(**options)
    )
    return dataclasses.replace(run, rewards=(reward,))


def test_overlapped_scoring_gives_the_same_run(tiny_run) -> None:
    plain = tiny_run("plain", train={"iterations": 2, "micro_batch_size": 2, "checkpoint_every": 100})
    overlapped = tiny_run(
        "overlap", train={"iterations": 2, "micro_batch_size": 2, "checkpoint_every": 100, "overlap_reward": True}
    )
    assert Trainer(plain).train() == "finished" and Trainer(overlapped).train() == "finished"
    assert json.dumps(_metrics(overlapped)) == json.dumps(_metrics(plain))


def test_micro_batches_are_scored_in_the_background_and_failures_keep_their_policy(tiny_run) -> None:
    train = {"iterations": 1, "micro_batch_size": 2, "checkpoint_every": 100, "overlap_reward": True}
    ThreadRecordingBrightness.calls.clear()
    run = _with_reward(tiny_run("calls", train=train, reward_failure={"policy": "skip_group"}), nan_red=True)
    assert Trainer(run).train() == "finished"
    assert [size for size, _ in ThreadRecordingBrightness.calls] == [2, 2, 2, 2]  # 2 prompts x G4 in micro-batches of 2
    assert all(name.startswith("overlapped-reward") for _, name in ThreadRecordingBrightness.calls)
    record = _metrics(run)[0]
    # both micro-batches of the red cube's group were failed calls (NaN); that one group is dropped
    assert record["dropped_groups"] == 1.0 and record["reward_failures"] == 2, record
