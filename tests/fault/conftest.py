"""Fault-injection suite: shared machinery.

- every test under tests/fault is marked ``fault`` (select with ``-m fault``);
- ``fault_report`` collects one row per guarantee; the table is printed at the end of the session;
- ``forkserver`` runs the ``dancecore`` CLI in forked child processes (see forkserver.py) that the
  tests kill, signal and resume;
- the fixture plugins in fixtures/site are put on the path (never installed into the venv).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT, TINY_RUN, deep_update

HERE = Path(__file__).resolve().parent
FIXTURE_SITE = HERE / "fixtures" / "site"

#: The trial run: 6 iterations, a checkpoint after each, an LR warmup then a cosine decay that ends
#: after the run (the learning rate differs at every update, so the schedule's state matters), 1 prompt
#: per iteration out of 4 (so the data cursor matters).
TRIAL_RUN: dict[str, Any] = deep_update(
    TINY_RUN,
    {
        "prompts": {"texts": ["a red cube", "a blue sphere", "a green cone", "a yellow torus"]},
        "train": {
            "iterations": 6,
            "prompts_per_iteration": 1,
            "checkpoint_every": 1,
            "keep_checkpoints": 3,
            "learning_rate": 3e-3,
            "lr_warmup_updates": 2,
            "lr_decay": "cosine",
            "lr_decay_updates": 8,
            "num_threads": 1,
            "ema": {"decay": 0.5, "every": 2},  # the EMA is state too: kills and resumes must keep it exact
        },
    },
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "fault: fault-injection suite (kills, corruption, bad input, failures)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.fault)


# ------------------------------------------------------------------------------- summary table


@dataclass
class FaultReport:
    """Rows of the summary table: (guarantee, figure, passed)."""

    rows: dict[str, tuple[str, bool]] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    def row(self, test: str, figure: str, passed: bool) -> None:
        """Record (or replace) one row."""
        self.rows[test] = (figure, passed)


_REPORT = FaultReport()


@pytest.fixture(scope="session")
def fault_report() -> FaultReport:
    """The session's summary table."""
    return _REPORT


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if not _REPORT.rows:
        return
    width = max(len(t) for t in _REPORT.rows)
    tr = terminalreporter
    tr.section("fault-injection summary")
    tr.write_line(f"{'test':<{width}} | {'pass figure':<60} | result")
    tr.write_line(f"{'-' * width}-+-{'-' * 60}-+-------")
    for test, (figure, passed) in _REPORT.rows.items():
        tr.write_line(f"{test:<{width}} | {figure:<60} | {'PASS' if passed else 'FAIL'}")
    tr.write_line(f"(suite wall time {time.monotonic() - _REPORT.started:.0f} s)")


# --------------------------------------------------------------------------------- fork server


@dataclass
class Child:
    """A forked ``dancecore`` run."""

    pid: int
    log: Path
    server: ForkServer
    status: int | None = None

    def wait(self, timeout: float = 120.0) -> int | None:
        """Exit code (minus the signal when killed), or None if still running after ``timeout``."""
        if self.status is None:
            self.status = self.server.request({"op": "wait", "pid": self.pid, "timeout": timeout})["status"]
        return self.status

    def poll(self) -> int | None:
        """Exit code if finished, else None."""
        return self.wait(0)

    def signal(self, signum: int) -> None:
        """Send a signal (ignored when the process is gone)."""
        try:
            os.kill(self.pid, signum)
        except ProcessLookupError:
            pass

    def output(self) -> str:
        """Everything the run printed."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class ForkServer:
    """Client of forkserver.py."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.count = 0
        self.lock = threading.Lock()
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "DS_ACCELERATOR": "cpu",  # DeepSpeed (imported once here, for the 2-rank trials) on CPU
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(FIXTURE_SITE)]),
        }
        self.process = subprocess.Popen(
            [sys.executable, str(HERE / "forkserver.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=env,
        )
        ready = self.process.stdout.readline()  # type: ignore[union-attr]
        if "ready" not in ready:
            raise RuntimeError(f"fork server did not start: {ready!r}")

    def request(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send one request and return the reply."""
        with self.lock:
            self.process.stdin.write(json.dumps(message) + "\n")  # type: ignore[union-attr]
            self.process.stdin.flush()  # type: ignore[union-attr]
            return json.loads(self.process.stdout.readline())  # type: ignore[union-attr]

    def spawn(self, *argv: str, env: dict[str, str] | None = None, fsize_limit: int | None = None) -> Child:
        """Start ``dancecore <argv>`` in a forked child."""
        self.count += 1
        log = self.workdir / f"child-{self.count:04d}.log"
        reply = self.request(
            {
                "op": "spawn",
                "argv": list(argv),
                "cwd": str(ROOT),
                "env": env or {},
                "log": str(log),
                "fsize_limit": fsize_limit,
            }
        )
        return Child(reply["pid"], log, self)

    def run(self, *argv: str, env: dict[str, str] | None = None, timeout: float = 180.0, **kw: Any) -> Child:
        """Start and wait for a run."""
        child = self.spawn(*argv, env=env, **kw)
        child.wait(timeout)
        return child

    def close(self) -> None:
        """Kill leftover children and stop the server."""
        if self.process.poll() is None:
            try:
                self.process.stdin.write(json.dumps({"op": "quit"}) + "\n")  # type: ignore[union-attr]
                self.process.stdin.flush()  # type: ignore[union-attr]
                self.process.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                stream.close()


@pytest.fixture(scope="session")
def forkserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ForkServer]:
    """A fork server shared by the whole session."""
    server = ForkServer(tmp_path_factory.mktemp("forkserver"))
    yield server
    server.close()


# ---------------------------------------------------------------------------------- helpers


def write_config(path: Path, output_dir: Path, **updates: Any) -> Path:
    """Write a trial config (TRIAL_RUN with ``updates``) as YAML."""
    data = deep_update(TRIAL_RUN, {"output_dir": str(output_dir), **updates})
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass(frozen=True)
class RunResult:
    """What a finished run leaves behind, reduced to what must be bit-identical across runs."""

    model_sha: str
    optimizer_sha: str
    rank_sha: str
    state: dict[str, Any]
    metrics: list[dict[str, Any]]
    ema_sha: str = ""

    def differences(self, other: RunResult) -> list[str]:
        """Names of the parts that differ."""
        out = [
            name
            for name in ("model_sha", "optimizer_sha", "rank_sha", "state", "ema_sha")
            if getattr(self, name) != getattr(other, name)
        ]
        if self.metrics != other.metrics:
            out.append("metrics")
        return out


def final_result(output_dir: Path, iteration: int = 6) -> RunResult:
    """The final checkpoint and metrics of a run (``seconds`` and config paths left out)."""
    final = output_dir / "checkpoints" / f"iter-{iteration:08d}"
    state = json.loads((final / "state.json").read_text())
    state.pop("config", None)
    metrics = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    for record in metrics:
        record.pop("seconds", None)
        for key in [k for k in record if k.startswith("time/")]:  # phase seconds: timings, not results
            record.pop(key)
    return RunResult(
        sha256(final / "model.safetensors"),
        sha256(final / "optimizer.safetensors"),
        sha256(final / "rank-00000.json"),
        state,
        metrics,
        sha256(final / "ema.safetensors") if (final / "ema.safetensors").is_file() else "",
    )


def copy_run(source: Path, destination: Path) -> Path:
    """A copy of a run's output directory."""
    shutil.copytree(source, destination, symlinks=True)
    return destination


@pytest.fixture(scope="module")
def fixture_plugins() -> Iterator[Path]:
    """Put the fixture plugins (fixtures/site) on sys.path for one test module of the fault suite;
    removed again afterwards so they never leak into other tests."""
    import importlib

    sys.path.insert(0, str(FIXTURE_SITE))
    importlib.invalidate_caches()
    yield FIXTURE_SITE
    sys.path.remove(str(FIXTURE_SITE))
    for name in [m for m in sys.modules if m.startswith("dancecore_fault_fixtures")]:
        del sys.modules[name]
    importlib.invalidate_caches()
