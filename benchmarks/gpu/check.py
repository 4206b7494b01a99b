"""``make gpu-check``: real-size FLUX.1, SD1.4 and HunyuanVideo networks on one GPU, no downloads.

    python -m benchmarks.gpu              # real size on CUDA (sized for under 10 minutes on one H100-class GPU)
    python -m benchmarks.gpu --tiny       # the same code at tiny size (CPU, fp32): what CI runs
    python -m benchmarks.gpu --only flux --repeats 5
    python -m benchmarks.gpu --dry-run    # real size on the meta device: shapes and FLOPs (CPU, ~2 min)

For each network (random weights, the published architecture): a bf16 rollout step and training
step (gradient checkpointing off and on) at the recipe's resolution and micro-batch, with seconds,
peak memory, FLOPs (torch's flop counter), TFLOP/s and MFU against the GPU's dense bf16 peak;
rho == 1 exactly between rollout and replay in bf16; each attention backend side by side; and one
GRPO iteration of a small real-architecture model (tiny FLUX) end to end through the trainer.
Prints a table and writes ``benchmarks/results/gpu-<device>.json``. Without CUDA it runs the tiny
path and says which parts it skipped. docs/performance.md explains how to read the table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.gpu.networks import WORKLOADS, Workload, call, tokens, workload
from benchmarks.gpu.steps import (
    Row,
    count_flops,
    free,
    measure,
    rho_checks,
    rollout_step,
    score_bytes,
    set_checkpointing,
    train_step,
)

RESULTS = Path(__file__).resolve().parents[1] / "results"

#: Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from the vendors' data sheets; matched
#: against torch.cuda.get_device_name() in this order. DANCECORE_PEAK_TFLOPS overrides.
BF16_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GB200", 2500.0),
    ("B200", 2250.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("H800 PCIe", 756.0),
    ("H800", 989.0),
    ("H20", 148.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("RTX 4090", 165.0),
)

#: The math kernel's score tensor above this is not attempted at real size (minutes, or OOM).
NATIVE_SCORE_LIMIT = 8 * 2**30


def peak_tflops(device: torch.device) -> float | None:
    """The GPU's dense bf16 peak (TFLOP/s), or None (CPU, or a GPU not in the table)."""
    if os.environ.get("DANCECORE_PEAK_TFLOPS"):
        return float(os.environ["DANCECORE_PEAK_TFLOPS"])
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAK_TFLOPS if key in name), None)


def device_slug(device: torch.device, tiny: bool) -> str:
    """``nvidia-h100-80gb-hbm3``-style name for the results file."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    if device.type == "meta":
        return "meta-dry-run"
    return f"{slug}-tiny" if tiny else slug


class Check:
    """One run of the check: collects rows, rho results, backend comparisons and skip notes."""

    def __init__(self, device: torch.device, tiny: bool, repeats: int) -> None:
        self.device, self.tiny, self.repeats = device, tiny, repeats
        self.on_cuda = device.type == "cuda"
        # bf16 on CUDA; fp32 on CPU, where bf16 matmuls are emulated and say nothing about a GPU.
        self.dtype = torch.bfloat16 if self.on_cuda else torch.float32
        self.peak = peak_tflops(device)
        self.rows: list[Row] = []
        self.rho: list[dict[str, Any]] = []
        self.backends: list[dict[str, Any]] = []
        self.networks: dict[str, dict[str, Any]] = {}
        self.skipped: list[str] = []
        if device.type == "meta":
            self.skip("timings, memory, rho, attention backends and the GRPO iteration (dry run on the meta device)")
        elif not self.on_cuda:
            self.skip("bf16 steps, rho in bf16 on CUDA, peak memory, MFU, xformers and flash (needs CUDA)")

    def skip(self, what: str) -> None:
        """Record (and print) a part that did not run, and why."""
        self.skipped.append(what)
        print(f"skipped: {what}", flush=True)

    # ------------------------------------------------------------------------------ one network

    def network(self, w: Workload) -> None:
        """Every measurement of one workload."""
        start = time.perf_counter()
        torch.manual_seed(0)
        try:
            module = w.build(self.tiny, self.device, self.dtype)
        except torch.OutOfMemoryError:
            self.rows.append(Row(w.name, "build", status="OOM"))
            free(self.device, collect=True)
            return
        module.train().requires_grad_(True)
        inputs = w.inputs(self.tiny, self.device, self.dtype)
        self.networks[w.name] = {
            "architecture": w.spec()["source"],
            "parameters": sum(p.numel() for p in module.parameters()),
            "tokens_per_row": tokens(w, self.tiny),
            "sizes": w.sizes(self.tiny),
            "notes": w.notes,
            "build_seconds": round(time.perf_counter() - start, 2),
        }
        flops_rollout, flops_train = self._flops(w)
        if self.device.type == "meta":  # the dry run: shapes and FLOPs at real size, nothing timed
            for step, flops in (("rollout", flops_rollout), ("train", flops_train)):
                self.rows.append(Row(w.name, step, status="dry run", tflop=flops / 1e12))
            return
        self.rows.append(self._measure(Row(w.name, "rollout"), rollout_step(module, inputs), flops_rollout))
        for checkpointing in (False, True):
            set_checkpointing(module, checkpointing)
            step = "train+ckpt" if checkpointing else "train"
            self.rows.append(self._measure(Row(w.name, step), train_step(module, inputs), flops_train))
        set_checkpointing(module, False)
        try:
            self.rho.extend(rho_checks(w, module, inputs, self.dtype))
        except torch.OutOfMemoryError:  # the rollout call itself does not fit
            self.rows.append(Row(w.name, "rho", status="OOM"))
            free(self.device, collect=True)
        self._backends(w, module, inputs, (flops_rollout, flops_train))
        del module, inputs
        free(self.device, collect=True)

    def _flops(self, w: Workload) -> tuple[int, int]:
        """FLOPs of a rollout call and a training call, counted on a meta-device twin of the
        network: the same graph, no memory (a 13B training step without checkpointing need not fit)."""
        meta = torch.device("meta")
        module = w.build(self.tiny, meta, self.dtype).train().requires_grad_(True)
        inputs = w.inputs(self.tiny, meta, self.dtype)
        return count_flops(rollout_step(module, inputs)), count_flops(train_step(module, inputs))

    def _measure(self, row: Row, fn: Any, flops: int | None) -> Row:
        return measure(row, fn, self.device, self.repeats, flops, self.peak)

    def _backends(self, w: Workload, module: torch.nn.Module, inputs: dict[str, Any], flops: tuple[int, int]) -> None:
        """The rollout step and the checkpointed training step under each attention backend the
        policy offers, side by side; the note has the prediction's max |diff| from sdpa's."""
        from dancecore import ATTENTION_BACKENDS, attention_backend_problem, load_plugin

        offered = load_plugin("policy", w.policy).Config.attention_backends
        try:
            with torch.no_grad():
                reference = call(module, inputs).float()
        except torch.OutOfMemoryError:
            self.rows.append(Row(w.name, "attention:*", status="OOM"))
            free(self.device, collect=True)
            return
        rows = w.sizes(self.tiny)["rows"]
        for backend in ATTENTION_BACKENDS:
            problem = attention_backend_problem(backend, offered)
            if backend == "native" and score_bytes(w, module, tokens(w, self.tiny), rows) > NATIVE_SCORE_LIMIT:
                problem = "the math kernel's score tensor would exceed 8 GiB per layer at this size"
            if problem:
                self.rows.append(Row(w.name, f"attention:{backend}", status=f"skipped: {problem}"))
                continue
            self.rows.extend(self._backend_rows(w, module, inputs, flops, backend, reference))

    def _backend_rows(
        self,
        w: Workload,
        module: torch.nn.Module,
        inputs: dict[str, Any],
        flops: tuple[int, int],
        backend: str,
        reference: torch.Tensor,
    ) -> list[Row]:
        from dancecore import apply_attention_backend

        rollout, train = Row(w.name, f"attention:{backend}"), Row(w.name, f"attention:{backend} train+ckpt")
        try:
            apply_attention_backend(module, backend)
            with torch.no_grad():
                diff = float((call(module, inputs).float() - reference).abs().max())
            rollout.note = f"max|diff| vs sdpa {diff:.3g}"
            self.backends.append({"workload": w.name, "backend": backend, "max_abs_diff_vs_sdpa": diff})
            self._measure(rollout, rollout_step(module, inputs), flops[0])
            set_checkpointing(module, True)
            self._measure(train, train_step(module, inputs), flops[1])
        except torch.OutOfMemoryError:
            rollout.status = "OOM" if rollout.seconds is None else rollout.status
            train.status = "OOM"
        except (RuntimeError, ValueError, NotImplementedError) as exc:  # a kernel refusing these inputs
            rollout.status = train.status = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        finally:
            set_checkpointing(module, False)
            apply_attention_backend(module, "sdpa")
            free(self.device)
        return [rollout, train]

    # ------------------------------------------------------------------------------ end to end

    def grpo_iteration(self, output_dir: Path) -> dict[str, Any]:
        """One GRPO iteration of tiny FLUX (the real architecture, small) through the trainer."""
        from dancecore.testing import validate
        from dancecore.training.trainer import Trainer

        run = validate(
            {
                "seed": 0,
                "output_dir": str(output_dir),
                "prompts": {"texts": ["a red cube", "a cat on a mat"]},
                "policy": {"name": "flux", "preset": "tiny"},
                "sampler": {"name": "flow-sde", "num_steps": 4},
                "algorithm": {"name": "grpo", "group_size": 4, "timestep_fraction": 0.6},
                "rewards": [{"name": "brightness"}],
                "train": {
                    "iterations": 1,
                    "prompts_per_iteration": 2,
                    "micro_batch_size": 4,
                    "device": str(self.device),
                    "mixed_precision": "bf16" if self.on_cuda else "no",
                    "checkpoint_every": 1000,
                    "num_threads": torch.get_num_threads(),
                },
                "logging": {"progress_bar": False, "tensorboard": False},
            }
        )
        start = time.perf_counter()
        trainer = Trainer(run)
        trainer.train()
        (record,) = trainer.metrics.read()
        return {
            "device": str(self.device),
            "seconds_with_build": round(time.perf_counter() - start, 2),
            "iteration_seconds": record.get("seconds"),
            "ratio_mean": record["ratio_mean"],
            "reward_mean": record["reward_mean"],
            "grad_norm": record["grad_norm"],
        }

    # ------------------------------------------------------------------------------ output

    def table(self) -> str:
        """The rows as a fixed-width text table."""
        head = (
            f"{'network':<13} {'step':<19} {'s/call':>8} {'peak GiB':>9} {'TFLOP':>9} {'TFLOP/s':>8} {'MFU':>6}  note"
        )
        lines = [head, "-" * len(head)]
        for r in self.rows:

            def num(value: float | None, fmt: str) -> str:
                return format(value, fmt) if value is not None else "-"

            note = r.note if r.status == "ok" else r.status.split(";")[0]  # the JSON has the whole message
            lines.append(
                f"{r.workload:<13} {r.step:<19} {num(r.seconds, '.4f'):>8} {num(r.peak_gib, '.1f'):>9} "
                f"{num(r.tflop, '.4g'):>9} {num(r.tflops, '.1f'):>8} {num(r.mfu and 100 * r.mfu, '.1f'):>6}  {note}"
            )
        for rho in self.rho:
            ckpt = "on" if rho["gradient_checkpointing"] else "off"
            lines.append(
                f"rho {rho['workload']} ({rho['dtype']}, checkpointing {ckpt}): exactly 1 = {rho['exactly_one']}"
            )
        return "\n".join(lines)

    def report(self, grpo: dict[str, Any] | None, seconds: float) -> dict[str, Any]:
        """Everything as one JSON-ready dict."""
        import diffusers

        return {
            "device": torch.cuda.get_device_name(self.device) if self.on_cuda else self.device.type,
            "size": "tiny" if self.tiny else "real",
            "dtype": str(self.dtype).removeprefix("torch."),
            "peak_bf16_tflops": self.peak,
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            "seconds": round(seconds, 1),
            "networks": self.networks,
            "rows": [r.to_json() for r in self.rows],
            "rho": self.rho,
            "attention_backends": self.backends,
            "grpo_iteration": grpo,
            "skipped": self.skipped,
        }


def run(
    *, tiny: bool, device: torch.device, only: list[str] | None = None, repeats: int = 3, out: Path | None = None
) -> dict[str, Any]:
    """Run the check; print the table; write the JSON (to ``out`` or benchmarks/results/)."""
    start = time.perf_counter()
    check = Check(device, tiny, repeats)
    for w in [workload(n) for n in only] if only else WORKLOADS:
        print(f"{w.name}: {w.notes}" + (" [tiny]" if tiny else ""), flush=True)
        check.network(w)
    grpo = None
    if device.type != "meta":
        with tempfile.TemporaryDirectory() as tmp:
            grpo = check.grpo_iteration(Path(tmp) / "run")
    report = check.report(grpo, time.perf_counter() - start)
    print(check.table())
    if grpo:
        print(
            f"GRPO iteration (tiny FLUX, {grpo['device']}): {grpo['seconds_with_build']} s, ratio {grpo['ratio_mean']}"
        )
    path = out or RESULTS / f"gpu-{device_slug(device, tiny)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    return report


def main(argv: list[str] | None = None) -> int:
    """Command line of ``python -m benchmarks.gpu``."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny networks (the CPU path CI runs)")
    parser.add_argument("--device", default=None, help="cuda[:N] or cpu (default: cuda when available)")
    parser.add_argument(
        "--dry-run", action="store_true", help="real size on the meta device: input shapes and FLOPs, nothing timed"
    )
    parser.add_argument("--only", default=None, help="comma-separated networks: " + ",".join(w.name for w in WORKLOADS))
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per step (default 3; tiny 1)")
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON path (default benchmarks/results/gpu-<device>.json)"
    )
    args = parser.parse_args(argv)
    device = torch.device("meta" if args.dry_run else args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tiny = args.tiny or device.type == "cpu"
    if device.type == "cpu" and not args.tiny:
        print("no CUDA device: running the tiny CPU path; the real-size table needs a GPU", flush=True)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    only = args.only.split(",") if args.only else None
    run(tiny=tiny, device=device, only=only, repeats=args.repeats or (1 if tiny else 3), out=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
