"""Helpers for a policy's ``memory_plan_spec`` (``dancecore plan``): architecture configs and meta
modules.

A policy ships the published architecture configs of its backbone (small JSON files of public
facts: layer counts, widths, vocabulary sizes) so that ``plan`` works without the checkpoint. When
the checkpoint is on disk its own ``config.json`` files win.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dancecore.errors import UserError, WeightsNotFoundError
from dancecore.plugin_kit.weights import resolve_pretrained


def architecture_configs(
    pretrained: str | None, shipped: Path, components: tuple[str, ...]
) -> tuple[dict[str, dict[str, Any]], str]:
    """``{component: config dict}`` from the checkpoint ``pretrained`` (diffusers layout,
    ``<component>/config.json``) when it is present locally, else from the ``shipped`` JSON file
    (one object per component); and a sentence saying which was used."""
    if pretrained is not None:
        try:
            root = resolve_pretrained(pretrained, "planned")
        except WeightsNotFoundError:
            root = None
        if root is not None and all((root / c / "config.json").is_file() for c in components):
            configs = {c: json.loads((root / c / "config.json").read_text()) for c in components}
            return configs, f"config.json files of {root}"
    try:
        data = json.loads(shipped.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{shipped}: cannot read the shipped architecture configs ({exc})") from None
    missing = [c for c in components if c not in data]
    if missing:
        raise UserError(f"{shipped}: no architecture config for {missing}")
    note = data.get("_source", shipped.name)
    return {c: data[c] for c in components}, f"published architecture ({note}; shipped as {shipped.name})"


def on_meta(build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """``build()`` with every tensor on the meta device: shapes and dtypes, no memory, no init cost."""
    with torch.device("meta"):
        return build()


def config_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    """A ``config.json`` dict without its bookkeeping keys (``_class_name``, ``_name_or_path``, ...)."""
    return {k: v for k, v in config.items() if not k.startswith("_")}
