"""The core services an algorithm trains through (the :class:`~dancecore.TrainingServices` contract):
micro-batched replay of trajectory transitions with the rollout's shapes, backward through the
engine, the optimizer step with the LR schedule and gradient clipping, skip-on-non-finite, seeded
generators and phase timing."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from dancecore.contracts.protocols import Policy, Sampler
from dancecore.contracts.records import Rollout, StepResult, Transitions
from dancecore.errors import TrainingError
from dancecore.functional.seeding import generator
from dancecore.training.ema import EmaWeights
from dancecore.training.engine import TrainEngine
from dancecore.training.lr_schedule import WarmupSchedule
from dancecore.training.reference import ReferencePolicy
from dancecore.training.sampling import NetworkCalls, RowCache, padded_chunks
from dancecore.training.state import TrainingState


class CoreServices:
    """One iteration's services, built by the trainer for the algorithm's training pass."""

    def __init__(
        self,
        *,
        policy: Policy,
        sampler: Sampler,
        engine: TrainEngine,
        calls: NetworkCalls,
        state: TrainingState,
        lr_schedule: WarmupSchedule,
        seed: int,
        draw: int,
        world_size: int,
        samples_per_update: int | None,
        max_nonfinite_updates: int,
        timed: Callable[[str], contextlib.AbstractContextManager[None]],
        reference: Callable[[], ReferencePolicy] | None = None,
        ema: EmaWeights | None = None,
    ) -> None:
        self.policy, self.sampler, self.engine, self.calls = policy, sampler, engine, calls
        self.state, self.lr_schedule = state, lr_schedule
        self.seed, self.draw = seed, draw
        self.world_size = world_size
        self.device = calls.device
        self.samples_per_update = samples_per_update
        self.micro_batch_size = calls.micro_batch_size
        self.max_nonfinite_updates = max_nonfinite_updates
        self._timed = timed
        self._reference = reference
        self._ema = ema
        self._conditioning: dict[int, RowCache] = {}

    def _rows(self, rollout: Rollout, samples: torch.Tensor) -> Any:
        cache = self._conditioning.setdefault(id(rollout.conditioning), RowCache(rollout.conditioning))
        return cache.rows(rollout.trajectory.prompt_rows[samples])

    def replay(self, rollout: Rollout, samples: torch.Tensor, steps: torch.Tensor) -> Iterator[Transitions]:
        """Recompute transitions (samples[j], steps[j]) with gradient, in padded micro-batches."""
        traj, schedule = rollout.trajectory, rollout.schedule
        for chunk, real in padded_chunks(torch.arange(samples.numel()), self.calls.micro_batch_size):
            s, t = samples[chunk], steps[chunk]
            x = traj.latents[s, t].to(self.device)
            x_next = traj.latents[s, t + 1].to(self.device)
            with self.calls.autocast():
                pred = self.policy.predict(x, schedule.timesteps[t], self._rows(rollout, s))
            out = self.sampler.step(schedule, t, x, pred, next_latents=x_next)
            yield Transitions(samples=s, steps=t, real=real, latents=x, next_latents=x_next, prediction=pred, step=out)

    def reference_step(self, rollout: Rollout, batch: Transitions) -> StepResult:
        """The reference policy's step for a replayed micro-batch (same inputs, no gradient)."""
        if self._reference is None:
            raise TrainingError("this run has no reference policy (the algorithm did not ask for one)")
        with self._reference().active(), self.calls.autocast():
            pred = self.policy.predict(
                batch.latents, rollout.schedule.timesteps[batch.steps], self._rows(rollout, batch.samples)
            )
        return self.sampler.step(rollout.schedule, batch.steps, batch.latents, pred, next_latents=batch.next_latents)

    def predict(
        self, latents: torch.Tensor, timesteps: torch.Tensor, rollout: Rollout, samples: torch.Tensor
    ) -> torch.Tensor:
        """The policy's prediction (with gradient) for any latents of the given samples' prompts."""
        with self.calls.autocast():
            return self.policy.predict(latents.to(self.device), timesteps, self._rows(rollout, samples))

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate gradients through the engine."""
        self.engine.backward(loss)

    def optimizer_step(self) -> float:
        """LR schedule, clip and step; a non-finite gradient norm counts as a skipped update."""
        self.lr_schedule.apply(getattr(self.engine, "optimizer", None))
        norm = self.engine.step()
        if math.isfinite(norm):
            self.state.nonfinite_in_a_row = 0
            self.lr_schedule.step()  # counts the applied updates
            if self._ema is not None and self._ema.due(self.lr_schedule.updates):
                self._ema.update(self.lr_schedule.updates)
        else:  # the engine did not step and dropped the gradients
            self._count_skip("non-finite gradient norm")
        return norm

    def skip_update(self, why: str) -> None:
        """Drop the accumulated gradients; abort after too many skipped updates in a row."""
        self.engine.zero_grad()
        self._count_skip(why)

    def _count_skip(self, why: str) -> None:
        self.state.counters["skipped_updates"] += 1
        self.state.nonfinite_in_a_row += 1
        if self.state.nonfinite_in_a_row >= self.max_nonfinite_updates:
            raise TrainingError(
                f"{self.state.nonfinite_in_a_row} updates in a row skipped ({why}); lower train.learning_rate or "
                "check the rewards"
            )

    def any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank."""
        return self.engine.any_rank(flag)

    def rollout_weights(self) -> contextlib.AbstractContextManager[None]:
        """Inside the block the policy holds the weights rollouts sample with (the EMA with
        ``train.ema.rollout``; otherwise the trained weights, unchanged)."""
        if self._ema is not None and self._ema.config.rollout:
            return self._ema.swapped_in(self.policy.module)
        return contextlib.nullcontext()

    def mean_over_ranks(self, values: Sequence[float]) -> list[float]:
        """The mean of each value over ranks."""
        return self.engine.all_reduce_mean([float(v) for v in values])

    def generator(self, purpose: str, *keys: int) -> torch.Generator:
        """A generator keyed by (seed, purpose, this iteration's draw, keys)."""
        return generator(self.seed, purpose, self.draw, *keys)

    def timed(self, phase: str) -> contextlib.AbstractContextManager[None]:
        """Time a block as ``time/<phase>_s``."""
        return self._timed(phase)
