"""``dancecore eval --compare A/results.json B/results.json``: two evaluations side by side, with
the difference B - A and its standard error.

When both evaluations scored the same (prompt, sample) items (same prompts and eval seed, e.g. base
weights vs a checkpoint), the difference is paired: the standard error is the standard deviation
of the per-item differences over sqrt(n), which removes the prompts' own variance. Otherwise the
two means are independent: sqrt(var_A / n_A + var_B / n_B). Breakdowns (e.g. GenEval's tasks) get
the same per group when the rows carry each sample's group (``group/<reward>``, written by rewards
with a ``groups`` method); their ``overall``, the mean of the group means, has the standard error
sqrt(sum of the groups' squared standard errors) / number of groups.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dancecore.errors import UserError


class CompareError(UserError):
    """A results file to compare is missing, unreadable or not a ``dancecore eval`` result."""


@dataclass(frozen=True)
class Difference:
    """One compared quantity: the two values, B - A, its standard error (NaN when it cannot be
    estimated) and the samples behind each value."""

    name: str
    a: float
    b: float
    diff: float
    stderr: float
    n: int
    paired: bool

    @property
    def z(self) -> float:
        """The difference in standard errors (NaN without one)."""
        return self.diff / self.stderr if self.stderr > 0 else math.nan


def read_results(path: Path) -> dict[str, Any]:
    """A ``results.json`` (or the directory holding one); ``CompareError`` naming the file otherwise."""
    path = path / "results.json" if path.is_dir() else path
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CompareError(f"cannot read evaluation results {path}: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("samples"), list) or "summary" not in data:
        raise CompareError(f"{path} is not a dancecore eval results.json (no 'summary' and 'samples')")
    return data


def _var(values: Sequence[float]) -> float:
    if len(values) < 2:
        return math.nan
    mean = sum(values) / len(values)
    return sum((v - mean) ** 2 for v in values) / (len(values) - 1)


def _key(row: dict[str, Any]) -> tuple[Any, ...]:
    return row.get("prompt_index"), row.get("sample"), row.get("prompt")


def difference(name: str, a: Sequence[float], b: Sequence[float], paired: bool) -> Difference:
    """B - A of the means, and its standard error (paired: ``a[i]`` and ``b[i]`` score the same item)."""
    mean_a, mean_b = sum(a) / len(a), sum(b) / len(b)
    if paired:
        stderr = math.sqrt(_var([y - x for x, y in zip(a, b, strict=True)]) / len(a))
    else:
        stderr = math.sqrt(_var(a) / len(a) + _var(b) / len(b))
    return Difference(name, mean_a, mean_b, mean_b - mean_a, stderr, min(len(a), len(b)), paired)


def _groups(
    name: str, rows_a: list[dict[str, Any]], rows_b: list[dict[str, Any]], paired: bool
) -> list[Difference] | None:
    column = f"group/{name}"
    if not all(column in r for r in rows_a + rows_b):
        return None
    found = []
    for group in dict.fromkeys(r[column] for r in rows_a + rows_b):
        a = [r[name] for r in rows_a if r[column] == group]
        b = [r[name] for r in rows_b if r[column] == group]
        if a and b:
            found.append(difference(f"{name}/{group}", a, b, paired))
    if found:
        a_mean = sum(d.a for d in found) / len(found)
        b_mean = sum(d.b for d in found) / len(found)
        stderr = math.sqrt(sum(d.stderr**2 for d in found)) / len(found)
        found.append(
            Difference(f"{name}/overall", a_mean, b_mean, b_mean - a_mean, stderr, sum(d.n for d in found), paired)
        )
    return found


def compare_results(path_a: Path, path_b: Path) -> list[Difference]:
    """Every reward both evaluations hold (then its groups, when the rows carry them), B - A."""
    res_a, res_b = read_results(path_a), read_results(path_b)
    rows_a = sorted(res_a["samples"], key=lambda r: str(_key(r)))
    rows_b = sorted(res_b["samples"], key=lambda r: str(_key(r)))
    paired = [_key(r) for r in rows_a] == [_key(r) for r in rows_b]
    names = [n for n in res_a["summary"] if n in res_b["summary"]]
    if not names:
        raise CompareError(
            f"{path_a} and {path_b} share no reward ({list(res_a['summary'])} vs {list(res_b['summary'])})"
        )
    out = []
    for name in names:
        out.append(difference(name, [r[name] for r in rows_a], [r[name] for r in rows_b], paired))
        out += _groups(name, rows_a, rows_b, paired) or []
    return out


def format_comparison(diffs: Sequence[Difference], label_a: str, label_b: str) -> str:
    """A markdown table: A, B, B - A, its standard error and z."""
    paired = all(d.paired for d in diffs)
    lines = [
        f"A: {label_a}",
        f"B: {label_b}",
        f"standard errors {'paired (same prompts and seeds)' if paired else 'unpaired (different items)'}",
        "",
        "| metric | A | B | B - A | std. error | z | n |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for d in diffs:
        se = f"{d.stderr:.4f}" if math.isfinite(d.stderr) else "n/a"
        z = f"{d.z:+.2f}" if math.isfinite(d.z) else "n/a"
        lines.append(f"| {d.name} | {d.a:.4f} | {d.b:.4f} | {d.diff:+.4f} | {se} | {z} | {d.n} |")
    return "\n".join(lines)
