"""YAML loading (strict: duplicate keys and Python tags rejected, YAML 1.2 scalars) and
``key.sub=value`` overrides of a run config."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from dancecore.errors import ConfigError

# ---------------------------------------------------------------------------------------- YAML


class _StrictLoader(yaml.SafeLoader):
    """A safe loader that rejects duplicate keys and reads scalars as YAML 1.2 does:
    ``1e-5`` is a float and only ``true``/``false`` are booleans (``no``, ``off`` stay strings)."""


_StrictLoader.yaml_implicit_resolvers = {
    first: [
        (tag, regexp) for tag, regexp in resolvers if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:float")
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)"
        r"|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: dict[Any, Any] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen[key] = True
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def parse_yaml(text: str, source: str = "<string>") -> Any:
    """Parse YAML safely (no python tags, no duplicate keys); errors name the file and line."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - _StrictLoader derives from SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        context = getattr(exc, "context", None)
        detail = f"{context}: {problem}" if context and "duplicate" in str(problem) else problem
        raise ConfigError([f"invalid YAML{where}: {detail}"], source) from None


def load_yaml_file(path: Path) -> dict[str, Any]:
    """Read a YAML config file into a dict, with clear errors for missing or malformed files."""
    if not path.is_file():
        raise ConfigError([f"config file not found: {path}"])
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"cannot read config file {path}: {exc}"]) from None
    data = parse_yaml(text, str(path))
    if not isinstance(data, dict):
        raise ConfigError(["the top level of a config must be a mapping"], str(path))
    return data


# ----------------------------------------------------------------------------------- overrides

_PATH_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def _split_path(dotted: str) -> list[str | int]:
    parts: list[str | int] = []
    for name, index in _PATH_PART.findall(dotted):
        parts.append(int(index) if index else name)
    if not parts:
        raise ConfigError([f"override {dotted!r} has an empty key"])
    return parts


def _list_index(node: Any, part: str | int) -> str | int:
    """``rewards.0.weight`` means ``rewards[0].weight``: a number after a list is its index."""
    if isinstance(node, list) and isinstance(part, str) and part.isdigit():
        return int(part)
    return part


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` / ``rewards[0].weight=0.5`` overrides (values parsed as YAML)."""
    errors: list[str] = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            errors.append(f"override {item!r} is not of the form key.sub=value")
            continue
        parts = _split_path(key.strip())
        value = parse_yaml(raw, f"override {key}") if raw.strip() else ""
        node: Any = data
        try:
            for part in parts[:-1]:
                part = _list_index(node, part)
                node = node[part] if isinstance(part, int) else node.setdefault(part, {})
            node[_list_index(node, parts[-1])] = value
        except (IndexError, KeyError, TypeError, AttributeError):
            errors.append(f"override {key!r}: no such place in the config (list items are written rewards[0].weight)")
    if errors:
        raise ConfigError(errors)
    return data
