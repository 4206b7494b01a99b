"""The DeepSpeed configuration of a run: generated from the run config, merged with the
``distributed.deepspeed_config`` passthrough, checked (conflicts are config errors naming the key)."""

from __future__ import annotations

import copy
import os
from typing import Any

import torch

from dancecore.config.schema import ConfigError, RunConfig

PASSTHROUGH = "distributed.deepspeed_config"
SEQUENCE_PARALLEL = "distributed.sequence_parallel"

# Keys dancecore derives from its own settings: the passthrough may repeat them, not contradict them.
_DERIVED_FROM = {
    ("train_micro_batch_size_per_gpu",): "dancecore's own batching (train.micro_batch_size)",
    ("gradient_accumulation_steps",): "dancecore's own accumulation (train.samples_per_update)",
    ("managed_gradient_accumulation",): "dancecore's own accumulation (train.samples_per_update)",
    ("gradient_clipping",): "train.grad_clip",
    ("optimizer", "type"): "dancecore's AdamW",
    ("optimizer", "params", "lr"): "train.learning_rate",
    ("optimizer", "params", "betas"): "train.adam_betas",
    ("optimizer", "params", "eps"): "train.adam_eps",
    ("optimizer", "params", "weight_decay"): "train.weight_decay",
    ("zero_optimization", "stage"): "distributed.zero_stage",
    ("bf16", "enabled"): "train.mixed_precision",
}
# Sections dancecore cannot honour: the loop would silently differ from what they ask for.
_REFUSED = {
    "fp16": "fp16 training is not supported; use train.mixed_precision=bf16",
    "amp": "apex AMP is not supported; use train.mixed_precision=bf16",
    "scheduler": "DeepSpeed schedulers are not saved in dancecore checkpoints; use train.lr_warmup_updates",
    "train_batch_size": "dancecore batches itself: set train.prompts_per_iteration and optimizer.group_size",
}
# DeepSpeed's own validation errors name a section model; this maps them back to the YAML key.
_SECTION_OF_MODEL = {
    "DeepSpeedZeroConfig": "zero_optimization",
    "DeepSpeedBF16Config": "bf16",
    "DeepSpeedFP16Config": "fp16",
    "DeepSpeedActivationCheckpointingConfig": "activation_checkpointing",
    "DeepSpeedFlopsProfilerConfig": "flops_profiler",
    "DeepSpeedMonitorConfig": "monitor",
    "DeepSpeedCommsConfig": "comms_logger",
}


def _select_accelerator(cuda: bool) -> None:
    """Tell DeepSpeed which accelerator to use before it is first imported (it autodetects
    CUDA; without a GPU it must be told ``cpu``)."""
    if not cuda:
        os.environ["DS_ACCELERATOR"] = "cpu"


def _deepspeed() -> Any:
    """Import DeepSpeed, or explain how to get a version dancecore can drive."""
    try:
        import deepspeed
    except ImportError as exc:
        raise RuntimeError(
            "distributed training needs DeepSpeed: DS_BUILD_OPS=0 pip install deepspeed "
            "(or pip install 'dancecore[deepspeed]')"
        ) from exc
    try:
        from deepspeed.runtime.constants import MANAGED_GRADIENT_ACCUMULATION  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(
            f"DeepSpeed {deepspeed.__version__} cannot leave gradient accumulation to the caller "
            "(managed_gradient_accumulation), which dancecore needs; tested with 0.19.8: pip install -U deepspeed"
        ) from exc
    return deepspeed


# ----------------------------------------------------------------------------------- the config


def generated_config(cfg: RunConfig) -> dict[str, Any]:
    """The DeepSpeed config dancecore derives from ``distributed`` and ``train``.

    DeepSpeed does not own the batching: the trainer calls ``backward`` once per micro-batch and
    ``step`` once per update, so gradient accumulation is left to the caller
    (``managed_gradient_accumulation: false``) and the batch sizes are bookkeeping only.
    """
    dist, train = cfg.distributed, cfg.train
    zero: dict[str, Any] = {"stage": dist.zero_stage}
    if dist.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if dist.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
        "gradient_clipping": train.grad_clip,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": train.learning_rate,
                "betas": list(train.adam_betas),
                "eps": train.adam_eps,
                "weight_decay": train.weight_decay,
                # torch.optim.AdamW: no native op to compile; a passthrough may set false to get
                # DeepSpeed's fused (GPU) or CPU Adam.
                "torch_adam": True,
            },
        },
        "zero_optimization": zero,
        "bf16": {"enabled": train.mixed_precision == "bf16"},
        "steps_per_print": 2**31 - 1,  # dancecore logs its own metrics
        "wall_clock_breakdown": False,
    }


def _merge(base: dict[str, Any], extra: dict[str, Any], path: tuple[str, ...], errors: list[str]) -> dict[str, Any]:
    """``extra`` merged over ``base``; a derived key given a different value is an error."""
    out = dict(base)
    for key, value in extra.items():
        here = (*path, str(key))
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value, here, errors)
            continue
        source = _DERIVED_FROM.get(here)
        if source is not None and key in out and _normal(out[key]) != _normal(value):
            errors.append(
                f"{PASSTHROUGH}.{'.'.join(here)}: {value!r} conflicts with {out[key]!r} set from {source}; "
                "set it there instead"
            )
            continue
        out[key] = value
    return out


def _normal(value: Any) -> Any:
    """Compare numbers as floats and tuples as lists (YAML gives lists, pydantic tuples)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, list | tuple):
        return [_normal(v) for v in value]
    return value


def _check_merged(merged: dict[str, Any], cfg: RunConfig, errors: list[str]) -> None:
    """Combinations dancecore or DeepSpeed cannot run, each error naming the key to change."""
    zero = merged.get("zero_optimization") or {}
    stage = zero.get("stage", 0)
    params_device = (zero.get("offload_param") or {}).get("device", "none")
    optimizer_device = (zero.get("offload_optimizer") or {}).get("device", "none")
    if params_device not in ("none", None) and stage != 3:
        where = (
            "distributed.offload_params"
            if cfg.distributed.offload_params
            else f"{PASSTHROUGH}.zero_optimization.offload_param"
        )
        errors.append(f"{where}: parameter offload needs ZeRO stage 3 (distributed.zero_stage is {stage})")
    if optimizer_device not in ("none", None) and stage == 0:
        where = (
            "distributed.offload_optimizer"
            if cfg.distributed.offload_optimizer
            else f"{PASSTHROUGH}.zero_optimization.offload_optimizer"
        )
        errors.append(f"{where}: optimizer offload needs ZeRO stage 1, 2 or 3 (distributed.zero_stage is 0)")
    if stage == 0 and (merged.get("bf16") or {}).get("enabled"):
        errors.append(
            "distributed.zero_stage: bf16 (train.mixed_precision=bf16) needs ZeRO stage 1, 2 or 3 (stage 0's bf16 "
            "optimizer does not expose its fp32 master weights for checkpoints; stage 1 communicates the same)"
        )
    for section, device in (("offload_param", params_device), ("offload_optimizer", optimizer_device)):
        if device == "nvme":
            errors.append(
                f"{PASSTHROUGH}.zero_optimization.{section}.device: NVMe offload is not supported (dancecore "
                "gathers the full state for its checkpoints); use cpu"
            )
    if zero.get("overlap_comm") and stage < 2:
        errors.append(
            f"{PASSTHROUGH}.zero_optimization.overlap_comm: needs ZeRO stage 2 or 3 when dancecore drives "
            "gradient accumulation"
        )


def _deepspeed_validation_errors(merged: dict[str, Any]) -> list[str]:
    """DeepSpeed's own checks of the merged config (each section's schema), as dancecore errors."""
    _select_accelerator(cuda=torch.cuda.is_available())
    _deepspeed()
    from deepspeed.runtime.config import DeepSpeedConfig
    from pydantic import ValidationError

    try:
        DeepSpeedConfig(copy.deepcopy(merged))
    except ValidationError as exc:
        section = _SECTION_OF_MODEL.get(exc.title)
        messages = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"])
            where = ".".join(p for p in (PASSTHROUGH, section, key) if p)
            messages.append(f"{where}: {err['msg']} (DeepSpeed {exc.title})")
        return messages
    except (AssertionError, ValueError, TypeError, KeyError) as exc:
        return [f"{PASSTHROUGH}: DeepSpeed rejects the merged config: {exc}"]
    return []


def deepspeed_config(cfg: RunConfig, *, check_with_deepspeed: bool = True) -> dict[str, Any]:
    """The DeepSpeed config of a run: :func:`generated_config` merged with the raw
    ``distributed.deepspeed_config`` passthrough, then validated. Raises :class:`ConfigError`
    with every problem, each naming its key."""
    errors: list[str] = []
    extra = cfg.distributed.deepspeed_config or {}
    for key, why in _REFUSED.items():
        if key in extra:
            errors.append(f"{PASSTHROUGH}.{key}: {why}")
    extra = {k: v for k, v in extra.items() if k not in _REFUSED}
    merged = _merge(generated_config(cfg), extra, (), errors)
    _check_merged(merged, cfg, errors)
    if not errors and check_with_deepspeed:
        errors.extend(_deepspeed_validation_errors(merged))
    if errors:
        raise ConfigError(errors)
    return merged


def sequence_parallel_errors(cfg: RunConfig, world_size: int, policy_cls: Any = None) -> list[str]:
    """What stops ``distributed.sequence_parallel`` on ``world_size`` ranks, each naming its key:
    the degree must divide the ranks, the prompts of an iteration must share out over the groups,
    and the policy must split its sequence (class attribute ``supports_sequence_parallel``)."""
    sp = cfg.distributed.sequence_parallel
    if sp == 1:
        return []
    errors = []
    if world_size % sp:
        errors.append(f"{SEQUENCE_PARALLEL}: {sp} does not divide the number of ranks ({world_size})")
    elif cfg.train.prompts_per_iteration % (world_size // sp):
        errors.append(
            f"train.prompts_per_iteration: {cfg.train.prompts_per_iteration} is not a multiple of the "
            f"{world_size // sp} sequence-parallel groups ({world_size} ranks / {SEQUENCE_PARALLEL} {sp})"
        )
    if policy_cls is not None and not getattr(policy_cls, "supports_sequence_parallel", False):
        errors.append(
            f"{SEQUENCE_PARALLEL}: policy {cfg.policy.name!r} does not split its sequence over ranks "
            "(hunyuanvideo, skyreels-i2v and wan-t2v do); set it to 1"
        )
    return errors
