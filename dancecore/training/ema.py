"""An exponential moving average of the trained weights: fp32, optionally in CPU memory, updated
every ``every`` optimizer updates, saved in every checkpoint (``ema.safetensors``) and restored
bit for bit on resume. Evaluation can swap it in (:meth:`EmaWeights.swapped_in`), and with
``rollout: true`` so do rollouts: the average is then DiffusionNFT's soft-updated old policy."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from dancecore.config.schema import EmaConfig
from dancecore.training.engine import TrainEngine, load_trainable


class EmaWeights:
    """``ema = decay * ema + (1 - decay) * weights`` over the engine's trainable weights (by name)."""

    def __init__(self, config: EmaConfig, engine: TrainEngine, device: torch.device) -> None:
        self.config = config
        self.engine = engine
        self.device = torch.device("cpu") if config.device == "cpu" else device
        self.tensors = {
            k: v.detach().to(self.device, torch.float32, copy=True) for k, v in engine.model_state().items()
        }

    def due(self, updates: int) -> bool:
        """Whether the average is updated after the ``updates``-th successful optimizer update."""
        return updates > 0 and updates % self.config.every == 0

    def decay_at(self, updates: int) -> float:
        """The decay used after the ``updates``-th optimizer update: constant, or with ``ramp``
        ``min(ramp (updates - ramp_after), decay)`` and 0 before ``ramp_after`` (DiffusionNFT's
        schedule for its old policy)."""
        c = self.config
        if c.ramp is None:
            return c.decay
        return 0.0 if updates < c.ramp_after else min(c.ramp * (updates - c.ramp_after), c.decay)

    @torch.no_grad()
    def update(self, updates: int = 0) -> None:
        """Fold the current weights into the average (the decay of the ``updates``-th update)."""
        decay = self.decay_at(updates)
        for name, weights in self.engine.model_state().items():
            average = self.tensors[name]
            average.mul_(decay).add_(weights.detach().to(average.device, torch.float32), alpha=1.0 - decay)

    def state(self) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint stores."""
        return {k: v.cpu() for k, v in self.tensors.items()}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore from a checkpoint (names must match the trainable weights)."""
        missing = sorted(set(self.tensors) - set(tensors))
        if missing:
            raise KeyError(f"the checkpoint's EMA lacks {missing[:3]}")
        self.tensors = {k: tensors[k].to(self.device, torch.float32, copy=True) for k in self.tensors}

    @contextlib.contextmanager
    def swapped_in(self, module: torch.nn.Module) -> Iterator[None]:
        """Inside the block the module holds the EMA weights; the trained weights come back after."""
        trained = {k: v.detach().clone() for k, v in self.engine.model_state().items()}
        load_trainable(module, self.tensors)
        try:
            yield
        finally:
            load_trainable(module, trained)
