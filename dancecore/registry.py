"""Plugin discovery through Python entry points, resolved lazily by the name a config writes.

One entry-point group per kind of component (``dancecore.policies``, ``dancecore.samplers``,
``dancecore.rewards``, ``dancecore.optimizers``). Listing reads distribution metadata only; a
plugin's code is imported when a config names it, so a broken plugin only breaks runs that use it.
``DANCECORE_BLOCK_PLUGINS`` (comma separated names, optionally ``kind:name``) blocks plugins.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from pydantic import BaseModel

from dancecore.errors import PluginError

KINDS: dict[str, str] = {
    "policy": "dancecore.policies",
    "sampler": "dancecore.samplers",
    "reward": "dancecore.rewards",
    "algorithm": "dancecore.algorithms",
    "optimizer": "dancecore.optimizers",  # the old name of the algorithm group; still searched
}

#: A kind whose plugins may also be registered under an older group name.
OLD_GROUPS: dict[str, str] = {"algorithm": "dancecore.optimizers"}

#: Methods each kind of component must have (checked when a plugin loads).
REQUIRED_METHODS: dict[str, tuple[str, ...]] = {
    "policy": ("encode_prompts", "initial_noise", "predict", "decode", "trainable_parameters"),
    "sampler": ("schedule", "step"),
    "reward": ("score",),
    "algorithm": ("train",),
    "optimizer": ("advantages", "select_samples", "select_steps", "loss"),
}


@dataclass(frozen=True)
class PluginInfo:
    """An installed plugin as its distribution's metadata describes it (nothing imported)."""

    kind: str
    name: str
    target: str
    package: str
    version: str


def _blocked() -> set[str]:
    raw = os.environ.get("DANCECORE_BLOCK_PLUGINS", "")
    return {item.strip() for item in raw.split(",") if item.strip()}


def is_blocked(kind: str, name: str) -> bool:
    """Whether ``DANCECORE_BLOCK_PLUGINS`` blocks this plugin (by ``name`` or ``kind:name``)."""
    blocked = _blocked()
    return name in blocked or f"{kind}:{name}" in blocked


def installed(kind: str | None = None) -> list[PluginInfo]:
    """Every installed plugin (of one kind, or all), from entry-point metadata only."""
    kinds = [kind] if kind else list(KINDS)
    found: list[PluginInfo] = []
    for k in kinds:
        for ep in metadata.entry_points(group=KINDS[k]):
            dist = ep.dist
            found.append(
                PluginInfo(
                    kind=k,
                    name=ep.name,
                    target=ep.value,
                    package=dist.metadata["Name"] if dist is not None else "?",
                    version=dist.version if dist is not None else "?",
                )
            )
    return sorted(found, key=lambda p: (list(KINDS).index(p.kind), p.name))


def _package(ep: metadata.EntryPoint) -> str:
    return ep.dist.metadata["Name"] if ep.dist is not None else "?"


def _entry_point(kind: str, name: str) -> tuple[metadata.EntryPoint, str]:
    """The entry point of ``name`` and the kind whose contract it honours (an algorithm found only
    in the old ``dancecore.optimizers`` group honours the ``optimizer`` contract)."""
    if kind not in KINDS:
        raise PluginError(f"unknown component kind {kind!r}; expected one of {sorted(KINDS)}")
    searched = [(kind, KINDS[kind])] + ([("optimizer", OLD_GROUPS[kind])] if kind in OLD_GROUPS else [])
    if kind == "optimizer":  # the old kind name also finds algorithms registered under the new group
        searched.append(("algorithm", KINDS["algorithm"]))
    for contract, group in searched:
        matches = [ep for ep in metadata.entry_points(group=group) if ep.name == name]
        packages = sorted({_package(ep) for ep in matches})
        if len(packages) > 1:
            raise PluginError(
                f"{kind} plugin name {name!r} is registered by more than one package ({', '.join(packages)}): "
                "uninstall one of them"
            )
        if matches:
            return matches[0], contract
    names = sorted({ep.name for _, group in searched for ep in metadata.entry_points(group=group)})
    raise PluginError(f"no {kind} plugin named {name!r} is installed (installed: {', '.join(names) or 'none'})")


def load(kind: str, name: str) -> Any:
    """Import and return the component class registered as ``name`` for ``kind``.

    Raises :class:`PluginError` naming the plugin and its package when the plugin is blocked,
    missing, fails to import, or lacks a pydantic ``Config`` or a required method.
    """
    if is_blocked(kind, name):
        raise PluginError(f"{kind} plugin {name!r} is blocked by DANCECORE_BLOCK_PLUGINS")
    ep, contract = _entry_point(kind, name)
    package = _package(ep)
    try:
        component = ep.load()
    except Exception as exc:  # any import-time failure of third-party code
        raise PluginError(
            f"{kind} plugin {name!r} (package {package}, {ep.value}) failed to import: {type(exc).__name__}: {exc}"
        ) from exc
    problems = contract_problems(contract, component)
    if problems:
        raise PluginError(f"{kind} plugin {name!r} (package {package}) is invalid: {'; '.join(problems)}")
    return component


load_plugin = load  # the public name (``dancecore.load_plugin``)


def contract_problems(kind: str, component: Any) -> list[str]:
    """What a component class is missing to honour the ``kind`` contract (empty when it is fine)."""
    problems: list[str] = []
    config = getattr(component, "Config", None)
    if not (isinstance(config, type) and issubclass(config, BaseModel)):
        problems.append("it has no nested pydantic `Config` class")
    elif config.model_config.get("extra") != "forbid":
        problems.append("its Config must set extra='forbid'")
    for method in REQUIRED_METHODS[kind]:
        if not callable(getattr(component, method, None)):
            problems.append(f"it has no `{method}` method")
    return problems
