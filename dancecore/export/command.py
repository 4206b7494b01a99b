"""The ``dancecore export`` sub-command (registered by :func:`dancecore.cli.build_parser`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def cmd_export(args: argparse.Namespace) -> int:
    """Export a checkpoint (or the base weights) as a diffusers pipeline or a LoRA adapter."""
    from dancecore.config.schema import load_run
    from dancecore.export import LoraMode, export_run

    run = load_run(Path(args.config), args.overrides)
    lora: LoraMode = "only" if args.lora_only else "merge" if args.merge_lora else "default"
    result = export_run(
        run, args.checkpoint, Path(args.to), ema=args.ema, lora=lora, dtype=args.dtype, force=args.force
    )
    how = (
        f"{result.pipeline_class}.from_pretrained(BASE).load_lora_weights('{result.directory}')"
        if result.form == "LoRA adapter"
        else f"{result.pipeline_class}.from_pretrained('{result.directory}')"
    )
    print(f"exported {result.weights} as a {result.form} to {result.directory} (model card README.md); load: {how}")
    return 0


def add_export_command(sub: Any) -> None:
    """Add ``export`` to the sub-command parsers ``sub``."""
    export = sub.add_parser("export", help="write a checkpoint as a diffusers pipeline (or LoRA adapter) + model card")
    export.add_argument("config", help="the run's config (policy and sampler are taken from it)")
    export.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    export.add_argument("--checkpoint", default="latest", help="checkpoint directory, 'latest' (default) or 'base'")
    export.add_argument("--to", required=True, help="directory to write (refused if it exists, unless --force)")
    export.add_argument("--ema", action="store_true", help="export the checkpoint's EMA weights (train.ema)")
    lora = export.add_mutually_exclusive_group()
    lora.add_argument("--lora-only", action="store_true", help="LoRA runs: write the adapter alone (the default)")
    lora.add_argument("--merge-lora", action="store_true", help="LoRA runs: a full pipeline, adapter merged")
    export.add_argument("--dtype", default=None, help="cast written weights: bf16, fp16 or fp32 (default: as run)")
    export.add_argument("--force", action="store_true", help="replace an existing --to directory")
    export.set_defaults(func=cmd_export)
