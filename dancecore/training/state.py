"""The training state: everything a checkpoint saves and resume restores, as one typed record.

``state.json`` of a checkpoint is :meth:`TrainingState.to_json` (plus the optimizer's
hyper-parameters, the world size and the config, written beside it by the trainer). Restore and the
post-restore check both walk :data:`PIECES`, so a new piece of state cannot be saved and then
forgotten by resume: add a field here, name it in :data:`PIECES`, and both follow.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from dancecore.errors import CheckpointError

#: Counters carried across resume (``nonfinite_in_a_row`` is stored with them).
COUNTERS = ("skipped_updates", "reward_failures", "dropped_groups")


@dataclass
class TrainingState:
    """What a run must restore to continue bit for bit.

    ``iteration`` is the next iteration to run; ``data_cursor`` the position in the prompt order;
    ``noise_position`` the sampler RNG's state (noise is drawn from generators keyed by seed, this
    position and the sample, so the position *is* the state); ``lr_schedule`` the LR schedule's
    state; ``counters`` the failure/skip counters; ``algorithm`` the algorithm's own state
    (empty unless it is a :class:`~dancecore.contracts.protocols.StatefulAlgorithm`).
    """

    seed: int
    iteration: int = 0
    data_cursor: int = 0
    noise_position: int = 0
    lr_schedule: dict[str, Any] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    nonfinite_in_a_row: int = 0
    algorithm: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The JSON form written to ``state.json`` (checkpoint format 1)."""
        data: dict[str, Any] = {
            "iteration": self.iteration,
            "data_cursor": self.data_cursor,
            "sampler_rng": {"seed": self.seed, "position": self.noise_position},
            "lr_schedule": dict(self.lr_schedule),
            "counters": {**self.counters, "nonfinite_in_a_row": self.nonfinite_in_a_row},
        }
        if self.algorithm:
            data["algorithm"] = dict(self.algorithm)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str = "checkpoint") -> TrainingState:
        """Parse :meth:`to_json`'s form; a missing piece is a :class:`CheckpointError` naming it."""
        missing = [k for k in ("data_cursor", "sampler_rng", "lr_schedule", "counters") if k not in data]
        if missing:
            raise CheckpointError(f"{where} lacks {', '.join(missing)} (older format?)")
        counters = {k: int(v) for k, v in data["counters"].items()}
        nonfinite = counters.pop("nonfinite_in_a_row", 0)
        return cls(
            seed=int(data["sampler_rng"]["seed"]),
            iteration=int(data.get("iteration", 0)),
            data_cursor=int(data["data_cursor"]),
            noise_position=int(data["sampler_rng"]["position"]),
            lr_schedule=dict(data["lr_schedule"]),
            counters={**dict.fromkeys(COUNTERS, 0), **counters},
            nonfinite_in_a_row=int(nonfinite),
            algorithm=dict(data.get("algorithm", {})),
        )


#: Restorable piece (the names the fault suite's ``DANCECORE_FAULT_SKIP_RESTORE`` uses) -> the
#: fields of :class:`TrainingState` it covers.
PIECES: dict[str, tuple[str, ...]] = {
    "step_counter": ("iteration",),
    "data_cursor": ("data_cursor",),
    "sampler_rng": ("noise_position",),
    "schedule": ("lr_schedule",),
    "counters": ("counters", "nonfinite_in_a_row"),
    "algorithm": ("algorithm",),
}


def restore_fields(live: TrainingState, saved: TrainingState, skip: set[str]) -> TrainingState:
    """``live`` with every piece of ``saved`` copied in, except the pieces named in ``skip``."""
    updates: dict[str, Any] = {}
    for piece, names in PIECES.items():
        if piece not in skip:
            updates.update({name: getattr(saved, name) for name in names})
    return dataclasses.replace(live, **updates)


def _all_fields_covered() -> None:
    covered = {name for names in PIECES.values() for name in names}
    missing = {f.name for f in dataclasses.fields(TrainingState)} - covered - {"seed"}
    assert not missing, f"TrainingState fields not restored by any piece: {missing}"


_all_fields_covered()
