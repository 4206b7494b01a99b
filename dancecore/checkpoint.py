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
from safetensors.torch import load_file, save_file

from dancecore.errors import CheckpointError, CheckpointWriteError

MANIFEST = "manifest.json"
STATE = "state.json"
FORMAT_VERSION = 1
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")
#: Pieces of training state a resume restores (names used by the test-only skip hook).
RESTORABLE_PIECES = ("optimizer", "schedule", "data_cursor", "sampler_rng", "step_counter", "rng", "counters")

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
    )


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
