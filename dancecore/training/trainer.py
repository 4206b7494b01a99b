"""The trainer: builds a run's components, runs iterations (:mod:`dancecore.training.iteration`)
inside the run loop (:mod:`dancecore.training.loop`), and saves/restores the training state
(:class:`~dancecore.training.state.TrainingState`) in checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dancecore import checkpoint as ckpt
from dancecore.builtins.algorithms import ClippedRatioAlgorithm
from dancecore.config.schema import ConfigError, ResolvedRun, RunConfig
from dancecore.contracts.protocols import (
    Algorithm,
    BuildContext,
    Policy,
    ReferenceAlgorithm,
    Sampler,
    SequenceParallelGroup,
    StatefulAlgorithm,
)
from dancecore.contracts.records import Prompt, Schedule, Trajectory
from dancecore.errors import OutputDirError, TrainingError
from dancecore.functional.seeding import derive_seed
from dancecore.hooks import plugin_manager
from dancecore.outputs.images import MetricsLog
from dancecore.training import sampling
from dancecore.training.ema import EmaWeights
from dancecore.training.engine import LocalEngine, TrainEngine
from dancecore.training.evaluation import PeriodicEval
from dancecore.training.iteration import run_iteration
from dancecore.training.loop import StopFlag, check_writable, refuse_earlier_run, run_loop
from dancecore.training.lr_schedule import WarmupSchedule
from dancecore.training.prompts import PromptOrder, load_prompts
from dancecore.training.reference import ReferencePolicy
from dancecore.training.scoring import build_eval_rewards, build_rewards
from dancecore.training.state import TrainingState, restore_fields

__all__ = ["OutputDirError", "Trainer", "TrainingError", "check_writable", "pick_device", "refuse_earlier_run"]

EngineFactory = Callable[[torch.nn.Module, RunConfig], TrainEngine]


def pick_device(name: str) -> torch.device:
    """Resolve ``train.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_algorithm(run: ResolvedRun, context: BuildContext) -> Algorithm:
    """Build the run's algorithm; an old-style ``dancecore.optimizers`` plugin (objective only) is
    trained through the clipped-ratio pass."""
    built = run.algorithm.cls(run.algorithm.config, context)
    if isinstance(built, Algorithm):
        return built
    return ClippedRatioAlgorithm(built, run.algorithm.name)


class Trainer:
    """Trains a validated run. Build it, then call :meth:`train`."""

    clock = staticmethod(time.perf_counter)  # what :meth:`timed` reads; benchmarks may use CPU time

    def __init__(
        self,
        run: ResolvedRun,
        engine_factory: EngineFactory | None = None,
        *,
        rank: int = 0,
        world_size: int = 1,
        sequence_parallel: SequenceParallelGroup | None = None,
    ) -> None:
        cfg = run.config
        self.run, self.cfg, self.output_dir = run, cfg, cfg.output_dir
        self.rank, self.world_size = rank, world_size
        self.is_main = rank == 0
        # The ranks of a sequence-parallel group hold the same samples: prompts are shared out over
        # the groups (data-parallel ranks), and only a group's first rank decodes and scores.
        self.sequence_parallel = sequence_parallel if sequence_parallel and sequence_parallel.size > 1 else None
        sp = self.sequence_parallel.size if self.sequence_parallel else 1
        self.data_rank, self.data_world_size = rank // sp, world_size // sp
        self.scores_samples = self.sequence_parallel is None or self.sequence_parallel.rank == 0
        if cfg.distributed.sequence_parallel > 1 and self.sequence_parallel is None:
            raise ConfigError(
                [
                    f"distributed.sequence_parallel: {cfg.distributed.sequence_parallel} needs that many ranks per "
                    "group: start the run with --nproc N (or a launcher) and distributed.backend=deepspeed"
                ]
            )
        if cfg.train.prompts_per_iteration % self.data_world_size:
            raise TrainingError(
                f"train.prompts_per_iteration ({cfg.train.prompts_per_iteration}) must be a multiple of the "
                f"number of ranks ({world_size}) divided by distributed.sequence_parallel ({sp})"
            )
        check_writable(self.output_dir)
        if cfg.train.num_threads:
            torch.set_num_threads(cfg.train.num_threads)
        self.device = pick_device(cfg.train.device)
        context = BuildContext(
            device=self.device,
            seed=cfg.seed,
            rank=rank,
            world_size=world_size,
            output_dir=self.output_dir,
            sequence_parallel=self.sequence_parallel,
        )
        self.order = PromptOrder(
            load_prompts(cfg.prompts), cfg.train.prompts_per_iteration, cfg.seed, cfg.prompts.shuffle
        )
        torch.manual_seed(cfg.seed)  # any init-time randomness (e.g. LoRA) is seeded too
        random.seed(derive_seed(cfg.seed, "python", rank))  # python/numpy RNGs: reproducible, per rank
        np.random.seed(derive_seed(cfg.seed, "numpy", rank) % 2**32)
        self.policy: Policy = run.policy.cls(run.policy.config, context)
        if cfg.train.compile:
            self.policy.module.compile()  # in place: parameter names, hence checkpoints, are unchanged
        self.sampler: Sampler = run.sampler.cls(run.sampler.config, context)
        self.algorithm: Algorithm = build_algorithm(run, context)
        self.group_size: int = self.algorithm.group_size
        num_steps = sampling.rollout_schedule(self.sampler, 0).num_steps
        if getattr(self.algorithm, "uses_log_probs", True) and not self.stochastic_mask(num_steps, 0).any():
            raise TrainingError(
                f"sampler {run.sampler.name!r} takes no stochastic step, and algorithm {run.algorithm.name!r} "
                "trains on the rollout's stochastic transitions: use a stochastic sampler (flow-sde, flow-cps) "
                "or an algorithm that learns from the clean samples (diffusion-nft)"
            )
        self.rewards = build_rewards(run, context)
        self.evaluation = (
            PeriodicEval(cfg.eval, build_eval_rewards(run, context), self.output_dir) if cfg.eval is not None else None
        )
        self.engine: TrainEngine = (
            engine_factory(self.policy.module, cfg) if engine_factory else LocalEngine(self.policy.module, cfg.train)
        )
        self.calls = sampling.NetworkCalls(self.device, cfg.train.micro_batch_size, self.autocast)
        self.ema = EmaWeights(cfg.train.ema, self.engine, self.device) if cfg.train.ema is not None else None
        self.reference: ReferencePolicy | None = None  # made now, before resume loads trained weights
        if isinstance(self.algorithm, ReferenceAlgorithm) and self.algorithm.needs_reference:
            self.reference = ReferencePolicy(
                self.policy,
                dtype=self.algorithm.reference_dtype,
                device=self.algorithm.reference_device,
                distributed=not isinstance(self.engine, LocalEngine),
            )
            if self.is_main:
                print(f"KL reference policy: {self.reference.description}")
        self.metrics = MetricsLog(self.output_dir / "metrics.jsonl")
        self.hooks = plugin_manager()
        self.stop = StopFlag()
        self.state = TrainingState(seed=cfg.seed)  # what a checkpoint saves and resume restores
        self.lr_schedule = WarmupSchedule(
            cfg.train.learning_rate,
            cfg.train.lr_warmup_updates,
            cfg.train.decay_updates if cfg.train.lr_decay == "cosine" else None,
            cfg.train.lr_min_ratio,
        )
        if self.lr_schedule.active and not hasattr(getattr(self.engine, "optimizer", None), "param_groups"):
            raise TrainingError("train.lr_warmup_updates and train.lr_decay need an engine that exposes its optimizer")
        self.phase_times: dict[str, float] = {}  # seconds per phase of the last iteration (see timed)
        self._last_pixels = torch.zeros(0)

    # ---------------------------------------------------------------- views of the training state

    @property
    def start_iteration(self) -> int:
        """The next iteration to run (after a resume: the checkpoint's)."""
        return self.state.iteration

    @property
    def data_cursor(self) -> int:
        """Position in the prompt order."""
        return self.state.data_cursor

    @data_cursor.setter
    def data_cursor(self, value: int) -> None:
        self.state.data_cursor = value

    @property
    def noise_position(self) -> int:
        """The sampler RNG's position (one step per iteration)."""
        return self.state.noise_position

    @property
    def counters(self) -> dict[str, int]:
        """Skipped updates, reward failures and dropped groups so far."""
        return self.state.counters

    # ------------------------------------------------------------------------- one iteration

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """bf16 autocast for network calls when configured, otherwise nothing."""
        if self.cfg.train.mixed_precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        """Add the block's duration on :attr:`clock` (wall time unless a benchmark sets CPU time) to
        ``phase_times[phase]``, queued GPU work included; the iteration's record carries it as
        ``time/<phase>_s`` (metrics.jsonl, TensorBoard) and ``benchmarks/`` reads it."""
        began = self.clock()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.phase_times[phase] = self.phase_times.get(phase, 0.0) + self.clock() - began

    def local_prompts(self, iteration: int) -> list[Prompt]:
        """This rank's share of the prompts at the data cursor (disjoint across data-parallel ranks;
        the same on every rank of a sequence-parallel group)."""
        return self.order.batch_at(self.state.data_cursor)[self.data_rank :: self.data_world_size]

    def global_prompt_ids(self, iteration: int) -> list[int]:
        """Global positions (in the iteration) of this rank's prompts."""
        return list(range(self.cfg.train.prompts_per_iteration))[self.data_rank :: self.data_world_size]

    def shared_with_group(self, value: Any) -> Any:
        """``value`` as the first rank of this rank's sequence-parallel group has it (``value``
        itself without sequence parallelism)."""
        sp = self.sequence_parallel
        if sp is None:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=sp.ranks[0], group=sp.group)
        return box[0]

    def stochastic_mask(self, num_steps: int, iteration: int) -> torch.Tensor:
        """Which steps the sampler takes stochastically this iteration (all, unless it has a window)."""
        return sampling.stochastic_mask(self.sampler, num_steps, iteration)

    def rollout(
        self,
        draw: int,
        cond: Any,
        schedule: Schedule,
        stochastic: torch.Tensor,
        on_micro_batch: Callable[[slice, torch.Tensor], None] | None = None,
    ) -> Trajectory:
        """G trajectories per prompt of this rank (see :func:`~dancecore.training.sampling.grouped_rollout`),
        sampled with the EMA weights when ``train.ema.rollout`` is set."""
        old_policy = self.ema is not None and self.ema.config.rollout
        with self.ema.swapped_in(self.policy.module) if old_policy and self.ema else contextlib.nullcontext():
            return self._rollout(draw, cond, schedule, stochastic, on_micro_batch)

    def _rollout(
        self,
        draw: int,
        cond: Any,
        schedule: Schedule,
        stochastic: torch.Tensor,
        on_micro_batch: Callable[[slice, torch.Tensor], None] | None,
    ) -> Trajectory:
        return sampling.grouped_rollout(
            self.policy,
            self.sampler,
            self.calls,
            seed=self.cfg.seed,
            draw=draw,
            prompt_ids=self.global_prompt_ids(draw),
            group_size=self.group_size,
            cond=cond,
            schedule=schedule,
            stochastic=stochastic,
            shared_noise=bool(getattr(self.algorithm, "shared_noise", True)),
            on_micro_batch=on_micro_batch,
        )

    def reference_policy(self) -> ReferencePolicy:
        """The KL reference (only when the algorithm asked for one)."""
        if self.reference is None:
            raise TrainingError(
                f"algorithm {self.run.algorithm.name!r} has no reference policy (needs_reference is false)"
            )
        return self.reference

    def iteration(self, iteration: int) -> dict[str, Any]:
        """One iteration on this rank; returns its (rank-reduced) metrics."""
        return run_iteration(self, iteration)

    def train(self, resume: bool = False, log: Any = print, *, allow_pickle: bool = False) -> str:
        """Run all iterations (see :func:`~dancecore.training.loop.run_loop`); 'finished' or 'stopped'.
        ``allow_pickle`` lets resume load pickle files the verified manifest lists (weights only)."""
        return run_loop(self, resume, log, allow_pickle=allow_pickle)

    # ------------------------------------------------------------------ checkpoint and resume

    def _sync_state(self) -> TrainingState:
        """The training-state record with the live objects' state (LR schedule, algorithm) copied in."""
        self.state.lr_schedule = self.lr_schedule.state_dict()
        self.state.algorithm = self.algorithm.state_dict() if isinstance(self.algorithm, StatefulAlgorithm) else {}
        return self.state

    def capture_state(self, iteration: int, optimizer_meta: dict[str, Any]) -> dict[str, Any]:
        """``state.json``: the training-state record at ``iteration``, the optimizer's hyper-parameters,
        the world size and the config."""
        record = self._sync_state().to_json()
        record["iteration"] = iteration
        ordered = {k: record[k] for k in ("iteration", "data_cursor", "sampler_rng", "lr_schedule")}
        rest = {k: v for k, v in record.items() if k not in ordered}
        return {
            **ordered,
            "optimizer": optimizer_meta,
            **rest,
            "world_size": self.world_size,
            "config": json.loads(self.cfg.model_dump_json()),
        }

    def save(self, iteration: int) -> Path | None:
        """Checkpoint the state *after* ``iteration`` iterations (the next one to run).

        Rank 0 stages the directory; every rank writes its own RNG states into it; rank 0 writes
        the shared files and commits (rename) once all have written. A failure on any rank fails
        the save on every rank, so none is left waiting.
        """
        model = self.engine.model_state()
        opt_tensors, opt_meta = self.engine.optimizer_state()
        ema = self.ema.state() if self.ema is not None else None
        staging = ckpt.staging_path(self.output_dir, iteration)

        def shared_files() -> Path:
            ckpt.write_tensors(staging, "model.safetensors", model)
            ckpt.write_tensors(staging, "optimizer.safetensors", opt_tensors)
            if ema is not None:
                ckpt.write_tensors(staging, "ema.safetensors", ema)
            ckpt.write_json(staging, ckpt.STATE, self.capture_state(iteration, opt_meta))
            return ckpt.commit(self.output_dir, iteration, self.cfg.train.keep_checkpoints)

        rank_state = {"rank": self.rank, "rng": ckpt.rng_state()}
        self._save_stage(iteration, lambda: ckpt.begin(self.output_dir, iteration) if self.is_main else None)
        self._save_stage(iteration, lambda: ckpt.write_json(staging, ckpt.rank_file(self.rank), rank_state))
        path: Path | None = self._save_stage(iteration, shared_files if self.is_main else lambda: None)
        if self.is_main:
            self.hooks.hook.dancecore_checkpoint_saved(iteration=iteration, path=path)
        return path

    def _save_stage(self, iteration: int, stage: Callable[[], Any]) -> Any:
        """Run one stage of a save on this rank; if it failed on any rank, raise on every rank."""
        error: ckpt.CheckpointError | None = None
        result = None
        try:
            result = stage()
        except ckpt.CheckpointError as exc:
            error = exc
        if self.engine.any_rank(error is not None):
            if self.is_main:
                ckpt.abort(self.output_dir, iteration)
            raise error or ckpt.CheckpointWriteError(f"checkpoint {iteration} failed on another rank")
        return result

    def resume(self, allow_pickle: bool = False) -> list[str]:
        """Load the newest checkpoint whose manifest verifies; returns messages naming the ones
        skipped (and why). Raises :class:`ckpt.CheckpointError` when committed checkpoints exist
        but none verifies: never a silent fresh start."""
        plan = ckpt.plan_resume(self.output_dir)
        messages = [*plan.ignored, *plan.skipped]
        if plan.path is None:
            if plan.skipped:
                raise ckpt.CheckpointError(
                    f"no valid checkpoint to resume from in {ckpt.checkpoint_dir(self.output_dir)}: "
                    + "; ".join(plan.skipped)
                )
            if self.is_main:
                self.metrics.truncate_after(0)
            return [*messages, "no checkpoint found; starting from iteration 0"]
        loaded = ckpt.read_checkpoint(plan.path, rank=self.rank, allow_pickle=allow_pickle)
        messages += self.restore(loaded)
        if self.is_main:
            self.metrics.truncate_after(self.start_iteration)
        return [*messages, f"resumed from {plan.path.name} (iteration {loaded.iteration})"]

    def restore(self, loaded: ckpt.Checkpoint) -> list[str]:
        """Restore every piece of the training state from a checkpoint, then verify that the live
        state equals the saved one (a piece forgotten here is an error, not a silent drift)."""
        if "optimizer" not in loaded.state:
            raise ckpt.CheckpointError(f"checkpoint {loaded.path} lacks optimizer (older format?)")
        saved = TrainingState.from_json(loaded.state, f"checkpoint {loaded.path}")
        if saved.seed != self.cfg.seed:
            raise ckpt.CheckpointError(
                f"checkpoint {loaded.path} was written with seed {saved.seed}, the config says "
                f"{self.cfg.seed}: resuming would not continue the same run"
            )
        saved.iteration = loaded.iteration
        skip = ckpt.skipped_restores()  # test-only fault hook: empty in real runs
        opt_tensors, opt_meta = loaded.optimizer, loaded.state["optimizer"]
        if "optimizer" in skip:
            opt_tensors, opt_meta = self.engine.optimizer_state()
        self.engine.load_state(loaded.model, opt_tensors, opt_meta)
        self.state = restore_fields(self._sync_state(), saved, skip)
        self.lr_schedule.load_state_dict(self.state.lr_schedule)
        if self.ema is not None and "ema" not in skip:
            if loaded.ema is None:
                raise ckpt.CheckpointError(f"checkpoint {loaded.path} has no EMA, but train.ema is set")
            self.ema.load(loaded.ema)
        if isinstance(self.algorithm, StatefulAlgorithm) and self.state.algorithm:
            self.algorithm.load_state_dict(self.state.algorithm)
        messages = []
        if loaded.rank_state is None:
            messages.append(f"rank {self.rank}: no RNG states in the checkpoint (world size changed); re-seeded")
        elif "rng" not in skip:
            ckpt.restore_rng_state(loaded.rank_state["rng"])
        if not ckpt.restore_check_disabled():
            self.check_restored(loaded)
        return messages

    def check_restored(self, loaded: ckpt.Checkpoint) -> None:
        """Raise :class:`ckpt.CheckpointError` naming every piece whose live value differs from the
        checkpoint just restored."""
        model = self.engine.model_state()
        opt_tensors, opt_meta = self.engine.optimizer_state()
        live = self.capture_state(self.start_iteration, opt_meta)
        problems = ckpt.state_differences(loaded.state, live, ("config", "world_size"))
        if not ckpt.tensors_equal(model, loaded.model):
            problems.append("model weights")
        if not ckpt.tensors_equal(opt_tensors, loaded.optimizer):
            problems.append("optimizer tensors")
        if self.ema is not None and (loaded.ema is None or not ckpt.tensors_equal(self.ema.state(), loaded.ema)):
            problems.append("EMA weights")
        if loaded.rank_state is not None and ckpt.state_differences(loaded.rank_state["rng"], ckpt.rng_state()):
            problems.append(f"RNG states of rank {self.rank}")
        if problems:
            raise ckpt.CheckpointError(f"resume from {loaded.path} did not restore: {', '.join(problems)}")
