"""The run loop around the iterations: output-directory checks, signals, the progress bar,
observers (TensorBoard/wandb), lifecycle hooks, sample grids and the checkpoint cadence."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dancecore import checkpoint as ckpt
from dancecore.errors import OutputDirError, RewardFailure
from dancecore.outputs.images import plot_reward_curve, save_grid
from dancecore.outputs.observers import open_observers

if TYPE_CHECKING:
    from dancecore.training.trainer import Trainer


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


def _progress_bar(trainer: Trainer, total: int) -> Any:
    if not (trainer.is_main and trainer.cfg.logging.progress_bar):
        return None
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=trainer.start_iteration,
        desc="GRPO",
        unit="it",
        dynamic_ncols=True,
        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}, ETA {remaining}, {rate_fmt}{postfix}]",
    )


def _begin(trainer: Trainer, resume: bool, log: Any, allow_pickle: bool) -> None:
    if resume:
        for message in trainer.resume(allow_pickle=allow_pickle):
            if trainer.is_main:
                log(message)
        return
    error: OutputDirError | None = None
    try:
        refuse_earlier_run(trainer.output_dir)
    except OutputDirError as exc:
        error = exc
    if trainer.engine.any_rank(error is not None):  # every rank refuses together
        raise error or OutputDirError(f"output_dir {trainer.output_dir} already holds a run (seen on another rank)")


def run_loop(trainer: Trainer, resume: bool = False, log: Any = print, *, allow_pickle: bool = False) -> str:
    """Run all iterations. Returns 'finished' or 'stopped' (signal); raises on failure."""
    _begin(trainer, resume, log, allow_pickle)
    observers = open_observers(trainer.cfg, trainer.output_dir, enabled=trainer.is_main, log=log)  # TensorBoard, wandb
    trainer.stop.install()
    trainer.hooks.hook.dancecore_run_start(config=trainer.cfg, output_dir=trainer.output_dir)
    total = trainer.cfg.train.iterations
    bar = _progress_bar(trainer, total)
    status = "finished"
    done = trainer.start_iteration
    try:
        if done == 0:
            evaluate_if_due(trainer, 0, total, observers, log)
        for it in range(trainer.start_iteration, total):
            try:
                record = trainer.iteration(it)
            except RewardFailure:
                path = trainer.save(it)  # nothing of the finished iterations is lost
                if trainer.is_main:
                    log(f"reward failure at iteration {it}: checkpoint {path}; fix the reward, then --resume")
                raise
            done = it + 1
            if trainer.is_main:
                _publish(trainer, it, total, record, observers, bar)
            trainer.hooks.hook.dancecore_iteration_end(iteration=it, metrics=record)
            evaluate_if_due(trainer, done, total, observers, log)
            stop = trainer.engine.any_rank(trainer.stop.requested)
            if done % trainer.cfg.train.checkpoint_every == 0 or done == total or stop:
                trainer.save(done)
            if stop:
                status = "stopped"
                break
    except BaseException:
        trainer.hooks.hook.dancecore_run_end(output_dir=trainer.output_dir, status="failed")
        raise
    finally:
        if bar is not None:
            bar.close()
        observers.close()
        trainer.stop.uninstall()
    if trainer.is_main and status == "finished" and done == total:
        plot_reward_curve(trainer.metrics.read(), trainer.output_dir / "reward_curve.png")
    trainer.hooks.hook.dancecore_run_end(output_dir=trainer.output_dir, status=status)
    return status


def _publish(trainer: Trainer, it: int, total: int, record: dict[str, Any], observers: Any, bar: Any) -> None:
    """Rank 0: metrics.jsonl, observers, sample grids, the progress bar."""
    trainer.metrics.append(record)
    observers.scalars(it, record)
    if write_samples(trainer, it, total):
        observers.images(it, trainer._last_pixels, trainer.group_size)
    if bar is not None:
        bar.set_postfix(reward=f"{record['reward_mean']:.4g}", clip=f"{record['clip_fraction']:.2f}")
        bar.update(1)


def evaluate_if_due(trainer: Trainer, done: int, total: int, observers: Any, log: Any = print) -> None:
    """The held-out evaluation of the weights after ``done`` iterations, when the schedule says so."""
    evaluation = trainer.evaluation
    if evaluation is None or not evaluation.due(done, total):
        return
    record = evaluation.run(trainer, done)
    alarm = record.get("alarm")
    if trainer.is_main and record:
        observers.scalars(done, {k: v for k, v in record.items() if k != "alarm"})
        if alarm:
            log(f"warning: {alarm}")
    alarm_config = trainer.cfg.eval.divergence_alarm if trainer.cfg.eval else None
    if alarm_config is not None and alarm_config.stop and trainer.engine.any_rank(bool(alarm)):
        trainer.stop.requested = True  # the loop checkpoints and stops at this iteration boundary
        if trainer.is_main:
            log("stopping: eval.divergence_alarm.stop is set")


def write_samples(trainer: Trainer, iteration: int, total: int) -> bool:
    """Sample grids at the first and last iteration, and every ``sample_every`` iterations;
    returns whether this iteration's were written."""
    every = trainer.cfg.train.sample_every
    if not (iteration in (0, total - 1) or (every and iteration % every == 0)):
        return False
    pixels = trainer._last_pixels
    stem = trainer.output_dir / "samples" / f"iter-{iteration:06d}"
    save_grid(pixels, stem.with_suffix(".png"), trainer.group_size)
    if pixels.ndim == 5:  # videos: one clip per group (its first member)
        from dancecore.outputs.video import write_video

        for group, start in enumerate(range(0, pixels.shape[0], trainer.group_size)):
            write_video(pixels[start], stem.parent / f"{stem.name}-group{group:02d}.mp4")
    return True
