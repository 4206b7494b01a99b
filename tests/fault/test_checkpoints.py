"""Damaged checkpoints, full disks and pickles: every corruption of the newest checkpoint is
detected, resume falls back to the previous one and says why, a full disk names the path and
leaves earlier checkpoints valid, and no pickle payload ever runs."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
from pathlib import Path

import pytest
import torch

from dancecore import checkpoint as ckpt
from tests.fault.conftest import copy_run, final_result, write_config

FILES = ("model.safetensors", "optimizer.safetensors", "state.json", "rank-00000.json", "manifest.json")


@pytest.fixture(scope="module")
def three(forkserver, tmp_path_factory) -> Path:
    """The trial run after 3 iterations: checkpoints iter-1, iter-2, iter-3."""
    root = tmp_path_factory.mktemp("three")
    out = root / "out"
    child = forkserver.run("train", str(write_config(root / "run.yaml", out, train={"iterations": 3})))
    assert child.status == 0, child.output()
    return out


@pytest.fixture(scope="module")
def baseline6(forkserver, tmp_path_factory):
    """The uninterrupted 6-iteration trial run."""
    root = tmp_path_factory.mktemp("base6")
    child = forkserver.run("train", str(write_config(root / "run.yaml", root / "out")))
    assert child.status == 0, child.output()
    return final_result(root / "out")


def _newest(out: Path) -> Path:
    return out / "checkpoints" / "iter-00000003"


def _corruptions(rng: random.Random) -> list[tuple[str, object]]:
    cases: list[tuple[str, object]] = []
    for name in FILES:
        for label, size in (("0 bytes", lambda n: 0), ("50%", lambda n: n // 2), ("size-1", lambda n: n - 1)):
            cases.append((f"{name} truncated to {label}", ("truncate", name, size)))
        for _ in range(12):
            cases.append((f"{name} byte flipped", ("flip", name, rng.random(), rng.randrange(1, 256))))
        cases.append((f"{name} removed", ("remove", name)))
    cases.append(("unlisted file added", ("add", "extra.bin")))
    cases.append(("directory replaced by a symlink", ("symlink",)))
    return cases


def _apply(path: Path, case: tuple) -> None:
    kind = case[0]
    if kind == "truncate":
        file = path / case[1]
        data = file.read_bytes()
        file.write_bytes(data[: case[2](len(data))])
    elif kind == "flip":
        file = path / case[1]
        data = bytearray(file.read_bytes())
        data[int(case[2] * len(data))] ^= case[3]
        file.write_bytes(bytes(data))
    elif kind == "remove":
        (path / case[1]).unlink()
    elif kind == "add":
        (path / case[1]).write_bytes(b"\x80\x04K\x01.")
    elif kind == "symlink":
        target = path.with_name("elsewhere")
        path.rename(target)
        path.symlink_to(target)


def test_every_corruption_of_the_newest_checkpoint_is_detected(three, tmp_path, fault_report):
    rng = random.Random(1234)
    cases = _corruptions(rng)
    detected, fell_back = 0, 0
    for index, (label, case) in enumerate(cases):
        out = copy_run(three, tmp_path / f"case-{index}")
        _apply(_newest(out), case)
        plan = ckpt.plan_resume(out)
        if any(m.startswith("skipped iter-00000003: ") for m in plan.skipped):
            detected += 1
        if plan.path is not None and plan.path.name == "iter-00000002":
            fell_back += 1
        else:
            pytest.fail(f"{label}: not detected (plan {plan})")
        shutil.rmtree(out)
    # stray staging directory from an interrupted save: ignored, with a message
    out = copy_run(three, tmp_path / "stray")
    shutil.copytree(_newest(out), out / "checkpoints" / "iter-00000004.tmp")
    (out / "checkpoints" / "iter-00000004.tmp" / "model.safetensors").write_bytes(b"")
    plan = ckpt.plan_resume(out)
    stray_ok = plan.path == _newest(out) and plan.ignored == ["ignored iter-00000004.tmp: an interrupted save"]
    fault_report.row(
        "corrupted newest checkpoint",
        f"{detected}/{len(cases)} detected, {fell_back}/{len(cases)} fell back to iter-2; stray .tmp ignored",
        detected == fell_back == len(cases) and stray_ok,
    )
    assert detected == len(cases)
    assert stray_ok


def test_resume_skips_a_bad_checkpoint_and_says_why(three, baseline6, forkserver, tmp_path, fault_report):
    out = copy_run(three, tmp_path / "out")
    manifest = _newest(out) / "model.safetensors"
    manifest.write_bytes(manifest.read_bytes()[:-1])
    child = forkserver.run("train", str(write_config(tmp_path / "run.yaml", out)), "--resume")
    assert child.status == 0, child.output()
    text = child.output()
    assert "skipped iter-00000003: model.safetensors has" in text
    assert "resumed from iter-00000002 (iteration 2)" in text
    assert final_result(out).differences(baseline6) == [], "fallback resume is still bit-identical"

    # none valid: non-zero exit, never a silent fresh start
    bad = copy_run(three, tmp_path / "none-valid")
    for path in sorted((bad / "checkpoints").iterdir()):
        (path / "manifest.json").unlink()
    before = sorted(p.relative_to(bad) for p in bad.rglob("*"))
    metrics_before = (bad / "metrics.jsonl").read_bytes()
    child = forkserver.run("train", str(write_config(tmp_path / "bad.yaml", bad)), "--resume")
    none_ok = (
        child.status not in (0, None)
        and "no valid checkpoint to resume from" in child.output()
        and "Traceback" not in child.output()
        and sorted(p.relative_to(bad) for p in bad.rglob("*")) == before
        and (bad / "metrics.jsonl").read_bytes() == metrics_before
    )
    fault_report.row(
        "resume with a bad newest / no valid checkpoint",
        f"falls back, names skipped + reason, bit-identical; none valid: exit {child.status}, nothing written",
        none_ok,
    )
    assert none_ok, child.output()


def test_disk_full_during_a_save_names_the_path_and_keeps_the_previous(tiny_run, monkeypatch, fault_report):
    from dancecore.training.trainer import Trainer

    trainer = Trainer(tiny_run(train={"iterations": 2, "checkpoint_every": 1}))
    trainer.train()
    previous = ckpt.committed_path(trainer.output_dir, 2)
    real_save = ckpt.store.save_file

    def full_disk(tensors, filename, *args, **kwargs):
        if filename.endswith("optimizer.safetensors"):
            Path(filename).write_bytes(b"\0" * 10)  # partially written, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        return real_save(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(ckpt.store, "save_file", full_disk)
    with pytest.raises(ckpt.CheckpointError) as info:
        trainer.save(3)
    message = str(info.value)
    ok = (
        "iter-00000003.tmp/optimizer.safetensors" in message
        and "No space left on device" in message
        and ckpt.verify(previous) is None
        and not ckpt.staging_path(trainer.output_dir, 3).exists()
        and ckpt.plan_resume(trainer.output_dir).path == previous
    )
    fault_report.row(
        "disk full (ENOSPC injected) during a save", "error names the path; previous verifies; no .tmp left", ok
    )
    assert ok, message


def test_file_size_limit_during_a_save(forkserver, tmp_path, fault_report):
    """A real failing write: RLIMIT_FSIZE below the optimizer file's size (EFBIG)."""
    # A wider tiny policy, so that the optimizer file (two Adam moments per weight) is the largest
    # file a run writes; the limit lies between it and every other file.
    wide = {"policy": {"name": "testing-tiny", "hidden": 64}}
    out = tmp_path / "out"
    first = forkserver.run("train", str(write_config(tmp_path / "three.yaml", out, train={"iterations": 3}, **wide)))
    assert first.status == 0, first.output()
    config = write_config(tmp_path / "run.yaml", out, **wide)
    others = [p.stat().st_size for p in out.rglob("*") if p.is_file() and p.name != "optimizer.safetensors"]
    optimizer = (_newest(out) / "optimizer.safetensors").stat().st_size
    assert max(others) < optimizer
    child = forkserver.run("train", str(config), "--resume", fsize_limit=(max(others) + optimizer) // 2)
    text = child.output()
    ok = (
        child.status not in (0, None)
        and "iter-00000004.tmp/optimizer.safetensors" in text
        and "Traceback" not in text
        and ckpt.plan_resume(out).path == _newest(out)
        and not ckpt.staging_path(out, 4).exists()
    )
    fault_report.row(
        "file size limit (RLIMIT_FSIZE) during a save", f"exit {child.status}; path named; iter-3 still verifies", ok
    )
    assert ok, text


# ------------------------------------------------------------------------------------- pickles


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _as_pickle_checkpoint(path: Path, payload: object | None = None) -> None:
    """Replace model.safetensors by model.pt (plain tensors, or ``payload``), re-manifested as if
    dancecore had written it."""
    weights = ckpt.reading.load_file(str(path / "model.safetensors"))
    (path / "model.safetensors").unlink()
    torch.save(payload if payload is not None else weights, path / "model.pt")
    (path / "manifest.json").unlink()
    ckpt.write_manifest(path, 3)
    assert ckpt.verify(path) is None


def test_pickles_are_refused_and_never_run(three, baseline6, forkserver, tmp_path, fault_report):
    marker = tmp_path / "PWNED"
    results = {}
    # 1. a plain-tensor pickle: refused without --allow-pickle
    out = copy_run(three, tmp_path / "plain")
    _as_pickle_checkpoint(_newest(out))
    with pytest.raises(ckpt.CheckpointError, match="allow-pickle"):
        ckpt.read_checkpoint(_newest(out))
    child = forkserver.run("train", str(write_config(tmp_path / "plain.yaml", out)), "--resume")
    results["plain refused"] = child.status not in (0, None) and "--allow-pickle" in child.output()
    # 2. ... and loaded (weights only) with --allow-pickle: the run continues bit-identically
    child = forkserver.run("train", str(write_config(tmp_path / "plain.yaml", out)), "--resume", "--allow-pickle")
    results["plain allowed"] = child.status == 0 and final_result(out).differences(baseline6) == []
    # 3. an evil pickle in a verified manifest: refused even with --allow-pickle
    out = copy_run(three, tmp_path / "evil")
    _as_pickle_checkpoint(_newest(out), {"w": _Evil(marker)})
    with pytest.raises(ckpt.CheckpointError, match="refused pickle"):
        ckpt.read_checkpoint(_newest(out), allow_pickle=True)
    for flags in ((), ("--allow-pickle",)):
        child = forkserver.run("train", str(write_config(tmp_path / "evil.yaml", out)), "--resume", *flags)
        results[f"evil refused {flags}"] = child.status not in (0, None) and "pickle" in child.output()
    # 4. an evil pickle the manifest does not list: the checkpoint is invalid, never loaded
    out = copy_run(three, tmp_path / "unlisted")
    torch.save({"w": _Evil(marker)}, _newest(out) / "optimizer.pt")
    plan = ckpt.plan_resume(out)
    results["unlisted skipped"] = plan.path is not None and plan.path.name == "iter-00000002"
    results["payload never ran"] = not marker.exists()
    ok = all(results.values())
    fault_report.row(
        "pickle checkpoint; evil pickle with --allow-pickle", "refused; payload never ran" if ok else str(results), ok
    )
    assert ok, results


def test_every_torch_load_is_weights_only(fault_report):
    import ast

    root = Path(__file__).resolve().parents[2]
    offenders, count = [], 0
    for file in [*root.glob("dancecore/**/*.py"), *root.glob("plugins/*/*/**/*.py")]:
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load":
                if isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                    count += 1
                    kw = {k.arg: k.value for k in node.keywords}
                    if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                        offenders.append(f"{file.relative_to(root)}:{node.lineno}")
    fault_report.row(
        "every torch.load uses weights_only=True", f"{count - len(offenders)}/{count} calls", not offenders
    )
    assert not offenders


# ------------------------------------------------------------------------------ path escapes


def test_no_write_escapes_the_output_dir(tmp_path, tiny_run, fault_report):
    from dancecore.training.trainer import OutputDirError, Trainer

    outside = tmp_path / "outside"
    outside.mkdir()
    results = {}
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoints").symlink_to(outside)
    with pytest.raises(OutputDirError, match="symlink"):
        Trainer(tiny_run("run"))
    with pytest.raises(ckpt.CheckpointError, match="symlink"):
        ckpt.begin(out, 1)
    results["symlinked checkpoints/ refused"] = not any(outside.iterdir())
    with pytest.raises(ckpt.CheckpointError):
        ckpt.ensure_inside(out, out / ".." / "outside" / "x")
    with pytest.raises(ckpt.CheckpointError):
        ckpt.ensure_inside(out, Path("/etc/passwd"))
    results["'..' and absolute paths refused"] = True
    # a manifest naming a path outside the checkpoint is invalid, and nothing outside is read
    good = tmp_path / "good"
    (good / "checkpoints" / "iter-00000001").mkdir(parents=True)
    c = good / "checkpoints" / "iter-00000001"
    (c / "state.json").write_text(json.dumps({"iteration": 1}))
    body = ckpt.store._manifest_body(1, {"../../outside/secret": {"sha256": "0", "bytes": 1}, "state.json": {}})
    (c / "manifest.json").write_text(ckpt.store._manifest_text(body))
    results["manifest path escape refused"] = "invalid file name" in (ckpt.verify(c) or "")
    ok = all(results.values())
    fault_report.row("no write outside output_dir (.., absolute, symlinks)", "refused" if ok else str(results), ok)
    assert ok, results


def test_global_rng_and_counters_mutants_are_caught(tiny_run, monkeypatch, fault_report):
    """The two pieces a clean trial run cannot show (its global RNGs are never drawn from and its
    counters stay 0): give them non-trivial values, then resume without restoring them."""
    import random

    from dancecore.training.trainer import Trainer

    first = Trainer(tiny_run(train={"iterations": 2}))
    first.train()
    random.random()  # the global RNG moved on
    first.counters["dropped_groups"] = 5
    first.save(3)
    caught = []
    for piece, word in (("rng", "RNG states"), ("counters", "counters")):
        monkeypatch.setenv("DANCECORE_FAULT_SKIP_RESTORE", piece)
        second = Trainer(tiny_run(train={"iterations": 4}))
        try:
            second.resume()
        except ckpt.CheckpointError as exc:
            if word in str(exc):
                caught.append(piece)
    monkeypatch.delenv("DANCECORE_FAULT_SKIP_RESTORE")
    third = Trainer(tiny_run(train={"iterations": 4}))
    third.resume()
    restored = (
        third.counters["dropped_groups"] == 5
        and ckpt.rng_state()["python"]
        == json.loads((ckpt.committed_path(third.output_dir, 3) / "rank-00000.json").read_text())["rng"]["python"]
    )
    fault_report.row(
        "mutants: global RNG / counters not restored",
        f"{len(caught)}/2 caught; restored when not skipped",
        len(caught) == 2 and restored,
    )
    assert caught == ["rng", "counters"] and restored
