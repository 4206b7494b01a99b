"""``dancecore eval``: score a policy (base weights or a checkpoint) on a prompt file.

Sampling is deterministic (the ODE / eta = 0 version of the run's sampler, as the paper evaluates)
with fixed per-(prompt, sample) seeds, so two evaluations of the same weights give the same table.
Writes ``results.json``, ``results.csv``, ``results.md`` and ``grid.png`` (a contact sheet for videos, plus
one clip per sample under ``videos/``) to the output directory.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dancecore.checkpoint import CheckpointError, find_latest, read_checkpoint
from dancecore.config.schema import ResolvedRun
from dancecore.contracts.protocols import BuildContext
from dancecore.contracts.records import PromptBatch, select_rows
from dancecore.functional.seeding import generator
from dancecore.outputs.images import save_grid
from dancecore.training.engine import load_trainable
from dancecore.training.prompts import load_prompts, read_prompt_file
from dancecore.training.scoring import build_rewards, score_samples
from dancecore.training.trainer import check_writable, pick_device


@dataclass(frozen=True)
class EvalResult:
    """Per-sample scores and their summary."""

    rows: list[dict[str, Any]]
    summary: dict[str, dict[str, float]]
    output_dir: Path


def _resolve_checkpoint(run: ResolvedRun, checkpoint: str | None) -> Path | None:
    if checkpoint in (None, "none", "base"):
        return None
    if checkpoint == "latest":
        path, skipped = find_latest(run.config.output_dir)
        if path is None:
            raise CheckpointError(f"no valid checkpoint under {run.config.output_dir / 'checkpoints'}: {skipped}")
        return path
    return Path(checkpoint)


@torch.no_grad()
def evaluate(
    run: ResolvedRun,
    prompts_file: Path | None,
    output_dir: Path,
    *,
    checkpoint: str | None = None,
    samples_per_prompt: int = 1,
    seed: int = 0,
    batch_size: int = 8,
) -> EvalResult:
    """Generate deterministically and score; returns the table and writes it to ``output_dir``."""
    cfg = run.config
    check_writable(output_dir)
    prompts = read_prompt_file(prompts_file) if prompts_file is not None else load_prompts(cfg.prompts)
    device = pick_device(cfg.train.device)
    context = BuildContext(device=device, seed=seed, output_dir=output_dir)
    policy = run.policy.cls(run.policy.config, context)
    sampler = run.sampler.cls(run.sampler.config, context)
    rewards = build_rewards(run, context)
    ckpt_path = _resolve_checkpoint(run, checkpoint)
    if ckpt_path is not None:
        load_trainable(policy.module, read_checkpoint(ckpt_path).model)
    policy.module.eval()
    schedule = sampler.schedule()
    items = [(p, j) for p in prompts for j in range(samples_per_prompt)]
    pixels_all: list[torch.Tensor] = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        cond = policy.encode_prompts(PromptBatch(tuple(p for p, _ in chunk)))
        x = torch.cat([policy.initial_noise(1, generator(seed, "eval", p.index, j)) for p, j in chunk]).to(device)
        for i in range(schedule.num_steps):
            pred = policy.predict(x, schedule.timesteps[i].expand(len(chunk)), select_rows(cond, torch.arange(len(chunk))))
            out = sampler.step(schedule, i, x, pred.float(), deterministic=True)
            x = out.next_latents
        pixels_all.append(policy.decode(out.x0_hat).cpu())
    pixels = torch.cat(pixels_all)
    texts = [p.text for p, _ in items]
    group_ids = torch.arange(len(items))
    scored = score_samples(rewards, pixels, texts, group_ids, cfg.reward_failure)
    rows = []
    for n, (prompt, j) in enumerate(items):
        row: dict[str, Any] = {"prompt_index": prompt.index, "sample": j, "prompt": prompt.text}
        for k, name in enumerate(scored.scores.names):
            row[name] = float(scored.scores.values[k, n])
        rows.append(row)
    summary = {}
    for k, name in enumerate(scored.scores.names):
        values = scored.scores.values[k]
        summary[name] = {
            "mean": float(values.mean()),
            "std": float(values.std()) if values.numel() > 1 else 0.0,
            "n": float(values.numel()),
        }
    _write_outputs(output_dir, rows, summary, pixels, samples_per_prompt, ckpt_path)
    return EvalResult(rows=rows, summary=summary, output_dir=output_dir)


def _write_outputs(
    output_dir: Path,
    rows: list[dict[str, Any]],
    summary: dict[str, dict[str, float]],
    pixels: torch.Tensor,
    columns: int,
    checkpoint: Path | None,
) -> None:
    weights = str(checkpoint) if checkpoint else "base"
    (output_dir / "results.json").write_text(json.dumps({"weights": weights, "summary": summary, "samples": rows}, indent=1))
    with (output_dir / "results.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"# Evaluation ({weights})", "", "| reward | mean | std | n |", "|---|---|---|---|"]
    for name, stats in summary.items():
        std = stats["std"] if math.isfinite(stats["std"]) else 0.0
        lines.append(f"| {name} | {stats['mean']:.4f} | {std:.4f} | {int(stats['n'])} |")
    (output_dir / "results.md").write_text("\n".join(lines) + "\n")
    save_grid(pixels, output_dir / "grid.png", columns if columns > 1 else None)
    if pixels.ndim == 5:  # videos: every sample as a clip too
        from dancecore.outputs.video import write_video

        for n, row in enumerate(rows):
            write_video(pixels[n], output_dir / "videos" / f"prompt{row['prompt_index']:04d}-sample{row['sample']:02d}.mp4")
