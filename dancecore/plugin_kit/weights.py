"""Helpers plugins share to find weights offline and to build tiny random-init models.

Weights come from a local directory or the Hugging Face cache, never from the network at run
time. Tiny presets are written once to ``$DANCECORE_CACHE`` (default ``~/.cache/dancecore``) in
the same layout as the real checkpoints and then loaded through the same loading code.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dancecore.errors import WeightsNotFoundError

#: ``pretrained: plugin:<name>`` names weights a plugin ships, through this entry-point group (the
#: entry point is a zero-argument callable returning the directory).
WEIGHTS_GROUP = "dancecore.weights"
PLUGIN_PREFIX = "plugin:"


def plugin_weights(name: str, what: str = "model") -> Path:
    """The directory of weights shipped by a plugin under the ``dancecore.weights`` entry point ``name``."""
    from importlib import metadata

    found = [ep for ep in metadata.entry_points(group=WEIGHTS_GROUP) if ep.name == name]
    if not found:
        known = sorted({ep.name for ep in metadata.entry_points(group=WEIGHTS_GROUP)})
        raise WeightsNotFoundError(
            f"{what} weights {PLUGIN_PREFIX}{name}: no installed plugin ships weights named {name!r} "
            f"(entry-point group {WEIGHTS_GROUP!r}; installed: {', '.join(known) or 'none'})"
        )
    entry = found[0]
    try:
        directory = Path(entry.load()())
    except Exception as exc:
        raise WeightsNotFoundError(
            f"{what} weights {PLUGIN_PREFIX}{name}: plugin entry point {entry.value} failed: {type(exc).__name__}: {exc}"
        ) from None
    if not directory.is_dir():
        raise WeightsNotFoundError(
            f"{what} weights {PLUGIN_PREFIX}{name}: {directory} (from {entry.value}) is not a directory"
        )
    return directory


def resolve_pretrained(source: str | Path, what: str = "model") -> Path:
    """Return the local directory holding ``source``: a directory path, ``plugin:<name>`` (weights an
    installed plugin ships, see :func:`plugin_weights`), or a Hugging Face repo id already present
    in the local cache (looked up offline)."""
    if isinstance(source, str) and source.startswith(PLUGIN_PREFIX):
        return plugin_weights(source.removeprefix(PLUGIN_PREFIX), what)
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise WeightsNotFoundError(f"{what} weights {source!r} is a file, expected a directory")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - huggingface_hub ships with diffusers/transformers
        raise WeightsNotFoundError(f"{what} weights not found at {source!r} (no such directory)") from None
    try:
        return Path(snapshot_download(str(source), local_files_only=True))
    except (LocalEntryNotFoundError, ValueError, OSError) as exc:
        raise WeightsNotFoundError(
            f"{what} weights {source!r}: no such directory and not in the Hugging Face cache "
            f"({type(exc).__name__}); download them once with `huggingface-cli download {source}` "
            "on a machine with network access, or give a local path"
        ) from None


def cache_root() -> Path:
    """Where tiny presets are materialised (``$DANCECORE_CACHE`` or ``~/.cache/dancecore``)."""
    return Path(os.environ.get("DANCECORE_CACHE", Path.home() / ".cache" / "dancecore"))


def materialise(name: str, spec: dict, build: Callable[[Path], None]) -> Path:
    """Build a model directory once, keyed by ``name`` and a hash of ``spec``; return its path.

    The directory is written to a temporary sibling and renamed into place, so a crash while
    building never leaves a half-written model behind.
    """
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    target = cache_root() / f"{name}-{digest}"
    if (target / ".complete").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        build(tmp)
        (tmp / ".complete").write_text(json.dumps(spec, sort_keys=True))
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


@dataclass(frozen=True)
class TinyTokenizerIds:
    """The vocabulary of :func:`write_tiny_tokenizer`: the 256 byte tokens (ids 0-255), then the
    special tokens, end-of-text last so that it has the highest id."""

    pad: int
    unk: int
    bos: int
    eos: int
    vocab_size: int

    def model_config(self) -> dict[str, int]:
        """The id fields of a transformers text-model config (CLIP, T5, Llama) matching this vocabulary."""
        return {
            "vocab_size": self.vocab_size,
            "pad_token_id": self.pad,
            "bos_token_id": self.bos,
            "eos_token_id": self.eos,
        }


#: Ids of the tiny tokenizer's special tokens, after the 256 byte tokens. Tiny model configs take
#: theirs from here, so that a change here changes every preset's spec and thus its cache directory.
TINY_TOKENIZER = TinyTokenizerIds(pad=256, unk=257, bos=258, eos=259, vocab_size=260)
_PAD, _UNK, _BOS, _EOS = "<pad>", "<unk>", "<s>", "</s>"


def write_tiny_tokenizer(directory: Path, model_max_length: int, *, bos: bool = True) -> TinyTokenizerIds:
    """Write a byte-level BPE tokenizer (256 byte tokens, then specials, no merges) loadable with
    ``AutoTokenizer.from_pretrained``; it stands in for the CLIP, T5 and Llama tokenizers of tiny
    presets. Every text is followed by end-of-text and, with ``bos``, preceded by ``<s>`` (T5 has
    no begin token). Returns the special ids, for the model config.

    End-of-text has the highest id, so a ``CLIPTextModel`` pools it whichever rule its config
    selects: the first ``eos_token_id``, or (for the legacy ``eos_token_id == 2``) the highest id.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers.pre_tokenizers import ByteLevel

    ids = TINY_TOKENIZER
    vocab = {token: i for i, token in enumerate(sorted(ByteLevel.alphabet()))}  # the 256 byte tokens
    vocab.update({_PAD: ids.pad, _UNK: ids.unk, _BOS: ids.bos, _EOS: ids.eos})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=_UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    template = f"{_BOS} $A {_EOS}" if bos else f"$A {_EOS}"
    specials = [(_BOS, ids.bos), (_EOS, ids.eos)] if bos else [(_EOS, ids.eos)]
    tokenizer.post_processor = processors.TemplateProcessing(single=template, special_tokens=specials)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "pad_token": _PAD,
        "unk_token": _UNK,
        "eos_token": _EOS,
        **({"bos_token": _BOS} if bos else {}),
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return ids
