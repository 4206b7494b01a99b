"""The ``pickscore`` reward on a tiny random-init CLIP, against PickScore's documented computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dancecore_rewards_pickscore.reward import PickScore, tiny_pickscore_dir
from PIL import Image
from pydantic import ValidationError

from dancecore import Reward, WeightsNotFoundError
from dancecore.testing import contract_problems, load_plugin


@pytest.fixture(scope="module")
def reward() -> PickScore:
    return PickScore(PickScore.Config(preset="tiny"))


def _images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=generator).float() / 255


def _features(output) -> torch.Tensor:
    # transformers 4.x returns a tensor, 5.x an output whose pooler_output is the projection.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _reference_pickscore(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """PickScore as its model card computes it: processor on PIL images and padded text,
    normalised get_*_features, ``logit_scale.exp() * text @ image.T``, one diagonal entry per pair."""
    from transformers import AutoModel, AutoProcessor

    root = tiny_pickscore_dir()
    processor = AutoProcessor.from_pretrained(root / "processor", local_files_only=True)
    model = AutoModel.from_pretrained(root / "model", local_files_only=True).eval()
    pil = [Image.fromarray(np.ascontiguousarray((i * 255).round().byte().permute(1, 2, 0).numpy())) for i in images]
    image_inputs = processor(images=pil, return_tensors="pt")
    text_inputs = processor(text=prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        image_embs = _features(model.get_image_features(**image_inputs))
        image_embs = image_embs / torch.norm(image_embs, dim=-1, keepdim=True)
        text_embs = _features(model.get_text_features(**text_inputs))
        text_embs = text_embs / torch.norm(text_embs, dim=-1, keepdim=True)
        scores = model.logit_scale.exp() * (text_embs @ image_embs.T)
    return torch.diagonal(scores)


def test_entry_point_honours_the_reward_contract(reward):
    assert load_plugin("reward", "pickscore") is PickScore
    assert contract_problems("reward", PickScore) == []
    assert isinstance(reward, Reward)


def test_equals_the_reference_computation(reward):
    images = _images(4)
    prompts = ["a red bicycle", "two dogs in the snow", "a red bicycle", "An astronaut riding a horse"]
    expected = _reference_pickscore(images, prompts)
    got = reward.score(images, prompts)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    assert float(expected.std()) > 1e-2


def test_scale_is_the_learned_logit_scale(reward):
    """PickScore is the CLIP logit: ~100 times the cosine similarity for the (tiny) model's scale."""
    images = _images(3, seed=1)
    prompts = ["a", "b", "c"]
    image_features, text_features, _ = reward.embedder.embed(images, prompts)
    cosine = (image_features * text_features).sum(dim=-1)
    torch.testing.assert_close(reward.score(images, prompts), 100.0 * cosine, rtol=1e-4, atol=1e-4)


def test_deterministic_and_batch_independent(reward):
    images = _images(4, size=48, seed=2)
    prompts = ["x", "y", "x", "z"]
    first = reward.score(images, prompts)
    assert first.shape == (4,) and first.dtype == torch.float32
    assert torch.equal(first, reward.score(images.clone(), list(prompts)))
    one_by_one = torch.cat([reward.score(images[i : i + 1], [prompts[i]]) for i in range(4)])
    torch.testing.assert_close(first, one_by_one, rtol=0, atol=1e-4)


def test_bad_inputs_raise(reward):
    with pytest.raises(ValueError, match="2 prompts"):
        reward.score(_images(2), ["one"])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        reward.score(_images(1) * 2 - 1, ["a"])


def test_missing_weights_are_named(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="no-pickscore-here"):
        PickScore(PickScore.Config(pretrained=str(tmp_path / "no-pickscore-here")))
    model_only = PickScore.Config(pretrained=str(tiny_pickscore_dir() / "model"), processor="dancecore-tests/no-proc")
    with pytest.raises(WeightsNotFoundError, match="dancecore-tests/no-proc"):
        PickScore(model_only)


def test_loads_local_directories(reward):
    root = tiny_pickscore_dir()
    from_dirs = PickScore(PickScore.Config(pretrained=str(root / "model"), processor=str(root / "processor")))
    images = _images(2, seed=3)
    assert torch.equal(from_dirs.score(images, ["a", "b"]), reward.score(images, ["a", "b"]))


@pytest.mark.parametrize(
    "options",
    [{"pretrained": None}, {"preset": "tiny", "processor": "x"}, {"preset": "tiny", "pretrained": "y"}, {"scale": 1}],
)
def test_invalid_configs_are_rejected(options):
    with pytest.raises(ValidationError):
        PickScore.Config.model_validate(options)


def test_passes_the_dancecore_conformance_kit():
    from dancecore.testing import check_reward_plugin

    check_reward_plugin("pickscore", {"preset": "tiny"})
