"""The ``dancecore plan`` sub-command (registered by :func:`dancecore.cli.build_parser`) and its table."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from dancecore.planning.plan import GB, MemoryPlan, Row, safety_margin


def _gb(nbytes: int) -> str:
    return f"{nbytes / GB:.1f}"


def _params(count: int) -> str:
    return f"{count / 1e9:.2f} B" if count >= 1e8 else f"{count / 1e6:.1f} M"


def _header(plan: MemoryPlan, config: str) -> list[str]:
    a = plan.activations
    how = "LoRA" if plan.frozen_base else "full fine-tuning"
    precision = "bf16 mixed precision" if plan.bf16 else "fp32"
    lines = [
        f"dancecore plan {config}: {plan.gpus} GPU(s) of {_gb(plan.gpu_memory)} GB, usable "
        f"{_gb(plan.usable)} GB each (margin {_gb(safety_margin(plan.gpu_memory))} GB: CUDA context, NCCL, "
        "fragmentation)",
        f"trained: {plan.network}, {_params(plan.trained)} trained of {_params(plan.trained + plan.frozen_base)} "
        f"({how}), {precision}, gradient checkpointing {'on' if plan.checkpointing else 'off'}",
        f"  architecture: {plan.source}",
        f"  shapes: {plan.shapes}; micro-batch {plan.micro_batch}",
        f"activations of one micro-batch (measured on the meta device): rollout peak {_gb(a.rollout_peak)} GB, "
        f"training peak {_gb(a.train_peak)} GB (of which {_gb(a.saved)} GB saved for backward)",
    ]
    for name, (count, nbytes) in plan.resident.items.items():
        lines.append(f"resident on every GPU: {name}, {_params(count)} parameters, {_gb(nbytes)} GB")
    for name, (count, nbytes) in plan.resident.offloaded.items():
        lines.append(f"in CPU memory, on the GPU while encoding: {name}, {_params(count)}, {_gb(nbytes)} GB")
    for name, nbytes in plan.extras.items():
        lines.append(f"resident on every GPU: {name}, {_gb(nbytes)} GB")
    for name in plan.resident.uncounted:
        lines.append(f"NOT counted: reward {name!r} (its plugin has no memory_plan_modules)")
    return lines


def _row(plan: MemoryPlan, row: Row) -> str:
    s = row.states
    fits = "yes" if plan.fits(row) else ("not offered (bf16 needs stage >= 1)" if not row.offered else "no")
    mark = " *" if row.setting == plan.configured else ""
    cells = [
        row.setting.label + mark, _gb(s.weights), _gb(s.gradients), _gb(s.optimizer), _gb(s.buffers),
        _gb(row.resident), _gb(row.rollout), _gb(row.training), _gb(row.peak), _gb(s.cpu), fits,
    ]  # fmt: skip
    return "| " + " | ".join(cells) + " |"


def render(plan: MemoryPlan, config: str) -> str:
    """The plan as text: what is counted, the table (GB per GPU) and the verdict."""
    lines = [*_header(plan, config), ""]
    lines.append(
        "| setting | weights | grads | optimizer | ZeRO buffers | frozen+rewards+EMA | rollout peak | "
        "training peak | peak | CPU per rank | fits |"
    )
    lines.append("| --- " + "| ---: " * 9 + "| --- |")
    lines.extend(_row(plan, row) for row in plan.rows)
    lines.append("")
    lines.append("(GB = 10^9 bytes per GPU; * = the config's setting; CPU per rank = offloaded states in host memory.)")
    cheapest = plan.cheapest
    configured = next((row for row in plan.rows if row.setting == plan.configured), None)
    if cheapest is None:
        lines.append(
            f"verdict: nothing fits {plan.gpus} GPU(s) of {_gb(plan.gpu_memory)} GB; use more GPUs, LoRA, "
            "a smaller micro-batch or gradient checkpointing"
        )
    else:
        lines.append(f"verdict: cheapest setting that fits: {cheapest.setting.label} ({_gb(cheapest.peak)} GB peak)")
    if configured is not None:
        state = "fits" if plan.fits(configured) else "does NOT fit"
        lines.append(f"the config's setting, {configured.setting.label}: {_gb(configured.peak)} GB peak, {state}")
    return "\n".join(lines)


def cmd_plan(args: argparse.Namespace) -> int:
    """Print the memory plan of a config on ``--gpus`` GPUs."""
    from dancecore.config.schema import load_run
    from dancecore.planning.plan import parse_memory, plan_run

    memory = parse_memory(args.gpu_memory)
    run = load_run(Path(args.config), args.overrides)
    print(render(plan_run(run, args.gpus, memory), args.config))
    return 0


def add_plan_command(sub: Any) -> None:
    """Add ``plan`` to the sub-command parsers ``sub``."""
    plan = sub.add_parser("plan", help="per-GPU memory of a config at its real sizes, per ZeRO stage (no weights)")
    plan.add_argument("config", help="the run's config")
    plan.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    plan.add_argument("--gpus", type=int, required=True, help="number of GPUs (ranks)")
    plan.add_argument("--gpu-memory", default="80GB", help="memory of one GPU (default 80GB; GB = 10^9 bytes)")
    plan.set_defaults(func=cmd_plan)
