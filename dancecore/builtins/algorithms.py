"""The built-in ``grpo`` algorithm (DanceGRPO): group-relative advantages, optional best-of-N,
random step subsets and the clipped-ratio loss, trained through the core's services.

:func:`clipped_ratio_pass` is the training pass of every clipped-ratio objective (the
:class:`~dancecore.contracts.protocols.Optimizer` contract); :class:`ClippedRatioAlgorithm` runs a
plugin of the old ``dancecore.optimizers`` group, which only supplies that objective, through it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar, Literal, Protocol

import torch
from pydantic import BaseModel, Field

from dancecore.contracts.component import ComponentConfig
from dancecore.contracts.protocols import BuildContext, Optimizer, TrainingServices
from dancecore.contracts.records import LossOutput, RewardScores, Rollout
from dancecore.errors import TrainingError
from dancecore.functional.grpo import (
    best_and_worst,
    clipped_policy_loss,
    combined_advantages,
    global_std,
    sample_timestep_subset,
    trainable_steps,
)
from dancecore.functional.sde import gaussian_mean_kl


class ClippedRatioObjective(Protocol):
    """The four methods of a clipped-ratio objective (the :class:`Optimizer` contract, less its Config)."""

    def advantages(self, scores: RewardScores, group_ids: torch.Tensor) -> torch.Tensor: ...

    def select_samples(self, advantages: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor: ...

    def select_steps(self, candidates: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor: ...

    def loss(self, new_log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor) -> LossOutput: ...


NO_UPDATE = {"loss": math.nan, "clip_fraction": math.nan, "ratio_mean": math.nan, "grad_norm": math.nan}


def _mean(values: Sequence[Any]) -> float:
    return sum(float(v) for v in values) / len(values) if values else math.nan


def clipped_ratio_pass(
    objective: ClippedRatioObjective,
    rollout: Rollout,
    advantages: torch.Tensor,
    chosen: torch.Tensor,
    services: TrainingServices,
    kl_beta: float = 0.0,
) -> dict[str, float]:
    """Clipped policy-gradient updates on a random subset of each chosen sample's steps.

    Backward per micro-batch with the loss scaled by 1/(samples per update x steps per sample); one
    optimizer step per ``train.samples_per_update`` trajectories (all of them by default). With
    ``kl_beta > 0`` each trained step adds ``kl_beta * ||mu - mu_ref||^2 / (2 std^2)`` (averaged over
    the latent, like the log-probs) against the reference policy, logged as ``kl``.
    """
    traj = rollout.trajectory
    candidates = trainable_steps(rollout.stochastic)
    step_gens = [services.generator("steps", int(traj.sample_ids[s])) for s in chosen]
    steps = objective.select_steps(candidates, step_gens)  # (len(chosen), k)
    k = steps.shape[1]
    per_update = services.samples_per_update or len(chosen)
    losses: list[torch.Tensor] = []
    clipfracs: list[torch.Tensor] = []
    ratios: list[torch.Tensor] = []
    kls: list[torch.Tensor] = []
    norms: list[float] = []
    for start in range(0, len(chosen), per_update):
        members = torch.arange(start, min(start + per_update, len(chosen)))
        scale = 1.0 / (len(members) * k)
        finite = True
        for batch in services.replay(rollout, chosen[members].repeat_interleave(k), steps[members].reshape(-1)):
            s, t = batch.samples, batch.steps
            adv = advantages[s].to(services.device)
            result = objective.loss(batch.step.log_prob, traj.log_probs[s, t].to(services.device), adv)
            per_row = result.loss
            if kl_beta > 0:
                kl = _kl_to_reference(batch, services.reference_step(rollout, batch))
                per_row = per_row + kl_beta * kl
                kls.append(batch.real_rows(kl).detach().mean())
            loss = batch.real_rows(per_row).sum() * scale  # padding rows add nothing
            if services.any_rank(not bool(torch.isfinite(loss))):  # every rank skips together
                finite = False
                break
            services.backward(loss)
            losses.append(loss.detach() / (scale * batch.real))
            clipfracs.append(batch.real_rows(result.clip_fraction).mean())
            ratios.append(batch.real_rows(result.ratio).mean())
        if not finite:
            services.skip_update("non-finite loss")
            continue
        norms.append(services.optimizer_step())
    stats = {
        "loss": _mean(losses),
        "clip_fraction": _mean(clipfracs),
        "ratio_mean": _mean(ratios),
        "grad_norm": _mean(norms),
    }
    if kl_beta > 0:
        stats["kl"] = _mean(kls)
    return stats


def _kl_to_reference(batch: Any, reference: Any) -> torch.Tensor:
    """Per-row KL between the trained step and the reference step (same std, same inputs)."""
    step = batch.step
    if step.mean is None or step.std is None or reference.mean is None:
        raise TrainingError("KL regularisation needs a sampler whose steps report their Gaussian mean and std")
    return gaussian_mean_kl(step.mean, reference.mean, step.std)


def train_clipped_ratio(
    objective: ClippedRatioObjective, name: str, rollout: Rollout, services: TrainingServices, kl_beta: float = 0.0
) -> dict[str, float]:
    """Advantages over the kept samples, the samples to train, then :func:`clipped_ratio_pass`."""
    traj, keep = rollout.trajectory, rollout.keep
    group_ids = rollout.kept_group_ids
    advantages = torch.zeros(traj.num_samples)
    if keep.numel():
        advantages[keep] = objective.advantages(rollout.scores, group_ids)
    if services.any_rank(not bool(torch.isfinite(advantages).all())):
        raise TrainingError(f"algorithm {name!r} returned non-finite advantages")
    chosen = torch.zeros(0, dtype=torch.long)
    if services.world_size > 1:  # same backward/step calls on every rank: dropped groups stay, with A = 0
        chosen = objective.select_samples(advantages, traj.group_ids)
    elif keep.numel():
        chosen = keep[objective.select_samples(advantages[keep], group_ids)]
    stats = dict(NO_UPDATE)
    if chosen.numel():
        with services.timed("update"):
            stats = clipped_ratio_pass(objective, rollout, advantages, chosen, services, kl_beta)
    zero_groups = sum(int(bool((advantages[traj.group_ids == gid] == 0).all())) for gid in torch.unique(group_ids))
    return {**stats, "zero_advantage_groups": float(zero_groups)}


class GRPO:
    """DanceGRPO: group-relative advantages, optional best-of-N, random step subsets, clipped loss."""

    class Config(ComponentConfig):
        """Options of the ``grpo`` algorithm."""

        group_size: int = Field(12, ge=2, description="Samples per prompt (G).")
        shared_noise: bool = Field(
            True, description="The G samples of a prompt share one initial noise (DanceGRPO); false: each its own."
        )
        clip_range: float = Field(
            1e-4, gt=0, description="PPO ratio clip epsilon (below 1; above too unless clip_range_high)."
        )
        clip_range_high: float | None = Field(
            None, gt=0, description="Asymmetric clipping: the ratio's upper bound is 1 + this (default: clip_range)."
        )
        advantage_clip: float = Field(5.0, gt=0, description="Advantages are clamped to +/- this value.")
        advantage_std: Literal["group", "global"] = Field(
            "group",
            description="Divide by each group's reward std (DanceGRPO) or by the std of all of the iteration's rewards (Flow-GRPO).",
        )
        timestep_fraction: float = Field(0.6, gt=0, le=1, description="Fraction tau of trainable steps trained.")
        best_of: int | None = Field(
            None, ge=1, description="Best-of-N: train only the top-k and bottom-k of each group (pool)."
        )
        kl_beta: float = Field(
            0.0, ge=0, description="KL to the reference policy, beta ||mu - mu_ref||^2 / 2 std^2 per step (Flow-GRPO)."
        )
        reference_dtype: Literal["float32", "bfloat16"] = Field(
            "float32", description="dtype of the frozen reference copy (without LoRA)."
        )
        reference_device: Literal["same", "cpu"] = Field(
            "same", description="Keep the frozen reference copy on the training device or in CPU memory."
        )

    def __init__(self, config: Config, context: BuildContext | None = None) -> None:
        self.config = config
        self.group_size = config.group_size
        self.shared_noise = config.shared_noise
        self.needs_reference = config.kl_beta > 0
        self.reference_dtype = config.reference_dtype
        self.reference_device = config.reference_device
        self._stds: list[float] | None = None  # this iteration's global reward stds (advantage_std: global)

    def train(self, rollout: Rollout, services: TrainingServices) -> dict[str, float]:
        """Advantages, sample selection and the clipped-ratio training pass (plus KL when kl_beta > 0)."""
        self._stds = global_stds(rollout.scores.values, services) if self.config.advantage_std == "global" else None
        return train_clipped_ratio(self, "grpo", rollout, services, self.config.kl_beta)

    def advantages(self, scores: RewardScores, group_ids: torch.Tensor) -> torch.Tensor:
        """Per-reward group normalisation (by the group's std or the global one), weighted sum, clamp."""
        return combined_advantages(
            scores.values, scores.weights, group_ids, clip=self.config.advantage_clip, stds=self._stds
        )

    def select_samples(self, advantages: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
        """All samples, or the best and worst ``best_of`` of each pool."""
        if self.config.best_of is None:
            return torch.arange(advantages.shape[0])
        return best_and_worst(advantages, group_ids, self.config.best_of)

    def select_steps(self, candidates: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
        """For each generator (sample), a fraction tau of the candidate steps, as original indices."""
        return torch.stack([sample_timestep_subset(candidates, self.config.timestep_fraction, g) for g in generators])

    def loss(self, new_log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor) -> LossOutput:
        """The clipped-ratio loss, element-wise."""
        return clipped_policy_loss(
            new_log_prob, old_log_prob, advantages, self.config.clip_range, self.config.clip_range_high
        )


def global_stds(values: torch.Tensor, services: TrainingServices) -> list[float]:
    """Each reward's std over every kept sample of the iteration on every rank (Flow-GRPO's
    normalisation); ``values`` is (num_rewards, kept samples on this rank)."""
    v = values.double()
    moments = services.mean_over_ranks(
        [float(v.shape[1])] + [float(x) for row in v for x in (row.sum(), row.square().sum())]
    )
    sums = [m * services.world_size for m in moments]  # means over ranks -> sums over ranks
    return [global_std(sums[0], sums[1 + 2 * k], sums[2 + 2 * k]) for k in range(v.shape[0])]


class ClippedRatioAlgorithm:
    """Adapts an old-style ``dancecore.optimizers`` plugin (advantages/select_samples/select_steps/
    loss, no training pass) to the :class:`~dancecore.contracts.protocols.Algorithm` contract."""

    Config: ClassVar[type[BaseModel]] = ComponentConfig  # the plugin's own Config validated its options

    def __init__(self, objective: Optimizer, name: str) -> None:
        self.objective = objective
        self.name = name
        config: BaseModel | None = getattr(objective, "config", None)
        group_size = getattr(config, "group_size", None)
        if not isinstance(group_size, int):
            raise TrainingError(f"optimizer plugin {name!r} has no integer config.group_size")
        self.group_size = group_size

    def train(self, rollout: Rollout, services: TrainingServices) -> dict[str, float]:
        """The clipped-ratio training pass with the plugin's objective."""
        return train_clipped_ratio(self.objective, self.name, rollout, services)
