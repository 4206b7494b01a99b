"""Calling reward models safely: checked outputs, the run's failure policy, and counted failures.

A failing reward is never turned into a number. A reward *fails* when it raises, exceeds
``reward_failure.timeout_s``, or returns something other than ``batch`` real numbers (None, a wrong
shape, a non-numeric dtype) or non-finite values (NaN, +-inf). Depending on ``reward_failure.policy``:

- ``fail`` raises :class:`RewardFailure` (the trainer checkpoints and exits naming the plugin);
- ``skip_group`` drops every group holding a failed score from this update (counted);
- ``retry`` calls the reward again, up to ``retries`` more times (``retries + 1`` calls in all),
  each within ``timeout_s``; then fails as ``fail`` does.

Scores are checked in float32, the precision the advantages are computed from, so a value too
large for float32 is non-finite too.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dancecore.config.schema import ResolvedComponent, ResolvedRun, RewardFailureConfig, RewardSpec
from dancecore.contracts.protocols import BuildContext
from dancecore.contracts.records import RewardScores
from dancecore.errors import RewardFailure


@dataclass(frozen=True)
class NamedReward:
    """A built reward component with its metric name, weight and plugin (entry-point) name."""

    name: str
    weight: float
    component: object
    plugin: str | None = None


def _named_rewards(
    specs: Sequence[RewardSpec], resolved: Sequence[ResolvedComponent], context: BuildContext
) -> list[NamedReward]:
    return [
        NamedReward(spec.display_name, spec.weight, r.cls(r.config, context), plugin=spec.name)
        for spec, r in zip(specs, resolved, strict=True)
    ]


def build_rewards(run: ResolvedRun, context: BuildContext) -> list[NamedReward]:
    """Build every reward of a run, each named for metrics and tagged with its plugin."""
    return _named_rewards(run.config.rewards, run.rewards, context)


def build_eval_rewards(run: ResolvedRun, context: BuildContext) -> list[NamedReward]:
    """The rewards of the run's evaluation: ``eval.rewards`` when given, else the training rewards."""
    if run.config.eval and run.config.eval.rewards:
        return _named_rewards(run.config.eval.rewards, run.eval_rewards, context)
    return build_rewards(run, context)


@dataclass(frozen=True)
class ScoringResult:
    """Scores for the kept samples, which samples were kept, and failure counts.

    ``failures`` counts failed reward calls (retried ones included); ``dropped_groups`` the groups
    removed under ``skip_group``.
    """

    scores: RewardScores
    keep: torch.Tensor
    dropped_groups: int
    failures: int


_NUMERIC = (
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
)


def check_scores(name: str, raw: object, batch: int, plugin: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a reward's output: a tensor (or sequence) of ``batch`` real numbers.

    Returns the scores as float32 and a mask of the finite entries; raises :class:`RewardFailure`
    on None, a wrong type, shape or dtype.
    """
    if raw is None:
        raise RewardFailure(name, "returned None", plugin)
    if not isinstance(raw, torch.Tensor):
        try:
            raw = torch.as_tensor(raw)
        except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
            raise RewardFailure(
                name, f"returned {type(raw).__name__}, not a tensor of scores ({exc})", plugin
            ) from None
    if raw.dtype not in _NUMERIC:
        raise RewardFailure(name, f"returned dtype {raw.dtype}, expected real numbers (float or int)", plugin)
    if tuple(raw.shape) != (batch,):
        raise RewardFailure(name, f"returned shape {tuple(raw.shape)}, expected ({batch},)", plugin)
    values = raw.detach().to("cpu", torch.float64).to(torch.float32)
    return values, torch.isfinite(values)


def call_with_timeout(fn: Any, args: tuple[Any, ...], timeout_s: float | None, what: str) -> Any:
    """Call ``fn(*args)``; with a timeout, in a daemon thread abandoned when it overruns (a hung
    reward must neither block training nor keep the process alive at exit)."""
    if timeout_s is None:
        return fn(*args)
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn(*args)
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    worker = threading.Thread(target=target, name=f"reward-{what}", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise TimeoutError(f"timed out after {timeout_s:g} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def _score_one(
    reward: NamedReward, samples: torch.Tensor, prompts: Sequence[str], policy: RewardFailureConfig
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Scores, finite mask and number of failed calls for one reward under the policy."""
    attempts = 1 + (policy.retries if policy.policy == "retry" else 0)
    batch = samples.shape[0]
    failures = 0
    last: RewardFailure | None = None
    for _ in range(attempts):
        try:
            raw = call_with_timeout(reward.component.score, (samples, prompts), policy.timeout_s, reward.name)  # type: ignore[attr-defined]
            values, finite = check_scores(reward.name, raw, batch, reward.plugin)
            if policy.policy == "skip_group" or bool(finite.all()):
                failures += int(not bool(finite.all()))
                return values, finite, failures
            bad = int((~finite).sum())
            origin = getattr(reward.component, "source", None)  # e.g. a remote reward's URL
            where = f" (from {origin})" if isinstance(origin, str) else ""
            raise RewardFailure(reward.name, f"returned {bad} non-finite score(s) of {batch}{where}", reward.plugin)
        except RewardFailure as exc:
            last = exc
        except TimeoutError as exc:
            last = RewardFailure(reward.name, str(exc), reward.plugin)
        except Exception as exc:  # third-party code: any exception is a reward failure
            last = RewardFailure(reward.name, f"raised {type(exc).__name__}: {exc}", reward.plugin)
        failures += 1
        if policy.policy == "skip_group":
            return torch.full((batch,), math.nan), torch.zeros(batch, dtype=torch.bool), failures
    assert last is not None
    if attempts > 1:
        last = RewardFailure(last.reward, f"{last.reason} (after {attempts} calls)", last.plugin)
    raise last


def score_samples(
    rewards: Sequence[NamedReward],
    samples: torch.Tensor,
    prompts: Sequence[str],
    group_ids: torch.Tensor,
    policy: RewardFailureConfig,
) -> ScoringResult:
    """Score every sample with every reward under the failure policy.

    With ``skip_group`` a group is dropped when any reward failed on any of its members; the
    returned scores cover only the kept samples (``keep`` indexes them), so NaN never reaches an
    advantage.
    """
    return merge_scores(rewards, score_part(rewards, samples, prompts, policy), group_ids)


def score_part(
    rewards: Sequence[NamedReward], samples: torch.Tensor, prompts: Sequence[str], policy: RewardFailureConfig
) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """Scores, finite masks and failed calls of every reward on one part of the samples (a
    micro-batch); :func:`merge_parts` joins the parts. Raises :class:`RewardFailure` as
    :func:`score_samples` does."""
    return [_score_one(reward, samples, prompts, policy) for reward in rewards]


def merge_parts(
    rewards: Sequence[NamedReward],
    parts: Sequence[list[tuple[torch.Tensor, torch.Tensor, int]]],
    group_ids: torch.Tensor,
) -> ScoringResult:
    """The result of scoring the concatenation of the parts (in order) at once."""
    joined = [
        (
            torch.cat([part[k][0] for part in parts]),
            torch.cat([part[k][1] for part in parts]),
            sum(part[k][2] for part in parts),
        )
        for k in range(len(rewards))
    ]
    return merge_scores(rewards, joined, group_ids)


def merge_scores(
    rewards: Sequence[NamedReward],
    per_reward: Sequence[tuple[torch.Tensor, torch.Tensor, int]],
    group_ids: torch.Tensor,
) -> ScoringResult:
    """Drop the groups holding a non-finite score of any reward; count failures and dropped groups."""
    finite_all = torch.ones(group_ids.shape[0], dtype=torch.bool)
    failures = 0
    for _, finite, failed in per_reward:
        finite_all &= finite
        failures += failed
    bad_groups = torch.unique(group_ids[~finite_all])
    keep = torch.nonzero(~torch.isin(group_ids, bad_groups)).flatten()
    values = torch.stack([values for values, _, _ in per_reward])[:, keep]
    assert bool(torch.isfinite(values).all())
    scores = RewardScores(names=tuple(r.name for r in rewards), weights=tuple(r.weight for r in rewards), values=values)
    return ScoringResult(scores=scores, keep=keep, dropped_groups=int(bad_groups.numel()), failures=failures)
