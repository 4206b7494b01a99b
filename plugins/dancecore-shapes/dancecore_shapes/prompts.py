"""The shapes prompt split: training captions and held-out compositions never seen in training.

Every held-out caption uses only the training vocabulary (shapes, colours, numbers, relations),
but in a combination that no training caption contains:

- single_object: the three captions are all training ones (there is nothing to hold out).
- two_object: the pair circle/triangle (both orders) is held out.
- counting: "two triangles", "three circles" and "four squares" are held out; every count and
  every shape still appears in training.
- colors: six colour-shape pairs are held out (:data:`HELDOUT_PAIRS`), one per colour and two per
  shape; each colour is still trained with two shapes and each shape with four colours.
- position: half of the (ordered shape pair, relation) combinations are held out, a checkerboard
  so that every pair keeps two relations and every relation three pairs in training.
- color_attr: captions naming a held-out colour-shape pair are held out; training captions use
  only trained pairs. Both are evenly thinned to :data:`COLOR_ATTR_PER_SPLIT` captions.

Run ``python -m dancecore_shapes.prompts --write configs/prompts`` to (re)write
``shapes_train.txt`` and ``shapes_heldout.txt``; the tests check the shipped files equal
:func:`split`.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

from dancecore_shapes.scenes import RELATIONS, SHAPES, TASKS, SceneSpec, all_specs, caption

HELDOUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {
        ("red", "triangle"),
        ("yellow", "triangle"),
        ("green", "circle"),
        ("purple", "circle"),
        ("blue", "square"),
        ("cyan", "square"),
    }
)
HELDOUT_TWO_OBJECT: frozenset[str] = frozenset({"circle", "triangle"})
HELDOUT_COUNTS: frozenset[tuple[int, str]] = frozenset({(2, "triangle"), (3, "circle"), (4, "square")})
COLOR_ATTR_PER_SPLIT = 40
TRAIN_FILE, HELDOUT_FILE = "shapes_train.txt", "shapes_heldout.txt"


def is_heldout(spec: SceneSpec) -> bool:
    """Whether ``spec`` is a held-out combination (see the module docstring)."""
    objs = spec.objects
    if spec.task == "two_object":
        return {o.shape for o in objs} == HELDOUT_TWO_OBJECT
    if spec.task == "counting":
        return (spec.count, objs[0].shape) in HELDOUT_COUNTS
    if spec.task in ("colors", "color_attr"):
        return any((o.color, o.shape) in HELDOUT_PAIRS for o in objs)
    if spec.task == "position":
        pair = list(itertools.permutations(SHAPES, 2)).index((objs[0].shape, objs[1].shape))
        return (pair + RELATIONS.index(spec.relation or "")) % 2 == 0
    return False


def _thin(items: list[str], keep: int) -> list[str]:
    """``keep`` items spread evenly over ``items`` (all of them if there are fewer)."""
    if len(items) <= keep:
        return items
    return [items[i * len(items) // keep] for i in range(keep)]


def split_by_task() -> dict[str, tuple[list[str], list[str]]]:
    """Per task: (training captions, held-out captions), in a fixed order."""
    result = {}
    for task in TASKS:
        specs = all_specs(task)
        train = [caption(s) for s in specs if not is_heldout(s)]
        heldout = [caption(s) for s in specs if is_heldout(s)]
        if task == "color_attr":
            train, heldout = _thin(train, COLOR_ATTR_PER_SPLIT), _thin(heldout, COLOR_ATTR_PER_SPLIT)
        result[task] = (train, heldout)
    return result


def split() -> tuple[list[str], list[str]]:
    """(training captions, held-out captions): disjoint, deterministic, grouped by task."""
    parts = split_by_task()
    return [c for t in TASKS for c in parts[t][0]], [c for t in TASKS for c in parts[t][1]]


def write(directory: Path) -> tuple[Path, Path]:
    """Write the two prompt files (one caption per line) into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    train, heldout = split()
    paths = directory / TRAIN_FILE, directory / HELDOUT_FILE
    for path, lines in zip(paths, (train, heldout), strict=True):
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return paths


def main(argv: list[str] | None = None) -> None:
    """Command line: ``--write DIR`` writes the files, otherwise print per-task counts."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path, metavar="DIR", help="write shapes_train.txt and shapes_heldout.txt here")
    args = parser.parse_args(argv)
    if args.write is not None:
        for path in write(args.write):
            print(f"wrote {path}")
    for task, (train, heldout) in split_by_task().items():
        print(f"{task:14s} train {len(train):3d}  held-out {len(heldout):3d}")


if __name__ == "__main__":
    main()
