"""Checks of a run config against the machine it is validated on: the input files it names and the
training device.

Input paths (``prompts.path``, ``eval.prompts``) written in a config file are looked up next to
the config file first, then in the working directory:

- a config kept beside its prompt files works from any directory (``dancecore train
  ~/runs/cats/run.yaml`` reads ``~/runs/cats/prompts.txt`` for ``path: prompts.txt``);
- configs written relative to the directory they are run from keep working: the bundled recipes
  name ``configs/prompts/x.txt``, relative to the repository root, and are run from there.

When both places hold the file, the one beside the config wins. The resolved path replaces the
written one in the validated config, so the run and its checkpoints record the file actually read.
Output paths (``output_dir``) stay relative to the working directory.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dancecore.config.schema import RunConfig

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def find_input_file(path: Path, base: Path | None) -> Path | None:
    """Where the input file ``path`` is: itself when absolute; else ``base / path`` when that file
    exists (``base``: the config file's directory), else ``path`` relative to the working directory;
    None when neither exists."""
    if path.is_absolute():
        return path if path.is_file() else None
    if base is not None and (base / path).is_file():
        return base / path
    return path if path.is_file() else None


def _not_found(key: str, path: Path, base: Path | None) -> str:
    if path.is_absolute():
        return f"{key}: prompt file not found: {path}"
    places = [f"the working directory {Path.cwd()}"]
    if base is not None and base.resolve() != Path.cwd().resolve():
        places.insert(0, f"the config's directory {base}")
    return f"{key}: prompt file not found: {path} (looked in {' and in '.join(places)})"


def resolve_input_files(config: RunConfig, base: Path | None, errors: list[str]) -> RunConfig:
    """``config`` with its prompt-file paths resolved as the module docstring describes; a missing
    file adds one error naming its key."""
    if config.prompts.path is not None:
        found = find_input_file(config.prompts.path, base)
        if found is None:
            errors.append(_not_found("prompts.path", config.prompts.path, base))
        else:
            config = config.model_copy(update={"prompts": config.prompts.model_copy(update={"path": found})})
    if config.eval is not None:
        found = find_input_file(config.eval.prompts, base)
        if found is None:
            errors.append(_not_found("eval.prompts", config.eval.prompts, base))
        else:
            config = config.model_copy(update={"eval": config.eval.model_copy(update={"prompts": found})})
    return config


def check_device(device: str, errors: list[str], key: str = "train.device") -> None:
    """An error naming ``key`` unless ``device`` is ``auto``, ``cpu`` or ``cuda[:N]`` and, for CUDA,
    this machine has that GPU (checked at ``dancecore validate``, before any model is loaded)."""
    if not _DEVICE.match(device):
        errors.append(f"{key}: unknown device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'")
        return
    if not device.startswith("cuda"):
        return
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(device.partition(":")[2] or 0)
    if count == 0:
        errors.append(
            f"{key}: {device!r} but this machine has no usable CUDA GPU (torch {torch.__version__}, "
            f"CUDA build: {torch.version.cuda or 'none'}); use 'auto' or 'cpu'"
        )
    elif index >= count:
        errors.append(f"{key}: {device!r} but this machine has {count} CUDA GPU(s) (cuda:0 to cuda:{count - 1})")
