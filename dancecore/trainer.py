"""The GRPO training loop: sample -> score -> advantages -> clipped update, once, for every backbone.

Read :meth:`Trainer.iteration` top to bottom for the algorithm; everything else is bookkeeping
(building components, checkpoints, metrics, signals).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dancecore import checkpoint as ckpt
from dancecore.config import ResolvedRun
from dancecore.engine import LocalEngine, TrainEngine
from dancecore.errors import OutputDirError, TrainingError
from dancecore.grpo import trainable_steps
from dancecore.hooks import plugin_manager
from dancecore.lr_schedule import WarmupSchedule
from dancecore.observability import open_observers
from dancecore.outputs import MetricsLog, plot_reward_curve, save_grid
from dancecore.prompts import PromptOrder, load_prompts
from dancecore.protocols import BuildContext
from dancecore.scoring import RewardFailure, build_rewards, score_samples
from dancecore.seeding import derive_seed, generator
from dancecore.types import Prompt, PromptBatch, Schedule, Trajectory, select_rows


@dataclass
class StopFlag:
    """Set by SIGTERM/SIGINT; acted upon at the next iteration boundary. A second signal exits."""

    requested: bool = False
    previous: dict[int, Any] = field(default_factory=dict)

    def install(self) -> None:
        """Install the handlers (main thread only)."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        """Restore the previous handlers."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            os._exit(128 + signum)
        self.requested = True


def check_writable(output_dir: Path) -> None:
    """Create ``output_dir`` and prove it is writable, before any model is loaded."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise OutputDirError(f"output_dir {output_dir} is not writable: {exc.strerror or exc}") from None
    for child in ("checkpoints", "samples", "metrics.jsonl", "reward_curve.png"):
        if (output_dir / child).is_symlink():  # a symlink would redirect writes outside output_dir
            raise OutputDirError(f"{output_dir / child} is a symlink; refusing to write through it")


def refuse_earlier_run(output_dir: Path) -> None:
    """A fresh (not resumed) run must not write into another run's output_dir: its metrics would be
    appended to the old ones, and a later ``--resume`` could pick up the old run's newer checkpoint."""
    found = [p.name for p in ckpt.committed_checkpoints(output_dir)[-1:]]
    metrics = output_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        found.append("metrics.jsonl")
    if found:
        raise OutputDirError(
            f"output_dir {output_dir} already holds a run ({', '.join(found)}): continue it with --resume, "
            "or choose another output_dir (or delete that one)"
        )


def pick_device(name: str) -> torch.device:
    """Resolve ``train.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _padded_chunks(indices: torch.Tensor, size: int) -> Iterator[tuple[torch.Tensor, int]]:
    """Chunks of exactly ``size`` rows (the last padded by repeating its final row) and the number
    of real rows in each. Every network call then has the same batch shape in rollout and
    training, which keeps recomputed log-probabilities bit-identical."""
    for start in range(0, indices.numel(), size):
        chunk = indices[start : start + size]
        real = chunk.numel()
        if real < size:
            chunk = torch.cat([chunk, chunk[-1:].expand(size - real)])
        yield chunk, real


def _real_rows(t: torch.Tensor, real: int) -> torch.Tensor:
    """The first ``real`` rows of a padded micro-batch's result (the tensor itself when unpadded)."""
    return t if t.shape[0] == real else t[:real]


class _RowCache:
    """``select_rows`` of one conditioning, remembered per row pattern: the micro-batches of one
    prompt's group all need the same rows."""

    def __init__(self, cond: Any) -> None:
        self.cond = cond
        self.selected: dict[tuple[int, ...], Any] = {}

    def rows(self, rows: torch.Tensor) -> Any:
        key = tuple(rows.tolist())
        if key not in self.selected:
            self.selected[key] = select_rows(self.cond, rows)
        return self.selected[key]


class Trainer:
    """Runs GRPO for a validated config. Build with :meth:`from_run`, then call :meth:`train`."""

    clock = staticmethod(time.perf_counter)  # what :meth:`timed` reads; benchmarks may use CPU time

    def __init__(self, run: ResolvedRun, engine_factory: Any = None, *, rank: int = 0, world_size: int = 1) -> None:
        cfg = run.config
        self.run = run
        self.cfg = cfg
        self.output_dir = cfg.output_dir
        self.rank, self.world_size = rank, world_size
        self.is_main = rank == 0
        if cfg.train.prompts_per_iteration % world_size:
            raise TrainingError(
                f"train.prompts_per_iteration ({cfg.train.prompts_per_iteration}) must be a multiple of the "
                f"number of ranks ({world_size})"
            )
        check_writable(self.output_dir)
        if cfg.train.num_threads:
            torch.set_num_threads(cfg.train.num_threads)
        self.device = pick_device(cfg.train.device)
        context = BuildContext(
            device=self.device, seed=cfg.seed, rank=rank, world_size=world_size, output_dir=self.output_dir
        )
        self.order = PromptOrder(load_prompts(cfg.prompts), cfg.train.prompts_per_iteration, cfg.seed, cfg.prompts.shuffle)
        torch.manual_seed(cfg.seed)  # any init-time randomness (e.g. LoRA) is seeded too
        random.seed(derive_seed(cfg.seed, "python", rank))  # python/numpy RNGs: reproducible, per rank
        np.random.seed(derive_seed(cfg.seed, "numpy", rank) % 2**32)
        self.policy = run.policy.cls(run.policy.config, context)
        if cfg.train.compile:
            self.policy.module.compile()  # in place: parameter names, hence checkpoints, are unchanged
        self.sampler = run.sampler.cls(run.sampler.config, context)
        self.algorithm = run.optimizer.cls(run.optimizer.config, context)
        self.rewards = build_rewards(run, context)
        self.group_size: int = run.optimizer.config.group_size  # type: ignore[attr-defined]
        self.engine: TrainEngine = (
            engine_factory(self.policy.module, cfg) if engine_factory else LocalEngine(self.policy.module, cfg.train)
        )
        self.metrics = MetricsLog(self.output_dir / "metrics.jsonl")
        self.hooks = plugin_manager()
        self.stop = StopFlag()
        # Training state a checkpoint saves and resume restores (see capture_state). The data cursor
        # and the noise position advance once per iteration; noise is drawn from generators keyed by
        # (seed, noise position, sample), so this position *is* the sampler RNG's state.
        self.start_iteration = 0
        self.data_cursor = 0
        self.noise_position = 0
        self.lr_schedule = WarmupSchedule(cfg.train.learning_rate, cfg.train.lr_warmup_updates)
        if self.lr_schedule.active and not hasattr(getattr(self.engine, "optimizer", None), "param_groups"):
            raise TrainingError("train.lr_warmup_updates needs an engine that exposes its optimizer")
        self.nonfinite_in_a_row = 0
        self.counters = {"skipped_updates": 0, "reward_failures": 0, "dropped_groups": 0}
        self.phase_times: dict[str, float] = {}  # seconds per phase of the last iteration (see timed)

    # ------------------------------------------------------------------------- the algorithm

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
        """This rank's share of the prompts at the data cursor (disjoint across ranks)."""
        return self.order.batch_at(self.data_cursor)[self.rank :: self.world_size]

    def global_prompt_ids(self, iteration: int) -> list[int]:
        """Global positions (in the iteration) of this rank's prompts."""
        return list(range(self.cfg.train.prompts_per_iteration))[self.rank :: self.world_size]

    @torch.no_grad()
    def rollout(self, iteration: int, cond: Any, schedule: Schedule, stochastic: torch.Tensor) -> Trajectory:
        """Sample a group of G trajectories per prompt; each group shares its initial noise."""
        g = self.group_size
        prompt_ids = self.global_prompt_ids(iteration)
        shared = [self.policy.initial_noise(1, generator(self.cfg.seed, "init", iteration, pid)) for pid in prompt_ids]
        initial = torch.cat([x.expand(g, *x.shape[1:]) for x in shared])
        n = initial.shape[0]
        sample_ids = torch.tensor([pid * g + j for pid in prompt_ids for j in range(g)])
        prompt_rows = torch.arange(len(prompt_ids)).repeat_interleave(g)
        steps = schedule.num_steps
        latents = torch.empty((n, steps + 1, *initial.shape[1:]), dtype=initial.dtype)
        latents[:, 0] = initial
        log_probs = torch.zeros((n, steps))
        final = torch.empty_like(initial)
        noise_gens = [generator(self.cfg.seed, "sde", iteration, int(s)) for s in sample_ids]
        conditioning = _RowCache(cond)
        micro = self.cfg.train.micro_batch_size
        step_times = [t.expand(micro) for t in schedule.timesteps.unbind()]
        stochastic_steps = [bool(flag) for flag in stochastic.tolist()]
        for chunk, real in _padded_chunks(torch.arange(n), micro):
            rows = slice(int(chunk[0]), int(chunk[0]) + real)  # chunks are consecutive rows
            rows_cond = conditioning.rows(prompt_rows[chunk])
            # Each sample's noise for all its steps in one draw from its own generator (the same
            # numbers as one draw per step whenever a latent's size is a multiple of 16).
            noise = torch.stack([torch.randn((steps, *initial.shape[1:]), generator=noise_gens[i]) for i in chunk[:real]])
            noise = noise[torch.arange(len(chunk)).clamp(max=real - 1)].to(self.device)  # padding rows repeat the last
            step_noise = noise.unbind(1)
            saved_latents = latents[rows].unbind(1)  # views: copying into them fills the trajectory
            saved_log_probs = log_probs[rows].unbind(1)
            x = latents[chunk, 0].to(self.device)
            for i in range(steps):
                with self.autocast():
                    pred = self.policy.predict(x, step_times[i], rows_cond)
                out = self.sampler.step(schedule, i, x, pred, noise=step_noise[i], deterministic=not stochastic_steps[i])
                x = out.next_latents
                saved_latents[i + 1].copy_(_real_rows(x, real))
                saved_log_probs[i].copy_(_real_rows(out.log_prob, real))
            final[rows] = _real_rows(out.x0_hat, real).cpu()
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
    def decode(self, final: torch.Tensor) -> torch.Tensor:
        """Decode the last step's clean estimates to pixels, micro-batch by micro-batch."""
        size = self.cfg.train.micro_batch_size
        return torch.cat([self.policy.decode(final[i : i + size]).cpu() for i in range(0, final.shape[0], size)])

    def update(
        self,
        iteration: int,
        traj: Trajectory,
        cond: Any,
        schedule: Schedule,
        stochastic: torch.Tensor,
        advantages: torch.Tensor,
        chosen: torch.Tensor,
    ) -> dict[str, float]:
        """Clipped policy-gradient updates on a random subset of each chosen sample's steps."""
        candidates = trainable_steps(stochastic)
        step_gens = [generator(self.cfg.seed, "steps", iteration, int(traj.sample_ids[s])) for s in chosen]
        steps = self.algorithm.select_steps(candidates, step_gens)  # (len(chosen), k)
        k = steps.shape[1]
        per_update = self.cfg.train.samples_per_update or len(chosen)
        conditioning = _RowCache(cond)
        losses: list[torch.Tensor] = []
        clipfracs: list[torch.Tensor] = []
        ratios: list[torch.Tensor] = []
        norms: list[float] = []
        for start in range(0, len(chosen), per_update):
            members = torch.arange(start, min(start + per_update, len(chosen)))
            sample_idx = chosen[members].repeat_interleave(k)
            step_idx = steps[members].reshape(-1)
            scale = 1.0 / (len(members) * k)
            finite = True
            for chunk, real in _padded_chunks(torch.arange(sample_idx.numel()), self.cfg.train.micro_batch_size):
                s, t = sample_idx[chunk], step_idx[chunk]
                x = traj.latents[s, t].to(self.device)
                x_next = traj.latents[s, t + 1].to(self.device)
                with self.autocast():
                    pred = self.policy.predict(x, schedule.timesteps[t], conditioning.rows(traj.prompt_rows[s]))
                out = self.sampler.step(schedule, t, x, pred, next_latents=x_next)
                adv = advantages[s].to(self.device)
                result = self.algorithm.loss(out.log_prob, traj.log_probs[s, t].to(self.device), adv)
                loss = _real_rows(result.loss, real).sum() * scale  # padding rows add nothing
                if self.engine.any_rank(not bool(torch.isfinite(loss))):  # every rank skips together
                    finite = False
                    break
                self.engine.backward(loss)
                losses.append(loss.detach() / (scale * real))
                clipfracs.append(_real_rows(result.clip_fraction, real).mean())
                ratios.append(_real_rows(result.ratio, real).mean())
            if not finite:
                self.engine.zero_grad()
                self.skip_update("non-finite loss")
                continue
            self.lr_schedule.apply(getattr(self.engine, "optimizer", None))
            norm = self.engine.step()
            norms.append(norm)
            if math.isfinite(norm):
                self.nonfinite_in_a_row = 0
                self.lr_schedule.step()
            else:
                self.skip_update("non-finite gradient norm")

        def avg(values: list[Any]) -> float:
            return sum(float(v) for v in values) / len(values) if values else math.nan

        return {"loss": avg(losses), "clip_fraction": avg(clipfracs), "ratio_mean": avg(ratios), "grad_norm": avg(norms)}

    def skip_update(self, why: str) -> None:
        """Count a skipped update; abort after too many in a row."""
        self.counters["skipped_updates"] += 1
        self.nonfinite_in_a_row += 1
        if self.nonfinite_in_a_row >= self.cfg.train.max_nonfinite_updates:
            raise TrainingError(
                f"{self.nonfinite_in_a_row} updates in a row skipped ({why}); lower train.learning_rate or "
                "check the rewards"
            )

    def iteration(self, iteration: int) -> dict[str, Any]:
        """One GRPO iteration on this rank; returns its (rank-reduced) metrics."""
        began = time.perf_counter()
        self.phase_times = {}
        prompts = self.local_prompts(iteration)
        with self.timed("encode"):
            cond = self.policy.encode_prompts(PromptBatch(tuple(prompts)))
        schedule = self.sampler.schedule()
        draw = self.noise_position  # keys every random draw of this iteration (== iteration unless resumed oddly)
        stochastic = self.stochastic_mask(schedule.num_steps, draw)
        with self.timed("rollout"):
            traj = self.rollout(draw, cond, schedule, stochastic)
        with self.timed("decode"):
            pixels = self.decode(traj.final)
        texts = [prompts[int(r)].text for r in traj.prompt_rows]
        failure: RewardFailure | None = None
        try:
            with self.timed("reward"):
                scored = score_samples(self.rewards, pixels, texts, traj.group_ids, self.cfg.reward_failure)
        except RewardFailure as exc:
            failure = exc
            self.counters["reward_failures"] += 1
        if self.engine.any_rank(failure is not None):  # every rank stops (and checkpoints) together
            raise failure or RewardFailure("?", "a reward failed on another rank")
        self.counters["reward_failures"] += scored.failures
        self.counters["dropped_groups"] += scored.dropped_groups
        group_ids = traj.group_ids[scored.keep]
        advantages = torch.zeros(traj.num_samples)
        stats = {"loss": math.nan, "clip_fraction": math.nan, "ratio_mean": math.nan, "grad_norm": math.nan}
        if scored.keep.numel():
            advantages[scored.keep] = self.algorithm.advantages(scored.scores, group_ids)
        if self.engine.any_rank(not bool(torch.isfinite(advantages).all())):
            raise TrainingError(f"optimizer {self.run.optimizer.name!r} returned non-finite advantages")
        chosen = torch.zeros(0, dtype=torch.long)
        if self.world_size > 1:  # same backward/step calls on every rank: dropped groups stay, with A = 0
            chosen = self.algorithm.select_samples(advantages, traj.group_ids)
        elif scored.keep.numel():
            chosen = scored.keep[self.algorithm.select_samples(advantages[scored.keep], group_ids)]
        if chosen.numel():
            with self.timed("update"):
                stats = self.update(draw, traj, cond, schedule, stochastic, advantages, chosen)
        weights = torch.tensor(scored.scores.weights).unsqueeze(1)
        combined = (scored.scores.values * weights).sum(0) if scored.keep.numel() else torch.zeros(0)
        zero_groups = sum(
            int(bool((advantages[traj.group_ids == gid] == 0).all())) for gid in torch.unique(group_ids)
        )
        local = {
            "reward_mean": float(combined.mean()) if combined.numel() else math.nan,
            "reward_std": float(combined.std()) if combined.numel() > 1 else 0.0,
            **{f"reward/{n}": float(v.mean()) if v.numel() else math.nan for n, v in zip(scored.scores.names, scored.scores.values, strict=True)},
            **stats,
            "zero_advantage_groups": float(zero_groups),
            "dropped_groups": float(scored.dropped_groups),
        }
        keys = sorted(local)
        reduced = dict(zip(keys, self.engine.all_reduce_mean([local[k] for k in keys]), strict=True))
        reduced["zero_advantage_groups"] *= self.world_size
        reduced["dropped_groups"] *= self.world_size
        record: dict[str, Any] = {"iteration": iteration, **reduced, "seconds": time.perf_counter() - began}
        record.update({f"time/{phase}_s": seconds for phase, seconds in self.phase_times.items()})  # this rank's
        record["skipped_updates"] = self.counters["skipped_updates"]
        record["reward_failures"] = self.counters["reward_failures"]
        self.data_cursor += self.cfg.train.prompts_per_iteration
        self.noise_position += 1
        self._last_pixels = pixels
        return record

    def stochastic_mask(self, num_steps: int, iteration: int) -> torch.Tensor:
        """Which steps the sampler takes stochastically this iteration (all, unless it has a window)."""
        mask_fn = getattr(self.sampler, "stochastic_steps", None)
        return mask_fn(num_steps, iteration) if mask_fn else torch.ones(num_steps, dtype=torch.bool)

    # --------------------------------------------------------------------------- bookkeeping

    def capture_state(self, iteration: int, optimizer_meta: dict[str, Any]) -> dict[str, Any]:
        """The training state every rank shares, JSON-safe (``state.json``): step counter, data
        cursor, sampler RNG position, LR schedule, optimizer hyper-parameters and counters."""
        return {
            "iteration": iteration,
            "data_cursor": self.data_cursor,
            "sampler_rng": {"seed": self.cfg.seed, "position": self.noise_position},
            "lr_schedule": self.lr_schedule.state_dict(),
            "optimizer": optimizer_meta,
            "counters": {**self.counters, "nonfinite_in_a_row": self.nonfinite_in_a_row},
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
        staging = ckpt.staging_path(self.output_dir, iteration)

        def shared_files() -> Path:
            ckpt.write_tensors(staging, "model.safetensors", model)
            ckpt.write_tensors(staging, "optimizer.safetensors", opt_tensors)
            ckpt.write_json(staging, ckpt.STATE, self.capture_state(iteration, opt_meta))
            return ckpt.commit(self.output_dir, iteration, self.cfg.train.keep_checkpoints)

        rank_state = {"rank": self.rank, "rng": ckpt.rng_state()}
        self._save_stage(iteration, lambda: ckpt.begin(self.output_dir, iteration) if self.is_main else None)
        self._save_stage(iteration, lambda: ckpt.write_json(staging, ckpt.rank_file(self.rank), rank_state))
        path = self._save_stage(iteration, shared_files if self.is_main else lambda: None)
        if self.is_main:
            self.hooks.hook.dancecore_checkpoint_saved(iteration=iteration, path=path)
        return path

    def _save_stage(self, iteration: int, stage: Any) -> Any:
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
            raise error or ckpt.CheckpointError(f"checkpoint {iteration} failed on another rank")
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
        """Restore every piece of training state from a checkpoint, then verify that the live
        state equals the saved one (a piece forgotten here is an error, not a silent drift)."""
        state = loaded.state
        missing = [k for k in ("data_cursor", "sampler_rng", "lr_schedule", "optimizer", "counters") if k not in state]
        if missing:
            raise ckpt.CheckpointError(f"checkpoint {loaded.path} lacks {', '.join(missing)} (older format?)")
        if state["sampler_rng"]["seed"] != self.cfg.seed:
            raise ckpt.CheckpointError(
                f"checkpoint {loaded.path} was written with seed {state['sampler_rng']['seed']}, the config says "
                f"{self.cfg.seed}: resuming would not continue the same run"
            )
        skip = ckpt.skipped_restores()  # test-only fault hook: empty in real runs
        opt_tensors, opt_meta = loaded.optimizer, state["optimizer"]
        if "optimizer" in skip:
            opt_tensors, opt_meta = self.engine.optimizer_state()
        self.engine.load_state(loaded.model, opt_tensors, opt_meta)
        if "schedule" not in skip:
            self.lr_schedule.load_state_dict(state["lr_schedule"])
        if "data_cursor" not in skip:
            self.data_cursor = int(state["data_cursor"])
        if "sampler_rng" not in skip:
            self.noise_position = int(state["sampler_rng"]["position"])
        if "step_counter" not in skip:
            self.start_iteration = loaded.iteration
        if "counters" not in skip:
            counters = dict(state["counters"])
            self.nonfinite_in_a_row = int(counters.pop("nonfinite_in_a_row", 0))
            self.counters.update(counters)
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
        if loaded.rank_state is not None and ckpt.state_differences(loaded.rank_state["rng"], ckpt.rng_state()):
            problems.append(f"RNG states of rank {self.rank}")
        if problems:
            raise ckpt.CheckpointError(f"resume from {loaded.path} did not restore: {', '.join(problems)}")

    def train(self, resume: bool = False, log: Any = print, *, allow_pickle: bool = False) -> str:
        """Run all iterations. Returns 'finished' or 'stopped' (signal); raises on failure.
        ``allow_pickle`` lets resume load pickle files the verified manifest lists (weights only)."""
        if resume:
            for message in self.resume(allow_pickle=allow_pickle):
                if self.is_main:
                    log(message)
        else:
            error: OutputDirError | None = None
            try:
                refuse_earlier_run(self.output_dir)
            except OutputDirError as exc:
                error = exc
            if self.engine.any_rank(error is not None):  # every rank refuses together
                raise error or OutputDirError(f"output_dir {self.output_dir} already holds a run (seen on another rank)")
        observers = open_observers(self.cfg, self.output_dir, enabled=self.is_main, log=log)  # TensorBoard, wandb
        self.stop.install()
        self.hooks.hook.dancecore_run_start(config=self.cfg, output_dir=self.output_dir)
        total = self.cfg.train.iterations
        bar = None
        if self.is_main and self.cfg.logging.progress_bar:
            from tqdm import tqdm

            bar = tqdm(
                total=total, initial=self.start_iteration, desc="GRPO", unit="it", dynamic_ncols=True,
                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}, ETA {remaining}, {rate_fmt}{postfix}]",
            )
        status = "finished"
        done = self.start_iteration
        try:
            for it in range(self.start_iteration, total):
                try:
                    record = self.iteration(it)
                except RewardFailure:
                    path = self.save(it)  # nothing of the finished iterations is lost
                    if self.is_main:
                        log(f"reward failure at iteration {it}: checkpoint {path}; fix the reward, then --resume")
                    raise
                done = it + 1
                if self.is_main:
                    self.metrics.append(record)
                    observers.scalars(it, record)
                    if self.write_samples(it, total):
                        observers.images(it, self._last_pixels, self.group_size)
                    if bar is not None:
                        bar.set_postfix(reward=f"{record['reward_mean']:.4g}", clip=f"{record['clip_fraction']:.2f}")
                        bar.update(1)
                self.hooks.hook.dancecore_iteration_end(iteration=it, metrics=record)
                stop = self.engine.any_rank(self.stop.requested)
                if done % self.cfg.train.checkpoint_every == 0 or done == total or stop:
                    self.save(done)
                if stop:
                    status = "stopped"
                    break
        except BaseException:
            self.hooks.hook.dancecore_run_end(output_dir=self.output_dir, status="failed")
            raise
        finally:
            if bar is not None:
                bar.close()
            observers.close()
            self.stop.uninstall()
        if self.is_main and status == "finished" and done == total:
            plot_reward_curve(self.metrics.read(), self.output_dir / "reward_curve.png")
        self.hooks.hook.dancecore_run_end(output_dir=self.output_dir, status=status)
        return status

    def write_samples(self, iteration: int, total: int) -> bool:
        """Sample grids at the first and last iteration, and every ``sample_every`` iterations;
        returns whether this iteration's were written."""
        every = self.cfg.train.sample_every
        if not (iteration in (0, total - 1) or (every and iteration % every == 0)):
            return False
        stem = self.output_dir / "samples" / f"iter-{iteration:06d}"
        save_grid(self._last_pixels, stem.with_suffix(".png"), self.group_size)
        if self._last_pixels.ndim == 5:  # videos: one clip per group (its first member)
            from dancecore.video import write_video

            for group, start in enumerate(range(0, self._last_pixels.shape[0], self.group_size)):
                write_video(self._last_pixels[start], stem.parent / f"{stem.name}-group{group:02d}.mp4")
        return True
