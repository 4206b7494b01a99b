"""Prompt datasets: plain text (one prompt per line) or JSON lines (``{"prompt": ..., "image": ...}``),
and the seeded order in which a run visits them."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dancecore.config.schema import PromptsConfig
from dancecore.contracts.records import Prompt
from dancecore.errors import PromptFileError
from dancecore.functional.seeding import derive_seed


def read_prompt_file(path: Path) -> list[Prompt]:
    """Read prompts from ``path``: ``.jsonl``/``.json`` as JSON lines, anything else as plain text."""
    if not path.is_file():
        raise PromptFileError(f"prompt file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise PromptFileError(f"cannot read prompt file {path}: {exc}") from None
    prompts: list[Prompt] = []
    json_lines = path.suffix in (".jsonl", ".json")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if not json_lines:
            prompts.append(Prompt(text=line.strip(), index=len(prompts)))
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PromptFileError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise PromptFileError(f"{path}:{number}: expected an object with a string 'prompt' field")
        image = record.get("image")
        if image is not None and not isinstance(image, str):
            raise PromptFileError(f"{path}:{number}: 'image' must be a path string")
        if image is not None and not Path(image).is_absolute():
            image = str(path.parent / image)
        prompts.append(Prompt(text=record["prompt"], index=len(prompts), image=image))
    if not prompts:
        raise PromptFileError(f"prompt file {path} holds no prompt")
    return prompts


def load_prompts(config: PromptsConfig) -> list[Prompt]:
    """The run's prompts: from ``prompts.path`` or the inline ``prompts.texts``."""
    if config.path is not None:
        return read_prompt_file(config.path)
    return [Prompt(text=t, index=i) for i, t in enumerate(config.texts or [])]


class PromptOrder:
    """Which prompts iteration ``i`` uses: a seeded permutation per epoch, walked in order.

    The position in the dataset (the data cursor) is ``iteration * per_iteration``, so the
    order is a pure function of the seed and the iteration and resumes exactly.
    """

    def __init__(self, prompts: list[Prompt], per_iteration: int, seed: int, shuffle: bool = True) -> None:
        self.prompts = prompts
        self.per_iteration = per_iteration
        self.seed = seed
        self.shuffle = shuffle
        self._epoch = -1
        self._perm = torch.arange(len(prompts))

    def _permutation(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(len(self.prompts))
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(derive_seed(self.seed, "prompts", epoch))
            self._perm, self._epoch = torch.randperm(len(self.prompts), generator=g), epoch
        return self._perm

    def cursor(self, iteration: int) -> int:
        """Global position in the prompt stream at the start of ``iteration``."""
        return iteration * self.per_iteration

    def batch(self, iteration: int) -> list[Prompt]:
        """The ``per_iteration`` prompts of ``iteration`` (over all ranks)."""
        return self.batch_at(self.cursor(iteration))

    def batch_at(self, cursor: int) -> list[Prompt]:
        """The ``per_iteration`` prompts starting at position ``cursor`` of the prompt stream
        (the data cursor a checkpoint saves)."""
        out = []
        for position in range(cursor, cursor + self.per_iteration):
            epoch, offset = divmod(position, len(self.prompts))
            out.append(self.prompts[int(self._permutation(epoch)[offset])])
        return out
