"""One training iteration, top to bottom. The numbered phases match docs/architecture.md.

    1. prompts    this rank's share of the prompts at the data cursor
    2. encode     the policy encodes them once
    3. rollout    G samples per prompt from one shared initial noise, every transition's log-prob
    4. decode     the last step's clean estimate to pixels
    5. reward     every reward scores every sample, under the reward-failure policy
    6. train      the algorithm's own training pass (GRPO: advantages, clipped-ratio updates)
    7. record     metrics averaged over ranks; the data cursor and noise position move on

Shapes: B = prompts on this rank x G samples, N = sampler steps; ``trajectory.latents`` is
(B, N+1, *latent), ``trajectory.log_probs`` (B, N), ``pixels`` (B, 3, H, W) or (B, F, 3, H, W).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from dancecore.contracts.records import Prompt, PromptBatch, Rollout
from dancecore.errors import RewardFailure
from dancecore.training import sampling
from dancecore.training.overlap import OverlappedScoring
from dancecore.training.scoring import ScoringResult, score_samples
from dancecore.training.services import CoreServices

if TYPE_CHECKING:
    from dancecore.training.trainer import Trainer

#: Metrics that count something over the whole world (summed over ranks, not averaged).
SUMMED_OVER_RANKS = ("zero_advantage_groups", "dropped_groups")


def run_iteration(trainer: Trainer, iteration: int) -> dict[str, Any]:
    """Run one iteration on this rank; returns its metrics record (reduced over ranks)."""
    began = time.perf_counter()
    trainer.phase_times = {}
    state, cfg = trainer.state, trainer.cfg
    draw = state.noise_position  # keys every random draw of this iteration (== iteration unless resumed oddly)

    # 1. prompts
    prompts = trainer.local_prompts(iteration)

    # 2. encode
    with trainer.timed("encode"):
        cond = trainer.policy.encode_prompts(PromptBatch(tuple(prompts)))

    # 3. rollout (with train.overlap_reward, each micro-batch is decoded and scored as soon as it is done)
    schedule = sampling.rollout_schedule(trainer.sampler, draw)
    stochastic = sampling.stochastic_mask(trainer.sampler, schedule.num_steps, draw)
    scores_here = trainer.scores_samples  # with sequence parallelism: the first rank of each group
    overlap = overlapped_scoring(trainer, prompts) if cfg.train.overlap_reward and scores_here else None
    try:
        with trainer.timed("rollout"):
            traj = trainer.rollout(draw, cond, schedule, stochastic, overlap.on_micro_batch if overlap else None)
    except BaseException:
        if overlap is not None:
            overlap.close()
        raise

    # 4. decode (the other ranks of a sequence-parallel group hold the same samples: they skip 4 and 5)
    with trainer.timed("decode"):
        if overlap is not None:
            pixels = overlap.decoded()
        elif scores_here:
            pixels = sampling.decode(trainer.policy, traj.final, cfg.train.micro_batch_size)
        else:
            pixels = torch.zeros(0)

    # 5. reward (once per sample; a sequence-parallel group shares its first rank's scores)
    texts = [prompts[int(r)].text for r in traj.prompt_rows]
    if overlap is not None:
        scored = score_on_every_rank(trainer, lambda: overlap.result(traj.group_ids))
    else:
        scored = score_on_every_rank(
            trainer,
            (lambda: score_samples(trainer.rewards, pixels, texts, traj.group_ids, cfg.reward_failure))
            if scores_here
            else None,
        )

    # 6. train
    rollout = Rollout(traj, scored.scores, scored.keep, cond, schedule, stochastic, draw)
    services = CoreServices(
        policy=trainer.policy,
        sampler=trainer.sampler,
        engine=trainer.engine,
        calls=trainer.calls,
        state=state,
        lr_schedule=trainer.lr_schedule,
        seed=cfg.seed,
        draw=draw,
        world_size=trainer.world_size,
        samples_per_update=cfg.train.samples_per_update,
        max_nonfinite_updates=cfg.train.max_nonfinite_updates,
        timed=trainer.timed,
        reference=trainer.reference_policy,
        ema=trainer.ema,
    )
    stats = trainer.algorithm.train(rollout, services)

    # 7. record
    record = metrics_record(trainer, iteration, scored, stats, began)
    state.data_cursor += cfg.train.prompts_per_iteration
    state.noise_position += 1
    trainer._last_pixels = pixels
    return record


def overlapped_scoring(trainer: Trainer, prompts: list[Prompt]) -> OverlappedScoring:
    """Scoring of each micro-batch as soon as it is rolled out (sample row r has prompt r // G)."""
    g = trainer.group_size

    def texts(rows: slice) -> list[str]:
        return [prompts[r // g].text for r in range(rows.start, rows.stop)]

    return OverlappedScoring(trainer.policy, trainer.rewards, texts, trainer.cfg.reward_failure)


def score_on_every_rank(trainer: Trainer, score: Callable[[], ScoringResult] | None) -> ScoringResult:
    """Score under the reward-failure policy; a failure on any rank stops every rank together.
    ``score`` is None on the ranks of a sequence-parallel group that receive their first rank's result."""
    failure: RewardFailure | None = None
    scored: ScoringResult | None = None
    try:
        with trainer.timed("reward"):
            scored = score() if score is not None else None
    except RewardFailure as exc:
        failure = exc
        trainer.state.counters["reward_failures"] += 1
    if trainer.engine.any_rank(failure is not None):  # every rank stops (and checkpoints) together
        raise failure or RewardFailure("?", "a reward failed on another rank")
    scored = trainer.shared_with_group(scored)
    assert scored is not None
    trainer.state.counters["reward_failures"] += scored.failures
    trainer.state.counters["dropped_groups"] += scored.dropped_groups
    return scored


def metrics_record(
    trainer: Trainer, iteration: int, scored: ScoringResult, stats: dict[str, float], began: float
) -> dict[str, Any]:
    """The iteration's metrics.jsonl record: rewards, the algorithm's statistics, counters, phase times."""
    scores = scored.scores
    weights = torch.tensor(scores.weights).unsqueeze(1)
    combined = (scores.values * weights).sum(0) if scored.keep.numel() else torch.zeros(0)
    local = {
        "reward_mean": float(combined.mean()) if combined.numel() else math.nan,
        "reward_std": float(combined.std()) if combined.numel() > 1 else 0.0,
        **{
            f"reward/{n}": float(v.mean()) if v.numel() else math.nan
            for n, v in zip(scores.names, scores.values, strict=True)
        },
        **stats,
        "dropped_groups": float(scored.dropped_groups),
    }
    keys = sorted(local)
    reduced = dict(zip(keys, trainer.engine.all_reduce_mean([local[k] for k in keys]), strict=True))
    for key in SUMMED_OVER_RANKS:
        if key in reduced:
            reduced[key] *= trainer.data_world_size  # each sequence-parallel group counted once
    record: dict[str, Any] = {"iteration": iteration, **reduced, "seconds": time.perf_counter() - began}
    record.update({f"time/{phase}_s": seconds for phase, seconds in trainer.phase_times.items()})  # this rank's
    record["skipped_updates"] = trainer.state.counters["skipped_updates"]
    record["reward_failures"] = trainer.state.counters["reward_failures"]
    return record
