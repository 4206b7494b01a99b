"""The measured steps of the GPU check: a rollout step, a training step, rho between rollout and
replay, and the same step under each attention backend.

Every measurement is one :class:`Row`. FLOPs come from ``torch.utils.flop_counter.FlopCounterMode``
over one call (counted once per network with the ``sdpa`` backend: the other kernels do the same
arithmetic, and xformers/flash-attn ops are invisible to the counter). Out-of-memory is a result
(``status: OOM``), not a crash, so one table shows what fits on the GPU.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.gpu.networks import Workload, call

GIB = 2**30


@dataclass
class Row:
    """One line of the table."""

    workload: str
    step: str  # rollout | train | train+ckpt | attention:<backend>
    status: str = "ok"  # ok | OOM | skipped: <why>
    seconds: float | None = None
    peak_gib: float | None = None
    tflop: float | None = None  # per call
    tflops: float | None = None  # achieved TFLOP/s
    mfu: float | None = None  # tflops / the GPU's dense bf16 peak
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        """The row as a JSON object."""
        return asdict(self)


def sync(device: torch.device) -> None:
    """Wait for the device (timings on CUDA are asynchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device, collect: bool = False) -> None:
    """Give back the CUDA cache the last measurement held; ``collect`` also runs the garbage
    collector (about a second with diffusers and transformers loaded, so only between networks and
    after an out-of-memory error)."""
    if collect:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def rollout_step(module: torch.nn.Module, inputs: dict[str, Any]) -> Callable[[], Any]:
    """One network call without gradient, as the rollout makes it."""

    def run() -> Any:
        with torch.no_grad():
            return call(module, inputs)

    return run


def train_step(module: torch.nn.Module, inputs: dict[str, Any]) -> Callable[[], Any]:
    """One network call with gradient and its backward (a stand-in loss on the prediction)."""

    def run() -> Any:
        try:
            call(module, inputs).float().square().mean().backward()
        finally:  # also after an out-of-memory error: gradients must not pile up
            module.zero_grad(set_to_none=True)

    return run


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn`` by torch's dispatcher-level counter."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> tuple[float, float | None]:
    """Median seconds of ``repeats`` calls after one warm-up call, and the peak memory (GiB, CUDA)."""
    fn()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
    return statistics.median(times), peak


def measure(
    row: Row, fn: Callable[[], Any], device: torch.device, repeats: int, flops: int | None, peak_tflops: float | None
) -> Row:
    """Fill ``row`` with the timing of ``fn``; OOM becomes the row's status."""
    try:
        seconds, peak = timed(fn, device, repeats)
    except torch.OutOfMemoryError:
        row.status = "OOM"
        free(device, collect=True)
        return row
    row.seconds, row.peak_gib = seconds, peak
    if flops:
        row.tflop = flops / 1e12
        row.tflops = row.tflop / seconds
        row.mfu = row.tflops / peak_tflops if peak_tflops else None
    free(device)
    return row


def set_checkpointing(module: torch.nn.Module, on: bool) -> None:
    """Switch diffusers' gradient checkpointing (recompute activations in backward)."""
    if on:
        module.enable_gradient_checkpointing()  # type: ignore[operator]
    else:
        module.disable_gradient_checkpointing()  # type: ignore[operator]


def rho_checks(
    w: Workload, module: torch.nn.Module, inputs: dict[str, Any], dtype: torch.dtype
) -> list[dict[str, Any]]:
    """rho = exp(log p_replay - log p_rollout) of one SDE transition, with the network in ``dtype``.

    The rollout scores a sampled transition from a prediction without gradient; the replay rescores
    the same transition from a prediction with gradient, with gradient checkpointing off and on, as
    training does. dancecore's samplers (flow-sde / ddim-sde) compute the log-probs in fp32.
    """
    from dancecore.testing import build_component

    sampler = build_component("sampler", "flow-sde" if w.prediction == "flow" else "ddim-sde", {"num_steps": 16})
    schedule = sampler.schedule()
    key = w.latents_key()
    latents = inputs[key].float()
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(1)).to(latents.device)
    with torch.no_grad():
        old = sampler.step(schedule, 3, latents, call(module, inputs).float(), noise=noise)
    results = []
    index = torch.full((latents.shape[0],), 3, device=latents.device)
    for checkpointing in (True, False):  # with checkpointing first: it fits where the other may not
        set_checkpointing(module, checkpointing)
        result: dict[str, Any] = {
            "workload": w.name,
            "dtype": str(dtype).removeprefix("torch."),
            "gradient_checkpointing": checkpointing,
        }
        try:
            prediction = call(module, inputs).float()
            new = sampler.step(schedule, index, latents, prediction, next_latents=old.next_latents)
            rho = torch.exp(new.log_prob.detach() - old.log_prob)
            result |= {
                "rho": [float(r) for r in rho.cpu()],
                "exactly_one": bool(torch.equal(rho, torch.ones_like(rho))),
            }
        except torch.OutOfMemoryError:
            result |= {"rho": None, "exactly_one": None, "status": "OOM"}
        results.append(result)
        module.zero_grad(set_to_none=True)
        free(latents.device, collect="status" in result)
    set_checkpointing(module, False)
    return results


def score_bytes(w: Workload, module: torch.nn.Module, sequence: int, rows: int) -> int:
    """Bytes of one layer's attention-score tensor in bf16 (what the math kernel materialises)."""
    # SD's UNet config names its head count attention_head_dim (a legacy diffusers quirk).
    value: Any = getattr(module.config, "num_attention_heads", None) or getattr(module.config, "attention_head_dim", 8)
    heads = max(value) if isinstance(value, list | tuple) else int(value)
    return rows * heads * sequence * sequence * 2
