"""Multi-process training: the DeepSpeed configuration, the process group, the DeepSpeed engine
(the only importer of deepspeed in dancecore) and the local launcher.

May import: training (to plug its engine into the trainer), config, checkpoint, errors.
"""

import importlib as _importlib
from typing import Any as _Any

_HOMES = ("dancecore.distributed.config", "dancecore.distributed.process", "dancecore.distributed.engine")


def __getattr__(name: str) -> _Any:  # the old flat module's names keep working for one release
    if name == "train_distributed":
        return _importlib.import_module("dancecore.training.run").train_distributed
    for home in _HOMES:
        module = _importlib.import_module(home)
        if hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f"module 'dancecore.distributed' has no attribute {name!r}")
