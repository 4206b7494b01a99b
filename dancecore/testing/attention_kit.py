"""Conformance check of ``policy.attention_backend``: every backend runs what it says, rollout and
training agree bit for bit under each, and the backends train a tiny preset to the same metrics.

Call it from a policy plugin's tests::

    from dancecore.testing import check_attention_backends

    def test_attention_backends_train_alike(tmp_path):
        check_attention_backends("my-policy", {"preset": "tiny"}, tmp_path)
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from dancecore.config.schema import validate
from dancecore.contracts.records import PromptBatch
from dancecore.plugin_kit.attention import attention_backend_of

#: Metrics that measure the machine, not the run.
_TIMING = ("seconds", "time/")


def check_attention_backends(
    name: str,
    options: dict[str, Any],
    output_dir: Path,
    *,
    backends: tuple[str, ...] = ("sdpa", "native"),
    prompts: dict[str, Any] | None = None,
    iterations: int = 2,
    rel: float = 1e-3,
    atol: float = 1e-4,
) -> dict[str, list[dict[str, Any]]]:
    """Check policy ``name`` (built from ``options``) under each of ``backends``; return each
    backend's metric records.

    Per backend: the trained network reports that backend in every attention layer, and a
    prediction without gradient (rollout) equals one with gradient (training) bit for bit. Across
    backends: one forward differs by at most ``atol``, and ``iterations`` GRPO iterations of a tiny
    run (brightness reward, CPU) give the same metrics within ``rel``, with rho exactly 1.
    ``prompts`` is the run's ``prompts`` block (default: two texts; an image-to-video policy gives a
    prompt file with images).
    """
    prompts = prompts or {"texts": ["a red cube", "a cat on a mat"]}
    trainers = {
        backend: _trainer(name, options, backend, prompts, output_dir / backend, iterations) for backend in backends
    }
    predictions = {backend: _predictions(name, backend, trainer) for backend, trainer in trainers.items()}
    reference = backends[0]
    for backend, prediction in predictions.items():
        diff = float((prediction - predictions[reference]).abs().max())
        assert diff <= atol, (
            f"{name}: one forward with attention_backend={backend!r} differs from {reference!r} by {diff:.3g} "
            f"(> {atol:g}): the kernels must compute the same attention"
        )
    records = {backend: _train(trainer) for backend, trainer in trainers.items()}
    for backend, runs in records.items():
        assert [r["ratio_mean"] for r in runs] == [1.0] * iterations, (
            f"{name}: with attention_backend={backend!r} the importance ratio is not exactly 1 before the update: "
            f"{[r['ratio_mean'] for r in runs]} (rollout and training must run the same kernel)"
        )
        _assert_same_metrics(name, backend, reference, runs, records[reference], rel)
    return records


def _predictions(name: str, backend: str, trainer: Any) -> torch.Tensor:
    policy = trainer.policy
    ran = attention_backend_of(policy.module)
    assert ran == backend, f"{name}: attention_backend={backend!r} was asked for, but the network runs {ran!r}"
    prompts = PromptBatch(tuple(trainer.local_prompts(0)))
    cond = policy.encode_prompts(prompts)
    latents = policy.initial_noise(len(prompts.texts), torch.Generator().manual_seed(0))
    flow = getattr(policy, "prediction_type", "flow") == "flow"
    timesteps = torch.full((len(prompts.texts),), 0.5) if flow else torch.full((len(prompts.texts),), 500)
    with torch.no_grad():
        rollout = policy.predict(latents, timesteps, cond)
    training = policy.predict(latents, timesteps, cond)
    assert torch.equal(rollout, training.detach()), (
        f"{name}: with attention_backend={backend!r} the prediction with gradient differs from the one without "
        f"(max {float((rollout - training.detach()).abs().max()):.3g}): rho would not be 1"
    )
    return rollout.float().cpu()


def _trainer(
    name: str, options: dict[str, Any], backend: str, prompts: dict[str, Any], output_dir: Path, iterations: int
) -> Any:
    from dancecore.registry import load as load_plugin
    from dancecore.training.trainer import Trainer

    flow = getattr(load_plugin("policy", name), "prediction_type", "flow") == "flow"
    run = validate(
        {
            "seed": 0,
            "output_dir": str(output_dir),
            "prompts": prompts,
            "policy": {"name": name, **options, "attention_backend": backend},
            "sampler": {"name": "flow-sde" if flow else "ddim-sde", "num_steps": 3},
            "algorithm": {"name": "grpo", "group_size": 2, "timestep_fraction": 1.0},
            "rewards": [{"name": "brightness"}],
            "train": {
                "iterations": iterations,
                "prompts_per_iteration": 1,
                "micro_batch_size": 2,
                "learning_rate": 1e-3,
                "checkpoint_every": 1000,
                "device": "cpu",
                "num_threads": 1,
            },
            "logging": {"progress_bar": False, "tensorboard": False},
        }
    )
    torch.manual_seed(0)  # the same random-init weights wherever a preset draws them
    return Trainer(run)


def _train(trainer: Any) -> list[dict]:
    trainer.train()
    return [{k: v for k, v in r.items() if not k.startswith(_TIMING)} for r in trainer.metrics.read()]


def _assert_same_metrics(
    name: str, backend: str, reference: str, runs: list[dict], expected: list[dict], rel: float
) -> None:
    assert len(runs) == len(expected), (
        f"{name}: {backend!r} logged {len(runs)} iterations, {reference!r} {len(expected)}"
    )
    for got, want in zip(runs, expected, strict=True):
        assert got.keys() == want.keys(), f"{name}: {backend!r} and {reference!r} log different metrics"
        for key, value in want.items():
            other = got[key]
            if isinstance(value, float) and isinstance(other, float):
                same = math.isclose(other, value, rel_tol=rel, abs_tol=1e-6)
            else:
                same = other == value
            assert same, (
                f"{name}: iteration {want.get('iteration')}: {key} = {other!r} with attention_backend={backend!r}, "
                f"{value!r} with {reference!r}: the backends must train to the same metrics"
            )
