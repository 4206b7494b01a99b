"""Check the planner against the measured peak memory of real CPU steps (benchmarks/plan_memory.py).

The run is real: the policy's trained network is built from the same ``memory_plan_spec`` the
planner uses, materialised on the CPU (``to_empty`` then random weights), and trained with AdamW
in fp32 for two optimizer steps of two micro-batches each (gradient accumulation, so the second
micro-batch's backward runs with a full set of gradients and the Adam moments of step 1 held, the
peak of a ZeRO-0/1 or single-process step). It runs in a fresh process and its peak is read from
the kernel (``VmHWM``, the resident set's high-water mark, reset first) minus the resident set just before
the weights are allocated: a measurement of the process, independent of the planner's
dispatch-level accounting. The rollout figure is measured the same way around no-grad forwards.

The planner's figure for the same run is its one-process fp32 setting: weights 4 B, gradients
4 B and AdamW moments 8 B per parameter, plus the measured activation peak on the meta device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import torch

from dancecore.planning.measure import LiveStorages, measure_call
from dancecore.planning.states import Setting, model_states


@dataclass(frozen=True)
class Agreement:
    """Planner vs measured bytes of one phase."""

    phase: str
    planned: int
    measured: int

    @property
    def ratio(self) -> float:
        """planned / measured."""
        return self.planned / self.measured


def _spec(policy: str, options: dict[str, Any]) -> Any:
    from dancecore import registry

    cls = registry.load("policy", policy)
    return cls.memory_plan_spec(cls.Config.model_validate(options))


def planned(policy: str, options: dict[str, Any], rows: int) -> dict[str, int]:
    """The planner's bytes for the CPU run: ``{"rollout": ..., "training": ..., "parameters": ...}``."""
    spec = _spec(policy, options)
    module = spec.trained
    torch.nn.Module.to(module, torch.float32)
    params = sum(p.numel() for p in module.parameters())
    figures = measure_call(module, spec.call, rows)
    states = model_states(params, 0, Setting(None), 1, bf16=False)
    return {
        "rollout": 4 * params + figures.rollout_peak,
        "training": states.total + figures.train_peak,
        "parameters": params,
    }


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> None:
    """Restart the kernel's resident-set high-water mark (VmHWM) from the current resident set: a
    child inherits its parent's mark through fork (``ru_maxrss`` would report the parent's peak)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def _warm_up() -> None:
    x = torch.randn(2, 2, 64, 32, requires_grad=True)
    y = torch.nn.functional.scaled_dot_product_attention(x, x, x)
    z = torch.nn.functional.gelu(torch.nn.functional.layer_norm(y, (32,)) @ torch.randn(32, 32))
    z.square().mean().backward()


def _steps(spec: Any, module: torch.nn.Module, rows: int, phase: str) -> None:
    if phase == "rollout":
        with torch.no_grad():
            for _ in range(2):
                spec.call(module, rows)
        return
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-5, foreach=False)
    for _ in range(2):
        for _ in range(2):  # two micro-batches per update
            spec.call(module, rows).float().square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _materialise(spec: Any) -> torch.nn.Module:
    module = spec.trained
    torch.nn.Module.to(module, torch.float32)
    module.to_empty(device="cpu")
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.02)
    return module


def _run(policy: str, options: dict[str, Any], rows: int, phase: str) -> dict[str, int]:
    """In this (fresh) process: materialise the network, run ``phase``, report the RSS peak."""
    torch.set_num_threads(1)
    spec = _spec(policy, options)
    torch.manual_seed(0)
    _warm_up()  # page in the kernels' code first: RSS counts library pages as they are first used
    before = _rss()
    _reset_peak_rss()
    _steps(spec, _materialise(spec), rows, phase)
    return {"measured": _peak_rss() - before}


def measured_tensors(policy: str, options: dict[str, Any], rows: int, phase: str) -> int:
    """Peak bytes of live tensors (weights, gradients, AdamW moments, activations, temporaries) of
    the same real CPU run, counted by :class:`LiveStorages` around the real kernels, in this
    process: no allocator or library overhead, so it also resolves the tiny presets, whose few
    megabytes the RSS reading cannot."""
    spec = _spec(policy, options)
    torch.manual_seed(0)
    with LiveStorages() as tracker:
        _steps(spec, _materialise(spec), rows, phase)
    return tracker.peak


def measured(policy: str, options: dict[str, Any], rows: int, phase: str) -> int:
    """Peak bytes of ``phase`` ("rollout" or "training") of a real CPU run, in a fresh process."""
    # A fixed mmap threshold: glibc then maps every block over 64 KiB on its own and unmaps it when
    # freed, so the resident set follows the live tensors instead of a heap that keeps freed blocks.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    code = "import json, sys; from dancecore.planning.verify import _run; print(json.dumps(_run(*json.loads(sys.argv[1]))))"
    args = json.dumps([policy, options, rows, phase])
    out = subprocess.run([sys.executable, "-c", code, args], capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"the measured CPU run failed:\n{out.stderr[-2000:]}")
    return int(json.loads(out.stdout.strip().splitlines()[-1])["measured"])


def compare(policy: str, options: dict[str, Any], rows: int, method: str = "rss") -> list[Agreement]:
    """Planner vs measured, rollout and training, for one policy configuration; ``method``:
    ``"rss"`` (:func:`measured`) or ``"tensors"`` (:func:`measured_tensors`)."""
    plan = planned(policy, options, rows)
    measure = measured if method == "rss" else measured_tensors
    return [Agreement(phase, plan[phase], measure(policy, options, rows, phase)) for phase in ("rollout", "training")]
