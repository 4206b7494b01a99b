"""``dancecore export``: a trained policy out of dancecore, as the diffusers ecosystem loads it.

A full fine-tune (or a LoRA run with ``--merge-lora``) becomes a complete diffusers pipeline
directory: every component written by ``save_pretrained`` (the trained network with its checkpoint
weights, the frozen ones as the policy loaded them) and ``model_index.json``, so that the matching
pipeline class loads it with ``from_pretrained(DIR)``. A LoRA run becomes, by default, its adapter
alone (``pytorch_lora_weights.safetensors``, the format ``load_lora_weights`` reads). Either way
``DIR/README.md`` is a model card.

What the pipeline is depends on the backbone, so the policy builds it (the optional
:class:`dancecore.ExportablePolicy` contract); this module loads the weights exactly as
``dancecore eval`` does (:func:`dancecore.evaluate.load_policy`), writes and swaps directories.

Atomic: everything is written to a temporary directory beside ``DIR`` and renamed into place at
the end, so a failed or interrupted export leaves no half-written ``DIR``; an existing ``DIR`` is
replaced only with ``force``.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from dancecore import __version__
from dancecore.config.schema import ResolvedRun
from dancecore.contracts.protocols import BuildContext, ExportablePolicy
from dancecore.contracts.records import DiffusersExport
from dancecore.errors import ConfigError, OutputDirError, PluginError
from dancecore.evaluate import load_policy
from dancecore.export.card import CardFacts, write_card
from dancecore.plugin_kit.network import DTYPES
from dancecore.training.trainer import pick_device

__all__ = ["ExportResult", "LoraMode", "export_run"]

#: What the export was (the model card's facts, the config, the dancecore version), as JSON.
EXPORT_RECORD = "dancecore_export.json"
LoraMode = Literal["default", "only", "merge"]
#: ``--dtype`` spellings.
DTYPE_NAMES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16"}
DTYPE_NAMES |= {"fp16": "float16", "float16": "float16"}


@dataclass(frozen=True)
class ExportResult:
    """Where the export went and what it is."""

    directory: Path
    form: str
    pipeline_class: str
    weights: str


def _check_request(run: ResolvedRun, lora: LoraMode, dtype: str | None) -> bool:
    """Refuse impossible requests before any model loads; returns whether the run trains a LoRA."""
    errors = []
    if not hasattr(run.policy.cls, "diffusers_export"):
        raise PluginError(
            f"policy {run.policy.name!r} cannot be exported: {run.policy.cls.__module__}.{run.policy.cls.__name__} "
            "has no diffusers_export method (the optional dancecore.ExportablePolicy contract)"
        )
    trains_lora = getattr(run.policy.config, "lora", None) is not None
    if lora != "default" and not trains_lora:
        flag = "--lora-only" if lora == "only" else "--merge-lora"
        errors.append(f"{flag}: the run trains every weight (policy.lora is not set); export it without the flag")
    if dtype is not None and dtype not in DTYPE_NAMES:
        errors.append(f"--dtype: unknown dtype {dtype!r}; use one of {', '.join(sorted(DTYPE_NAMES))}")
    if errors:
        raise ConfigError(errors)
    return trains_lora


def _check_destination(destination: Path, force: bool) -> None:
    if destination.exists() and not force:
        raise OutputDirError(f"{destination} exists; choose another --to or pass --force to replace it")
    if destination.exists() and not destination.is_dir():
        raise OutputDirError(f"{destination} exists and is not a directory")
    parent = destination.parent
    parent.mkdir(parents=True, exist_ok=True)
    if not os.access(parent, os.W_OK):
        raise OutputDirError(f"cannot write into {parent}")


def lora_adapter(module: torch.nn.Module, dtype: torch.dtype | None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The LoRA weights of ``module`` under peft's adapter-free names (as diffusers saves them),
    and the adapter's config (rank, alpha, targets) as diffusers' adapter metadata."""
    from peft.utils import get_peft_model_state_dict

    weights = {
        k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in get_peft_model_state_dict(module).items()
    }
    peft_config: Any = module.peft_config  # diffusers' PeftAdapterMixin
    config = peft_config["default"].to_dict()
    metadata = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    return weights, metadata


def _save_adapter(export: DiffusersExport, module: torch.nn.Module, directory: Path, dtype: torch.dtype | None) -> None:
    weights, metadata = lora_adapter(module, dtype)
    save = type(export.pipeline).save_lora_weights
    options: dict[str, Any] = {f"{export.trained}_lora_layers": weights}
    if f"{export.trained}_lora_adapter_metadata" in inspect.signature(save).parameters:
        options[f"{export.trained}_lora_adapter_metadata"] = metadata
    save(str(directory), safe_serialization=True, **options)


def _save_pipeline(
    export: DiffusersExport, module: torch.nn.Module, directory: Path, dtype: torch.dtype | None, merge: bool
) -> None:
    if merge:  # fold the adapter into the base weights, then drop the LoRA layers
        module.fuse_lora()  # type: ignore[operator]  # diffusers' PeftAdapterMixin
        module.unload_lora()  # type: ignore[operator]
    if dtype is not None:
        export.pipeline.to(dtype=dtype)
    export.pipeline.save_pretrained(str(directory), safe_serialization=True)


def _swap_into_place(staging: Path, destination: Path) -> None:
    """Rename ``staging`` to ``destination``; an existing destination is moved aside first and
    removed only once the new one is in place."""
    old = destination.parent / f".{destination.name}.replaced-{os.getpid()}"
    if destination.exists():
        os.replace(destination, old)
    try:
        os.replace(staging, destination)
    except OSError:
        if old.exists():
            os.replace(old, destination)
        raise
    shutil.rmtree(old, ignore_errors=True)


def export_run(
    run: ResolvedRun,
    checkpoint: str | None,
    destination: Path,
    *,
    ema: bool = False,
    lora: LoraMode = "default",
    dtype: str | None = None,
    force: bool = False,
) -> ExportResult:
    """Export the weights ``checkpoint`` names (``latest``, a path, or ``base``) to ``destination``.

    ``lora``: for a LoRA run, ``"default"`` and ``"only"`` write the adapter alone, ``"merge"`` a
    full pipeline with the adapter merged. ``dtype`` (``bf16``, ``fp16``, ``fp32``) casts every
    written weight; by default they keep the dtypes the policy runs in.
    """
    trains_lora = _check_request(run, lora, dtype)
    _check_destination(destination, force)
    torch_dtype = DTYPES[DTYPE_NAMES[dtype]] if dtype else None
    context = BuildContext(device=pick_device(run.config.train.device), seed=run.config.seed)
    loaded = load_policy(run, checkpoint, context, ema=ema)
    policy = loaded.policy
    assert isinstance(policy, ExportablePolicy)
    export = policy.diffusers_export(run.sampler.cls(run.sampler.config, context))
    adapter_only = trains_lora and lora != "merge"
    form = "LoRA adapter" if adapter_only else "full pipeline (LoRA merged)" if trains_lora else "full pipeline"
    staging = destination.parent / f".{destination.name}.export-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        if adapter_only:
            _save_adapter(export, policy.module, staging, torch_dtype)
        else:
            _save_pipeline(export, policy.module, staging, torch_dtype, merge=trains_lora)
        facts = CardFacts(
            pipeline_class=type(export.pipeline).__name__,
            task=export.task,
            weights=loaded.weights,
            iteration=loaded.iteration,
            form=form,
            dtype=DTYPE_NAMES[dtype] if dtype else "weights in the dtypes the policy runs in",
            call=export.call,
        )
        write_card(staging, run, facts, str(destination))
        record = {
            **dataclasses.asdict(facts),
            "dancecore_version": __version__,
            "config": run.config.model_dump(mode="json"),
        }
        (staging / EXPORT_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        _swap_into_place(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExportResult(destination, form, type(export.pipeline).__name__, loaded.weights)
