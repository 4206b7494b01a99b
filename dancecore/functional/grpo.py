"""Group Relative Policy Optimization as small pure functions.

Each function here is checked against a hand computation in ``tests/test_grpo.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dancecore.contracts.records import LossOutput


def group_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    clip: float = 5.0,
    eps: float = 1e-8,
    std: float | None = None,
) -> torch.Tensor:
    """Normalise rewards within each group: ``(r - mean) / (std + eps)`` with the group's unbiased
    std (DanceGRPO), or with the one ``std`` given for every group (Flow-GRPO's global std, see
    :func:`global_std`).

    A group whose rewards are all equal (or a group of one) gets advantage 0, and the result is
    clamped to ``[-clip, clip]``.
    """
    rewards = rewards.double()
    advantages = torch.zeros_like(rewards)
    for group in torch.unique(group_ids):
        members = group_ids == group
        r = rewards[members]
        if r.numel() < 2 or bool((r == r[0]).all()):
            continue
        scale = r.std(unbiased=True) if std is None else torch.tensor(std, dtype=torch.float64)
        advantages[members] = (r - r.mean()) / (scale + eps)
    return advantages.clamp(-clip, clip).float()


def global_std(count: float, total: float, total_square: float) -> float:
    """The unbiased std of all rewards from their count, sum and sum of squares; 0 for fewer than two."""
    if count < 2:
        return 0.0
    mean = total / count
    variance = max(0.0, total_square / count - mean * mean) * count / (count - 1)
    return float(variance**0.5)


def combined_advantages(
    values: torch.Tensor,
    weights: Sequence[float],
    group_ids: torch.Tensor,
    *,
    clip: float = 5.0,
    eps: float = 1e-8,
    stds: Sequence[float] | None = None,
) -> torch.Tensor:
    """Several rewards: normalise each one within its group separately, then sum with weights.

    ``values`` has shape (num_rewards, num_samples); ``stds``, when given, is one std per reward
    used for every group instead of each group's own. The sum is clamped to ``[-clip, clip]``.
    """
    if values.ndim != 2 or values.shape[0] != len(weights):
        raise ValueError(f"values must be (num_rewards={len(weights)}, B), got {tuple(values.shape)}")
    scales: Sequence[float | None] = [None] * len(weights) if stds is None else stds
    total = torch.zeros(values.shape[1], dtype=torch.float64)
    for row, weight, std in zip(values, weights, scales, strict=True):
        total += weight * group_advantages(row, group_ids, clip=float("inf"), eps=eps, std=std).double()
    return total.clamp(-clip, clip).float()


def best_and_worst(advantages: torch.Tensor, group_ids: torch.Tensor, k: int) -> torch.Tensor:
    """Best-of-N: within each group (pool), the indices of the ``k`` highest and ``k`` lowest
    advantages. The advantages must already be computed over the whole pool."""
    chosen: list[torch.Tensor] = []
    for group in torch.unique(group_ids):
        members = torch.nonzero(group_ids == group).flatten()
        if members.numel() <= 2 * k:
            chosen.append(members)
            continue
        order = torch.argsort(advantages[members], descending=True, stable=True)
        chosen.append(members[torch.cat([order[:k], order[-k:]])])
    return torch.sort(torch.cat(chosen)).values


def clipped_policy_loss(
    new_log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
    clip_range_high: float | None = None,
) -> LossOutput:
    """PPO clipped-ratio loss without a critic, per element: ``max(-A rho, -A clip(rho, 1-e, 1+e_high))``
    with ``e_high = clip_range_high`` (asymmetric clipping) or ``clip_range``."""
    high = clip_range if clip_range_high is None else clip_range_high
    ratio = torch.exp(new_log_prob.float() - old_log_prob.float())
    negative = -advantages.float()
    loss = torch.maximum(negative * ratio, negative * torch.clamp(ratio, 1.0 - clip_range, 1.0 + high))
    detached = ratio.detach()
    clip_fraction = ((detached < 1.0 - clip_range) | (detached > 1.0 + high)).float()
    return LossOutput(loss=loss, ratio=detached, clip_fraction=clip_fraction)


def trainable_steps(stochastic: torch.Tensor) -> torch.Tensor:
    """Original indices of the steps that may be trained: stochastic ones, never the last transition."""
    mask = stochastic.clone().bool()
    mask[-1] = False
    return torch.nonzero(mask).flatten()


def sample_timestep_subset(candidates: torch.Tensor, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """A random subset, in random order, of ``candidates`` (original step indices).

    It holds ``int(fraction * len(candidates))`` steps, at least one.
    """
    if candidates.numel() < 1:
        raise ValueError("no trainable step: a trajectory needs at least one stochastic step before the last")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"timestep fraction must be in (0, 1], got {fraction}")
    count = max(1, int(fraction * candidates.numel()))
    return candidates[torch.randperm(candidates.numel(), generator=generator)[:count]]
