"""The learning-rate schedule: constant (the paper's setting), optionally after a linear warmup and
optionally followed by a cosine decay, driven by the number of optimizer updates actually applied
(skipped non-finite updates do not count).

Its state is that one counter; checkpoints save it and resume restores it."""

from __future__ import annotations

import math
from typing import Any


class WarmupSchedule:
    """``lr = base_lr * min(1, (updates + 1) / warmup_updates)`` during the warmup; then constant, or with
    ``decay_updates`` a cosine from ``base_lr`` to ``base_lr * min_ratio`` reached at update ``decay_updates``
    (and held after it)::

        progress = (updates - warmup) / (decay_updates - warmup)
        lr = base_lr * (min_ratio + (1 - min_ratio) * (1 + cos(pi * progress)) / 2)
    """

    def __init__(
        self, base_lr: float, warmup_updates: int = 0, decay_updates: int | None = None, min_ratio: float = 0.0
    ) -> None:
        if decay_updates is not None and decay_updates <= warmup_updates:
            raise ValueError(f"the decay must end after the warmup ({decay_updates} <= {warmup_updates} updates)")
        self.base_lr = base_lr
        self.warmup_updates = warmup_updates
        self.decay_updates = decay_updates
        self.min_ratio = min_ratio
        self.updates = 0

    @property
    def active(self) -> bool:
        """Whether the learning rate changes at all (otherwise the optimizer's own lr is left alone)."""
        return self.warmup_updates > 0 or self.decay_updates is not None

    def learning_rate(self) -> float:
        """The learning rate of the next update."""
        if self.updates < self.warmup_updates:
            return self.base_lr * (self.updates + 1) / self.warmup_updates
        if self.decay_updates is None:
            return self.base_lr
        progress = min(1.0, (self.updates - self.warmup_updates) / (self.decay_updates - self.warmup_updates))
        return self.base_lr * (self.min_ratio + (1.0 - self.min_ratio) * (1.0 + math.cos(math.pi * progress)) / 2)

    def apply(self, optimizer: Any) -> None:
        """Set the next update's learning rate on every parameter group of ``optimizer``."""
        if self.active:
            for group in optimizer.param_groups:
                group["lr"] = self.learning_rate()

    def step(self) -> None:
        """Count an applied update."""
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        """JSON-safe state (the base rate and warmup length are config, not state)."""
        return {"updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the update counter."""
        self.updates = int(state["updates"])
