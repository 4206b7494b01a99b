"""A fork server for the fault-injection suite: imports torch, diffusers, transformers and dancecore
once, then forks a fresh child per request that runs ``dancecore.cli.main(argv)``, exactly as the
``dancecore`` command does, in its own process that the tests can SIGKILL/SIGTERM.

Process start-up (imports) costs seconds on a small CPU machine; a fork costs milliseconds, which
is what makes dozens of kill/resume trials affordable. The children are real processes: signals,
exit codes, file descriptors and fsync behave as for the command itself (the suite also checks that
a plain ``dancecore`` subprocess gives bit-identical results).

Protocol: one JSON object per line on stdin, one reply per line on stdout.
  {"op": "spawn", "argv": [...], "cwd": str, "env": {...}, "log": path, "fsize_limit": int|null}
      -> {"pid": int}
  {"op": "wait", "pid": int, "timeout": float} -> {"status": int|null}
      (exit code; minus the signal number if killed; null while still running)
  {"op": "quit"} -> kills and reaps every child still running, then exits.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
import time
import traceback


def _preload() -> None:
    import torch

    torch.set_num_threads(1)  # no thread pool in the parent: forked children must not inherit one
    import matplotlib

    matplotlib.use("Agg")
    import dancecore.testing.tiny_policy  # noqa: F401  (the trial runs' policy: torch only)

    try:  # optional: the 2-rank trials (DS_ACCELERATOR=cpu is set by the client)
        import deepspeed  # noqa: F401

        import dancecore.distributed.engine  # noqa: F401
        import dancecore.training.run  # noqa: F401
    except ImportError:
        pass
    import matplotlib.pyplot  # noqa: F401
    import safetensors.torch  # noqa: F401

    import dancecore.builtins.algorithms  # noqa: F401
    import dancecore.builtins.rewards  # noqa: F401
    import dancecore.builtins.samplers  # noqa: F401
    import dancecore.cli  # noqa: F401
    import dancecore.training.trainer  # noqa: F401


def _child(request: dict) -> None:
    code = 1
    try:
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        sys.stdout = os.fdopen(1, "w", buffering=1)
        sys.stderr = os.fdopen(2, "w", buffering=1)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.chdir(request.get("cwd") or os.getcwd())
        os.environ.update(request.get("env") or {})
        limit = request.get("fsize_limit")
        if limit:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # over-limit writes then fail with EFBIG
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        from dancecore.cli import main

        code = int(main(list(request["argv"])) or 0)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _status(raw: int) -> int:
    return -os.WTERMSIG(raw) if os.WIFSIGNALED(raw) else os.WEXITSTATUS(raw)


def serve() -> None:
    """Answer requests until 'quit' or end of input."""
    _preload()
    children: dict[int, int | None] = {}
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        op = request["op"]
        if op == "spawn":
            sys.stdout.flush()
            pid = os.fork()
            if pid == 0:
                _child(request)
            children[pid] = None
            reply: dict = {"pid": pid}
        elif op == "wait":
            pid = request["pid"]
            deadline = time.monotonic() + float(request.get("timeout", 0))
            while children.get(pid) is None:
                done, raw = os.waitpid(pid, os.WNOHANG)
                if done:
                    children[pid] = _status(raw)
                    break
                if time.monotonic() >= deadline:
                    break
                time.sleep(0.002)
            reply = {"status": children.get(pid)}
        elif op == "quit":
            break
        else:
            reply = {"error": f"unknown op {op!r}"}
        print(json.dumps(reply), flush=True)
    for pid, status in children.items():
        if status is None:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass


if __name__ == "__main__":
    serve()
