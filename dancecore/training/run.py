"""Entry points that run a whole training job: on one process (:class:`LocalEngine`) or as one rank
of a DeepSpeed job. This module builds the trainer; :mod:`dancecore.distributed` only supplies the
process group and the engine."""

from __future__ import annotations

from typing import Any

import torch

from dancecore.config.schema import ResolvedRun


def train_distributed(run: ResolvedRun, resume: bool = False, *, allow_pickle: bool = False, log: Any = print) -> str:
    """Train ``run`` as one rank of a DeepSpeed job (or alone, as a world of one); every rank
    calls this. Returns 'finished' or 'stopped', like :meth:`Trainer.train`."""
    from dancecore.config.schema import ConfigError
    from dancecore.distributed.config import _select_accelerator, deepspeed_config, sequence_parallel_errors
    from dancecore.distributed.engine import DeepSpeedEngine
    from dancecore.distributed.process import _use_cuda, init_process_group, report_ranks, sequence_parallel_group
    from dancecore.training.trainer import Trainer

    cfg = run.config
    cuda = _use_cuda(cfg)
    _select_accelerator(cuda)
    ds_config = deepspeed_config(cfg)
    started_here = not torch.distributed.is_initialized()
    rank, world_size, local_rank = init_process_group(cuda)
    trainer = None
    try:
        errors = sequence_parallel_errors(cfg, world_size, run.policy.cls)
        if errors:
            raise ConfigError(errors)
        report_ranks(rank, world_size, local_rank, int(ds_config["zero_optimization"]["stage"]), log)
        trainer = Trainer(
            run,
            engine_factory=lambda module, _cfg: DeepSpeedEngine(module, cfg, ds_config),
            rank=rank,
            world_size=world_size,
            sequence_parallel=sequence_parallel_group(cfg.distributed.sequence_parallel, rank, world_size),
        )
        status = trainer.train(resume=resume, log=log, allow_pickle=allow_pickle)
        trainer.engine.check_replicas()  # type: ignore[attr-defined]
        return status
    finally:
        if trainer is not None and isinstance(trainer.engine, DeepSpeedEngine):
            trainer.engine.close()
        if started_here and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
