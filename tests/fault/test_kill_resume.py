"""Kills and signals: SIGKILL at random moments (and during saves) then ``--resume`` must give
bit-identical final weights; each piece of state left unrestored must be caught; SIGTERM/SIGINT
stop at the next iteration boundary with a checkpoint; a second signal exits at once."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from dancecore.checkpoint import plan_resume, verify
from tests.conftest import ROOT, deep_update
from tests.fault.conftest import TRIAL_RUN, RunResult, copy_run, final_result, write_config

TRIALS = 20


@dataclass(frozen=True)
class Baseline:
    """The uninterrupted trial run."""

    config: Path
    result: RunResult
    span: float  # seconds from the first metrics line to the last checkpoint's commit


def _wait_for(predicate, child, timeout: float = 60.0) -> bool:
    """Poll ``predicate`` every millisecond or so until true; False if the child ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if child.poll() is not None:
            return predicate()
        time.sleep(0.001)
    raise TimeoutError("condition not reached")


def _metric_lines(output_dir: Path) -> int:
    path = output_dir / "metrics.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def _uninterrupted(forkserver, config: Path, out: Path) -> tuple[RunResult, float]:
    """Run ``config`` to the end: what it leaves and the seconds from its first metrics line to its
    last checkpoint (the window the kills aim into)."""
    child = forkserver.spawn("train", str(config))
    _wait_for(lambda: (out / "metrics.jsonl").exists(), child)
    first = time.monotonic()
    _wait_for((out / "checkpoints" / "iter-00000006").exists, child)
    span = time.monotonic() - first
    assert child.wait(180) == 0, child.output()
    return final_result(out), span


@pytest.fixture(scope="module")
def baseline(forkserver, tmp_path_factory) -> Baseline:
    root = tmp_path_factory.mktemp("baseline")
    config = write_config(root / "run.yaml", root / "out")
    result, span = _uninterrupted(forkserver, config, root / "out")
    return Baseline(config, result, span)


@pytest.fixture(scope="module")
def half_run(forkserver, tmp_path_factory) -> Path:
    """The trial run stopped cleanly after 3 of its 6 iterations (checkpoint iter-3)."""
    root = tmp_path_factory.mktemp("half")
    out = root / "out"
    config = write_config(root / "run.yaml", out, train={"iterations": 3})
    child = forkserver.run("train", str(config))
    assert child.status == 0, child.output()
    return out


def test_forked_runs_match_the_plain_command(baseline, tmp_path, fault_report):
    """The fork server is only a speed-up: a plain ``dancecore train`` gives the same bits."""
    out = tmp_path / "out"
    config = write_config(tmp_path / "run.yaml", out)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "dancecore.cli", "train", str(config)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    differences = final_result(out).differences(baseline.result)
    fault_report.row("plain CLI process == forked child", "identical weights, optimizer, RNG, metrics", not differences)
    assert not differences


def _kill_then_resume(
    forkserver,
    write: Callable[[Path, Path], Path],
    tmp_path: Path,
    expected: RunResult,
    span: float,
    trials: int,
    seed: int,
) -> tuple[int, int, list[str]]:
    """``trials`` runs of ``write(config path, output dir)``'s config, each SIGKILLed at a random moment
    before its last step (every third one aimed into a checkpoint save) and resumed; how many ended
    bit-identical to ``expected``, how many kills landed mid-save, and what failed."""
    rng = random.Random(seed)
    identical, during_save, failures = 0, 0, []
    for trial in range(trials):
        out = tmp_path / f"trial-{trial:02d}"
        config = write(tmp_path / f"trial-{trial:02d}.yaml", out)
        aim_at_save = trial % 3 == 0
        for _attempt in range(6):
            if out.exists():
                shutil.rmtree(out)
            env = {"DANCECORE_FAULT_SAVE_DELAY": "0.02"} if aim_at_save else {}
            child = forkserver.spawn("train", str(config), env=env)
            if aim_at_save:
                target = out / "checkpoints" / f"iter-{rng.randint(1, 5):08d}.tmp"
                _wait_for(target.exists, child)
                time.sleep(rng.uniform(0.0, 0.08))
            else:
                _wait_for((out / "metrics.jsonl").exists, child)
                time.sleep(rng.uniform(0.0, span * 0.9))
            child.signal(signal.SIGKILL)
            status = child.wait(60)
            if status == -signal.SIGKILL and not (out / "checkpoints" / "iter-00000006").exists():
                break  # killed before the last step
        else:
            pytest.fail(f"trial {trial}: could not kill the run before its last step (seed {seed})")
        stray = list((out / "checkpoints").glob("*.tmp")) if (out / "checkpoints").exists() else []
        during_save += bool(stray)
        resumed = forkserver.run("train", str(config), "--resume")
        if resumed.status != 0:
            failures.append(f"trial {trial}: resume exited {resumed.status}: {resumed.output()[-500:]}")
            continue
        differences = final_result(out).differences(expected)
        if differences:
            failures.append(f"trial {trial}: {differences} differ")
        else:
            identical += 1
    return identical, during_save, failures


def _fault_seed() -> int:
    return int(os.environ.get("DANCECORE_FAULT_SEED", "0")) or random.SystemRandom().randrange(1, 2**31)


def test_sigkill_at_random_moments_then_resume_is_bit_identical(baseline, forkserver, tmp_path, fault_report):
    seed = _fault_seed()
    identical, during_save, failures = _kill_then_resume(
        forkserver, write_config, tmp_path, baseline.result, baseline.span, TRIALS, seed
    )
    fault_report.row(
        f"SIGKILL at a random moment, --resume ({TRIALS} trials)",
        f"{identical}/{TRIALS} bit-identical (SHA-256); {during_save} killed mid-save; seed {seed}",
        identical == TRIALS and during_save >= 3,
    )
    assert not failures, f"seed {seed}: " + "; ".join(failures)
    assert during_save >= 3, f"only {during_save} kills landed during a save (seed {seed})"


def _nft_config(path: Path, output_dir: Path) -> Path:
    """The trial run trained by DiffusionNFT, whose old policy is the EMA (``rollout: true``) on a
    ramped decay, updated after each of the 2 updates per iteration: algorithm state that a resume
    must restore exactly."""
    data = deep_update(
        TRIAL_RUN,
        {
            "output_dir": str(output_dir),
            "train": {"samples_per_update": 2, "ema": {"decay": 0.5, "every": 1, "rollout": True, "ramp": 0.1}},
        },
    )
    data.pop("optimizer")
    data["algorithm"] = {"name": "diffusion-nft", "group_size": 4, "timesteps_per_sample": 2}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_sigkill_then_resume_keeps_diffusion_nfts_old_policy_bit_identical(forkserver, tmp_path, fault_report):
    out = tmp_path / "baseline"
    expected, span = _uninterrupted(forkserver, _nft_config(tmp_path / "baseline.yaml", out), out)
    assert expected.ema_sha, "the old policy (EMA) must be part of what is compared"
    trials, seed = 6, _fault_seed()
    (tmp_path / "kills").mkdir()
    identical, during_save, failures = _kill_then_resume(
        forkserver, _nft_config, tmp_path / "kills", expected, span, trials, seed
    )
    fault_report.row(
        f"DiffusionNFT (old policy = ramped EMA): SIGKILL, --resume ({trials} trials)",
        f"{identical}/{trials} bit-identical incl. the old policy (SHA-256); {during_save} killed mid-save; seed {seed}",
        identical == trials,
    )
    assert not failures, f"seed {seed}: " + "; ".join(failures)


MUTANTS = {  # piece not restored -> the word the post-restore verification must name
    "optimizer": "optimizer",
    "schedule": "lr_schedule",
    "data_cursor": "data_cursor",
    "sampler_rng": "sampler_rng",
    "step_counter": "iteration",
    "ema": "EMA",
}


def test_resume_from_a_clean_stop_is_bit_identical(baseline, half_run, forkserver, tmp_path):
    out = copy_run(half_run, tmp_path / "out")
    config = write_config(tmp_path / "run.yaml", out)
    child = forkserver.run("train", str(config), "--resume")
    assert child.status == 0, child.output()
    assert "resumed from iter-00000003" in child.output()
    assert final_result(out).differences(baseline.result) == []


def test_each_unrestored_piece_of_state_is_caught(baseline, half_run, forkserver, tmp_path, fault_report):
    """Mutants (test-only hook DANCECORE_FAULT_SKIP_RESTORE): resume forgets one piece. The
    post-restore verification must stop the run naming the piece; with that verification also
    switched off, the final weights must differ from the uninterrupted run."""
    by_check, by_bits = [], []
    for piece, word in MUTANTS.items():
        out = copy_run(half_run, tmp_path / f"{piece}-checked")
        config = write_config(tmp_path / f"{piece}.yaml", out)
        child = forkserver.run("train", str(config), "--resume", env={"DANCECORE_FAULT_SKIP_RESTORE": piece})
        if child.status not in (0, None) and "did not restore" in child.output() and word in child.output():
            by_check.append(piece)
        out = copy_run(half_run, tmp_path / f"{piece}-unchecked")
        config = write_config(tmp_path / f"{piece}-u.yaml", out)
        env = {"DANCECORE_FAULT_SKIP_RESTORE": piece, "DANCECORE_FAULT_SKIP_RESTORE_CHECK": "1"}
        child = forkserver.run("train", str(config), "--resume", env=env)
        assert child.status == 0, child.output()
        if {"model_sha", "ema_sha"} & set(final_result(out).differences(baseline.result)):  # the EMA never feeds back
            by_bits.append(piece)
    n = len(MUTANTS)
    fault_report.row(
        "mutants: one piece of state not restored",
        f"{len(by_check)}/{n} stopped by the restore check, {len(by_bits)}/{n} by final weights or EMA (SHA-256)",
        len(by_check) == n and len(by_bits) == n,
    )
    assert sorted(by_check) == sorted(MUTANTS)
    assert sorted(by_bits) == sorted(MUTANTS)


def test_sigterm_or_sigint_stops_at_the_next_boundary_with_a_checkpoint(baseline, forkserver, tmp_path, fault_report):
    rng = random.Random(7)
    times = []
    for trial, signum in enumerate([signal.SIGTERM, signal.SIGTERM, signal.SIGINT]):
        out = tmp_path / f"term-{trial}"
        config = write_config(tmp_path / f"term-{trial}.yaml", out)
        child = forkserver.spawn("train", str(config), env={"DANCECORE_FAULT_SAVE_DELAY": "0.05"})  # margin
        step = rng.randint(1, 4)
        _wait_for(lambda: _metric_lines(out) >= step, child)  # noqa: B023
        child.signal(signum)
        began = time.monotonic()
        status = child.wait(30)
        times.append(time.monotonic() - began)
        assert status == 0, child.output()
        assert "stopped by signal" in child.output()
        plan = plan_resume(out)
        assert plan.path is not None and verify(plan.path) is None
        stopped_at = int(plan.path.name.split("-")[1])
        assert stopped_at == _metric_lines(out) >= step, "checkpoint at the iteration reached"
        resumed = forkserver.run("train", str(config), "--resume")
        assert resumed.status == 0, resumed.output()
        assert final_result(out).differences(baseline.result) == []
    fault_report.row(
        "SIGTERM/SIGINT at a random step",
        f"checkpoint + exit 0 in {max(times):.2f} s max (limit 10 s); resume bit-identical",
        max(times) <= 10,
    )
    assert max(times) <= 10


def test_second_signal_exits_at_once(forkserver, tmp_path, fault_report):
    out = tmp_path / "out"
    config = write_config(tmp_path / "run.yaml", out)
    child = forkserver.spawn("train", str(config), env={"DANCECORE_FAULT_SAVE_DELAY": "0.5"})
    _wait_for((out / "checkpoints" / "iter-00000002.tmp").exists, child)  # second save under way
    child.signal(signal.SIGTERM)
    time.sleep(0.1)
    child.signal(signal.SIGTERM)
    began = time.monotonic()
    status = child.wait(30)
    elapsed = time.monotonic() - began
    plan = plan_resume(out)
    fault_report.row(
        "second signal", f"exit {status} in {elapsed:.2f} s (limit 2 s); previous checkpoint verifies", elapsed <= 2
    )
    assert status == 128 + signal.SIGTERM
    assert elapsed <= 2
    assert plan.path is not None and plan.path.name == "iter-00000001"
    assert any("iter-00000002.tmp" in m for m in plan.ignored)
