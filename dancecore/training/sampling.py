"""Sampling shared by training and evaluation: the grouped rollout, decoding, and the padded
micro-batches that keep every network call the same shape in rollout and training.

Shapes: ``latents`` (B, N+1, *latent), ``log_probs`` (B, N), ``final`` (B, *latent); B = prompts x G.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from dancecore.contracts.protocols import Policy, Sampler, WindowedSampler
from dancecore.contracts.records import Schedule, StepResult, Trajectory, select_rows
from dancecore.functional.seeding import generator


def padded_chunks(indices: torch.Tensor, size: int) -> Iterator[tuple[torch.Tensor, int]]:
    """Chunks of exactly ``size`` rows (the last padded by repeating its final row) and the number
    of real rows in each. Every network call then has the same batch shape in rollout and
    training, which keeps recomputed log-probabilities bit-identical."""
    for start in range(0, indices.numel(), size):
        chunk = indices[start : start + size]
        real = chunk.numel()
        if real < size:
            chunk = torch.cat([chunk, chunk[-1:].expand(size - real)])
        yield chunk, real


def real_rows(t: torch.Tensor, real: int) -> torch.Tensor:
    """The first ``real`` rows of a padded micro-batch's result (the tensor itself when unpadded)."""
    return t if t.shape[0] == real else t[:real]


class RowCache:
    """``select_rows`` of one conditioning, remembered per row pattern: the micro-batches of one
    prompt's group all need the same rows."""

    def __init__(self, cond: Any) -> None:
        self.cond = cond
        self.selected: dict[tuple[int, ...], Any] = {}

    def rows(self, rows: torch.Tensor) -> Any:
        """The conditioning restricted to ``rows`` (cached)."""
        key = tuple(rows.tolist())
        if key not in self.selected:
            self.selected[key] = select_rows(self.cond, rows)
        return self.selected[key]


def stochastic_mask(sampler: Sampler, num_steps: int, iteration: int) -> torch.Tensor:
    """Which steps the sampler takes stochastically this iteration (all, unless it has a window)."""
    if isinstance(sampler, WindowedSampler):
        return sampler.stochastic_steps(num_steps, iteration)
    return torch.ones(num_steps, dtype=torch.bool)


def rollout_schedule(sampler: Sampler, iteration: int) -> Schedule:
    """The schedule of this iteration's rollouts: the sampler's ``rollout_schedule`` if it has one
    (e.g. MixGRPO-Flash's compressed ODE tail), else its configured schedule."""
    build = getattr(sampler, "rollout_schedule", None)
    return build(iteration) if build is not None else sampler.schedule()


def decoded_latents(sampler: Sampler, last: StepResult) -> torch.Tensor:
    """The latents of the last step that are decoded: ``x0_hat``, or the step's sample when the
    sampler declares ``decodes = "sample"`` (DDIM)."""
    return last.next_latents if getattr(sampler, "decodes", "x0_hat") == "sample" else last.x0_hat


@dataclass(frozen=True)
class NetworkCalls:
    """How network calls are made: device, micro-batch size and the autocast context."""

    device: torch.device
    micro_batch_size: int
    autocast: Callable[[], contextlib.AbstractContextManager[Any]]


@torch.no_grad()
def grouped_rollout(
    policy: Policy,
    sampler: Sampler,
    calls: NetworkCalls,
    *,
    seed: int,
    draw: int,
    prompt_ids: list[int],
    group_size: int,
    cond: Any,
    schedule: Schedule,
    stochastic: torch.Tensor,
    shared_noise: bool = True,
    on_micro_batch: Callable[[slice, torch.Tensor], None] | None = None,
) -> Trajectory:
    """Sample a group of ``group_size`` trajectories per prompt; each group shares its initial noise
    (``shared_noise``, DanceGRPO) or each sample draws its own.

    ``prompt_ids`` are the global positions (within the iteration) of this rank's prompts; they and
    ``draw`` key the initial noise and every sample's SDE noise, so ranks and resumes agree.
    ``on_micro_batch(rows, final)``, when given, is called as soon as each micro-batch is done
    with its rows and their final clean latents (CPU), e.g. to decode and score them while the
    next micro-batches roll out.
    """
    g = group_size
    sample_ids = torch.tensor([pid * g + j for pid in prompt_ids for j in range(g)])
    if shared_noise:
        shared = [policy.initial_noise(1, generator(seed, "init", draw, pid)) for pid in prompt_ids]
        initial = torch.cat([x.expand(g, *x.shape[1:]) for x in shared])
    else:
        initial = torch.cat([policy.initial_noise(1, generator(seed, "init-sample", draw, int(s))) for s in sample_ids])
    n = initial.shape[0]
    prompt_rows = torch.arange(len(prompt_ids)).repeat_interleave(g)
    steps = schedule.num_steps
    latents = torch.empty((n, steps + 1, *initial.shape[1:]), dtype=initial.dtype)
    latents[:, 0] = initial
    log_probs = torch.zeros((n, steps))
    final = torch.empty_like(initial)
    noise_gens = [generator(seed, "sde", draw, int(s)) for s in sample_ids]
    conditioning = RowCache(cond)
    micro = calls.micro_batch_size
    step_times = [t.expand(micro) for t in schedule.timesteps.unbind()]
    stochastic_steps = [bool(flag) for flag in stochastic.tolist()]
    multistep = bool(getattr(sampler, "uses_previous_step", False))
    for chunk, real in padded_chunks(torch.arange(n), micro):
        rows = slice(int(chunk[0]), int(chunk[0]) + real)  # chunks are consecutive rows
        rows_cond = conditioning.rows(prompt_rows[chunk])
        # Each sample's noise for all its steps in one draw from its own generator (the same
        # numbers as one draw per step whenever a latent's size is a multiple of 16).
        noise = torch.stack([torch.randn((steps, *initial.shape[1:]), generator=noise_gens[i]) for i in chunk[:real]])
        noise = noise[torch.arange(len(chunk)).clamp(max=real - 1)].to(calls.device)  # padding rows repeat the last
        step_noise = noise.unbind(1)
        saved_latents = latents[rows].unbind(1)  # views: copying into them fills the trajectory
        saved_log_probs = log_probs[rows].unbind(1)
        x = latents[chunk, 0].to(calls.device)
        out: StepResult | None = None
        for i in range(steps):
            with calls.autocast():
                pred = policy.predict(x, step_times[i], rows_cond)
            deterministic = not stochastic_steps[i]
            if multistep:
                out = sampler.step(schedule, i, x, pred, noise=step_noise[i], deterministic=deterministic, previous=out)  # type: ignore[call-arg]
            else:
                out = sampler.step(schedule, i, x, pred, noise=step_noise[i], deterministic=deterministic)
            x = out.next_latents
            saved_latents[i + 1].copy_(real_rows(x, real))
            saved_log_probs[i].copy_(real_rows(out.log_prob, real))
        assert out is not None  # a schedule has at least one step
        final[rows] = real_rows(decoded_latents(sampler, out), real).cpu()
        if on_micro_batch is not None:
            on_micro_batch(rows, final[rows])
    return Trajectory(
        latents=latents,
        log_probs=log_probs,
        timesteps=schedule.timesteps,
        final=final,
        prompt_rows=prompt_rows,
        group_ids=torch.tensor(prompt_ids).repeat_interleave(g),
        sample_ids=sample_ids,
    )


@torch.no_grad()
def decode(policy: Policy, final: torch.Tensor, micro_batch_size: int) -> torch.Tensor:
    """Decode clean latents to pixels on the CPU, micro-batch by micro-batch."""
    size = micro_batch_size
    return torch.cat([policy.decode(final[i : i + size]).cpu() for i in range(0, final.shape[0], size)])
