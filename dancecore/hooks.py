"""Lifecycle hooks carried by pluggy (project name ``dancecore``).

Plugins implement any of these with ``@dancecore.hooks.hookimpl`` and register through the
``dancecore`` entry-point group. Hook plugins are loaded when a run starts (blocked names in
``DANCECORE_BLOCK_PLUGINS`` are skipped).
"""

from __future__ import annotations

import argparse
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import pluggy

from dancecore.registry import PluginError, is_blocked

if TYPE_CHECKING:
    from dancecore.config.schema import RunConfig

hookspec = pluggy.HookspecMarker("dancecore")
hookimpl = pluggy.HookimplMarker("dancecore")


class Hooks:
    """The hook specifications."""

    @hookspec
    def dancecore_run_start(self, config: RunConfig, output_dir: Path) -> None:
        """A run starts (after components are built, before the first iteration); ``config`` is
        the validated run config."""

    @hookspec
    def dancecore_iteration_end(self, iteration: int, metrics: dict[str, float]) -> None:
        """An iteration finished; ``metrics`` is the record written to metrics.jsonl."""

    @hookspec
    def dancecore_checkpoint_saved(self, iteration: int, path: Path) -> None:
        """A checkpoint was committed at ``path``."""

    @hookspec
    def dancecore_run_end(self, output_dir: Path, status: str) -> None:
        """A run ends; status is 'finished', 'stopped' or 'failed'."""

    @hookspec
    def dancecore_add_commands(self, subparsers: argparse._SubParsersAction) -> None:
        """Add sub-commands to the ``dancecore`` CLI."""


def plugin_manager(load_entry_points: bool = True) -> pluggy.PluginManager:
    """A plugin manager with the hook specs and (optionally) every ``dancecore`` hook plugin."""
    pm = pluggy.PluginManager("dancecore")
    pm.add_hookspecs(Hooks)
    if load_entry_points:
        for ep in metadata.entry_points(group="dancecore"):
            if is_blocked("hook", ep.name) or pm.get_plugin(ep.name) is not None:
                continue
            try:
                pm.register(ep.load(), name=ep.name)
            except Exception as exc:
                raise PluginError(f"hook plugin {ep.name!r} ({ep.value}) failed to load: {exc}") from exc
    return pm
