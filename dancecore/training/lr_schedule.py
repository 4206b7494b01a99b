"""The learning-rate schedule: constant (the paper's setting) or a linear warmup, driven by the
number of optimizer updates actually applied (skipped non-finite updates do not count).

Its state is that one counter; checkpoints save it and resume restores it."""

from __future__ import annotations

from typing import Any


class WarmupSchedule:
    """``lr = base_lr * min(1, (updates + 1) / warmup_updates)``; constant when ``warmup_updates`` is 0."""

    def __init__(self, base_lr: float, warmup_updates: int = 0) -> None:
        self.base_lr = base_lr
        self.warmup_updates = warmup_updates
        self.updates = 0

    @property
    def active(self) -> bool:
        """Whether the learning rate changes at all (otherwise the optimizer's own lr is left alone)."""
        return self.warmup_updates > 0

    def learning_rate(self) -> float:
        """The learning rate of the next update."""
        if not self.active:
            return self.base_lr
        return self.base_lr * min(1.0, (self.updates + 1) / self.warmup_updates)

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
