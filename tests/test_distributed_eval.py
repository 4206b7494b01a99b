"""The periodic evaluation of a 2-rank run: each rank samples and scores its share of the prompts'
batches, rank 0 gathers; the results equal a single process's.

pytest starts ``torchrun --nproc_per_node 2`` on this file (gloo, CPU, DeepSpeed ZeRO-2); each
rank trains the tiny run for one iteration with an evaluation before and after it; then rank 0
runs the same configuration in one process (LocalEngine, in the same interpreter to save a start)
and the test compares the evaluations.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import TINY_RUN, deep_update  # noqa: E402

# 3 prompts x 2 samples in batches of 2: 3 batches, rank 0 samples two of them and rank 1 one (and a
# discarded repeat, so that both ranks make the same number of network calls).
EVAL = {"samples_per_prompt": 2, "batch_size": 2, "every": 0, "at_start": True}
PROMPTS = "a purple pyramid\na white ring\na grey cone\n"


def config(out: Path, distributed: bool) -> dict[str, Any]:
    return deep_update(
        TINY_RUN,
        {
            "output_dir": str(out),
            "train": {"iterations": 1, "learning_rate": 3e-2},
            "eval": {**EVAL, "prompts": str(out.parent / "held_out.txt")},
            "distributed": {"backend": "deepspeed", "zero_stage": 2} if distributed else {"backend": "none"},
        },
    )


def _rows(out: Path, iteration: int) -> list[dict[str, Any]]:
    return json.loads((out / "eval" / f"iter-{iteration:06d}" / "results.json").read_text())["samples"]


@pytest.mark.slow
def test_two_ranks_evaluate_like_one_process(tmp_path: Path) -> None:
    (tmp_path / "held_out.txt").write_text(PROMPTS)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__]
    proc = subprocess.run(
        [*command, str(tmp_path / "two")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    before_two, before_one = _rows(tmp_path / "two", 0), _rows(tmp_path / "one", 0)
    assert len(before_one) == 6 and [(r["prompt_index"], r["sample"]) for r in before_two] == [
        (i, j) for i in range(3) for j in range(2)
    ]
    assert before_two == before_one  # the base weights: bit for bit
    after_two, after_one = _rows(tmp_path / "two", 1), _rows(tmp_path / "one", 1)
    assert [r["prompt"] for r in after_two] == [r["prompt"] for r in after_one]
    for a, b in zip(after_two, after_one, strict=True):  # one update: equal up to summation order
        assert abs(a["brightness"] - b["brightness"]) < 1e-5
    assert {r["brightness"] for r in after_one} != {r["brightness"] for r in before_one}
    history = (tmp_path / "two" / "eval" / "history.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in history] == [0, 1]


if __name__ == "__main__":  # one rank of the 2-rank run
    from dancecore.config.schema import validate
    from dancecore.training.run import train_distributed
    from dancecore.training.trainer import Trainer

    out = Path(sys.argv[1])
    assert train_distributed(validate(config(out, distributed=True)), log=lambda *a: None) == "finished"
    if os.environ["RANK"] == "0":  # the reference: one process, no DeepSpeed
        Trainer(validate(config(out.parent / "one", distributed=False))).train()


def test_ranks_sample_disjoint_batches_that_make_up_one_process(monkeypatch) -> None:
    """The split itself (no launch): 5 items in batches of 2 over 2 ranks: rank 0 samples batches
    0 and 2, rank 1 batch 1 and a discarded repeat: the same number of network calls."""
    import torch

    from dancecore.contracts.records import Prompt
    from dancecore.testing import build_component
    from dancecore.training.evaluation import ode_samples

    torch.set_num_threads(1)
    policy = build_component("policy", "testing-tiny")
    sampler = build_component("sampler", "flow-sde", {"num_steps": 3})
    prompts = [Prompt(text=t, index=i) for i, t in enumerate(["a", "b", "c", "d", "e"])]
    calls: list[int] = []
    decode = policy.decode
    monkeypatch.setattr(policy, "decode", lambda x: (calls.append(x.shape[0]), decode(x))[1])
    options = {"samples_per_prompt": 1, "seed": 0, "batch_size": 2, "device": torch.device("cpu")}
    items, pixels = ode_samples(policy, sampler, prompts, **options)
    calls.clear()
    shares = [ode_samples(policy, sampler, prompts, **options, shard=(r, 2)) for r in range(2)]
    assert calls == [2, 1, 2, 2]  # rank 0: batches 0 and 2 (one item); rank 1: batch 1, then batch 0 again
    assert [p.index for p, _ in shares[0][0]] == [0, 1, 4] and [p.index for p, _ in shares[1][0]] == [2, 3]
    assert torch.equal(torch.cat([shares[0][1][:2], shares[1][1], shares[0][1][2:]]), pixels)
