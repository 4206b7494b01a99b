"""Distributed training without starting ranks: the DeepSpeed config (generation, passthrough,
conflicts), the launcher's command line and supervision, and the GRPO semantics of sharding a
run over ranks (disjoint prompts, whole groups per rank, per-sample noise independent of the
world size). The multi-process runs are in test_distributed_engine.py and test_distributed_cli.py.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from dancecore.config.schema import ConfigError, RunConfig
from dancecore.distributed.config import deepspeed_config, generated_config
from dancecore.distributed.launch import rank_command, supervise
from dancecore.distributed.process import _ranges
from dancecore.training.trainer import Trainer


def run_config(**sections: dict) -> RunConfig:
    base = {
        "output_dir": "unused",
        "prompts": {"texts": ["a"]},
        "policy": {"name": "testing-tiny"},
        "sampler": {"name": "flow-sde"},
        "rewards": [{"name": "brightness"}],
        "train": {"iterations": 1, "learning_rate": 2e-5, "grad_clip": 0.01, "weight_decay": 1e-4},
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return RunConfig.model_validate(base)


# ------------------------------------------------------------------------------- the config


def test_generated_config_follows_train_and_distributed() -> None:
    cfg = run_config(
        distributed={"zero_stage": 3, "offload_optimizer": True, "offload_params": True},
        train={"mixed_precision": "bf16", "adam_betas": (0.9, 0.95)},
    )
    ds = generated_config(cfg)
    assert ds["zero_optimization"] == {
        "stage": 3,
        "offload_optimizer": {"device": "cpu"},
        "offload_param": {"device": "cpu"},
    }
    assert ds["optimizer"]["type"] == "AdamW"
    assert ds["optimizer"]["params"] == {
        "lr": 2e-5,
        "betas": [0.9, 0.95],
        "eps": 1e-8,
        "weight_decay": 1e-4,
        "torch_adam": True,
    }
    assert ds["gradient_clipping"] == 0.01
    assert ds["bf16"] == {"enabled": True}
    # dancecore owns accumulation: one DeepSpeed step per trainer update
    assert ds["gradient_accumulation_steps"] == 1 and ds["managed_gradient_accumulation"] is False


def test_passthrough_adds_keys_and_may_repeat_derived_ones() -> None:
    cfg = run_config(
        distributed={
            "zero_stage": 2,
            "deepspeed_config": {
                "zero_optimization": {"stage": 2, "reduce_bucket_size": 1000, "overlap_comm": True},
                "optimizer": {"params": {"lr": 2e-5, "torch_adam": False}},
                "gradient_clipping": 0.01,
            },
        }
    )
    merged = deepspeed_config(cfg)
    assert merged["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 1000, "overlap_comm": True}
    assert merged["optimizer"]["params"]["torch_adam"] is False  # a default, not derived: may change
    assert merged["optimizer"]["params"]["lr"] == 2e-5


def test_conflicting_passthrough_keys_are_all_reported_by_name() -> None:
    cfg = run_config(
        distributed={
            "zero_stage": 2,
            "deepspeed_config": {
                "zero_optimization": {"stage": 3},
                "optimizer": {"type": "Lamb", "params": {"lr": 1e-3}},
                "gradient_accumulation_steps": 4,
                "bf16": {"enabled": True},
                "fp16": {"enabled": True},
                "scheduler": {"type": "WarmupLR"},
            },
        }
    )
    with pytest.raises(ConfigError) as caught:
        deepspeed_config(cfg, check_with_deepspeed=False)
    text = "\n".join(caught.value.errors)
    for key, source in [
        ("zero_optimization.stage", "distributed.zero_stage"),
        ("optimizer.type", "AdamW"),
        ("optimizer.params.lr", "train.learning_rate"),
        ("gradient_accumulation_steps", "samples_per_update"),
        ("bf16.enabled", "train.mixed_precision"),
    ]:
        assert f"distributed.deepspeed_config.{key}: " in text and source in text, key
    assert "distributed.deepspeed_config.fp16: " in text
    assert "distributed.deepspeed_config.scheduler: " in text
    assert len(caught.value.errors) == 7


@pytest.mark.parametrize(
    ("distributed", "train", "key"),
    [
        (
            {"zero_stage": 2, "deepspeed_config": {"zero_optimization": {"offload_param": {"device": "cpu"}}}},
            {},
            "distributed.deepspeed_config.zero_optimization.offload_param",
        ),
        (
            {"zero_stage": 0, "deepspeed_config": {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}},
            {},
            "distributed.deepspeed_config.zero_optimization.offload_optimizer",
        ),
        (
            {"zero_stage": 3, "deepspeed_config": {"zero_optimization": {"offload_param": {"device": "nvme"}}}},
            {},
            "distributed.deepspeed_config.zero_optimization.offload_param.device",
        ),
        (
            {"zero_stage": 1, "deepspeed_config": {"zero_optimization": {"overlap_comm": True}}},
            {},
            "distributed.deepspeed_config.zero_optimization.overlap_comm",
        ),
        ({"zero_stage": 0}, {"mixed_precision": "bf16"}, "distributed.zero_stage"),
    ],
)
def test_combinations_dancecore_cannot_run_name_the_key(distributed: dict, train: dict, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        deepspeed_config(run_config(distributed=distributed, train=train), check_with_deepspeed=False)
    assert any(e.startswith(f"{key}: ") for e in caught.value.errors), caught.value.errors


def test_offload_flags_are_checked_with_the_config() -> None:
    from dancecore.config.schema import validate

    base = {
        "output_dir": "unused",
        "prompts": {"texts": ["a"]},
        "policy": {"name": "testing-tiny"},
        "sampler": {"name": "flow-sde"},
        "rewards": [{"name": "brightness"}],
        "train": {"iterations": 1},
    }
    with pytest.raises(ConfigError) as caught:
        validate({**base, "distributed": {"zero_stage": 2, "offload_params": True}})
    assert any("distributed" in e and "offload_params needs zero_stage 3" in e for e in caught.value.errors)


def test_deepspeed_schema_errors_come_back_with_the_yaml_path() -> None:
    cfg = run_config(distributed={"deepspeed_config": {"zero_optimization": {"reduce_bucket_sise": 10}}})
    with pytest.raises(ConfigError) as caught:
        deepspeed_config(cfg)
    assert caught.value.errors[0].startswith("distributed.deepspeed_config.zero_optimization.reduce_bucket_sise: ")


def test_rank_listing() -> None:
    assert _ranges([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert _ranges([3]) == "3"


# ------------------------------------------------------------------------------- the launcher


def test_rank_command_forwards_config_overrides_and_flags() -> None:
    args = argparse.Namespace(
        config="configs/smoke.yaml",
        overrides=["train.iterations=2", "seed=1"],
        resume=True,
        allow_pickle=False,
        debug=True,
        nproc=2,
    )
    command = rank_command(args, 2)
    assert command[:5] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert command[5:] == [
        "-m",
        "dancecore.cli",
        "--debug",
        "train",
        "configs/smoke.yaml",
        "train.iterations=2",
        "seed=1",
        "--resume",
    ]
    assert "--nproc" not in command[5:]  # ranks must not launch again


RANKS = textwrap.dedent(
    """
    import os, signal, sys, time
    from pathlib import Path
    out = Path(sys.argv[1])
    def stop(signum, frame):  # what the trainer does: finish, checkpoint, exit cleanly
        (out / f"rank{os.environ['RANK']}.stopped").write_text(signal.Signals(signum).name)
        sys.exit(0)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    (out / f"rank{os.environ['RANK']}.pid").write_text(str(os.getpid()))
    if os.environ["RANK"] == "1" and len(sys.argv) > 2:
        time.sleep(1)
        sys.exit(3)
    time.sleep(120)
    """
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _wait_for(condition, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


def _torchrun(script: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), *args]


@pytest.mark.slow
def test_a_failing_rank_fails_the_launch_and_stops_the_others(tmp_path: Path) -> None:
    script = tmp_path / "ranks.py"
    script.write_text(RANKS)
    began = time.monotonic()
    code = supervise(_torchrun(script, str(tmp_path), "fail"), {**os.environ, "OMP_NUM_THREADS": "1"})
    assert code != 0
    assert time.monotonic() - began < 90  # rank 0 would sleep 120 s: it was stopped
    assert not _alive(int((tmp_path / "rank0.pid").read_text()))


@pytest.mark.slow
def test_ranks_do_not_outlive_a_killed_launcher(tmp_path: Path) -> None:
    script = tmp_path / "ranks.py"
    script.write_text(RANKS)
    launcher = _launcher(script, tmp_path)
    pids = [tmp_path / "rank0.pid", tmp_path / "rank1.pid"]
    assert _wait_for(lambda: all(p.exists() for p in pids))
    launcher.send_signal(signal.SIGKILL)  # no chance to clean up: the kernel tells torchrun
    launcher.wait()
    assert _wait_for(lambda: not any(_alive(int(p.read_text())) for p in pids), timeout=60)


def _launcher(script: Path, out: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from dancecore.distributed.launch import supervise; sys.exit(supervise(sys.argv[1:]))",
            *_torchrun(script, str(out)),
        ],
    )


@pytest.mark.slow
def test_ctrl_c_reaches_every_rank(tmp_path: Path) -> None:
    script = tmp_path / "ranks.py"
    script.write_text(RANKS)
    launcher = _launcher(script, tmp_path)
    assert _wait_for(lambda: all((tmp_path / f"rank{r}.pid").exists() for r in (0, 1)))
    launcher.send_signal(signal.SIGINT)
    assert launcher.wait(timeout=60) == 128 + signal.SIGINT
    for r in (0, 1):
        assert (tmp_path / f"rank{r}.stopped").read_text() in ("SIGINT", "SIGTERM")


# ------------------------------------------------------------------------ GRPO across ranks


@pytest.fixture(scope="module")
def trainers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Trainer]:
    """One process of world size 1 and both ranks of world size 2, built side by side (no
    process group needed to sample: ranks only talk when they update)."""
    from dancecore.config.schema import validate
    from tests.conftest import TINY_RUN, deep_update

    run = validate(
        deep_update(
            TINY_RUN,
            {
                "output_dir": str(tmp_path_factory.mktemp("grpo")),
                "train": {"prompts_per_iteration": 4},
            },
        )
    )
    return {
        "single": Trainer(run),
        "rank0": Trainer(run, rank=0, world_size=2),
        "rank1": Trainer(run, rank=1, world_size=2),
    }


def test_prompts_are_sharded_without_overlap(trainers: dict[str, Trainer]) -> None:
    for iteration in range(3):
        trainers["single"].data_cursor = trainers["rank0"].data_cursor = trainers["rank1"].data_cursor = 4 * iteration
        mine = [p.index for p in trainers["rank0"].local_prompts(iteration)]
        theirs = [p.index for p in trainers["rank1"].local_prompts(iteration)]
        everyone = [p.index for p in trainers["single"].local_prompts(iteration)]
        assert not set(mine) & set(theirs)
        assert sorted(mine + theirs) == sorted(everyone)
        ids = trainers["rank0"].global_prompt_ids(iteration) + trainers["rank1"].global_prompt_ids(iteration)
        assert sorted(ids) == list(range(4))


def _rollout(trainer: Trainer, iteration: int):
    trainer.data_cursor = 4 * iteration
    prompts = trainer.local_prompts(iteration)
    from dancecore.contracts.records import PromptBatch

    cond = trainer.policy.encode_prompts(PromptBatch(tuple(prompts)))
    schedule = trainer.sampler.schedule()
    return trainer.rollout(iteration, cond, schedule, trainer.stochastic_mask(schedule.num_steps, iteration))


def test_groups_stay_on_one_rank_and_samples_match_any_world_size(trainers: dict[str, Trainer]) -> None:
    single = _rollout(trainers["single"], 1)
    parts = [_rollout(trainers["rank0"], 1), _rollout(trainers["rank1"], 1)]
    g = trainers["single"].group_size
    for part in parts:
        # every group this rank holds is whole: G samples, one shared initial noise
        for gid in torch.unique(part.group_ids):
            rows = part.group_ids == gid
            assert int(rows.sum()) == g
            first = part.latents[rows, 0]
            assert torch.equal(first, first[:1].expand_as(first))
    assert not set(parts[0].group_ids.tolist()) & set(parts[1].group_ids.tolist())
    assert not set(parts[0].sample_ids.tolist()) & set(parts[1].sample_ids.tolist())
    # the same global sample gets the same noise (hence the same trajectory) at any world size
    for part in parts:
        for row, sample in enumerate(part.sample_ids.tolist()):
            there = int((single.sample_ids == sample).nonzero())
            torch.testing.assert_close(part.latents[row], single.latents[there], rtol=1e-5, atol=1e-5)
    # and different samples get different noise, across ranks too
    finals = torch.cat([parts[0].latents[:, 1], parts[1].latents[:, 1]]).flatten(1)
    assert torch.unique(finals, dim=0).shape[0] == finals.shape[0]


def test_sequence_parallel_degree_is_checked_against_ranks_prompts_and_policy() -> None:
    from dancecore.distributed.config import sequence_parallel_errors
    from dancecore.testing import TinyFlowPolicy

    cfg = run_config(distributed={"sequence_parallel": 2}, train={"prompts_per_iteration": 3})
    assert sequence_parallel_errors(cfg, 3) == [
        "distributed.sequence_parallel: 2 does not divide the number of ranks (3)"
    ]
    assert sequence_parallel_errors(cfg, 4) == [
        "train.prompts_per_iteration: 3 is not a multiple of the 2 sequence-parallel groups "
        "(4 ranks / distributed.sequence_parallel 2)"
    ]
    [unsupported] = sequence_parallel_errors(cfg, 2, TinyFlowPolicy)
    assert unsupported.startswith("distributed.sequence_parallel: policy 'testing-tiny' does not split")
    assert sequence_parallel_errors(run_config(), 3, TinyFlowPolicy) == []


def test_a_sequence_parallel_group_shares_prompts_and_noise(tmp_path: Path) -> None:
    """4 ranks, groups {0, 1} and {2, 3}: a group's ranks roll out the same samples, bit for bit,
    and only its first rank scores; the groups split the prompts as 2 plain ranks would."""
    from dancecore.config.schema import validate
    from dancecore.contracts.protocols import SequenceParallelGroup
    from tests.conftest import TINY_RUN, deep_update

    run = validate(deep_update(TINY_RUN, {"output_dir": str(tmp_path), "train": {"prompts_per_iteration": 4}}))
    ranks = [
        Trainer(
            run,
            rank=r,
            world_size=4,
            sequence_parallel=SequenceParallelGroup(2, r % 2, None, (r - r % 2, r - r % 2 + 1)),
        )
        for r in range(4)
    ]
    plain = [Trainer(run, rank=r, world_size=2) for r in range(2)]
    alone = validate(deep_update(TINY_RUN, {"output_dir": str(tmp_path), "distributed": {"sequence_parallel": 2}}))
    with pytest.raises(ConfigError, match=r"distributed.sequence_parallel: 2 needs that many ranks"):
        Trainer(alone)  # one process without a group: refused, not silently unsplit
    assert [t.scores_samples for t in ranks] == [True, False, True, False]
    rollouts = [_rollout(t, 1) for t in ranks]
    for first, second, alone in ((0, 1, 0), (2, 3, 1)):
        assert (
            ranks[first].global_prompt_ids(1) == ranks[second].global_prompt_ids(1) == plain[alone].global_prompt_ids(1)
        )
        assert torch.equal(rollouts[first].latents, rollouts[second].latents)
        assert torch.equal(rollouts[first].log_probs, rollouts[second].log_probs)
        assert torch.equal(rollouts[first].latents, _rollout(plain[alone], 1).latents)
