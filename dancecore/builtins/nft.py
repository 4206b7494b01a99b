"""DiffusionNFT (Zheng et al., 2025): reinforcement on the forward process, by flow matching.

No log-probabilities: each sample's clean latent ``x0`` (the rollout's final ``x0_hat``, from any
sampler) is noised again, ``x_t = (1 - t) x0 + t eps``, and the velocity ``v_theta(x_t, t)`` is
regressed onto the flow-matching target ``eps - x0`` through two implicit policies built from the
sampling ("old") policy's velocity ``v_old``:

    v+ = (1 - beta) v_old + beta v_theta,     v- = (1 + beta) v_old - beta v_theta,
    loss = r ||v+ - (eps - x0)||^2 + (1 - r) ||v- - (eps - x0)||^2,

with ``r = 0.5 + 0.5 clip(A / advantage_scale, -1, 1)`` in [0, 1] from the group-relative advantage
A: good samples pull the velocity towards their flow, bad ones push it away, and the quadratic
terms keep ``v_theta`` within about ``1 / beta`` of ``v_old``. ``v_old`` is the policy as it
sampled (computed once, without gradient, before this iteration's first update): the trained
weights, or with ``train.ema: {rollout: true, ramp: ...}`` DiffusionNFT's soft-updated old policy,
``old = d old + (1 - d) theta`` after every update with ``d = min(ramp u, cap)``.

For rectified-flow policies whose prediction is the velocity ``noise - x0`` and whose timestep is
the sigma itself (FLUX, HunyuanVideo, SkyReels, SD3, Wan, Qwen-Image here); the sampler is free
(the rollout's log-probabilities are not used).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from dancecore.contracts.component import ComponentConfig
from dancecore.contracts.protocols import BuildContext, TrainingServices
from dancecore.contracts.records import Rollout
from dancecore.functional.grpo import combined_advantages


def optimality(advantages: torch.Tensor, scale: float) -> torch.Tensor:
    """``r = 0.5 + 0.5 clip(A / scale, -1, 1)``: the probability that a sample is a positive one."""
    return 0.5 + 0.5 * (advantages / scale).clamp(-1.0, 1.0)


def nft_loss(
    v_theta: torch.Tensor,
    v_old: torch.Tensor,
    target: torch.Tensor,
    r: torch.Tensor,
    beta: float,
    t: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample DiffusionNFT loss (mean over the latent's elements). Shapes: ``v_*``/``target``
    ``(B, *latent)``, ``r`` and ``t`` ``(B,)``.

    Without ``t``: the velocity-space loss ``r ||v+ - target||^2 + (1 - r) ||v- - target||^2``.
    With ``t``: DiffusionNFT's adaptive weighting, in x0 space: each branch's clean estimate
    ``x0_hat = x_t - t v`` is compared with ``x0`` (``x0_hat - x0 = -t (v - target)``) and its squared
    error divided by the sample's mean absolute error (no gradient through the divisor, at least
    1e-5), so every sample and noise level weighs about the same.
    """
    positive = (1 - beta) * v_old + beta * v_theta
    negative = (1 + beta) * v_old - beta * v_theta
    dims = tuple(range(1, v_theta.dim()))
    if t is None:
        pos = (positive - target).square().mean(dim=dims)
        neg = (negative - target).square().mean(dim=dims)
        return r * pos + (1 - r) * neg
    scale = t.view((-1,) + (1,) * (v_theta.dim() - 1))
    branches = []
    for branch in (positive, negative):
        error = scale * (branch - target)  # = x0 - x0_hat
        weight = error.detach().abs().mean(dim=dims).clamp(min=1e-5)
        branches.append(error.square().mean(dim=dims) / weight)
    return r * branches[0] + (1 - r) * branches[1]


def _slices(start: int, stop: int, size: int) -> list[slice]:
    """``[start, stop)`` in consecutive slices of at most ``size`` rows."""
    return [slice(i, min(i + size, stop)) for i in range(start, stop, size)]


class DiffusionNFT:
    """DiffusionNFT's negative-aware flow-matching objective on the rollout's clean samples."""

    uses_log_probs = False  # any sampler, deterministic ones (flow-ode) included

    class Config(ComponentConfig):
        """Options of the ``diffusion-nft`` algorithm."""

        group_size: int = Field(12, ge=2, description="Samples per prompt (G).")
        shared_noise: bool = Field(
            False, description="The G samples of a prompt share one initial noise (false: each its own)."
        )
        beta: float = Field(1.0, gt=0, description="Strength of the implicit policies v+ / v- (DiffusionNFT's beta).")
        advantage_scale: float = Field(
            1.0, gt=0, description="r = 0.5 + 0.5 clip(A / advantage_scale, -1, 1) from the group-normalised advantage."
        )
        timesteps_per_sample: int = Field(4, ge=1, description="Noise levels t drawn per sample per iteration.")
        t_min: float = Field(0.0, ge=0, lt=1, description="t is drawn uniformly from [t_min, t_max].")
        t_max: float = Field(1.0, gt=0, le=1)
        loss_weighting: Literal["none", "adaptive"] = Field(
            "none",
            description="'adaptive': DiffusionNFT's x0-space loss divided by each sample's mean absolute x0 error.",
        )

    def __init__(self, config: Config, context: BuildContext | None = None) -> None:
        self.config = config
        self.group_size = config.group_size
        self.shared_noise = config.shared_noise

    def train(self, rollout: Rollout, services: TrainingServices) -> dict[str, float]:
        """One pass over (kept sample, t) pairs; an optimizer update every ``samples_per_update`` samples."""
        cfg = self.config
        keep = rollout.keep
        adv = combined_advantages(rollout.scores.values, rollout.scores.weights, rollout.kept_group_ids)
        r_all = torch.zeros(rollout.trajectory.num_samples)
        r_all[keep] = optimality(adv, cfg.advantage_scale)
        k = cfg.timesteps_per_sample
        samples = keep.repeat_interleave(k)
        gen = services.generator("nft")
        t = cfg.t_min + (cfg.t_max - cfg.t_min) * torch.rand(samples.numel(), generator=gen)
        x0 = rollout.trajectory.final[samples]
        eps = torch.randn(x0.shape, generator=gen, dtype=x0.dtype)
        shape = (-1,) + (1,) * (x0.dim() - 1)
        x_t = (1 - t.view(shape)) * x0 + t.view(shape) * eps
        target = eps - x0
        micro = services.micro_batch_size

        def velocity(rows: slice) -> torch.Tensor:
            return services.predict(x_t[rows], t[rows].to(services.device), rollout, samples[rows]).float()

        with torch.no_grad(), services.rollout_weights():  # the sampling policy's velocities, before any update
            v_old = torch.cat([velocity(c).cpu() for c in _slices(0, samples.numel(), micro)])
        per_update = (services.samples_per_update or keep.numel()) * k
        losses, norms, updates = [], [], 0
        for start in range(0, samples.numel(), per_update):
            stop = min(start + per_update, samples.numel())
            for c in _slices(start, stop, micro):
                v = velocity(c)
                dev = v.device
                t_c = t[c].to(dev) if cfg.loss_weighting == "adaptive" else None
                loss = nft_loss(v, v_old[c].to(dev), target[c].to(dev), r_all[samples[c]].to(dev), cfg.beta, t_c)
                services.backward(loss.sum() / (stop - start))
                losses.append(float(loss.detach().sum()))
            norms.append(services.optimizer_step())
            updates += 1
        return {
            "loss": sum(losses) / samples.numel(),
            "grad_norm": max(norms),
            "updates": float(updates),
            "r_mean": float(r_all[keep].mean()),
            "clip_fraction": 0.0,
        }
