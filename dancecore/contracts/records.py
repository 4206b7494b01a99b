"""Typed, frozen records that flow between the policy, the sampler, the rewards and the optimizer.

Tensors inside these records are never mutated in place by the core; a record is built once and
passed on. Conditioning objects are owned by each policy; the core only needs to slice them by
row, which :func:`select_rows` does for any dataclass whose tensor fields lead with the batch dim.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, TypeVar

import torch


@dataclass(frozen=True)
class Prompt:
    """One entry of a prompt dataset: its text, its position in the dataset, an optional image."""

    text: str
    index: int
    image: str | None = None


@dataclass(frozen=True)
class PromptBatch:
    """The prompts one rank works on in one iteration (each is expanded to a group of samples)."""

    prompts: tuple[Prompt, ...]

    @property
    def texts(self) -> list[str]:
        """The prompt strings, in order."""
        return [p.text for p in self.prompts]

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass(frozen=True)
class Schedule:
    """A discretised sampling schedule of ``num_steps`` transitions.

    ``timesteps[i]`` is what the network is told at step ``i``; ``sigmas`` has ``num_steps + 1``
    entries and is interpreted by the sampler that built it (noise levels for rectified flow,
    cumulative alphas for DDIM). ``orders``, when set, is the ODE solver order of each step
    (1: the sampler's own first-order step; 2: a second-order multistep update such as
    DPM-Solver++(2M), which needs the previous step's result); None means order 1 everywhere.
    """

    timesteps: torch.Tensor
    sigmas: torch.Tensor
    orders: torch.Tensor | None = None

    @property
    def num_steps(self) -> int:
        """Number of transitions (network evaluations) in the schedule."""
        return int(self.timesteps.shape[0])


@dataclass(frozen=True)
class StepResult:
    """One stochastic transition: the next latent, its log-probability and the clean estimate.

    Samplers whose step is Gaussian may also report its ``mean`` (shaped like the latent) and
    ``std`` (a scalar or one value per row, broadcastable to the latent); KL regularisation uses them.
    """

    next_latents: torch.Tensor
    log_prob: torch.Tensor
    x0_hat: torch.Tensor
    mean: torch.Tensor | None = None
    std: torch.Tensor | None = None


@dataclass(frozen=True)
class Trajectory:
    """A batch of rollouts.

    ``latents[:, i]`` is the state before step ``i`` and ``latents[:, i + 1]`` the state after it;
    ``log_probs[:, i]`` is the rollout policy's log-probability of that transition.
    ``prompt_rows[b]`` is the row of the prompt conditioning that sample ``b`` used and
    ``sample_ids[b]`` its global index within the iteration (which seeds its noise).
    """

    latents: torch.Tensor
    log_probs: torch.Tensor
    timesteps: torch.Tensor
    final: torch.Tensor
    prompt_rows: torch.Tensor
    group_ids: torch.Tensor
    sample_ids: torch.Tensor

    @property
    def num_samples(self) -> int:
        """Number of sampled trajectories."""
        return int(self.latents.shape[0])

    @property
    def num_steps(self) -> int:
        """Number of transitions per trajectory."""
        return int(self.log_probs.shape[1])


@dataclass(frozen=True)
class RewardScores:
    """Scores of every reward for every sample: ``values[k, b]`` is reward ``names[k]`` on sample b."""

    names: tuple[str, ...]
    weights: tuple[float, ...]
    values: torch.Tensor

    def mean_of(self, name: str) -> float:
        """Mean of one reward's scores over the batch."""
        return float(self.values[self.names.index(name)].mean())


@dataclass(frozen=True)
class LossOutput:
    """The clipped policy-gradient loss and the statistics logged with it."""

    loss: torch.Tensor
    ratio: torch.Tensor
    clip_fraction: torch.Tensor


@dataclass(frozen=True)
class Rollout:
    """One iteration's samples as an algorithm receives them (see :class:`~dancecore.Algorithm`).

    ``trajectory`` holds every sample of this rank; ``scores`` the reward values of the samples in
    ``keep`` only (indices into the trajectory; a reward failure under ``skip_group`` drops groups).
    ``conditioning`` is the policy's encoded prompts (row ``trajectory.prompt_rows[b]`` for sample b),
    ``schedule`` the sampler's schedule, ``stochastic[i]`` whether step i was sampled stochastically
    (steps taken by the ODE carry log-probability 0 and are never trained), and ``draw`` the
    iteration's noise position, which keys every random draw of the iteration.
    """

    trajectory: Trajectory
    scores: RewardScores
    keep: torch.Tensor
    conditioning: Any
    schedule: Schedule
    stochastic: torch.Tensor
    draw: int

    @property
    def kept_group_ids(self) -> torch.Tensor:
        """Group id of each kept sample, aligned with ``scores.values[k]``."""
        return self.trajectory.group_ids[self.keep]


@dataclass(frozen=True)
class Transitions:
    """A micro-batch of trajectory transitions recomputed with the current weights.

    ``samples[j]``/``steps[j]`` say which sample and step row j is; only the first ``real`` rows are
    real (micro-batches are padded to one shape, so recomputed log-probabilities equal the rollout's
    bit for bit before an update). ``step`` is the sampler's result for the given next latents,
    ``prediction`` the policy's output (with gradient).
    """

    samples: torch.Tensor
    steps: torch.Tensor
    real: int
    latents: torch.Tensor
    next_latents: torch.Tensor
    prediction: torch.Tensor
    step: StepResult

    def real_rows(self, t: torch.Tensor) -> torch.Tensor:
        """The first ``real`` rows of a per-row tensor of this micro-batch."""
        return t if t.shape[0] == self.real else t[: self.real]


C = TypeVar("C")


def select_rows(cond: C, rows: torch.Tensor) -> C:
    """Return a copy of a conditioning dataclass keeping only ``rows`` of every batched tensor.

    Tensor fields whose first dimension is the batch are indexed; other fields (shared tensors
    such as positional ids, python scalars) are kept as they are. The batch size is taken from
    the field named in ``cond.batch_fields`` if present, otherwise every tensor with ndim >= 1
    is treated as batched.
    """
    if not dataclasses.is_dataclass(cond) or isinstance(cond, type):
        raise TypeError(f"conditioning must be a dataclass instance, got {type(cond).__name__}")
    batched: tuple[str, ...] | None = getattr(cond, "batch_fields", None)
    updates: dict[str, Any] = {}
    for field in dataclasses.fields(cond):
        value = getattr(cond, field.name)
        is_batched = (
            field.name in batched if batched is not None else (isinstance(value, torch.Tensor) and value.ndim >= 1)
        )
        if is_batched and isinstance(value, torch.Tensor):
            updates[field.name] = value.index_select(0, rows.to(value.device))
    return dataclasses.replace(cond, **updates)


@dataclass(frozen=True)
class DiffusersExport:
    """A policy seen as a diffusers pipeline, for ``dancecore export`` (:class:`ExportablePolicy`).

    ``pipeline`` is a diffusers ``DiffusionPipeline`` built from the policy's own modules (the
    trained network is ``policy.module`` itself, not a copy) and a scheduler that takes the
    deterministic steps of the run's sampler. ``trained`` names the pipeline component that is
    ``policy.module`` (``"transformer"``, ``"unet"``). ``call`` holds the keyword arguments of
    ``pipeline(prompt, **call)`` that reproduce ``dancecore eval``'s deterministic sampling (steps,
    guidance, size); the initial noise is passed as ``latents``, in the layout of
    ``policy.initial_noise``. ``task`` is the Hugging Face pipeline tag of the model card.
    """

    pipeline: Any
    trained: str
    call: dict[str, Any]
    task: str = "text-to-image"


@dataclass(frozen=True)
class MemoryPlanSpec:
    """A policy's networks at a run's real sizes, for ``dancecore plan`` (:class:`PlannablePolicy`).

    Every module is built on the ``meta`` device from its architecture config (the checkpoint's
    ``config.json`` when it is on disk, else the published config the plugin ships), so no weights
    are read and nothing is allocated. ``trained`` is the network the run trains, prepared as the
    run prepares it (LoRA adapters, gradient checkpointing). ``frozen`` names the other networks
    resident during training (text encoders, VAE) with the dtype they are kept in; ``offloaded``
    names those of them kept in CPU memory between uses. ``call(module, rows)`` runs one network
    call of ``rows`` samples at the run's shapes (resolution, frames, sequence length; both CFG
    branches when the policy uses CFG), building its example inputs on ``module``'s device in
    ``dtype``, and returns the prediction. ``shapes`` says those shapes in words for the report
    (e.g. ``"720 x 720 px: 2,025 image + 512 text tokens"``); ``source`` where the configs came from.
    """

    trained: Any
    frozen: dict[str, tuple[Any, torch.dtype]]
    call: Any
    shapes: str
    source: str
    offloaded: tuple[str, ...] = ()
