"""The ``clip-score`` reward on a tiny random-init CLIP, checked against transformers' own pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dancecore_rewards_clip.reward import CLIPScore, tiny_clip_dir
from PIL import Image
from pydantic import ValidationError

from dancecore import Reward, WeightsNotFoundError
from dancecore.testing import contract_problems, load_plugin


@pytest.fixture(scope="module")
def reward() -> CLIPScore:
    return CLIPScore(CLIPScore.Config(preset="tiny"))


def _images(n: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Random 8-bit images as float tensors in [0, 1] (exactly what a PNG would hold)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, height, width), generator=generator).float() / 255


def _to_pil(image: torch.Tensor) -> Image.Image:
    array = (image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(array))


def _transformers_clip_score(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """The reference: CLIPProcessor on PIL images and CLIPModel.forward, as its documentation shows."""
    from transformers import AutoProcessor, CLIPModel

    model = CLIPModel.from_pretrained(tiny_clip_dir(), local_files_only=True).eval()
    processor = AutoProcessor.from_pretrained(tiny_clip_dir(), local_files_only=True)
    inputs = processor(
        text=prompts,
        images=[_to_pil(i) for i in images],
        return_tensors="pt",
        padding="max_length",
        max_length=77,
        truncation=True,
    )
    with torch.no_grad():
        out = model(**inputs)
    return torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds, dim=-1)


def test_entry_point_honours_the_reward_contract(reward):
    assert load_plugin("reward", "clip-score") is CLIPScore
    assert contract_problems("reward", CLIPScore) == []
    assert isinstance(reward, Reward)


def test_equals_transformers_clip_at_model_resolution(reward):
    images = _images(4, 32, 32)
    prompts = ["a red bicycle", "two dogs in the snow", "a red bicycle", "An astronaut, riding a horse!"]
    expected = _transformers_clip_score(images, prompts)
    got = reward.score(images, prompts)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert float(expected.std()) > 1e-3  # scores differ between samples: the comparison means something


def test_close_to_transformers_clip_when_resizing(reward):
    """CLIPImageProcessor resizes PIL images; the reward resizes tensors (no PNG round trip).
    Both are antialiased bicubic, so the scores stay close."""
    images = _images(3, 64, 48, seed=1)
    prompts = ["a cat", "a dog", "a bird"]
    torch.testing.assert_close(
        reward.score(images, prompts), _transformers_clip_score(images, prompts), rtol=0, atol=5e-3
    )


def test_deterministic_and_batch_independent(reward):
    images = _images(5, 40, 40, seed=2)
    prompts = ["a", "b", "a", "c", "b"]
    first = reward.score(images, prompts)
    assert first.shape == (5,) and first.dtype == torch.float32
    assert ((first >= -1) & (first <= 1)).all()
    assert torch.equal(first, reward.score(images.clone(), list(prompts)))
    one_by_one = torch.cat([reward.score(images[i : i + 1], [prompts[i]]) for i in range(5)])
    torch.testing.assert_close(first, one_by_one, rtol=0, atol=1e-6)
    small_batches = CLIPScore(CLIPScore.Config(preset="tiny", batch_size=2))
    torch.testing.assert_close(first, small_batches.score(images, prompts), rtol=0, atol=1e-6)


def test_videos_average_their_frames(reward):
    frames = _images(6, 32, 32, seed=3).view(2, 3, 3, 32, 32)
    per_frame = reward.score(frames.reshape(6, 3, 32, 32), ["x"] * 3 + ["y"] * 3).view(2, 3)
    torch.testing.assert_close(reward.score(frames, ["x", "y"]), per_frame.mean(dim=1), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("samples", "prompts", "match"),
    [
        (torch.rand(2, 3, 32, 32), ["only one"], "2 prompts"),
        (torch.rand(2, 3, 32, 32) * 2 - 1, ["a", "b"], r"\[0, 1\]"),
        (torch.rand(2, 4, 32, 32), ["a", "b"], "expected"),
        (torch.full((1, 3, 32, 32), float("inf")), ["a"], "NaN or infinite"),
    ],
)
def test_bad_inputs_raise(reward, samples, prompts, match):
    with pytest.raises(ValueError, match=match):
        reward.score(samples, prompts)


def test_missing_weights_are_named(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="nowhere"):
        CLIPScore(CLIPScore.Config(pretrained=str(tmp_path / "nowhere")))
    with pytest.raises(WeightsNotFoundError, match="dancecore-tests/no-such-clip"):
        CLIPScore(CLIPScore.Config(pretrained="dancecore-tests/no-such-clip"))


def test_loads_a_local_directory(reward):
    from_dir = CLIPScore(CLIPScore.Config(pretrained=str(tiny_clip_dir())))
    images = _images(2, 32, 32, seed=4)
    assert torch.equal(from_dir.score(images, ["a", "b"]), reward.score(images, ["a", "b"]))


@pytest.mark.parametrize(
    "options",
    [{"pretrained": None}, {"preset": "tiny", "pretrained": "openai/clip-vit-large-patch14"}, {"scale": 100}],
)
def test_invalid_configs_are_rejected(options):
    with pytest.raises(ValidationError):
        CLIPScore.Config.model_validate(options)


def test_passes_the_dancecore_conformance_kit():
    from dancecore.testing import check_reward_plugin

    check_reward_plugin("clip-score", {"preset": "tiny"})
