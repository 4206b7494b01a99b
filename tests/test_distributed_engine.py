"""DeepSpeedEngine against LocalEngine, with two real processes on CPU (ZeRO stages 0-3, bf16).

pytest starts ``torchrun --nproc_per_node 2`` on this very file; each rank runs :func:`worker`
(the ``__main__`` block), which checks the engine on a small MLP against a single-process
LocalEngine fed the whole global batch, and writes what it measured to a JSON file that the
test then checks again and reports.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
GLOBAL_BATCH = 8
MICRO = 2
# fp32: 2 ranks vs 1 process differ only by summation order (measured max 3e-8 on the weights).
FP32_TOLERANCE = 1e-6
VARIANTS = [(0, False), (1, False), (2, False), (3, False), (1, True), (3, True)]


def run_config(stage: int, bf16: bool, output_dir: str) -> Any:
    from dancecore.config.schema import RunConfig

    return RunConfig.model_validate(
        {
            "output_dir": output_dir,
            "prompts": {"texts": ["unused"]},
            "policy": {"name": "unused"},
            "sampler": {"name": "unused"},
            "rewards": [{"name": "unused"}],
            "train": {
                "iterations": 1,
                "learning_rate": 1e-2,
                "weight_decay": 1e-4,
                "grad_clip": 0.5,
                "mixed_precision": "bf16" if bf16 else "no",
            },
            "distributed": {"backend": "deepspeed", "zero_stage": stage},
        }
    )


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3)
    )


def update(
    engine: Any,
    model: torch.nn.Module,
    batch: torch.Tensor,
    rank: int,
    world: int,
    *,
    poison: bool = False,
    bf16: bool = False,
) -> float:
    """The trainer's pattern: this rank's share in micro-batches, loss scaled by 1/(local samples),
    one backward per micro-batch, one step."""
    local = batch[rank::world]
    for start in range(0, local.shape[0], MICRO):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(local[start : start + MICRO]).float()
        loss = (out**2).sum() / local.shape[0]
        if poison:
            loss = loss * math.nan
        engine.backward(loss)
    return engine.step()


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:5]
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def check_variant(stage: int, bf16: bool, rank: int, world: int, data: torch.Tensor, tmp: str) -> dict[str, Any]:
    import dancecore.distributed as distributed
    from dancecore import checkpoint as ckpt
    from dancecore.training.engine import LocalEngine

    cfg = run_config(stage, bf16, tmp)
    found: dict[str, Any] = {}
    model, reference_model = make_model(), make_model()
    engine = distributed.DeepSpeedEngine(model, cfg)
    reference = LocalEngine(reference_model, cfg.train)
    assert engine.world_size == world and engine.rank == rank

    # Gradients are averaged over ranks: 2 ranks x B/2 == 1 process x B.
    norms = []
    for u in range(2):
        norms.append(
            (update(engine, model, data[u], rank, world, bf16=bf16), update(reference, reference_model, data[u], 0, 1))
        )
    found["norm_rel_diff"] = max(abs(a - b) / b for a, b in norms)
    found["weights_diff"] = max_diff(engine.model_state(), reference.model_state())
    tensors, meta = engine.optimizer_state()
    ref_tensors, ref_meta = reference.optimizer_state()
    found["moments_diff"] = max_diff(tensors, ref_tensors)
    assert json.loads(json.dumps(meta)) == json.loads(json.dumps(ref_meta)), (meta, ref_meta)
    if not bf16:
        assert found["norm_rel_diff"] < 1e-5, norms
        assert found["weights_diff"] < FP32_TOLERANCE, found
        assert found["moments_diff"] < FP32_TOLERANCE, found
    else:  # bf16 weights and activations: only roughly the fp32 update
        assert found["norm_rel_diff"] < 0.05, norms
        assert found["weights_diff"] < 0.05, found

    # A non-finite loss on rank 1 only: every rank skips the update, nothing changes.
    before_w, (before_t, _) = engine.model_state(), engine.optimizer_state()
    norm = update(engine, model, data[2], rank, world, poison=rank == world - 1, bf16=bf16)
    assert not math.isfinite(norm), norm
    assert ckpt.tensors_equal(engine.model_state(), before_w)
    assert ckpt.tensors_equal(engine.optimizer_state()[0], before_t)

    # zero_grad drops a partial accumulation (the trainer's non-finite-loss path) on every stage.
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        junk = model(data[3][rank::world] * 3).float()
    engine.backward((junk**3).sum())
    engine.zero_grad()
    engine.zero_grad()  # nothing pending: a no-op
    update(engine, model, data[3], rank, world, bf16=bf16)
    update(reference, reference_model, data[3], 0, 1)
    found["after_zero_grad_diff"] = max_diff(engine.model_state(), reference.model_state())
    if not bf16:
        assert found["after_zero_grad_diff"] < FP32_TOLERANCE, found
    engine.close()

    # Resume: a fresh engine (other init) loads LocalEngine's full state, bit for bit, and then
    # takes the same next step.
    model2 = make_model(seed=1)
    engine2 = distributed.DeepSpeedEngine(model2, cfg)
    saved_w, (saved_t, saved_meta) = reference.model_state(), reference.optimizer_state()
    saved_w = {k: v.clone() for k, v in saved_w.items()}
    saved_t = {k: v.clone() for k, v in saved_t.items()}
    engine2.load_state(saved_w, saved_t, saved_meta)
    assert ckpt.tensors_equal(engine2.model_state(), saved_w)
    tensors2, meta2 = engine2.optimizer_state()
    assert ckpt.tensors_equal(tensors2, saved_t)
    assert json.loads(json.dumps(meta2)) == json.loads(json.dumps(saved_meta))
    update(engine2, model2, data[4], rank, world, bf16=bf16)
    update(reference, reference_model, data[4], 0, 1)
    found["after_resume_diff"] = max_diff(engine2.model_state(), reference.model_state())
    if not bf16:
        assert found["after_resume_diff"] < FP32_TOLERANCE, found

    # Replicas that drift apart are caught (stages 0-2 keep a full copy on every rank).
    if stage < 3:
        target = next(iter(engine2.params.values()))
        with torch.no_grad():
            if rank == world - 1:
                target.view(-1)[0] += 1e-3
        try:
            engine2.check_replicas()
        except distributed.ReplicaDivergence:
            found["divergence_detected"] = True
        else:
            found["divergence_detected"] = False
        assert found["divergence_detected"]
        with torch.no_grad():
            if rank == world - 1:
                target.view(-1)[0] -= 1e-3
    engine2.close()
    return found


def worker(out_path: str) -> None:
    """One rank: every variant, then the collectives."""
    import tempfile

    import dancecore.distributed as distributed

    torch.set_num_threads(1)
    rank, world, _ = distributed.init_process_group(cuda=False)
    data = torch.randn(5, GLOBAL_BATCH, 6, generator=torch.Generator().manual_seed(7))
    results: dict[str, Any] = {"world_size": world}
    with tempfile.TemporaryDirectory() as tmp:
        for stage, bf16 in VARIANTS:
            results[f"zero{stage}{'-bf16' if bf16 else ''}"] = check_variant(stage, bf16, rank, world, data, tmp)
        engine = distributed.DeepSpeedEngine(make_model(), run_config(2, False, tmp))
        assert engine.all_reduce_mean([float(rank), 1.0, math.nan])[:2] == [(world - 1) / 2, 1.0]
        assert engine.any_rank(rank == world - 1) and not engine.any_rank(False)
        engine.barrier()
        engine.close()
    if rank == 0:
        Path(out_path).write_text(json.dumps(results, indent=1))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_deepspeed_engine_matches_local_engine_on_two_ranks(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, str(out)]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    results = json.loads(out.read_text())
    assert results["world_size"] == 2
    for stage in range(4):
        measured = results[f"zero{stage}"]
        assert measured["weights_diff"] < FP32_TOLERANCE
        assert measured["after_resume_diff"] < FP32_TOLERANCE
        assert stage == 3 or measured["divergence_detected"]
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    worker(sys.argv[1])
