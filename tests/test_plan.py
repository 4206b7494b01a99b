"""`dancecore plan`: clear errors, the ZeRO accounting, and the meta-device activation measurement.
The real backbones' plans and their agreement with measured CPU peaks are tested in the policy
plugins (e.g. plugins/dancecore-flux/tests/test_flux_plan.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from dancecore.cli import _main
from dancecore.errors import UserError
from dancecore.planning.measure import measure_call
from dancecore.planning.plan import GB, parse_memory
from dancecore.planning.states import Setting, model_states
from tests.conftest import TINY_RUN


def _config(directory: Path, data: dict) -> str:
    path = directory / "run.yaml"
    path.write_text(yaml.safe_dump({**data, "output_dir": str(directory / "out")}))
    return str(path)


def test_a_policy_without_the_contract_is_a_clear_error(tmp_path, capsys):
    assert _main(["plan", _config(tmp_path, TINY_RUN), "--gpus", "1"]) == 2
    err = capsys.readouterr().err
    assert "policy 'testing-tiny'" in err and "memory_plan_spec" in err and "PlannablePolicy" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gpus", "1", "--gpu-memory", "eighty"], "--gpu-memory: 'eighty' is not a memory size"),
        (["--gpus", "1", "--gpu-memory", "80XB"], "is not a memory size"),
        (["--gpus", "3"], "--gpus 3 does not divide train.prompts_per_iteration (2)"),
        (["--gpus", "0"], "--gpus must be at least 1"),
    ],
)
def test_bad_arguments_are_user_errors(tmp_path, capsys, args, message):
    data = {
        **TINY_RUN,
        "policy": {"name": "flux", "preset": "tiny"},
        "train": {**TINY_RUN["train"], "prompts_per_iteration": 2},
    }
    assert _main(["plan", _config(tmp_path, data), *args]) == 2
    assert message in capsys.readouterr().err


def test_memory_sizes_parse():
    assert parse_memory("80GB") == parse_memory("80") == parse_memory("80 G") == 80 * GB
    assert parse_memory("80GiB") == 80 * 2**30 and parse_memory("40000MB") == 40 * GB
    with pytest.raises(UserError):
        parse_memory("-3GB")


def test_zero_accounting_per_stage():
    p, n = 1_000_000_000, 8
    s0 = model_states(p, 0, Setting(0), n, bf16=True)
    assert (s0.weights, s0.gradients, s0.optimizer) == (2 * p, 2 * p, 12 * p)
    s1 = model_states(p, 0, Setting(1), n, bf16=True)
    assert (s1.weights, s1.gradients, s1.optimizer) == (2 * p, 4 * p, 12 * p // n)  # fp32 grad accumulation
    s2 = model_states(p, 0, Setting(2), n, bf16=True)
    assert (s2.weights, s2.gradients, s2.optimizer) == (2 * p, 2 * p // n, 12 * p // n)
    s3 = model_states(p, 0, Setting(3, offload_optimizer=True), n, bf16=True)
    assert (s3.weights, s3.optimizer, s3.cpu) == (2 * p // n, 0, 16 * p // n)
    lora = model_states(1000, p, Setting(2), n, bf16=True)  # the frozen base: weights only
    assert lora.weights == 2 * (p + 1000) and lora.gradients < 1000
    local = model_states(p, 0, Setting(None), 1, bf16=False)
    assert local.total == 16 * p


def test_meta_measurement_sees_saved_activations_and_checkpointing():
    """An MLP of known sizes on the meta device: a forward without grad frees as it goes, one with
    grad keeps each layer's input (and the activation) for backward; checkpointing keeps far less."""
    torch.manual_seed(0)
    with torch.device("meta"):
        mlp = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.GELU()) for _ in range(4)])

    def call(module: torch.nn.Module, rows: int) -> torch.Tensor:
        return module(torch.randn(rows, 256, device="meta"))

    figures = measure_call(mlp, call, 1024)
    layer = 1024 * 256 * 4  # one (rows, 256) fp32 activation: 1 MiB
    assert figures.rollout_peak <= 4 * layer  # a few live activations, never all eight
    assert 8 * layer - layer <= figures.saved <= 8 * layer + layer  # linear input + GELU input per layer

    def checkpointed(module: torch.nn.Module, rows: int) -> torch.Tensor:
        x = torch.randn(rows, 256, device="meta", requires_grad=True)
        for block in module:
            x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
        return x

    assert measure_call(mlp, checkpointed, 1024).saved <= 5 * layer


def test_plan_prints_the_table_and_verdict_for_the_8_gpu_recipe(capsys):
    """The 8-GPU FLUX recipe through the CLI, on the tiny preset (the real-size plan of the same
    command is in docs/distributed.md; its parameter counts are tested in the FLUX plugin)."""
    pytest.importorskip("dancecore_flux")
    torch.set_num_threads(1)
    tiny = ["policy.pretrained=null", "policy.preset=tiny", "policy.resolution=32", "policy.max_sequence_length=32"]
    tiny += ["rewards[0].pretrained=null", "rewards[0].preset=tiny"]
    assert _main(["plan", "configs/flux/hps_8gpu.yaml", *tiny, "--gpus", "8", "--gpu-memory", "80GB"]) == 0
    out = capsys.readouterr().out
    assert "FluxTransformer2DModel" in out and "the tiny preset" in out and "reward hps-v2.1: open_clip tiny" in out
    assert "| ZeRO-3 + opt offload * |" in out and "| ZeRO-0 |" in out and "not offered" in out
    assert "verdict: cheapest setting that fits: ZeRO-1" in out
    assert "the config's setting, ZeRO-3 + opt offload:" in out and "fits" in out
