"""Group Relative Policy Optimization as small pure functions.

Each function here is checked against a hand computation in ``tests/test_grpo.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dancecore.contracts.records import LossOutput


def group_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, *, clip: float = 5.0, eps: float = 1e-8
) -> torch.Tensor:
    """Normalise rewards within each group: ``(r - mean) / (std + eps)`` with the unbiased std.

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
        advantages[members] = (r - r.mean()) / (r.std(unbiased=True) + eps)
    return advantages.clamp(-clip, clip).float()


def combined_advantages(
    values: torch.Tensor,
    weights: Sequence[float],
    group_ids: torch.Tensor,
    *,
    clip: float = 5.0,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Several rewards: normalise each one within its group separately, then sum with weights.

    ``values`` has shape (num_rewards, num_samples). The sum is clamped to ``[-clip, clip]``.
    """
    if values.ndim != 2 or values.shape[0] != len(weights):
        raise ValueError(f"values must be (num_rewards={len(weights)}, B), got {tuple(values.shape)}")
    total = torch.zeros(values.shape[1], dtype=torch.float64)
    for row, weight in zip(values, weights, strict=True):
        total += weight * group_advantages(row, group_ids, clip=float("inf"), eps=eps).double()
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
    new_log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float
) -> LossOutput:
    """PPO clipped-ratio loss without a critic, per element: ``max(-A rho, -A clip(rho, 1-e, 1+e))``."""
    ratio = torch.exp(new_log_prob.float() - old_log_prob.float())
    negative = -advantages.float()
    loss = torch.maximum(negative * ratio, negative * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range))
    detached = ratio.detach()
    clip_fraction = ((detached - 1.0).abs() > clip_range).float()
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
