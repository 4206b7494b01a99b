"""What goes into a checkpoint besides files: the restore check (live state vs saved), the optimizer
state flattened to tensors + JSON, global RNG states, and the test-only fault hooks of resume."""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from dancecore.checkpoint.store import RESTORABLE_PIECES
from dancecore.errors import CheckpointError

# ------------------------------------------------------------------------ restore verification


def _json_normal(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True))


def state_differences(saved: dict[str, Any], live: dict[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    """Top-level keys whose JSON values differ between a saved and a live state."""
    keys = sorted((set(saved) | set(live)) - set(ignore))
    return [k for k in keys if _json_normal(saved.get(k)) != _json_normal(live.get(k))]


def tensors_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Same names, dtypes, shapes and bits."""
    return set(a) == set(b) and all(
        a[k].dtype == b[k].dtype and torch.equal(a[k].detach().cpu(), b[k].detach().cpu()) for k in a
    )


# ------------------------------------------------------------------------ test-only fault hooks


def skipped_restores() -> set[str]:
    """Test-only: the pieces ``DANCECORE_FAULT_SKIP_RESTORE`` tells resume not to restore."""
    raw = os.environ.get("DANCECORE_FAULT_SKIP_RESTORE", "")
    pieces = {p.strip() for p in raw.split(",") if p.strip()}
    unknown = pieces - set(RESTORABLE_PIECES)
    if unknown:
        raise CheckpointError(f"DANCECORE_FAULT_SKIP_RESTORE names unknown pieces {sorted(unknown)}")
    return pieces


def restore_check_disabled() -> bool:
    """Test-only: ``DANCECORE_FAULT_SKIP_RESTORE_CHECK=1`` disables the post-restore verification."""
    return os.environ.get("DANCECORE_FAULT_SKIP_RESTORE_CHECK", "") == "1"


# ------------------------------------------------------------------------ optimizer (de)serialise


def flatten_optimizer_state(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split a torch optimizer ``state_dict`` into tensors (for safetensors) and JSON metadata."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param_id, entries in state_dict["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{param_id}.{key}"] = value
            else:
                scalars.setdefault(str(param_id), {})[key] = value
    return tensors, {"param_groups": [portable_param_group(g) for g in state_dict["param_groups"]], "scalars": scalars}


# How an optimizer computes its update (kernel choice), not what it updates: never saved, so a
# checkpoint resumes under any engine, and each engine keeps its own choice on load.
IMPLEMENTATION_KEYS = ("fused", "foreach", "capturable", "differentiable")


def portable_param_group(group: dict[str, Any]) -> dict[str, Any]:
    """An optimizer ``param_group`` as a checkpoint stores it: without :data:`IMPLEMENTATION_KEYS`."""
    return {k: v for k, v in group.items() if k not in IMPLEMENTATION_KEYS}


def unflatten_optimizer_state(
    tensors: dict[str, torch.Tensor], meta: dict[str, Any], current_groups: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Inverse of :func:`flatten_optimizer_state`; ``current_groups`` (the live optimizer's
    ``param_groups``) supply the implementation switches the checkpoint does not carry."""
    state: dict[Any, dict[str, Any]] = {}
    for name, value in tensors.items():
        param_id, key = name.split(".", 1)
        state.setdefault(int(param_id), {})[key] = value
    for param_id, entries in meta.get("scalars", {}).items():
        state.setdefault(int(param_id), {}).update(entries)
    groups = [dict(group) for group in meta["param_groups"]]
    for group, live in zip(groups, current_groups or [], strict=False):
        group.update({k: live[k] for k in IMPLEMENTATION_KEYS if k in live})
    return {"state": state, "param_groups": groups}


def rng_state() -> dict[str, Any]:
    """Global RNG states (python, numpy, torch CPU/CUDA) as JSON-safe values."""
    import random

    import numpy as np

    version, internal, gauss = random.getstate()
    np_state: Any = np.random.get_state()
    out: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        out["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return out


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved."""
    import random

    import numpy as np

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
