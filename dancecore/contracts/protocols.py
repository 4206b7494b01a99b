"""The four component contracts of dancecore.

Components are plain classes found through entry points (see :mod:`dancecore.registry`). Each
has a nested pydantic ``Config`` (``extra="forbid"``) and is built as ``cls(config, context)``.
These protocols are structural: a plugin does not inherit from anything in the core.
Contracts only grow by optional members, so a plugin written today keeps working.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import torch
from pydantic import BaseModel

from dancecore.contracts.records import (
    DiffusersExport,
    LossOutput,
    MemoryPlanSpec,
    PromptBatch,
    RewardScores,
    Rollout,
    Schedule,
    StepResult,
    Transitions,
)


@dataclass(frozen=True)
class SequenceParallelGroup:
    """The ranks that share one sample's tokens (``distributed.sequence_parallel``).

    ``size`` ranks, this one at position ``rank`` among them; ``group`` is their
    ``torch.distributed`` process group (``None`` only in single-process tests of validation).
    Every rank of a group holds the same samples; a policy that supports sequence parallelism
    splits its networks' token sequence over the group (see docs/distributed.md).
    """

    size: int = 1
    rank: int = 0
    group: Any = None
    ranks: tuple[int, ...] = (0,)


@dataclass(frozen=True)
class BuildContext:
    """What every component is told when it is built.

    ``rank``/``world_size`` are the process's; ``sequence_parallel`` (when set, size > 1) is the
    group of ranks sharing this rank's samples. A policy declares that it splits its sequence over
    such a group with the class attribute ``supports_sequence_parallel = True``.
    """

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    output_dir: Path | None = None
    sequence_parallel: SequenceParallelGroup | None = None


@runtime_checkable
class Policy(Protocol):
    """A generative network that can be sampled step by step and trained.

    ``prediction_type`` tells samplers what :meth:`predict` returns: ``"flow"`` (velocity) or
    ``"epsilon"`` (noise). ``module`` is the trainable ``nn.Module`` (what the optimizer updates,
    what checkpoints store and what DeepSpeed wraps).
    """

    Config: ClassVar[type[BaseModel]]
    prediction_type: str
    module: torch.nn.Module

    def encode_prompts(self, batch: PromptBatch) -> Any:
        """Encode prompts once, returning a conditioning dataclass with one row per prompt."""
        ...

    def initial_noise(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Draw ``n`` initial latents (on CPU, fp32) from ``generator``."""
        ...

    def predict(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: Any) -> torch.Tensor:
        """One denoising prediction for a batch; ``timesteps`` has one entry per row.

        Classifier-free guidance, when the policy uses it, is applied here so that rollout and
        training see exactly the same prediction.
        """
        ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode clean latents to pixels in [0, 1]: (B, 3, H, W) images or (B, F, 3, H, W) videos."""
        ...

    def trainable_parameters(self) -> Iterable[torch.nn.Parameter]:
        """The parameters GRPO updates (all of ``module`` or only adapters)."""
        ...


@runtime_checkable
class ExportablePolicy(Policy, Protocol):
    """A policy that ``dancecore export`` can write as a diffusers pipeline (optional: a policy
    without :meth:`diffusers_export` trains and evaluates as before; export names it)."""

    def diffusers_export(self, sampler: Sampler) -> DiffusersExport:
        """This policy, with its current weights, as a diffusers pipeline whose scheduler takes the
        deterministic (ODE) steps of ``sampler``; see :class:`DiffusersExport`."""
        ...


@runtime_checkable
class PlannablePolicy(Policy, Protocol):
    """A policy that ``dancecore plan`` can size (optional: a policy without
    :meth:`memory_plan_spec` trains as before; ``plan`` names it). It is asked before any weights
    are loaded, so the method is a classmethod of the policy's validated ``Config``."""

    @classmethod
    def memory_plan_spec(cls, config: Any) -> MemoryPlanSpec:
        """The policy's networks on the meta device at the run's real sizes; see :class:`MemoryPlanSpec`."""
        ...


@runtime_checkable
class Sampler(Protocol):
    """A stochastic sampler that reports the log-probability of every transition it takes.

    Optional class attribute ``decodes``: which latent of the last step is decoded into the sample
    (rewards, eval images): ``"x0_hat"`` (the default; the ODE endpoint of a flow model) or
    ``"sample"`` (the last step's next latent: DDIM's final sample, as diffusers, DDPO and DanceGRPO's
    SD code decode it).

    Optional method ``rollout_schedule(iteration) -> Schedule``: the schedule training rollouts use
    at that iteration when it differs from :meth:`schedule` (MixGRPO-Flash compresses the ODE steps
    after its SDE window). Optional attribute ``uses_previous_step``: when true, rollouts pass
    ``previous=`` (the previous step's :class:`StepResult`) to :meth:`step`, for multistep ODE solvers.
    """

    Config: ClassVar[type[BaseModel]]

    def schedule(self, num_steps: int | None = None) -> Schedule:
        """The schedule for ``num_steps`` transitions (the configured number by default)."""
        ...

    def step(
        self,
        schedule: Schedule,
        index: int | torch.Tensor,
        latents: torch.Tensor,
        model_output: torch.Tensor,
        *,
        noise: torch.Tensor | None = None,
        next_latents: torch.Tensor | None = None,
        deterministic: bool = False,
    ) -> StepResult:
        """Take step ``index`` (one per row when a tensor) from ``latents``.

        With ``next_latents`` given, no noise is drawn: the log-probability of that given
        transition is returned (training). ``deterministic`` takes the ODE step (evaluation).
        """
        ...


@runtime_checkable
class WindowedSampler(Sampler, Protocol):
    """A sampler that takes only some steps stochastically (an SDE window, MixGRPO-style); the
    others are ODE steps with log-probability 0, never trained."""

    def stochastic_steps(self, num_steps: int, iteration: int) -> torch.Tensor:
        """Boolean mask (num_steps,) of the steps taken stochastically at ``iteration``."""
        ...


@runtime_checkable
class Reward(Protocol):
    """Scores decoded samples against their prompts, one float per sample (higher is better)."""

    Config: ClassVar[type[BaseModel]]

    def score(self, samples: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Score pixels in [0, 1] ((B, 3, H, W) or (B, F, 3, H, W)); returns a (B,) tensor."""
        ...


@runtime_checkable
class PlannableReward(Reward, Protocol):
    """A reward whose resident networks ``dancecore plan`` can count (optional)."""

    @classmethod
    def memory_plan_modules(cls, config: Any) -> dict[str, tuple[torch.nn.Module, torch.dtype]]:
        """Name -> (network on the meta device, the dtype it is kept in) for the reward's models."""
        ...


class TrainingServices(Protocol):
    """What the core offers an :class:`Algorithm` for its training pass (see docs/architecture.md).

    Network calls go through :meth:`replay` / :meth:`predict`, which micro-batch with the rollout's
    shapes, so a log-probability recomputed before any update equals the rollout's exactly. The
    gradient goes through :meth:`backward` and :meth:`optimizer_step` (engine-neutral: one process
    or DeepSpeed). Decisions every rank must take together go through :meth:`any_rank`.
    """

    world_size: int
    device: torch.device
    samples_per_update: int | None
    micro_batch_size: int  # samples per network call (``train.micro_batch_size``)

    def replay(self, rollout: Rollout, samples: torch.Tensor, steps: torch.Tensor) -> Iterator[Transitions]:
        """Recompute transitions ``(samples[j], steps[j])`` of the trajectory with gradient, micro-batch by micro-batch."""
        ...

    def predict(
        self, latents: torch.Tensor, timesteps: torch.Tensor, rollout: Rollout, samples: torch.Tensor
    ) -> torch.Tensor:
        """The policy's prediction (with gradient) for arbitrary latents of the given samples' prompts."""
        ...

    def reference_step(self, rollout: Rollout, batch: Transitions) -> StepResult:
        """The reference policy's step on a replayed micro-batch (algorithms with ``needs_reference``)."""
        ...

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate gradients of ``loss`` (already scaled by the caller)."""
        ...

    def optimizer_step(self) -> float:
        """Apply the LR schedule, clip, step; returns the gradient norm (a non-finite norm skips the update)."""
        ...

    def skip_update(self, why: str) -> None:
        """Drop the accumulated gradients of a non-finite update; too many in a row stop the run."""
        ...

    def any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank."""
        ...

    def mean_over_ranks(self, values: Sequence[float]) -> list[float]:
        """The mean of each value over ranks (the values themselves on one process); every rank calls it."""
        ...

    def rollout_weights(self) -> AbstractContextManager[None]:
        """Inside the block the policy holds the weights this iteration's rollout sampled with (the
        EMA with ``train.ema.rollout``, DiffusionNFT's old policy; otherwise the trained weights)."""
        ...

    def generator(self, purpose: str, *keys: int) -> torch.Generator:
        """A generator seeded by (run seed, purpose, this iteration's draw, keys): the same on resume."""
        ...

    def timed(self, phase: str) -> AbstractContextManager[None]:
        """Count the block's seconds as ``time/<phase>_s`` in the iteration's metrics."""
        ...


@runtime_checkable
class SummarizingReward(Reward, Protocol):
    """A reward that can break its scores down by group (e.g. GenEval's task types); evaluation
    tables show the breakdown next to the mean. Optionally it also has ``groups(prompts) -> list[str]``
    (each prompt's group): evaluation rows then carry it (``group/<reward>``) and
    ``dancecore eval --compare`` gives each group's difference a standard error."""

    def summarize(self, prompts: Sequence[str], scores: Sequence[float]) -> dict[str, float]:
        """Group name -> score (for instance per task, plus ``overall``)."""
        ...


@runtime_checkable
class Algorithm(Protocol):
    """A training algorithm (GRPO, reward-weighted regression, ...): it owns the training pass.

    It receives one iteration's :class:`Rollout` (trajectory, kept samples' rewards, conditioning,
    schedule) and updates the policy through the core's :class:`TrainingServices`. It returns its
    metrics for this rank (floats; NaN when it did not train); the core averages them over ranks
    and writes them to metrics.jsonl. ``group_size`` is how many samples share one prompt (and one
    initial noise): the rollout is shaped by it, whatever the algorithm.

    Optional attribute ``uses_log_probs`` (default true): whether it trains on the rollout's
    stochastic transitions. The core refuses a sampler that takes none (``flow-ode``) for such an
    algorithm; DiffusionNFT, which learns from the clean samples alone, sets it false.
    """

    Config: ClassVar[type[BaseModel]]
    group_size: int

    def train(self, rollout: Rollout, services: TrainingServices) -> dict[str, float]:
        """One iteration's training pass; returns this rank's metrics."""
        ...


@runtime_checkable
class ReferenceAlgorithm(Algorithm, Protocol):
    """An algorithm that may regularise towards a reference policy (KL): when ``needs_reference``
    is true the core provides one (the LoRA-disabled network, or a frozen copy of the weights at
    the start of training) through :meth:`TrainingServices.reference_step`. A frozen copy is kept in
    ``reference_dtype`` ("float32" or "bfloat16") on ``reference_device`` ("same" or "cpu")."""

    needs_reference: bool
    reference_dtype: Literal["float32", "bfloat16"]
    reference_device: Literal["same", "cpu"]


@runtime_checkable
class StatefulAlgorithm(Algorithm, Protocol):
    """An algorithm with state of its own (an EMA, a running baseline): saved in every checkpoint's
    training state and restored on resume. JSON-safe values only."""

    def state_dict(self) -> dict[str, Any]:
        """The state to checkpoint."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        ...


@runtime_checkable
class Optimizer(Protocol):
    """The clipped-ratio objective of GRPO-like algorithms: advantages, which samples and steps to
    train, the per-element loss. :class:`~dancecore.builtins.algorithms.GRPO` implements it and runs
    its training pass through :func:`~dancecore.builtins.algorithms.clipped_ratio_pass`; a plugin of
    the old ``dancecore.optimizers`` entry-point group that implements only these four methods is
    trained the same way (see :class:`~dancecore.builtins.algorithms.ClippedRatioAlgorithm`)."""

    Config: ClassVar[type[BaseModel]]

    def advantages(self, scores: RewardScores, group_ids: torch.Tensor) -> torch.Tensor:
        """One advantage per sample, from all reward scores and group membership."""
        ...

    def select_samples(self, advantages: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
        """Indices of the samples to train on (all of them, or best/worst-of-N)."""
        ...

    def select_steps(self, candidates: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
        """For each sample (one generator each), the original indices of the steps to train among
        ``candidates``; shape (num_samples, k)."""
        ...

    def loss(self, new_log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor) -> LossOutput:
        """The clipped-ratio loss per element (not reduced) and its statistics."""
        ...
