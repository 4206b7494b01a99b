"""GenEval-style summaries: per-task accuracy over shapes captions, and a markdown table."""

from __future__ import annotations

from collections.abc import Sequence

from dancecore_shapes.scenes import TASKS, parse_caption


def task_table(prompts: Sequence[str], scores: Sequence[float]) -> dict[str, float]:
    """Mean score per task (in :data:`~dancecore_shapes.scenes.TASKS` order) plus ``"overall"``,
    the unweighted mean of the task means, as GenEval reports it.

    Tasks with no prompt are left out, and ``overall`` averages the tasks present. Raises
    ``ValueError`` if the lengths differ, there is no prompt, or a prompt is not a shapes caption.
    """
    if len(prompts) != len(scores):
        raise ValueError(f"got {len(prompts)} prompts but {len(scores)} scores")
    if not prompts:
        raise ValueError("task_table needs at least one prompt")
    per_task: dict[str, list[float]] = {}
    for prompt, score in zip(prompts, scores, strict=True):
        per_task.setdefault(parse_caption(prompt).task, []).append(float(score))
    table = {t: sum(per_task[t]) / len(per_task[t]) for t in TASKS if t in per_task}
    table["overall"] = sum(table.values()) / len(table)
    return table


def format_table(table: dict[str, float], counts: dict[str, int] | None = None, title: str = "accuracy") -> str:
    """A markdown table of :func:`task_table`'s result (optionally with prompt counts per task)."""
    header = f"| task | {title} |" + (" prompts |" if counts else "")
    rule = "|---|---:|" + ("---:|" if counts else "")
    rows = [header, rule]
    for task, value in table.items():
        name = f"**{task}**" if task == "overall" else task
        extra = f" {counts.get(task, sum(counts.values()) if task == 'overall' else 0)} |" if counts else ""
        rows.append(f"| {name} | {value:.3f} |{extra}")
    return "\n".join(rows)


def task_counts(prompts: Sequence[str]) -> dict[str, int]:
    """How many of ``prompts`` belong to each task."""
    counts: dict[str, int] = {}
    for prompt in prompts:
        task = parse_caption(prompt).task
        counts[task] = counts.get(task, 0) + 1
    return {t: counts[t] for t in TASKS if t in counts}
