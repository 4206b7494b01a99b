"""Checkpoints: safetensors + JSON, written atomically and verified by a SHA-256 manifest.

Layout: ``<output_dir>/checkpoints/iter-00000042/`` holding ``model.safetensors`` (trainable
weights by name), ``optimizer.safetensors`` (optimizer tensors), ``state.json`` (step counter,
data cursor, sampler RNG position, LR schedule, optimizer hyper-parameters, counters),
``rank-00000.json`` ... (each rank's global RNG states) and ``manifest.json`` (size and SHA-256 of
every other file, plus a digest of the manifest itself).

Writing: rank 0 creates ``iter-XXXXXXXX.tmp``; every rank writes its own files into it; after a
barrier rank 0 writes the shared files and the manifest, fsyncs everything and renames the
directory into place with :func:`os.replace`; older checkpoints are rotated out only after that.
A checkpoint counts as valid only when its manifest verifies, never because of its name.

Reading never unpickles anything unless asked to (``allow_pickle``), and even then only files the
verified manifest lists, through ``torch.load(weights_only=True)``.

Test-only fault hooks (environment variables, read at call time; never set them in real runs):

- ``DANCECORE_FAULT_SAVE_DELAY=<seconds>``: sleep after each file written into a checkpoint, to
  widen the window in which the fault-injection suite kills a process during a save.
- ``DANCECORE_FAULT_SKIP_RESTORE=<piece>[,<piece>...]``: resume deliberately does not restore the
  named pieces (:data:`RESTORABLE_PIECES`), to prove the suite catches a forgotten restore.
- ``DANCECORE_FAULT_SKIP_RESTORE_CHECK=1``: resume skips its post-restore verification, so the
  suite can show that a forgotten restore also breaks bit-identity.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from dancecore.errors import CheckpointError, CheckpointWriteError

MANIFEST = "manifest.json"
STATE = "state.json"
FORMAT_VERSION = 1
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")
#: Pieces of training state a resume restores (names used by the test-only skip hook).
RESTORABLE_PIECES = (
    "optimizer",
    "schedule",
    "data_cursor",
    "sampler_rng",
    "step_counter",
    "rng",
    "counters",
    "algorithm",
    "ema",
)

_COMMITTED = re.compile(r"^iter-(\d{8})$")
_STAGING = re.compile(r"^iter-\d{8}\.(tmp|trash)$")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


@dataclass(frozen=True)
class Checkpoint:
    """A verified checkpoint's contents (``rank_state`` is this rank's file, when there is one)."""

    path: Path
    iteration: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]
    state: dict[str, Any]
    rank_state: dict[str, Any] | None = None
    ema: dict[str, torch.Tensor] | None = None  # the EMA of the trained weights, when the run keeps one


@dataclass(frozen=True)
class ResumePlan:
    """What :func:`plan_resume` found: the newest valid checkpoint (or None), the committed
    checkpoints skipped because they do not verify, and staging leftovers that were ignored."""

    path: Path | None
    skipped: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------ paths


def checkpoint_dir(output_dir: Path) -> Path:
    """Where a run's checkpoints live."""
    return output_dir / "checkpoints"


def committed_path(output_dir: Path, iteration: int) -> Path:
    """The directory of the committed checkpoint for ``iteration``."""
    return checkpoint_dir(output_dir) / f"iter-{iteration:08d}"


def staging_path(output_dir: Path, iteration: int) -> Path:
    """The directory a checkpoint is written into before it is committed."""
    return checkpoint_dir(output_dir) / f"iter-{iteration:08d}.tmp"


def rank_file(rank: int) -> str:
    """Name of a rank's own state file inside a checkpoint."""
    return f"rank-{rank:05d}.json"


def ensure_inside(output_dir: Path, path: Path) -> Path:
    """Return ``path`` if it lies inside ``output_dir`` with no symlink on the way; raise otherwise.

    Checked before anything is written, so that neither ``..``, an absolute path nor a symlink
    planted inside the output directory can redirect a write elsewhere.
    """
    root = output_dir.resolve()
    try:
        relative = path.absolute().relative_to(output_dir.absolute())
    except ValueError:
        raise CheckpointError(f"refusing to write {path}: outside the output directory {output_dir}") from None
    if ".." in relative.parts:
        raise CheckpointError(f"refusing to write {path}: '..' in the path")
    current = output_dir
    for part in relative.parts:
        current = current / part
        if current.is_symlink():
            raise CheckpointError(f"refusing to write through {current}: it is a symlink")
    if not path.resolve().is_relative_to(root):
        raise CheckpointError(f"refusing to write {path}: resolves outside {root}")
    return path


# ---------------------------------------------------------------------------------- writing


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_file(path: Path) -> None:
    with path.open("rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fault_delay() -> None:
    """Test-only: ``DANCECORE_FAULT_SAVE_DELAY`` seconds between checkpoint files."""
    delay = float(os.environ.get("DANCECORE_FAULT_SAVE_DELAY", "0") or 0)
    if delay > 0:
        time.sleep(delay)


def _write_error(path: Path, exc: BaseException) -> CheckpointError:
    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc)
        if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            reason += " (disk full or file size limit)"
    else:
        reason = str(exc)
    return CheckpointWriteError(f"could not write checkpoint file {path}: {reason}")


def _guarded(path: Path, write: Callable[[], object]) -> None:
    """Run ``write`` (which creates ``path``), fsync it, and turn any I/O failure into a
    :class:`CheckpointError` naming ``path``."""
    try:
        write()
        _fsync_file(path)
    except (OSError, SafetensorError) as exc:
        raise _write_error(path, exc) from exc
    _fault_delay()


def write_tensors(directory: Path, name: str, tensors: dict[str, torch.Tensor]) -> Path:
    """Write tensors as safetensors into a staging directory and fsync the file."""
    path = directory / _checked_name(name)
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    _guarded(path, lambda: save_file(cpu, str(path)))
    return path


def write_json(directory: Path, name: str, data: Any) -> Path:
    """Write JSON into a staging directory and fsync the file. NaN/inf are refused."""
    path = directory / _checked_name(name)
    text = json.dumps(data, indent=1, sort_keys=True, allow_nan=False)
    _guarded(path, lambda: path.write_text(text))
    return path


def _checked_name(name: str) -> str:
    if not _SAFE_NAME.match(name) or name == MANIFEST:
        raise CheckpointError(f"invalid checkpoint file name {name!r}")
    return name


def begin(output_dir: Path, iteration: int) -> Path:
    """(Rank 0) Create an empty staging directory for ``iteration``, clearing leftovers of
    interrupted saves first. Returns the staging directory."""
    root = checkpoint_dir(output_dir)
    tmp = staging_path(output_dir, iteration)
    try:
        ensure_inside(output_dir, root)
        root.mkdir(parents=True, exist_ok=True)
        for leftover in root.iterdir():
            if _STAGING.match(leftover.name):
                _remove(leftover)
        tmp.mkdir()
    except OSError as exc:
        raise _write_error(tmp, exc) from exc
    return tmp


def _manifest_body(iteration: int, files: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {"format": FORMAT_VERSION, "iteration": iteration, "files": files}


def _canonical(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _manifest_text(body: dict[str, Any]) -> str:
    digest = hashlib.sha256(_canonical(body).encode()).hexdigest()
    return _canonical({**body, "manifest_sha256": digest})


def write_manifest(directory: Path, iteration: int) -> Path:
    """Write (and fsync) the manifest of every regular file in ``directory``."""
    files = {}
    for p in sorted(directory.iterdir()):
        if p.name == MANIFEST or not p.is_file() or p.is_symlink():
            continue
        files[p.name] = {"sha256": _sha256(p), "bytes": p.stat().st_size}
    manifest = directory / MANIFEST
    manifest.write_text(_manifest_text(_manifest_body(iteration, files)))
    _fsync_file(manifest)
    _fsync_dir(directory)
    return manifest


def commit(output_dir: Path, iteration: int, keep: int) -> Path:
    """(Rank 0, after every rank wrote its files) Write the manifest, fsync, rename the staging
    directory into place and rotate old checkpoints. Returns the committed directory.

    A committed checkpoint of the same iteration that verifies is kept as it is (never
    overwritten); one that does not verify is replaced.
    """
    root = checkpoint_dir(output_dir)
    tmp = staging_path(output_dir, iteration)
    final = committed_path(output_dir, iteration)
    manifest = tmp / MANIFEST
    try:
        write_manifest(tmp, iteration)
    except OSError as exc:
        _remove(tmp)
        raise _write_error(manifest, exc) from exc
    try:
        if final.exists() or final.is_symlink():
            from dancecore.checkpoint.reading import verify  # reading builds on this module

            if verify(final) is None:
                _remove(tmp)
                rotate(root, keep)
                return final
            trash = final.with_name(final.name + ".trash")
            _remove(trash)
            os.replace(final, trash)
            _remove(trash)
        os.replace(tmp, final)
        _fsync_dir(root)
    except OSError as exc:
        _remove(tmp)
        raise _write_error(final, exc) from exc
    rotate(root, keep)
    return final


def abort(output_dir: Path, iteration: int) -> None:
    """Remove the staging directory of a failed save (earlier checkpoints are untouched)."""
    _remove(staging_path(output_dir, iteration))


def write_checkpoint(
    output_dir: Path,
    iteration: int,
    model: dict[str, torch.Tensor],
    optimizer: dict[str, torch.Tensor],
    state: dict[str, Any],
    keep: int,
    rank_states: dict[int, dict[str, Any]] | None = None,
) -> Path:
    """Write and commit a whole checkpoint from one process (see :func:`begin`/:func:`commit` for
    the multi-rank sequence). Raises :class:`CheckpointError` naming the path when the disk
    refuses (full, read-only, size limit); earlier checkpoints are untouched in that case."""
    tmp = begin(output_dir, iteration)
    try:
        for rank, data in sorted((rank_states or {}).items()):
            write_json(tmp, rank_file(rank), data)
        write_tensors(tmp, "model.safetensors", model)
        write_tensors(tmp, "optimizer.safetensors", optimizer)
        write_json(tmp, STATE, {**state, "iteration": iteration})
    except CheckpointError:
        abort(output_dir, iteration)
        raise
    return commit(output_dir, iteration, keep)


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)


def rotate(root: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest committed checkpoints (called after a commit)."""
    committed = sorted(p for p in root.iterdir() if _COMMITTED.match(p.name))
    for old in committed[:-keep]:
        _remove(old)
