"""``dancecore train CONFIG --nproc N``: start N local ranks with torchrun and supervise them.

The launcher validates the DeepSpeed config for N ranks, builds DeepSpeed's native comm op once
(ranks compiling it together can abort), then runs ``python -m torch.distributed.run --standalone``
with the same config path, overrides and flags. torchrun stops every rank when one fails, and the
launcher returns non-zero; SIGINT/SIGTERM sent to the launcher are forwarded (ranks checkpoint at
the next iteration boundary and stop), and torchrun is told to die with the launcher, so no rank
outlives it. Several machines: see docs/distributed.md.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

EXIT_FAILED = 1

# Started in place of torchrun: ask the kernel to SIGTERM this process when the launcher dies
# (the setting survives exec), then become torchrun.
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "try:\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG\n"
    "except (OSError, AttributeError):\n"
    "    pass\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(1)  # the launcher is already gone\n"
    "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])\n"
)


def rank_command(args: argparse.Namespace, nproc: int) -> list[str]:
    """The torchrun command line that starts ``nproc`` local ranks of ``dancecore train``."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    command += ["-m", "dancecore.cli"]
    if getattr(args, "debug", False):
        command.append("--debug")
    command += ["train", str(args.config), *args.overrides]
    if getattr(args, "resume", False):
        command.append("--resume")
    if getattr(args, "allow_pickle", False):
        command.append("--allow-pickle")
    return command


def rank_environment(cuda: bool) -> dict[str, str]:
    """The ranks' environment: DeepSpeed on CPU when there is no GPU."""
    env = dict(os.environ)
    if not cuda:
        env["DS_ACCELERATOR"] = "cpu"
    return env


def launch_local(args: argparse.Namespace) -> int:
    """Validate, warm up, start ``args.nproc`` ranks and wait; returns the exit code."""
    import torch

    import dancecore.distributed as distributed
    from dancecore.config.schema import load_run

    nproc = int(args.nproc)
    run = load_run(Path(args.config), args.overrides)
    cfg = run.config
    from dancecore.config.schema import ConfigError

    errors = distributed.sequence_parallel_errors(cfg, nproc, run.policy.cls)
    if cfg.distributed.sequence_parallel == 1 and cfg.train.prompts_per_iteration % nproc:
        errors.append(
            f"train.prompts_per_iteration: {cfg.train.prompts_per_iteration} is not a multiple of --nproc {nproc}"
        )
    if errors:
        raise ConfigError(errors)
    cuda = torch.cuda.is_available() and not cfg.train.device.startswith("cpu")
    if cuda and torch.cuda.device_count() < nproc:
        print(f"warning: --nproc {nproc} but {torch.cuda.device_count()} GPU(s) visible", file=sys.stderr)
    env = rank_environment(cuda)
    os.environ.update({k: v for k, v in env.items() if k == "DS_ACCELERATOR"})
    distributed.deepspeed_config(cfg)
    print("[dancecore] preparing DeepSpeed's native ops (compiled once per machine; the first time takes minutes)")
    distributed.build_native_ops(cuda)
    command = rank_command(args, nproc)
    print(f"[dancecore] starting {nproc} ranks: {' '.join(command[1:])}", flush=True)
    return supervise(command, env)


def dying_with_this_process(command: list[str]) -> list[str]:
    """``command`` (a Python command line) started so that the kernel sends it SIGTERM when this
    process dies, however it dies: torchrun then stops the ranks, and none is orphaned."""
    if command[0] != sys.executable:
        raise ValueError("expected a command run by this Python interpreter")
    return [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *command[1:]]


def supervise(command: list[str], env: dict[str, str] | None = None) -> int:
    """Run ``command`` (torchrun) in its own session, tied to this process's life, forwarding
    SIGINT/SIGTERM to it; returns 0, 128 + the signal number when a signal killed it, or 1."""
    child = subprocess.Popen(dying_with_this_process(command), env=env, start_new_session=True)
    forwarded: list[int] = []

    def forward(signum: int, frame: Any) -> None:
        if child.poll() is None:
            forwarded.append(signum)
            child.send_signal(signum)  # torchrun passes it on to every rank

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if child.poll() is None:  # the launcher itself is failing: take the ranks down with it
            child.terminate()
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
    if code == 0:
        return 0
    if forwarded:
        name = signal.Signals(forwarded[0]).name
        print(
            f"stopped by {name}: the ranks were asked to checkpoint and stop (see above; continue with --resume)",
            file=sys.stderr,
        )
        return 128 + forwarded[0]
    if code < 0:
        print(f"error: the ranks were stopped by signal {-code}", file=sys.stderr)
        return 128 - code
    print(f"error: a rank failed (torchrun exit code {code}); its error is printed above", file=sys.stderr)
    return EXIT_FAILED
