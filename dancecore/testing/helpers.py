"""Small helpers for plugin tests: build a component as a run would, sample inputs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dancecore.contracts.protocols import BuildContext
from dancecore.contracts.records import Prompt, PromptBatch
from dancecore.registry import load as load_plugin

#: The prompts the conformance kits use unless told otherwise.
DEFAULT_PROMPTS: tuple[str, ...] = ("a red cube", "a cat on a mat", "a blue sphere")


def build_component(
    kind: str, name: str, options: dict[str, Any] | None = None, context: BuildContext | None = None
) -> Any:
    """Build the installed component ``name`` of ``kind`` ('policy', 'sampler', 'reward', 'optimizer')
    from its options, as a run would (``cls(cls.Config(**options), context)``)."""
    cls = load_plugin(kind, name)
    return cls(cls.Config.model_validate(options or {}), context or BuildContext())


def sample_images(batch: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Random images in [0, 1], shape (batch, 3, size, size), from a fixed seed."""
    return torch.rand((batch, 3, size, size), generator=torch.Generator().manual_seed(seed))


def prompt_batch(prompts: PromptBatch | Sequence[str | Prompt] | None = None) -> PromptBatch:
    """A :class:`PromptBatch` from prompt texts or :class:`Prompt` records (the kits' default prompts
    when ``None``); a ``PromptBatch`` is returned as it is."""
    if isinstance(prompts, PromptBatch):
        return prompts
    items = DEFAULT_PROMPTS if prompts is None else prompts
    return PromptBatch(tuple(p if isinstance(p, Prompt) else Prompt(p, i) for i, p in enumerate(items)))


def recipe_overrides(path: Path) -> list[str]:
    """The ``key=value`` overrides of the ``dancecore train <recipe> ...`` command written in the
    header comment of the recipe at ``path`` (continued over lines ending in ``\\``), so a test can
    check that the documented tiny-preset command validates and runs."""
    import shlex

    lines = path.read_text().splitlines()
    start = next((i for i, line in enumerate(lines) if line.lstrip("# ").startswith("dancecore train ")), None)
    assert start is not None, f"{path}: no '# dancecore train ...' command in the header"
    command = ""
    for line in lines[start:]:
        command += " " + line.lstrip("#").strip().rstrip("\\")
        if not line.rstrip().endswith("\\"):
            break
    words = shlex.split(command)
    assert words[:2] == ["dancecore", "train"] and path.as_posix().endswith(words[2]), (
        f"{path}: the header command trains {words[2:3]}, not this recipe"
    )
    return words[3:]
