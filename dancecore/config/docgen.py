"""Generate docs/config-reference.md from the pydantic models (``python -m dancecore.config.docgen``).

The run structure comes from :class:`dancecore.config.schema.RunConfig`; every installed component's
options from its own ``Config``. ``tests/test_docs.py`` fails when the committed page is stale.
"""

from __future__ import annotations

import sys
import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from dancecore import registry
from dancecore.config.schema import RunConfig

HEADER = """# Configuration reference

Generated from the pydantic schema by `python -m dancecore.config.docgen` (`make docs`); a test fails when
this page is stale. A run config is YAML; every key below is checked (unknown keys are errors) and
can be overridden on the command line as `key.sub=value`, e.g. `train.iterations=10` or
`rewards[0].weight=0.5`.
"""


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(annotation))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def _default(field: FieldInfo) -> str:
    if field.default is not PydanticUndefined:
        value = field.default
        if isinstance(value, BaseModel):
            return "(see below)"
        return f"`{value!r}`" if value is not None else "`null`"
    if field.default_factory is not None:
        return "(see below)" if isinstance(field.default_factory(), BaseModel) else f"`{field.default_factory()!r}`"  # type: ignore[call-arg]
    return "**required**"


def _constraints(field: FieldInfo) -> str:
    parts = []
    for meta in field.metadata:
        for attr, symbol in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="), ("min_length", "min length")):
            value = getattr(meta, attr, None)
            if value is not None:
                parts.append(f"{symbol} {value}")
    return f" ({', '.join(parts)})" if parts else ""


def _nested_models(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found = []
    for arg in typing.get_args(annotation):
        found.extend(_nested_models(arg))
    return found


def model_table(model: type[BaseModel], prefix: str, out: list[str], seen: set[str]) -> None:
    """Append a markdown table of ``model``'s fields (and of nested models) to ``out``."""
    if prefix in seen:
        return
    seen.add(prefix)
    out.append(f"\n### `{prefix}`\n" if prefix else "\n### top level\n")
    doc = (model.__doc__ or "").strip().splitlines()
    if doc:
        out.append(doc[0] + "\n")
    out.append("| key | type | default | description |\n|---|---|---|---|")
    nested: list[tuple[str, type[BaseModel]]] = []
    for name, field in model.model_fields.items():
        description = (field.description or "").replace("|", "\\|") + _constraints(field)
        type_name = _type_name(field.annotation).replace("|", "\\|")
        out.append(f"| `{name}` | `{type_name}` | {_default(field)} | {description} |")
        for sub in _nested_models(field.annotation):
            if sub.__name__ not in ("ComponentSpec", "RewardSpec"):
                nested.append((f"{prefix}.{name}" if prefix else name, sub))
    if model.model_config.get("extra") == "allow":
        out.append("| *(other keys)* | | | options of the named component (see Components below) |")
    for path, sub in nested:
        model_table(sub, path, out, seen)


def render() -> str:
    """The whole reference page."""
    out = [HEADER, "\n## Run structure\n"]
    model_table(RunConfig, "", out, set())
    out.append("\n## Components\n")
    out.append("Options of each installed component, written next to its `name` in the run config.\n")
    for info in registry.installed():
        cls = registry.load(info.kind, info.name)
        out.append(f"\n## {info.kind} `{info.name}` ({info.package})\n")
        summary = (cls.__doc__ or "").strip().splitlines()
        if summary:
            out.append(summary[0] + "\n")
        model_table(cls.Config, f"{info.kind}:{info.name}", out, set())
    return "\n".join(out).rstrip() + "\n"


def main() -> int:
    """Print the reference page."""
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
