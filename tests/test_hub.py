"""The tiny tokenizer shared by every tiny preset, and the cache that tiny presets are built into."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dancecore.plugin_kit.weights import TINY_TOKENIZER, materialise, write_tiny_tokenizer

PROMPTS = ["a cat", "a dog"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tokenizer")
    assert write_tiny_tokenizer(directory, 77) == TINY_TOKENIZER
    return directory


def _load(directory: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory, local_files_only=True)


def test_bytes_come_first_and_end_of_text_has_the_highest_id(tokenizer_dir):
    tokenizer = _load(tokenizer_dir)
    ids = TINY_TOKENIZER
    assert len(tokenizer) == ids.vocab_size == 260
    assert (tokenizer.pad_token_id, tokenizer.unk_token_id) == (ids.pad, ids.unk)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (ids.bos, ids.eos)
    assert ids.eos == ids.vocab_size - 1
    encoded = tokenizer("a cat").input_ids
    assert encoded[0] == ids.bos and encoded[-1] == ids.eos
    assert all(0 <= i < 256 for i in encoded[1:-1])  # "a", " ", "c", "a", "t": byte tokens
    assert tokenizer.decode(encoded, skip_special_tokens=True) == "a cat"
    assert ids.model_config() == {"vocab_size": 260, "pad_token_id": 256, "bos_token_id": 258, "eos_token_id": 259}


def test_without_bos_only_end_of_text_is_added(tmp_path):
    assert write_tiny_tokenizer(tmp_path, 32, bos=False) == TINY_TOKENIZER
    tokenizer = _load(tmp_path)
    assert tokenizer.bos_token is None
    encoded = tokenizer("ab").input_ids
    assert len(encoded) == 3 and encoded[-1] == TINY_TOKENIZER.eos
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["model_max_length"] == 32


@pytest.mark.parametrize("eos_token_id", [TINY_TOKENIZER.eos, 2], ids=["eos-id pooling", "legacy argmax pooling"])
def test_tiny_clip_pools_end_of_text_so_prompts_differ(tokenizer_dir, eos_token_id):
    """transformers' CLIPTextModel pools the first ``eos_token_id`` or, for the legacy
    ``eos_token_id == 2``, the highest token id: either way end-of-text, so the pooled embedding
    depends on the whole prompt (with end-of-text at id 2 it pooled the space after "a")."""
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = _load(tokenizer_dir)
    config = CLIPTextConfig(
        **{**TINY_TOKENIZER.model_config(), "eos_token_id": eos_token_id},
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=77,
    )
    torch.manual_seed(0)
    model = CLIPTextModel(config).eval()
    tokens = tokenizer(PROMPTS, padding="max_length", max_length=16, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=tokens.input_ids)
    eos_positions = (tokens.input_ids == TINY_TOKENIZER.eos).int().argmax(dim=1)
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state[torch.arange(2), eos_positions])
    assert not torch.allclose(out.pooler_output[0], out.pooler_output[1], atol=1e-4)


def test_tiny_flux_pooled_embeddings_tell_prompts_apart():
    pytest.importorskip("dancecore_flux", reason="install plugins/dancecore-flux")
    from dancecore_flux.policy import TINY_SPEC, FluxPolicy

    from dancecore.contracts.records import Prompt, PromptBatch

    assert TINY_SPEC["clip"]["eos_token_id"] == TINY_SPEC["t5"]["eos_token_id"] == TINY_TOKENIZER.eos
    policy = FluxPolicy(FluxPolicy.Config(preset="tiny"))
    cond = policy.encode_prompts(PromptBatch(tuple(Prompt(text, i) for i, text in enumerate(PROMPTS))))
    assert not torch.allclose(cond.pooled_embeds[0], cond.pooled_embeds[1], atol=1e-4)


def test_materialise_builds_once_per_spec(tmp_path, monkeypatch):
    monkeypatch.setenv("DANCECORE_CACHE", str(tmp_path))
    built: list[Path] = []

    def build(root: Path) -> None:
        built.append(root)
        (root / "weights").write_text("w")

    first = materialise("tiny-x", {"eos": 259}, build)
    assert materialise("tiny-x", {"eos": 259}, build) == first and len(built) == 1
    other = materialise("tiny-x", {"eos": 2}, build)
    assert other != first and len(built) == 2
    assert (first / "weights").is_file() and (other / ".complete").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.name, other.name])  # no leftovers
