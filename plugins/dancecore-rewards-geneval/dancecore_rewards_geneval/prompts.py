"""GenEval's prompts and their structured specs.

GenEval (Ghosh et al., 2023) builds its 553 evaluation prompts from six templates over the 80 COCO
classes, with a seeded numpy generator (``numpy.random.default_rng(43)``), 100 draws per task after
one prompt per class for ``single_object``, then drops exact duplicates. :func:`generate_suite`
makes the same draws in the same order, so it yields GenEval's published list (first prompts "a
photo of a bench", "a photo of a cow", "a photo of a bicycle"; per task 80, 99, 80, 94, 100, 100).

Each prompt carries a :class:`Spec` (GenEval's ``evaluation_metadata.jsonl`` record): the task
tag, the ``include`` clauses (class, count, optional colour, optional position relative to an
earlier clause) and the ``exclude`` clauses (at least ``count`` of a class is wrong). The JSON-lines
form (:func:`write_jsonl`) is both a dancecore prompt file (its ``prompt`` field) and the reward's
metadata (``metadata:`` option of the ``geneval`` reward).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
"""GenEval's six tasks, in the order of its tables."""

PUBLISHED_COUNTS = {
    "single_object": 80,
    "two_object": 99,
    "counting": 80,
    "colors": 94,
    "position": 100,
    "color_attr": 100,
}
"""Prompts per task in GenEval's published ``evaluation_metadata.jsonl`` (553 in all)."""

# The 80 COCO classes in the detector's label order; GenEval renames three of them (64-66) so that
# prompts read naturally ("computer mouse" for "mouse", "tv remote" for "remote", "computer keyboard").
CLASS_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock",
    "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip

COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
"""GenEval's colour names: the prompts' colours and the zero-shot colour classifier's classes."""

POSITIONS = ("left of", "right of", "above", "below")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
SEED = 43
DRAWS_PER_TASK = 100


@dataclass(frozen=True)
class Clause:
    """One ``include``/``exclude`` clause: ``count`` objects of ``cls``, optionally of ``color``,
    optionally in relation ``position = (relation, index of an earlier include clause)``."""

    cls: str
    count: int
    color: str | None = None
    position: tuple[str, int] | None = None

    def to_json(self) -> dict[str, Any]:
        """GenEval's JSON form (``class``, ``count``, ``color``, ``position``)."""
        out: dict[str, Any] = {"class": self.cls, "count": self.count}
        if self.color is not None:
            out["color"] = self.color
        if self.position is not None:
            out["position"] = list(self.position)
        return out


@dataclass(frozen=True)
class Spec:
    """What a GenEval prompt asks for (one line of its ``evaluation_metadata.jsonl``)."""

    tag: str
    prompt: str
    include: tuple[Clause, ...]
    exclude: tuple[Clause, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """The JSON-lines record: ``tag``, ``include``, ``exclude`` (when any) and ``prompt``."""
        out: dict[str, Any] = {"tag": self.tag, "include": [c.to_json() for c in self.include]}
        if self.exclude:
            out["exclude"] = [c.to_json() for c in self.exclude]
        out["prompt"] = self.prompt
        return out


def with_article(name: str) -> str:
    """``a``/``an`` by the first letter, as GenEval writes it (vowel letters only)."""
    return f"an {name}" if name[0] in "aeiou" else f"a {name}"


def plural(name: str) -> str:
    """GenEval's plural: ``es`` after a final ``s``, else ``s`` ("skises", "scissorses": as published)."""
    return f"{name}es" if name.endswith("s") else f"{name}s"


def _uncoloured_class(offset: int) -> str:
    """Class ``offset`` (1..79) places after "person": colour prompts never name a person."""
    return CLASS_NAMES[(offset + CLASS_NAMES.index("person")) % len(CLASS_NAMES)]


def _two_object(rng: np.random.Generator) -> Spec:
    a, b = (CLASS_NAMES[i] for i in rng.choice(len(CLASS_NAMES), size=2, replace=False))
    return Spec("two_object", f"a photo of {with_article(a)} and {with_article(b)}", (Clause(a, 1), Clause(b, 1)))


def _counting(rng: np.random.Generator) -> Spec:
    name = CLASS_NAMES[rng.choice(len(CLASS_NAMES))]
    n = int(rng.integers(2, 4, endpoint=True))
    return Spec("counting", f"a photo of {NUMBERS[n]} {plural(name)}", (Clause(name, n),), (Clause(name, n + 1),))


def _colors(rng: np.random.Generator) -> Spec:
    name = _uncoloured_class(int(rng.choice(len(CLASS_NAMES) - 1)) + 1)
    color = COLORS[rng.choice(len(COLORS))]
    return Spec("colors", f"a photo of {with_article(color)} {name}", (Clause(name, 1, color),))


def _position(rng: np.random.Generator) -> Spec:
    a, b = (CLASS_NAMES[i] for i in rng.choice(len(CLASS_NAMES), size=2, replace=False))
    relation = POSITIONS[rng.choice(len(POSITIONS))]
    # The target (b) comes first; the object (a) is placed relative to include clause 0.
    prompt = f"a photo of {with_article(a)} {relation} {with_article(b)}"
    return Spec("position", prompt, (Clause(b, 1), Clause(a, 1, position=(relation, 0))))


def _color_attr(rng: np.random.Generator) -> Spec:
    a, b = (_uncoloured_class(int(i) + 1) for i in rng.choice(len(CLASS_NAMES) - 1, size=2, replace=False))
    ca, cb = (COLORS[i] for i in rng.choice(len(COLORS), size=2, replace=False))
    prompt = f"a photo of {with_article(ca)} {a} and {with_article(cb)} {b}"
    return Spec("color_attr", prompt, (Clause(a, 1, ca), Clause(b, 1, cb)))


def generate_suite(seed: int = SEED, draws: int = DRAWS_PER_TASK) -> list[Spec]:
    """GenEval's evaluation prompts: one ``single_object`` prompt per class in a seeded order, then
    ``draws`` prompts of each other task, in GenEval's order of random draws; exact duplicates dropped."""
    rng = np.random.default_rng(seed)
    specs = [
        Spec("single_object", f"a photo of {with_article(CLASS_NAMES[i])}", (Clause(CLASS_NAMES[i], 1),))
        for i in rng.choice(len(CLASS_NAMES), size=len(CLASS_NAMES), replace=False)
    ]
    for make in (_two_object, _counting, _colors, _position, _color_attr):
        specs += [make(rng) for _ in range(draws)]
    unique: dict[str, Spec] = {}
    for spec in specs:
        unique.setdefault(json.dumps(spec.to_json(), sort_keys=True), spec)
    return list(unique.values())


def task_counts(specs: Iterable[Spec]) -> dict[str, int]:
    """Prompts per task, in :data:`TASKS` order (tasks without prompts left out)."""
    counts: dict[str, int] = {}
    for spec in specs:
        counts[spec.tag] = counts.get(spec.tag, 0) + 1
    return {t: counts[t] for t in TASKS if t in counts}


def write_jsonl(specs: Sequence[Spec], path: Path) -> None:
    """Write ``specs`` as JSON lines (a dancecore prompt file that carries GenEval's metadata)."""
    path.write_text("".join(json.dumps(s.to_json()) + "\n" for s in specs), encoding="utf-8")


def _clause(record: Any, where: str) -> Clause:
    if not isinstance(record, dict) or not isinstance(record.get("class"), str):
        raise ValueError(f"{where}: a clause needs a string 'class'")
    count = record.get("count", 1)
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"{where}: 'count' must be a positive integer, got {count!r}")
    color = record.get("color")
    if color is not None and color not in COLORS:
        raise ValueError(f"{where}: unknown colour {color!r} (GenEval's colours: {', '.join(COLORS)})")
    position = record.get("position")
    if position is not None:
        if not (isinstance(position, list | tuple) and len(position) == 2 and position[0] in POSITIONS):
            raise ValueError(f"{where}: 'position' must be [relation, clause index], relation one of {POSITIONS}")
        position = (str(position[0]), int(position[1]))
    if record["class"] not in CLASS_NAMES:
        raise ValueError(f"{where}: {record['class']!r} is not one of the detector's 80 COCO classes")
    return Clause(record["class"], count, color, position)


def spec_from_json(record: Any, where: str = "spec") -> Spec:
    """A :class:`Spec` from GenEval's JSON record; ``ValueError`` naming ``where`` if malformed."""
    if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
        raise ValueError(f"{where}: expected an object with a string 'prompt'")
    if record.get("tag") not in TASKS:
        raise ValueError(f"{where}: 'tag' must be one of {', '.join(TASKS)}, got {record.get('tag')!r}")
    include = tuple(_clause(c, f"{where}: include[{i}]") for i, c in enumerate(record.get("include") or []))
    exclude = tuple(_clause(c, f"{where}: exclude[{i}]") for i, c in enumerate(record.get("exclude") or []))
    if not include:
        raise ValueError(f"{where}: needs at least one 'include' clause")
    for i, clause in enumerate(include):
        if clause.position is not None and not 0 <= clause.position[1] < i:
            raise ValueError(
                f"{where}: include[{i}] is placed relative to clause {clause.position[1]}, not an earlier one"
            )
    return Spec(str(record["tag"]), record["prompt"], include, exclude)


def read_jsonl(path: Path) -> list[Spec]:
    """Specs from a JSON-lines file; ``ValueError`` naming the file and line of a bad record."""
    specs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            specs.append(spec_from_json(record, f"{path}:{number}"))
    return specs


if __name__ == "__main__":  # python -m dancecore_rewards_geneval.prompts OUT.jsonl
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m dancecore_rewards_geneval.prompts OUT.jsonl")
    suite = generate_suite()
    write_jsonl(suite, Path(sys.argv[1]))
    print(f"wrote {len(suite)} prompts to {sys.argv[1]}: {task_counts(suite)}")
