"""Score a GenEval image folder, and compare with GenEval's own results (the calibration run).

GenEval's layout: ``<folder>/<00000>/metadata.jsonl`` (one spec) and ``<folder>/<00000>/samples/*.png``.
``python -m dancecore_rewards_geneval.folder FOLDER [--reference results.jsonl] [--out ours.jsonl]``
writes one JSON line per image (``filename``, ``tag``, ``prompt``, ``correct``, ``strict``,
``score``, ``reason``), prints the six-task table, and with ``--reference`` (the ``results.jsonl``
of GenEval's ``evaluation/evaluate_images.py`` on the same folder, mmdetection's checkpoint)
prints both tables and the per-image agreement of the verdicts per task.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dancecore_rewards_geneval.prompts import TASKS, spec_from_json
from dancecore_rewards_geneval.reward import GenEvalReward, task_table
from dancecore_rewards_geneval.rules import judge


def read_png(path: Path) -> torch.Tensor:
    """An image file as (3, H, W) float pixels in [0, 1]."""
    from PIL import Image, ImageOps

    image = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255


def score_folder(reward: GenEvalReward, folder: Path) -> list[dict[str, Any]]:
    """One row per image of a GenEval folder, in folder and file name order."""
    rows = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()):
        meta = sub / "metadata.jsonl"
        spec = spec_from_json(json.loads(meta.read_text()), str(meta))
        for path in sorted((sub / "samples").glob("*.png")):
            image = read_png(path)
            detections = reward.segmenter(image[None])[0]
            verdict = judge(spec, detections, lambda name, objs, image=image: reward.colors(image, name, objs))
            rows.append(
                {
                    "filename": str(path),
                    "tag": spec.tag,
                    "prompt": spec.prompt,
                    "correct": verdict.correct,
                    "strict": verdict.strict,
                    "score": verdict.score,
                    "reason": verdict.reason,
                }
            )
    if not rows:
        raise ValueError(f"{folder} holds no GenEval sample (<folder>/<digits>/samples/*.png)")
    return rows


def format_table(tables: dict[str, dict[str, float]]) -> str:
    """A markdown table, one column per named task table (tasks in GenEval's order, then overall)."""
    names = list(tables)
    lines = ["| task | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for task in [*TASKS, "overall"]:
        if any(task in t for t in tables.values()):
            cells = [f"{tables[n][task]:.3f}" if task in tables[n] else "" for n in names]
            lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _key(filename: str) -> str:
    """``<prompt folder>/samples/<file>``: the same image under either tool's root."""
    return "/".join(Path(filename).parts[-3:])


def compare(ours: list[dict[str, Any]], reference: list[dict[str, Any]]) -> dict[str, float]:
    """Per task, the fraction of images on which our verdict equals GenEval's (matched by file name)."""
    theirs = {_key(r["filename"]): bool(r["correct"]) for r in reference}
    agree: dict[str, list[float]] = {}
    for row in ours:
        key = _key(row["filename"])
        if key in theirs:
            agree.setdefault(row["tag"], []).append(float(theirs[key] == row["correct"]))
    return {t: sum(v) / len(v) for t in TASKS if (v := agree.get(t))}


def main(argv: list[str] | None = None) -> int:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m dancecore_rewards_geneval.folder", description=__doc__)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--reference", type=Path, help="GenEval's results.jsonl for the same folder")
    parser.add_argument("--out", type=Path, help="write our per-image results here (JSON lines)")
    parser.add_argument("--detector", default="facebook/mask2former-swin-small-coco-instance")
    parser.add_argument("--clip", default="openai/clip-vit-large-patch14")
    parser.add_argument("--preset", choices=["tiny"], default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    from dancecore import BuildContext

    options = {"preset": "tiny"} if args.preset else {"detector": args.detector, "clip": args.clip}
    reward = GenEvalReward(GenEvalReward.Config(**options), BuildContext(device=torch.device(args.device)))
    rows = score_folder(reward, args.folder)
    if args.out:
        args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tables = {"dancecore (transformers)": task_table([r["tag"] for r in rows], [float(r["correct"]) for r in rows])}
    if args.reference:
        reference = [json.loads(line) for line in args.reference.read_text().splitlines() if line.strip()]
        tables["GenEval (mmdetection)"] = task_table(
            [r["tag"] for r in reference], [float(r["correct"]) for r in reference]
        )
        tables["verdicts agree"] = compare(rows, reference)
    print(format_table(tables))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
