"""A real ``dancecore serve-reward`` process on a loopback ephemeral port, for the serving tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.conftest import ROOT

READY = re.compile(r"serving rewards .* on (http://\S+) ")


class RewardServer:
    """``dancecore serve-reward ARGS --port 0`` in a subprocess; ``url`` once it listens."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, pythonpath: list[Path] | None = None) -> None:
        paths = [str(ROOT), *(str(p) for p in pythonpath or [])]
        full_env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(paths),
            **(env or {}),
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dancecore.cli", "serve-reward", *args, "--port", "0", "--threads", "1"],
            cwd=ROOT,
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self.url = self._wait_ready(timeout=60.0)
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _wait_ready(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        assert self.process.stdout is not None
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            match = READY.search(line)
            if match:
                return match.group(1)
        self.kill()
        raise RuntimeError("reward server did not start:\n" + "".join(self.lines))

    def _drain(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    def output(self) -> str:
        """Everything the server printed so far."""
        return "".join(self.lines)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        """SIGKILL (no clean-up)."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
