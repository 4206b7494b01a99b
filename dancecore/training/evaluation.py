"""Held-out evaluation, shared by ``dancecore eval`` and the periodic evaluation of a run.

Sampling is deterministic (the ODE / eta = 0 version of the run's sampler, as the paper evaluates)
with a fixed seed per (prompt, sample), so two evaluations of the same weights give the same
table. Outputs: ``results.json`` (summary, per-sample rows, and per-group breakdowns from rewards
that offer one), ``results.csv``, ``results.md`` and ``grid.png`` (videos: a contact sheet plus one
clip per sample under ``videos/``).
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dancecore.config.schema import EvalConfig, RewardFailureConfig
from dancecore.contracts.protocols import Policy, Sampler, SummarizingReward
from dancecore.contracts.records import Prompt, PromptBatch, Schedule, select_rows
from dancecore.errors import RewardFailure
from dancecore.functional.seeding import generator
from dancecore.outputs.images import save_grid
from dancecore.outputs.report import load_eval_history
from dancecore.training.engine import LocalEngine
from dancecore.training.prompts import read_prompt_file
from dancecore.training.sampling import decoded_latents
from dancecore.training.scoring import NamedReward, score_samples

if TYPE_CHECKING:
    from dancecore.training.trainer import Trainer


@dataclass(frozen=True)
class EvalResult:
    """Per-sample scores, their summary, and per-group breakdowns (e.g. GenEval tasks)."""

    rows: list[dict[str, Any]]
    summary: dict[str, dict[str, float]]
    output_dir: Path
    breakdown: dict[str, dict[str, float]]


@torch.no_grad()
def ode_samples(
    policy: Policy,
    sampler: Sampler,
    prompts: Sequence[Prompt],
    *,
    samples_per_prompt: int,
    seed: int,
    batch_size: int,
    device: torch.device,
    num_steps: int | None = None,
    shard: tuple[int, int] = (0, 1),
) -> tuple[list[tuple[Prompt, int]], torch.Tensor]:
    """Deterministic samples of every (prompt, j < samples_per_prompt) from the seed
    ``(seed, "eval", prompt index, j)`` over ``num_steps`` steps (default: the sampler's);
    returns the items and their pixels (CPU).

    With ``shard = (rank, world_size)`` this rank samples every ``world_size``-th batch of
    ``batch_size`` items from its rank on: the batches are those of one process, so the pixels are
    too, and every rank makes the same number of network calls (a rank short of a batch repeats one
    and discards it), as a sharded network (ZeRO-3) needs."""
    schedule = sampler.schedule(num_steps)
    items = [(p, j) for p in prompts for j in range(samples_per_prompt)]
    batches = [items[start : start + batch_size] for start in range(0, len(items), batch_size)]
    rank, world = shard
    mine, pixels = [], []
    for number in range(rank, math.ceil(len(batches) / world) * world, world):
        chunk = batches[number] if number < len(batches) else batches[0]
        cond = policy.encode_prompts(PromptBatch(tuple(p for p, _ in chunk)))
        x = torch.cat([policy.initial_noise(1, generator(seed, "eval", p.index, j)) for p, j in chunk]).to(device)
        rows = select_rows(cond, torch.arange(len(chunk)))
        decoded = policy.decode(ode_latents(policy, sampler, schedule, x, rows)).cpu()
        if number < len(batches):
            mine += chunk
            pixels.append(decoded)
    return mine, torch.cat(pixels) if pixels else torch.empty(0)


@torch.no_grad()
def ode_latents(policy: Policy, sampler: Sampler, schedule: Schedule, x: torch.Tensor, cond: Any) -> torch.Tensor:
    """The deterministic (ODE / eta = 0) trajectory from ``x`` (B, *latent) over ``schedule``; returns
    the latents that are decoded: the last step's clean estimate ``x0_hat`` (flow), or its sample for
    a sampler that decodes it (DDIM's final sample)."""
    for i in range(schedule.num_steps):
        pred = policy.predict(x, schedule.timesteps[i].expand(x.shape[0]), cond)
        out = sampler.step(schedule, i, x, pred.float(), deterministic=True)
        x = out.next_latents
    return decoded_latents(sampler, out)


def score_and_report(
    rewards: Sequence[NamedReward],
    items: list[tuple[Prompt, int]],
    pixels: torch.Tensor,
    output_dir: Path,
    *,
    weights: str,
    failure_policy: RewardFailureConfig,
) -> EvalResult:
    """Score the samples with every reward and write the tables and the grid to ``output_dir``."""
    names, values = score_items(rewards, items, pixels, failure_policy)
    return report(rewards, items, names, values, pixels, output_dir, weights=weights)


def score_items(
    rewards: Sequence[NamedReward],
    items: list[tuple[Prompt, int]],
    pixels: torch.Tensor,
    failure_policy: RewardFailureConfig,
) -> tuple[list[str], torch.Tensor]:
    """Every reward's score of every item: the reward names and a (rewards, items) tensor."""
    texts = [p.text for p, _ in items]
    scored = score_samples(rewards, pixels, texts, torch.arange(len(items)), failure_policy)
    return list(scored.scores.names), scored.scores.values


def report(
    rewards: Sequence[NamedReward],
    items: list[tuple[Prompt, int]],
    names: list[str],
    values: torch.Tensor,
    pixels: torch.Tensor,
    output_dir: Path,
    *,
    weights: str,
) -> EvalResult:
    """Rows, summary and breakdowns of scored items, written to ``output_dir`` with the grid."""
    texts = [p.text for p, _ in items]
    groups = {  # optional: a summarizing reward's group of each sample, for standard errors per group
        name: list(getattr(reward.component, "groups")(texts))  # noqa: B009 (optional method)
        for name, reward in zip(names, rewards, strict=True)
        if callable(getattr(reward.component, "groups", None))
    }
    rows = []
    for n, (prompt, j) in enumerate(items):
        row: dict[str, Any] = {"prompt_index": prompt.index, "sample": j, "prompt": prompt.text}
        for k, name in enumerate(names):
            row[name] = float(values[k, n])
            if name in groups:
                row[f"group/{name}"] = groups[name][n]
        rows.append(row)
    summary: dict[str, dict[str, float]] = {}
    breakdown: dict[str, dict[str, float]] = {}
    for k, (name, reward) in enumerate(zip(names, rewards, strict=True)):
        summary[name] = {
            "mean": float(values[k].mean()),
            "std": float(values[k].std()) if values[k].numel() > 1 else 0.0,
            "n": float(values[k].numel()),
        }
        if isinstance(reward.component, SummarizingReward):
            breakdown[name] = {k2: float(v) for k2, v in reward.component.summarize(texts, values[k].tolist()).items()}
    output_dir.mkdir(parents=True, exist_ok=True)
    columns = max(1, len({j for _, j in items}))
    _write_outputs(output_dir, rows, summary, breakdown, pixels, columns, weights)
    return EvalResult(rows=rows, summary=summary, output_dir=output_dir, breakdown=breakdown)


def _write_outputs(
    output_dir: Path,
    rows: list[dict[str, Any]],
    summary: dict[str, dict[str, float]],
    breakdown: dict[str, dict[str, float]],
    pixels: torch.Tensor,
    columns: int,
    weights: str,
) -> None:
    results = {"weights": weights, "summary": summary, "breakdown": breakdown, "samples": rows}
    (output_dir / "results.json").write_text(json.dumps(results, indent=1))
    with (output_dir / "results.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"# Evaluation ({weights})", "", "| reward | mean | std | n |", "|---|---|---|---|"]
    for name, stats in summary.items():
        std = stats["std"] if math.isfinite(stats["std"]) else 0.0
        lines.append(f"| {name} | {stats['mean']:.4f} | {std:.4f} | {int(stats['n'])} |")
    for name, groups in breakdown.items():
        lines += ["", f"## {name} by group", "", "| group | score |", "|---|---|"]
        lines += [f"| {group} | {value:.4f} |" for group, value in groups.items()]
    (output_dir / "results.md").write_text("\n".join(lines) + "\n")
    save_grid(pixels, output_dir / "grid.png", columns if columns > 1 else None)
    if pixels.ndim == 5:  # videos: every sample as a clip too
        from dancecore.outputs.video import write_video

        for n, row in enumerate(rows):
            write_video(
                pixels[n], output_dir / "videos" / f"prompt{row['prompt_index']:04d}-sample{row['sample']:02d}.mp4"
            )


class PeriodicEval:
    """The run's ``eval:`` schedule: before training (``at_start``), every ``every`` iterations and
    at the end. Results go to ``eval/iter-XXXXXX/`` and one line per evaluation to
    ``eval/history.jsonl`` (``{"iteration": k, "eval/<reward>": mean, ...}``; k = iterations done)."""

    def __init__(self, config: EvalConfig, rewards: list[NamedReward], output_dir: Path) -> None:
        self.config = config
        self.rewards = rewards
        self.prompts = read_prompt_file(config.prompts)
        self.root = output_dir / "eval"

    def due(self, done: int, total: int) -> bool:
        """Whether the weights after ``done`` iterations are evaluated."""
        if done == 0:
            return self.config.at_start
        return done == total or bool(self.config.every and done % self.config.every == 0)

    def history(self) -> list[dict[str, Any]]:
        """Every evaluation so far, in order."""
        return load_eval_history(self.root.parent)

    def run(self, trainer: Trainer, done: int) -> dict[str, Any]:
        """Evaluate the current weights. The prompts' batches are split across ranks (every rank
        makes the same number of network calls: it may be sharded); each rank scores its share;
        rank 0 gathers the scores and pixels, in one process's order, and writes."""
        module = trainer.policy.module
        was_training = module.training
        use_ema = trainer.ema is not None and self.config.use_ema and isinstance(trainer.engine, LocalEngine)
        module.eval()
        try:
            with trainer.ema.swapped_in(module) if use_ema and trainer.ema else contextlib.nullcontext():
                items, pixels = ode_samples(
                    trainer.policy,
                    trainer.sampler,
                    self.prompts,
                    samples_per_prompt=self.config.samples_per_prompt,
                    seed=self.config.seed,
                    batch_size=self.config.batch_size,
                    device=trainer.device,
                    num_steps=self.config.num_steps,
                    shard=(trainer.rank, trainer.world_size),
                )
        finally:
            module.train(was_training)
        gathered = self._score_and_gather(trainer, items, pixels)
        if gathered is None:
            return {}
        names, values, pixels = gathered
        result = report(
            self.rewards,
            [(p, j) for p in self.prompts for j in range(self.config.samples_per_prompt)],
            names,
            values,
            pixels,
            self.root / f"iter-{done:06d}",
            weights=f"{'EMA ' if use_ema else ''}after {done} iterations",
        )
        record: dict[str, Any] = {
            "iteration": done,
            "weights": "ema" if use_ema else "trained",
            **{f"eval/{name}": stats["mean"] for name, stats in result.summary.items()},
        }
        for name, groups in result.breakdown.items():
            record.update({f"eval/{name}/{group}": value for group, value in groups.items()})
        earlier = [r for r in self.history() if r["iteration"] < done]  # a resumed run may redo one
        alarm = divergence_alarm(self.config, [*earlier, record], trainer.metrics.read())
        if alarm:
            record["alarm"] = alarm
        (self.root / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*earlier, record]))
        return record

    def _score_and_gather(
        self, trainer: Trainer, items: list[tuple[Prompt, int]], pixels: torch.Tensor
    ) -> tuple[list[str], torch.Tensor, torch.Tensor] | None:
        """Score this rank's items; on rank 0 every item's scores and pixels in one process's
        order (None on the other ranks). A reward failing on any rank fails every rank."""
        error: Exception | None = None
        names: list[str] | None = None
        values = torch.empty(len(self.rewards), 0)
        try:
            if items:
                names, values = score_items(self.rewards, items, pixels, trainer.cfg.reward_failure)
        except Exception as exc:  # re-raised below, once every rank knows
            error = exc
        if trainer.engine.any_rank(error is not None):
            if error is not None:
                raise error
            raise RewardFailure("eval", "an evaluation reward failed on another rank")
        keys = [(p.index, j) for p, j in items]
        parts = trainer.engine.gather_object((keys, names, values, pixels))
        if parts is None:
            return None
        order = {
            (p.index, j): n
            for n, (p, j) in enumerate((p, j) for p in self.prompts for j in range(self.config.samples_per_prompt))
        }
        position = torch.tensor([order[k] for part in parts for k in part[0]])
        merged_names = next(part[1] for part in parts if part[1] is not None)
        merged = torch.cat([part[2] for part in parts if part[0]], dim=1)
        merged_pixels = torch.cat([part[3] for part in parts if part[0]])
        inverse = torch.argsort(position)
        return merged_names, merged[:, inverse], merged_pixels[inverse]


def divergence_alarm(config: EvalConfig, history: list[dict[str, Any]], metrics: list[dict[str, Any]]) -> str | None:
    """The over-optimisation alarm's message, or None: between the evaluation ``window`` steps back
    and the last one, the gold metric fell by more than ``margin`` while the training reward rose.

    The training reward at an evaluation after ``k`` iterations is the mean ``reward_mean`` of the
    iterations since the previous evaluation (or of iteration 0 for the first).
    """
    alarm = config.divergence_alarm
    if alarm is None or len(history) <= alarm.window:
        return None
    then, now = history[-1 - alarm.window], history[-1]
    gold = alarm.gold or next(k.removeprefix("eval/") for k in now if k.startswith("eval/") and k.count("/") == 1)
    key = f"eval/{gold}"
    if key not in then or key not in now:
        return None

    def training_reward(at: int, since: int) -> float:
        values = [
            r["reward_mean"]
            for r in metrics
            if since <= r["iteration"] < max(at, 1) and math.isfinite(r["reward_mean"])
        ]
        return sum(values) / len(values) if values else math.nan

    positions = [h["iteration"] for h in history]
    before_then = positions[-2 - alarm.window] if len(positions) > alarm.window + 1 else 0
    train_then = training_reward(then["iteration"], before_then)
    train_now = training_reward(now["iteration"], positions[-2])
    fell = then[key] - now[key]
    if fell > alarm.margin and train_now > train_then:
        return (
            f"over-optimisation alarm: the training reward rose {train_then:.4f} -> {train_now:.4f} while the gold "
            f"metric {key} fell {then[key]:.4f} -> {now[key]:.4f} (more than {alarm.margin:g}) between iterations "
            f"{then['iteration']} and {now['iteration']}"
        )
    return None


def eval_summary(history: list[dict[str, Any]], output_dir: Path) -> str | None:
    """Two lines: each evaluated reward before (first evaluation) and after (last), and the grids."""
    if len(history) < 2:
        return None
    first, last = history[0], history[-1]
    grids = [output_dir / "eval" / f"iter-{r['iteration']:06d}" / "grid.png" for r in (first, last)]
    parts = [  # each reward's mean, and its summary's "overall" where it has one (GenEval's task mean)
        f"{key.removeprefix('eval/')} {first[key]:.3f} -> {last[key]:.3f} ({last[key] - first[key]:+.3f})"
        for key in first
        if key.startswith("eval/") and (key.count("/") == 1 or key.endswith("/overall")) and key in last
    ]
    return (
        f"held-out eval (iteration {first['iteration']} -> {last['iteration']}): "
        + ", ".join(parts)
        + f"\nheld-out grids: {grids[0]} (before), {grids[1]} (after)"
    )
