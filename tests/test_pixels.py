"""The input and output checks reward plugins share, on hand-made cases."""

from __future__ import annotations

import pytest
import torch

from dancecore.plugin_kit.pixels import FlatFrames, check_pixels, finite_or_raise, flatten_frames


def test_images_are_one_frame_each():
    images = torch.rand(2, 3, 4, 5)
    flat = flatten_frames(images, ["a", "b"])
    assert isinstance(flat, FlatFrames)
    assert flat.per_sample == 1 and flat.texts == ["a", "b"]
    assert torch.equal(flat.frames, images)


def test_video_frames_follow_each_other_with_their_prompt():
    videos = torch.rand(2, 3, 3, 4, 4)  # two videos of three frames
    frames, texts, per_sample = flatten_frames(videos, ("x", "y"))
    assert frames.shape == (6, 3, 4, 4) and per_sample == 3
    assert texts == ["x", "x", "x", "y", "y", "y"]
    assert torch.equal(frames[4], videos[1, 1])


def test_rounding_overshoot_is_accepted_and_clamped():
    images = torch.tensor([-5e-4, 0.5, 1.0 + 5e-4]).view(1, 3, 1, 1)
    frames = flatten_frames(images, ["a"]).frames
    assert frames.flatten().tolist() == [0.0, 0.5, 1.0]


def test_empty_batch_passes():
    flat = flatten_frames(torch.zeros(0, 3, 8, 8), [])
    assert flat.frames.shape == (0, 3, 8, 8) and flat.texts == []


@pytest.mark.parametrize(
    "samples",
    [torch.rand(3, 4, 4), torch.rand(1, 4, 4, 4), torch.rand(1, 2, 1, 4, 4), torch.rand(1, 1, 1, 3, 4, 4)],
    ids=["3-d", "4 channels", "video with 1 channel", "6-d"],
)
def test_wrong_shapes_are_named(samples):
    with pytest.raises(ValueError, match=rf"videos, got \({', '.join(map(str, samples.shape))}\)"):
        check_pixels(samples, ["a"] * samples.shape[0])


def test_a_non_tensor_is_named():
    with pytest.raises(ValueError, match="got list"):
        check_pixels([[0.5]], ["a"])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("prompts", "given"), [(["a"], 1), (["a", "b", "c"], 3), ("ab", 1)], ids=["too few", "too many", "a string"]
)
def test_prompt_count_must_match(prompts, given):
    with pytest.raises(ValueError, match=f"expected 2 prompts \\(one per sample\\), got {given}"):
        check_pixels(torch.rand(2, 3, 4, 4), prompts)


@pytest.mark.parametrize(
    ("low", "high"), [(-1.0, 1.0), (0.0, 255.0), (-0.01, 0.5)], ids=["[-1, 1]", "[0, 255]", "slightly negative"]
)
def test_pixels_out_of_range_are_named(low, high):
    images = torch.full((2, 3, 2, 2), 0.5)
    images[0, 0, 0, 0], images[1, 2, 1, 1] = low, high
    with pytest.raises(ValueError, match=rf"in \[0, 1\], got values in \[{low:.3f}, {high:.3f}\]"):
        flatten_frames(images, ["a", "b"])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_pixels_are_named(bad):
    videos = torch.rand(1, 2, 3, 4, 4)
    videos[0, 1, 2, 3, 3] = bad
    with pytest.raises(ValueError, match="NaN or infinite pixels"):
        check_pixels(videos, ["a"])


def test_finite_scores_pass_through_unchanged():
    scores = torch.tensor([0.5, -2.0, 3.0])
    assert finite_or_raise(scores, "X") is scores


def test_non_finite_scores_name_the_reward_and_the_samples():
    with pytest.raises(FloatingPointError, match=r"^CLIP produced non-finite scores for samples \[1, 3\]$"):
        finite_or_raise(torch.tensor([0.1, float("nan"), 0.3, float("-inf")]), "CLIP")


def test_non_finite_scores_are_located_by_row():
    per_head = torch.tensor([[1.0, 2.0, 3.0], [1.0, float("inf"), 3.0]])  # (B, heads)
    with pytest.raises(FloatingPointError, match=r"samples \[1\]$"):
        finite_or_raise(per_head, "VideoAlign")
