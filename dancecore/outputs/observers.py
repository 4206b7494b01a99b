"""Live views of a run besides ``metrics.jsonl``: TensorBoard (on by default) and Weights & Biases
(opt-in). Both are written by rank 0 only.

TensorBoard needs the ``tensorboard`` package, a dependency of dancecore itself. When it is
missing anyway (an environment installed without dependencies) and the config did not ask for it explicitly, the run says so in one line and goes on
without it; when ``logging.tensorboard: true`` is written in the config, the run stops before the
first iteration with the same message. wandb is imported only when ``logging.wandb`` is true.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from dancecore.errors import ObservabilityError

# Metric names of metrics.jsonl -> TensorBoard/wandb tags, grouped into sections.
_TAGS = {
    "reward_mean": "reward/mean",
    "reward_std": "reward/std",
    "loss": "train/loss",
    "clip_fraction": "train/clip_fraction",
    "ratio_mean": "train/ratio_mean",
    "grad_norm": "train/grad_norm",
    "learning_rate": "train/learning_rate",
    "zero_advantage_groups": "health/zero_advantage_groups",
    "dropped_groups": "health/dropped_groups",
    "skipped_updates": "health/skipped_updates",
    "reward_failures": "health/reward_failures",
    "seconds": "time/iteration_s",
}


def scalar_tags(record: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of a metrics record under their logging tags.

    Per-reward means (``reward/<name>``) and phase seconds (``time/<phase>_s``) keep their names;
    any other number goes under ``metrics/``. ``iteration`` is the step, not a scalar.
    """
    out: dict[str, float] = {}
    for key, value in record.items():
        if key == "iteration" or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        tag = _TAGS.get(key) or (key if key.startswith(("reward/", "time/", "eval/")) else f"metrics/{key}")
        out[tag] = float(value)
    return out


class Writer(Protocol):
    """One logging backend."""

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Log scalars at ``step``."""
        ...

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        """Log an (H, W, 3) uint8 image at ``step``."""
        ...

    def close(self) -> None:
        """Flush and release."""
        ...


class TensorBoardWriter:
    """Event files under ``<output_dir>/tensorboard`` through ``torch.utils.tensorboard``."""

    def __init__(self, log_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ImportError(str(exc) or "tensorboard is not installed") from exc
        self.log_dir = log_dir
        self.writer = SummaryWriter(log_dir=str(log_dir), flush_secs=10)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """One scalar per tag; NaN is written as is (TensorBoard shows a gap)."""
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, global_step=step)

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        """An HWC uint8 image."""
        self.writer.add_image(tag, image, global_step=step, dataformats="HWC")

    def close(self) -> None:
        """Flush the event file."""
        self.writer.close()


class WandbWriter:
    """A Weights & Biases run (``logging.wandb_project``), its files under ``<output_dir>/wandb``.
    Set ``WANDB_MODE=offline`` to log without an account or network."""

    def __init__(self, project: str, output_dir: Path, config: dict[str, Any]) -> None:
        try:
            import wandb
        except ImportError:
            raise ObservabilityError(
                "logging.wandb is true but the `wandb` package is not installed: "
                "pip install 'dancecore[wandb]' (or set logging.wandb=false)"
            ) from None
        self.wandb = wandb
        try:
            self.run = wandb.init(project=project, dir=str(output_dir), config=config)
        except Exception as exc:  # wandb raises many types (auth, network, usage)
            raise ObservabilityError(
                f"logging.wandb: wandb.init failed ({type(exc).__name__}: {exc}); log in with `wandb login`, "
                "set WANDB_MODE=offline, or set logging.wandb=false"
            ) from None

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """One wandb.log call per iteration."""
        self.run.log(values, step=step)

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        """A wandb.Image."""
        self.run.log({tag: self.wandb.Image(image)}, step=step)

    def close(self) -> None:
        """Finish the wandb run."""
        self.run.finish()


class Observers:
    """The backends of one run (none on ranks other than 0). Failures while logging are reported
    once per backend and that backend is dropped: a dashboard never stops training."""

    def __init__(self, writers: list[Writer] | None = None, log: Callable[[str], Any] = print) -> None:
        self.writers = list(writers or [])
        self.log = log

    def _each(self, action: Callable[[Writer], Any]) -> None:
        for writer in list(self.writers):
            try:
                action(writer)
            except Exception as exc:
                self.writers.remove(writer)
                self.log(f"warning: {type(writer).__name__} failed ({type(exc).__name__}: {exc}); logging to it stops")

    def scalars(self, iteration: int, record: dict[str, Any]) -> None:
        """Log an iteration's metrics record (phase seconds included)."""
        if self.writers:
            values = scalar_tags(record)
            self._each(lambda w: w.scalars(iteration, values))

    def images(self, iteration: int, pixels: torch.Tensor, columns: int | None = None) -> None:
        """Log a sample grid (videos as a contact sheet of their frames)."""
        if self.writers:
            from dancecore.outputs.images import image_grid

            grid = np.asarray(image_grid(pixels, columns))
            self._each(lambda w: w.image(iteration, "samples", grid))

    def close(self) -> None:
        """Flush and close every backend."""
        self._each(lambda w: w.close())
        self.writers.clear()


def open_observers(
    config: Any, output_dir: Path, *, enabled: bool = True, log: Callable[[str], Any] = print
) -> Observers:
    """Start the backends ``config.logging`` asks for (nothing when ``enabled`` is false, i.e. on
    ranks other than 0). Raises :class:`ObservabilityError` for a backend asked for explicitly
    that cannot start."""
    if not enabled:
        return Observers(log=log)
    logging = config.logging
    writers: list[Writer] = []
    if logging.tensorboard:
        log_dir = Path(output_dir) / "tensorboard"
        try:
            writers.append(TensorBoardWriter(log_dir))
        except ImportError as exc:
            message = (
                f"TensorBoard logging is on but the `tensorboard` package cannot be imported ({exc}): "
                "pip install 'dancecore[tensorboard]', or set logging.tensorboard=false"
            )
            if "tensorboard" in logging.model_fields_set:
                raise ObservabilityError(message) from None
            log(f"note: {message}; continuing without TensorBoard")
    if logging.wandb:
        try:
            writers.append(WandbWriter(logging.wandb_project, Path(output_dir), json.loads(config.model_dump_json())))
        except ObservabilityError:
            for writer in writers:
                writer.close()
            raise
    return Observers(writers, log=log)
