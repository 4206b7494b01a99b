"""The memory plan of one run: model states per setting, measured activations, frozen networks, verdict."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

from dancecore.config.schema import ResolvedRun
from dancecore.errors import UserError
from dancecore.planning.measure import ActivationFigures, measure_call
from dancecore.planning.states import SETTINGS, ModelStates, Setting, model_states

GB = 10**9
_UNITS = {"": GB, "g": GB, "gb": GB, "gib": 2**30, "m": 10**6, "mb": 10**6, "mib": 2**20, "t": 10**12, "tb": 10**12}


def parse_memory(text: str) -> int:
    """``80GB`` / ``80G`` / ``80`` (GB = 10^9 bytes), ``141GiB``, ``40000MB`` -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS or float(match.group(1)) <= 0:
        raise UserError(f"--gpu-memory: {text!r} is not a memory size; write e.g. 80GB, 141GB, 80GiB or 40000MB")
    return int(float(match.group(1)) * _UNITS[unit])


def safety_margin(gpu_memory: int) -> int:
    """Bytes held back from each GPU: 10 % (at least 2 GB) for the CUDA context, NCCL buffers and
    the caching allocator's fragmentation, none of which the planner counts."""
    return max(gpu_memory // 10, 2 * GB)


@dataclass(frozen=True)
class Resident:
    """Networks other than the trained one, resident on every GPU: name -> (parameters, bytes)."""

    items: dict[str, tuple[int, int]] = field(default_factory=dict)
    offloaded: dict[str, tuple[int, int]] = field(default_factory=dict)
    uncounted: tuple[str, ...] = ()

    @property
    def bytes(self) -> int:
        """Bytes on the GPU all the time."""
        return sum(b for _, b in self.items.values())


@dataclass(frozen=True)
class Row:
    """One setting's per-GPU bytes."""

    setting: Setting
    states: ModelStates
    resident: int  # frozen networks, rewards, EMA, KL reference
    rollout: int  # peak during sampling
    training: int  # peak during the training pass
    encoding: int  # peak while offloaded encoders are on the GPU
    offered: bool  # dancecore offers this setting for this run (bf16 refuses ZeRO-0)

    @property
    def peak(self) -> int:
        """The GPU's peak over the iteration."""
        return max(self.rollout, self.training, self.encoding)


@dataclass(frozen=True)
class MemoryPlan:
    """Everything ``dancecore plan`` reports."""

    gpus: int
    gpu_memory: int
    network: str
    trained: int
    frozen_base: int
    bf16: bool
    checkpointing: bool
    shapes: str
    source: str
    micro_batch: int
    activations: ActivationFigures
    resident: Resident
    extras: dict[str, int]  # EMA / KL reference bytes per GPU
    rows: tuple[Row, ...]
    configured: Setting

    @property
    def usable(self) -> int:
        """Per-GPU bytes a plan may use (after :func:`safety_margin`)."""
        return self.gpu_memory - safety_margin(self.gpu_memory)

    def fits(self, row: Row) -> bool:
        """Whether ``row`` fits in :attr:`usable`."""
        return row.offered and row.peak <= self.usable

    @property
    def cheapest(self) -> Row | None:
        """The first setting (cheapest first, see :data:`SETTINGS`) that fits, or None."""
        return next((row for row in self.rows if self.fits(row)), None)


def _policy_spec(run: ResolvedRun) -> Any:
    cls = run.policy.cls
    if not hasattr(cls, "memory_plan_spec"):
        raise UserError(
            f"policy {run.policy.name!r} ({cls.__module__}.{cls.__qualname__}) has no memory_plan_spec "
            "classmethod (the optional dancecore.PlannablePolicy contract), so `dancecore plan` cannot size it"
        )
    return cls.memory_plan_spec(run.policy.config)


def _bytes_of(module: torch.nn.Module, dtype: torch.dtype) -> tuple[int, int]:
    count = sum(p.numel() for p in module.parameters())
    return count, count * dtype.itemsize


def _resident(run: ResolvedRun, spec: Any) -> Resident:
    items: dict[str, tuple[int, int]] = {}
    offloaded: dict[str, tuple[int, int]] = {}
    for name, (module, dtype) in spec.frozen.items():
        (offloaded if name in spec.offloaded else items)[name] = _bytes_of(module, dtype)
    uncounted = []
    seen: set[tuple[str, str]] = set()
    for reward in run.rewards:
        key = (reward.name, repr(getattr(reward.config, "pretrained", None)))
        if key in seen:  # two entries of one model (e.g. VideoAlign's VQ and MQ heads) share it
            continue
        seen.add(key)
        if not hasattr(reward.cls, "memory_plan_modules"):
            uncounted.append(reward.name)
            continue
        for name, (module, dtype) in reward.cls.memory_plan_modules(reward.config).items():
            items[f"reward {reward.name}: {name}"] = _bytes_of(module, dtype)
    return Resident(items=items, offloaded=offloaded, uncounted=tuple(uncounted))


def _extras(run: ResolvedRun, trained: int, total: int, lora: bool) -> dict[str, int]:
    extras: dict[str, int] = {}
    ema = run.config.train.ema
    if ema is not None and ema.device == "same":
        extras["EMA (fp32)"] = 4 * trained
    algorithm = run.algorithm.config
    if getattr(algorithm, "kl_beta", 0.0) > 0 and not lora and getattr(algorithm, "reference_device", "") == "same":
        itemsize = 2 if getattr(algorithm, "reference_dtype", "float32") == "bfloat16" else 4
        extras["KL reference copy"] = itemsize * total
    return extras


def _setting_of(run: ResolvedRun) -> Setting:
    d = run.config.distributed
    if d.backend == "none":
        return Setting(None)
    return Setting(d.zero_stage, d.offload_optimizer, d.offload_params)


def check_gpus(run: ResolvedRun, gpus: int) -> None:
    """The run must split over ``gpus`` ranks as the trainer splits it."""
    if gpus < 1:
        raise UserError(f"--gpus must be at least 1, got {gpus}")
    prompts = run.config.train.prompts_per_iteration
    if prompts % gpus:
        raise UserError(
            f"--gpus {gpus} does not divide train.prompts_per_iteration ({prompts}): every rank takes the same "
            f"number of prompts; set train.prompts_per_iteration to a multiple of {gpus}"
        )


def plan_run(run: ResolvedRun, gpus: int, gpu_memory: int) -> MemoryPlan:
    """Size ``run`` on ``gpus`` GPUs of ``gpu_memory`` bytes each (nothing is loaded or allocated)."""
    check_gpus(run, gpus)
    spec = _policy_spec(run)
    module: torch.nn.Module = spec.trained
    bf16 = run.config.train.mixed_precision == "bf16"
    torch.nn.Module.to(module, torch.bfloat16 if bf16 else torch.float32)  # not diffusers' .to (it warns)
    lora = getattr(run.policy.config, "lora", None) is not None
    total = sum(p.numel() for p in module.parameters())
    trained = sum(p.numel() for p in module.parameters() if p.requires_grad)
    micro_batch = run.config.train.micro_batch_size
    activations = measure_call(module, spec.call, micro_batch)
    resident = _resident(run, spec)
    extras = _extras(run, trained, total, lora)
    fixed = resident.bytes + sum(extras.values())
    offloaded = sum(b for _, b in resident.offloaded.values())
    settings = SETTINGS if gpus > 1 else (Setting(None), *SETTINGS)
    rows = []
    for setting in settings:
        states = model_states(trained, total - trained, setting, gpus, bf16)
        base = states.total + fixed
        rows.append(
            Row(
                setting=setting,
                states=states,
                resident=fixed,
                rollout=base + activations.rollout_peak,
                training=base + activations.train_peak,
                encoding=base + offloaded,
                offered=not (bf16 and setting.zero_stage == 0),
            )
        )
    return MemoryPlan(
        gpus=gpus,
        gpu_memory=gpu_memory,
        network=type(module).__name__,
        trained=trained,
        frozen_base=total - trained,
        bf16=bf16,
        checkpointing=bool(getattr(run.policy.config, "gradient_checkpointing", False)),
        shapes=spec.shapes,
        source=spec.source,
        micro_batch=micro_batch,
        activations=activations,
        resident=resident,
        extras=extras,
        rows=tuple(rows),
        configured=_setting_of(run),
    )
