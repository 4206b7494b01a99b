"""Before/after figures of a held-out evaluation: chosen rows of two evaluation grids side by side.

    python -m dancecore_shapes.figures BEFORE_DIR AFTER_DIR OUT.png [--rows 0,2,5] [--columns 8]

BEFORE_DIR and AFTER_DIR are evaluation directories (``dancecore eval --output`` or a run's
``eval/iter-*``): an evaluation grid has one row per prompt and one column per sample seed, so the
two halves of the figure show the same prompts from the same seeds. Each row is labelled with its
caption, read from the directory's ``results.json`` (the prompts the evaluation actually scored).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image, ImageDraw

GAP = 12  # pixels between the two halves
LABEL_WIDTH = 260
HEADER = 16  # pixels above the rows, for "before" / "after"


def evaluated_captions(directory: Path) -> list[str]:
    """The prompts of an evaluation directory's ``results.json``, in row order (by prompt index)."""
    path = Path(directory) / "results.json"
    try:
        samples = json.loads(path.read_text())["samples"]
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{path}: not a dancecore evaluation result ({exc})") from None
    return [text for _, text in sorted({(s["prompt_index"], s["prompt"]) for s in samples})]


def before_after(
    before: Path,
    after: Path,
    captions: list[str],
    rows: list[int],
    scale: int = 2,
    tile: int | None = None,
    columns: int | None = None,
) -> Image.Image:
    """The figure: for each of ``rows``, its caption, the row of ``before`` and the row of ``after``
    (their first ``columns`` samples, or all)."""
    a, b = Image.open(before).convert("RGB"), Image.open(after).convert("RGB")
    if a.size != b.size:
        raise ValueError(f"the two grids differ in size: {before} {a.size} vs {after} {b.size}")
    tile = tile or a.size[1] // len(captions)
    if tile * len(captions) != a.size[1]:
        raise ValueError(f"{before}: {a.size[1]} px high is not {len(captions)} rows (one per caption)")
    width = a.size[0] if columns is None else min(a.size[0], columns * tile)
    out = Image.new("RGB", (LABEL_WIDTH + (2 * width + GAP) * scale, HEADER + tile * scale * len(rows)), "white")
    draw = ImageDraw.Draw(out)
    draw.text((LABEL_WIDTH, 2), "before", fill="black")
    draw.text((LABEL_WIDTH + (width + GAP) * scale, 2), "after", fill="black")
    for i, row in enumerate(rows):
        if not 0 <= row < len(captions):
            raise ValueError(f"row {row} is outside the {len(captions)} captions")
        top = HEADER + i * tile * scale
        box = (0, row * tile, width, (row + 1) * tile)
        for j, grid in enumerate((a, b)):
            strip = grid.crop(box).resize((width * scale, tile * scale), Image.NEAREST)
            out.paste(strip, (LABEL_WIDTH + j * (width + GAP) * scale, top))
        draw.text((4, top + tile * scale // 2 - 6), captions[row].removeprefix("a photo of "), fill="black")
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m dancecore_shapes.figures", description=__doc__.splitlines()[0])
    p.add_argument("before", type=Path, help="evaluation directory of the base weights (grid.png, results.json)")
    p.add_argument("after", type=Path, help="evaluation directory of the trained weights")
    p.add_argument("out", type=Path)
    p.add_argument("--rows", default="", help="comma-separated row indices (default: all)")
    p.add_argument("--scale", type=int, default=2)
    p.add_argument("--columns", type=int, default=None, help="samples per row to show (default: all)")
    args = p.parse_args(argv)
    captions = evaluated_captions(args.before)
    if evaluated_captions(args.after) != captions:
        p.error(f"{args.before} and {args.after} evaluated different prompts")
    rows = [int(r) for r in args.rows.split(",") if r] or list(range(len(captions)))
    grids = args.before / "grid.png", args.after / "grid.png"
    before_after(*grids, captions, rows, args.scale, columns=args.columns).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
