"""Reading checkpoints: manifest verification, the resume plan (newest valid checkpoint), and
loading tensors and state (never unpickling unless asked, and then only manifest-listed files)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from dancecore.checkpoint.store import (
    _COMMITTED,
    _SAFE_NAME,
    _STAGING,
    MANIFEST,
    PICKLE_SUFFIXES,
    STATE,
    Checkpoint,
    ResumePlan,
    _canonical,
    _manifest_text,
    _sha256,
    checkpoint_dir,
    rank_file,
)
from dancecore.errors import CheckpointError

# ---------------------------------------------------------------------------------- reading


def _read_manifest(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    manifest_path = path / MANIFEST
    if manifest_path.is_symlink() or not manifest_path.is_file():
        return None, "manifest.json is missing"
    try:
        raw = manifest_path.read_bytes()
        data = json.loads(raw)
    except (ValueError, OSError) as exc:
        return None, f"manifest.json is unreadable ({exc})"
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        return None, "manifest.json is malformed"
    digest = data.pop("manifest_sha256", None)
    try:
        canonical = _canonical(data)
    except ValueError:
        return None, "manifest.json is malformed"
    if digest != hashlib.sha256(canonical.encode()).hexdigest() or raw != _manifest_text(data).encode():
        return None, "manifest.json does not match its own digest (corrupted)"
    return data, None


def _listed_file_problem(path: Path, name: Any, entry: Any) -> str | None:
    """Why one file the manifest lists does not verify (None when it does)."""
    if not isinstance(name, str) or not _SAFE_NAME.match(name) or name == MANIFEST:
        return f"manifest lists an invalid file name {name!r}"
    file = path / name
    if file.is_symlink() or not file.is_file():
        return f"{name} is missing"
    size = file.stat().st_size
    if not isinstance(entry, dict) or size != entry.get("bytes"):
        return f"{name} has {size} bytes, manifest says {entry.get('bytes') if isinstance(entry, dict) else '?'}"
    if _sha256(file) != entry.get("sha256"):
        return f"{name} does not match its SHA-256 in the manifest"
    return None


def verify(path: Path) -> str | None:
    """Why the checkpoint at ``path`` is invalid, or None when its manifest verifies.

    Checks: a real directory; a manifest whose own digest matches; every listed file present
    (no symlink), with the listed size and SHA-256; no file the manifest does not list; the
    required files listed; and the manifest's iteration equal to the directory's.
    """
    if path.is_symlink():
        return "it is a symlink"
    if not path.is_dir():
        return "not a directory"
    manifest, problem = _read_manifest(path)
    if manifest is None:
        return problem
    files: dict[str, Any] = manifest["files"]
    for name, entry in files.items():
        problem = _listed_file_problem(path, name, entry)
        if problem:
            return problem
    extra = sorted(p.name for p in path.iterdir() if p.name != MANIFEST and p.name not in files)
    if extra:
        return f"{extra[0]} is not listed in the manifest"
    for stem in ("model", "optimizer"):
        if not any(n.split(".")[0] == stem for n in files):
            return f"manifest does not list a {stem} file"
    if STATE not in files:
        return f"manifest does not list {STATE}"
    match = _COMMITTED.match(path.name)
    if match and int(match.group(1)) != manifest.get("iteration"):
        return f"manifest is for iteration {manifest.get('iteration')}, directory for {int(match.group(1))}"
    return None


def committed_checkpoints(output_dir: Path) -> list[Path]:
    """The committed checkpoint directories of ``output_dir`` (verified or not), oldest first."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if _COMMITTED.match(p.name))


def plan_resume(output_dir: Path) -> ResumePlan:
    """The newest committed checkpoint that verifies, with one message per newer committed
    checkpoint skipped (and why) and per ignored leftover of an interrupted save."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return ResumePlan(None)
    skipped: list[str] = []
    ignored: list[str] = []
    for path in sorted(root.iterdir(), key=lambda p: p.name, reverse=True):
        if not _COMMITTED.match(path.name):
            what = "an interrupted save" if _STAGING.match(path.name) else "not a checkpoint"
            ignored.append(f"ignored {path.name}: {what}")
            continue
        problem = verify(path)
        if problem is None:
            return ResumePlan(path, skipped, ignored)
        skipped.append(f"skipped {path.name}: {problem}")
    return ResumePlan(None, skipped, ignored)


def find_latest(output_dir: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint whose manifest verifies, and one message per entry passed over."""
    plan = plan_resume(output_dir)
    return plan.path, [*plan.ignored, *plan.skipped]


def _load_tensors(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    if path.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise CheckpointError(
                f"refusing to load pickle file {path}: pickles can run code; pass --allow-pickle to load "
                "pickle files that dancecore wrote and the manifest verifies"
            )
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # UnpicklingError and friends: the payload was refused
            raise CheckpointError(f"refused pickle file {path}: not plain tensors ({type(exc).__name__})") from None
        if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
            raise CheckpointError(f"refused pickle file {path}: expected a dict of tensors")
        return data
    raise CheckpointError(f"unknown tensor file format {path}")


def _tensor_file(path: Path, files: dict[str, Any], stem: str) -> Path:
    names = sorted(n for n in files if n.split(".")[0] == stem)
    preferred = [n for n in names if n.endswith(".safetensors")] or names
    return path / preferred[0]


def read_checkpoint(path: Path, *, rank: int = 0, allow_pickle: bool = False) -> Checkpoint:
    """Verify and load a checkpoint directory (and ``rank``'s own file, when present).

    Pickle files are refused unless ``allow_pickle``; then only files the verified manifest
    lists are loaded, with ``torch.load(weights_only=True)``.
    """
    problem = verify(path)
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} is invalid: {problem}")
    manifest, _ = _read_manifest(path)
    assert manifest is not None
    files = manifest["files"]
    pickles = sorted(n for n in files if Path(n).suffix in PICKLE_SUFFIXES)
    if pickles and not allow_pickle:
        raise CheckpointError(
            f"checkpoint {path} holds pickle file(s) {', '.join(pickles)}; pickles can run code, so dancecore "
            "refuses them (pass --allow-pickle to load pickle files it wrote itself, manifest-verified)"
        )
    try:
        state = json.loads((path / STATE).read_text())
        rank_path = path / rank_file(rank)
        rank_state = json.loads(rank_path.read_text()) if rank_file(rank) in files else None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path}: unreadable JSON ({exc})") from None
    if not isinstance(state, dict) or state.get("iteration") != manifest.get("iteration"):
        raise CheckpointError(f"checkpoint {path}: state.json disagrees with the manifest's iteration")
    return Checkpoint(
        path=path,
        iteration=int(state["iteration"]),
        model=_load_tensors(_tensor_file(path, files, "model"), allow_pickle),
        optimizer=_load_tensors(_tensor_file(path, files, "optimizer"), allow_pickle),
        state=state,
        rank_state=rank_state,
        ema=_load_tensors(_tensor_file(path, files, "ema"), allow_pickle)
        if any(n.split(".")[0] == "ema" for n in files)
        else None,
    )
