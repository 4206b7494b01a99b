"""Process set-up of a multi-rank run: accelerator selection, native-op builds, the process group, rank reports."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from dancecore.config.schema import RunConfig
from dancecore.contracts.protocols import SequenceParallelGroup
from dancecore.distributed.config import _deepspeed, _select_accelerator

# ----------------------------------------------------------------------------- process set-up


def _use_cuda(cfg: RunConfig) -> bool:
    return torch.cuda.is_available() and not cfg.train.device.startswith("cpu")


@contextlib.contextmanager
def _machine_lock(name: str) -> Iterator[None]:
    """An exclusive lock shared by every process on this machine (a no-op if it cannot be made)."""
    path = Path(tempfile.gettempdir()) / f"dancecore-{name}.lock"
    try:
        handle = path.open("a")
    except OSError:
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_native_ops(cuda: bool | None = None) -> None:
    """Build (first use on a machine: a minute or two) and load the native op DeepSpeed's
    communication layer compiles when it starts (the shared-memory collectives on CPU).

    Ranks that compile it at the same time can abort, so the build is serialised by a machine-wide
    lock: the first process builds, the others then load the cached result. The launcher calls this
    once before starting ranks; every rank calls it again (a fast cached load) before DeepSpeed
    starts, which also covers ranks started by torchrun or the deepspeed launcher directly.
    """
    _select_accelerator(torch.cuda.is_available() if cuda is None else cuda)
    deepspeed = _deepspeed()
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return
    with _machine_lock("deepspeed-ops"):
        builder.load(verbose=False)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def init_process_group(cuda: bool) -> tuple[int, int, int]:
    """Join the process group (NCCL on GPUs, gloo on CPU); returns (rank, world size, local rank).

    Ranks started by a launcher find RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT in the environment;
    a process started alone (``distributed.backend=deepspeed`` without ``--nproc``) becomes a
    world of one.
    """
    if "RANK" not in os.environ and "LOCAL_RANK" not in os.environ:
        os.environ.update(
            RANK="0",
            LOCAL_RANK="0",
            WORLD_SIZE="1",
            LOCAL_WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(_free_port()),
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    build_native_ops(cuda)
    deepspeed = _deepspeed()

    _quiet_deepspeed()
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=False)
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank


def sequence_parallel_group(size: int, rank: int, world_size: int) -> SequenceParallelGroup | None:
    """This rank's group of ``size`` consecutive ranks (ranks 0..N-1, N..2N-1, ...: on one node
    when N divides the GPUs per node, where all-to-all is fastest); None when ``size`` is 1.

    Every rank creates every group, in the same order, as ``torch.distributed.new_group`` requires.
    """
    if size == 1:
        return None
    ours = None
    for start in range(0, world_size, size):
        ranks = tuple(range(start, start + size))
        group = torch.distributed.new_group(list(ranks))
        if rank in ranks:
            ours = SequenceParallelGroup(size=size, rank=rank - start, group=group, ranks=ranks)
    return ours


def _quiet_deepspeed() -> None:
    """DeepSpeed logs its whole config and every step at INFO on every rank; keep warnings."""
    import logging

    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)


def report_ranks(rank: int, world_size: int, local_rank: int, stage: int, log: Any = print) -> list[str]:
    """Every rank logs its host; rank 0 then lists who joined. Returns every rank's host name."""
    host = socket.gethostname()
    device = f"cuda:{torch.cuda.current_device()}" if torch.distributed.get_backend() == "nccl" else "cpu"
    log(f"[dancecore] rank {rank}/{world_size} (local rank {local_rank}) on {host}, pid {os.getpid()}, {device}")
    hosts: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(hosts, host)
    if rank == 0:
        by_host: dict[str, list[int]] = {}
        for r, h in enumerate(hosts):
            by_host.setdefault(str(h), []).append(r)
        listing = "; ".join(f"{h}: ranks {_ranges(rs)}" for h, rs in by_host.items())
        log(f"[dancecore] world size {world_size} on {len(by_host)} host(s), DeepSpeed ZeRO stage {stage}: {listing}")
    return [str(h) for h in hosts]


def _ranges(ranks: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    parts: list[str] = []
    start = prev = ranks[0]
    for r in [*ranks[1:], None]:
        if r is not None and r == prev + 1:
            prev = r
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if r is not None:
            start = prev = r
    return ",".join(parts)
