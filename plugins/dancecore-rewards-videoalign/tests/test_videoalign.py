"""The ``videoalign`` reward on a tiny random-init Qwen2-VL with a reward head (CPU, seconds)."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from dancecore_rewards_videoalign.reward import (
    HEADS,
    VideoAlignError,
    VideoAlignReward,
    frame_indices,
    frames_to_sample,
)
from dancecore_rewards_videoalign.tiny import tiny_videoalign_dir
from pydantic import ValidationError

from dancecore import Reward, WeightsNotFoundError
from dancecore.testing import contract_problems, load_plugin

SMALL = {"min_pixels": 28 * 28 * 4, "max_pixels": 56 * 84}


def _reward(**options) -> VideoAlignReward:
    return VideoAlignReward(VideoAlignReward.Config(preset="tiny", **{**SMALL, **options}))


@pytest.fixture(scope="module")
def reward() -> VideoAlignReward:
    return _reward()


def _videos(n: int = 3, frames: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, frames, 3, 32, 48, generator=torch.Generator().manual_seed(seed))


PROMPTS = ["a cat", "a dog surfing", "fireworks over a lake"]


def test_entry_point_honours_the_reward_contract(reward):
    assert load_plugin("reward", "videoalign") is VideoAlignReward
    assert contract_problems("reward", VideoAlignReward) == []
    assert isinstance(reward, Reward)


def test_scores_one_float_per_video(reward):
    scores = reward.score(_videos(), PROMPTS)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    heads = reward.score_heads(_videos(), PROMPTS)
    assert heads.shape == (3, 3)
    assert torch.equal(scores, heads[:, 0])  # default: VQ only, weight 1
    assert torch.equal(reward.score(_videos(), PROMPTS), scores)  # deterministic


def test_weighted_heads_and_normalisation():
    videos = _videos()
    raw = _reward(heads={"VQ": 1.0, "MQ": 1.0, "TA": 0.0}).score_heads(videos, PROMPTS)
    mixed = _reward(heads={"MQ": 0.5, "VQ": 2.0}).score(videos, PROMPTS)
    torch.testing.assert_close(mixed, 2.0 * raw[:, 0] + 0.5 * raw[:, 1])
    normed = _reward(heads={"MQ": 1.0}, normalise=True).score(videos, PROMPTS)
    torch.testing.assert_close(normed, (raw[:, 1] - 1.1646) / 1.3811)


def test_scores_are_read_at_each_reward_token(reward):
    """The tiny template puts the VQ and MQ tokens before the text prompt and TA after it: under
    causal attention VQ and MQ cannot depend on the prompt, TA must."""
    videos = _videos(n=2)
    a = reward.score_heads(videos, ["a cat", "a cat"])
    b = reward.score_heads(videos, ["a cat", "an entirely different prompt"])
    torch.testing.assert_close(a[:, :2], b[:, :2])
    torch.testing.assert_close(a[0], b[0])
    assert not torch.allclose(a[1, 2], b[1, 2])
    # And every head depends on the video.
    c = reward.score_heads(_videos(n=2, seed=5), ["a cat", "a cat"])
    assert not torch.allclose(a, c)


def test_head_matches_a_hand_computation(reward):
    loaded = reward.loaded
    video = _videos(n=1)
    frames = reward.prepare_frames(video[0])
    text = loaded.processor.apply_chat_template(reward._messages("a cat"), tokenize=False, add_generation_prompt=True)
    batch = loaded.processor(
        text=[text], videos=[frames], return_tensors="pt", videos_kwargs={"do_resize": False, "do_sample_frames": False}
    )
    with torch.no_grad():
        hidden = loaded.model.model(**batch).last_hidden_state[0]
    ids = batch["input_ids"][0].tolist()
    expected = [float(hidden[ids.index(loaded.special_token_ids[h])] @ loaded.head[0]) for h in HEADS]
    torch.testing.assert_close(reward.score_heads(video, ["a cat"])[0], torch.tensor(expected))


def test_batching_does_not_change_scores():
    videos = _videos(n=3)
    together = _reward(batch_size=4).score_heads(videos, PROMPTS)
    one_by_one = _reward(batch_size=1).score_heads(videos, PROMPTS)
    torch.testing.assert_close(together, one_by_one, rtol=1e-4, atol=1e-4)


def test_images_are_one_frame_videos(reward):
    scores = reward.score(torch.rand(2, 3, 32, 48), ["a", "b"])
    assert scores.shape == (2,) and torch.isfinite(scores).all()


@pytest.mark.parametrize(
    ("num_frames", "video_fps", "sample_fps", "fixed", "expected"),
    [
        (53, 24.0, 2.0, None, 4),
        (53, 8.0, 2.0, None, 12),
        (5, 24.0, 2.0, None, 2),
        (53, 24.0, 2.0, 9, 8),
        (53, 24.0, 2.0, 100, 52),
        (1, 24.0, 2.0, None, 2),
        (129, 24.0, 2.0, None, 10),
    ],
)
def test_frames_to_sample(num_frames, video_fps, sample_fps, fixed, expected):
    assert frames_to_sample(num_frames, video_fps, sample_fps, fixed) == expected


def test_frame_indices_span_the_video():
    assert frame_indices(53, 4) == [0, 17, 35, 52]
    assert frame_indices(5, 2) == [0, 4]


def test_frames_are_resized_within_the_pixel_budget():
    r = _reward(max_pixels=448 * 448, min_pixels=128 * 28 * 28, num_frames=4)
    frames = r.prepare_frames(torch.rand(53, 3, 480, 848))
    assert frames.dtype == torch.uint8 and frames.shape[:2] == (4, 3)
    h, w = frames.shape[2:]
    assert h % 28 == 0 and w % 28 == 0 and h * w <= 448 * 448
    assert abs(w / h - 848 / 480) < 0.1
    small = r.prepare_frames(torch.rand(5, 3, 32, 48))
    assert small.shape[2] * small.shape[3] >= 128 * 28 * 28  # upscaled to the minimum


def test_checkpoint_directory_loads_like_the_preset(reward):
    from_dir = VideoAlignReward(VideoAlignReward.Config(pretrained=str(tiny_videoalign_dir()), **SMALL))
    assert torch.equal(from_dir.score(_videos(), PROMPTS), reward.score(_videos(), PROMPTS))


def test_rewards_share_one_loaded_model():
    assert _reward(heads={"VQ": 1.0}).loaded is _reward(heads={"MQ": 1.0}).loaded


# ------------------------------------------------------------------------------------ errors


def test_bad_inputs_raise(reward):
    """The inputs are checked by :func:`dancecore.check_pixels` (tested in the core)."""
    with pytest.raises(ValueError, match="videos, got"):
        reward.score(torch.rand(2, 5, 4, 32, 32), ["a", "b"])
    with pytest.raises(ValueError, match="expected 2 prompts"):
        reward.score(torch.rand(2, 5, 3, 32, 32), ["a"])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        reward.score(torch.rand(2, 5, 3, 32, 32) * 2 - 1, ["a", "b"])


def test_a_prompt_holding_a_reward_token_is_an_error(reward):
    with pytest.raises(VideoAlignError, match="exactly one TA token"):
        reward.score(_videos(n=1), ["sneaky <|TA_reward|>"])


def test_non_finite_scores_are_an_error_not_a_number(monkeypatch):
    broken = _reward()
    nan_head = dataclasses.replace(broken.loaded, head=torch.full_like(broken.loaded.head, float("nan")))
    monkeypatch.setattr(broken, "loaded", nan_head)
    with pytest.raises(VideoAlignError, match="non-finite scores for samples \\[0, 1\\]"):
        broken.score(_videos(n=2), ["a", "b"])


def test_incomplete_checkpoint_is_reported(tmp_path):
    copy = tmp_path / "ckpt"
    shutil.copytree(tiny_videoalign_dir(), copy)
    (copy / "reward_head.safetensors").unlink()
    with pytest.raises(VideoAlignError, match="lacks reward_head.safetensors"):
        VideoAlignReward(VideoAlignReward.Config(pretrained=str(copy)))
    shutil.copy(tiny_videoalign_dir() / "reward_head.safetensors", copy)
    meta = json.loads((copy / "videoalign.json").read_text())
    meta["prompt_template"] = "no tokens here {text_prompt}"
    (copy / "videoalign.json").write_text(json.dumps(meta))
    with pytest.raises(VideoAlignError, match="every special token"):
        VideoAlignReward(VideoAlignReward.Config(pretrained=str(copy)))
    del meta["normalisation"]
    meta["prompt_template"] = "<|VQ_reward|> <|MQ_reward|> <|TA_reward|> {text_prompt}"
    (copy / "videoalign.json").write_text(json.dumps(meta))
    with pytest.raises(VideoAlignError, match="no statistics"):
        VideoAlignReward(VideoAlignReward.Config(pretrained=str(copy), normalise=True))


def test_missing_weights_name_the_path(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="no-such-videoreward"):
        VideoAlignReward(VideoAlignReward.Config(pretrained=str(tmp_path / "no-such-videoreward")))


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"preset": "tiny", "pretrained": "KwaiVGI/VideoReward"},
        {"preset": "tiny", "heads": {}},
        {"preset": "tiny", "heads": {"XQ": 1.0}},
        {"preset": "tiny", "fps": 2},
        {"preset": "tiny", "min_pixels": 10**6, "max_pixels": 10**5},
    ],
)
def test_invalid_configs_are_rejected(options):
    with pytest.raises(ValidationError):
        VideoAlignReward.Config.model_validate(options)


# ----------------------------------------------------------------------------------- conversion


def test_convert_a_state_dict_into_a_loadable_checkpoint(tmp_path, reward):
    """A whole-model state dict (Qwen2-VL keys in the layout older transformers saved, plus
    rm_head.weight), a base model without the reward tokens and a template become a checkpoint
    that scores exactly like the model the state dict came from."""
    from dancecore_rewards_videoalign.convert import main
    from dancecore_rewards_videoalign.tiny import SPECIAL_TOKENS, TINY_TEMPLATE, write_tiny_processor
    from safetensors.torch import load_file

    source = tiny_videoalign_dir()
    base = tmp_path / "base"
    write_tiny_processor(base, special_tokens=SPECIAL_TOKENS[:7])  # Qwen2-VL's own tokens only
    shutil.copy(source / "config.json", base / "config.json")
    state = load_file(str(source / "model.safetensors"))
    state = {f"module.{k}": v for k, v in state.items()}  # as saved from a DDP wrapper
    state["module.rm_head.weight"] = load_file(str(source / "reward_head.safetensors"))["weight"]
    torch.save(state, tmp_path / "reward_model.pt")
    (tmp_path / "template.txt").write_text(TINY_TEMPLATE)

    out = tmp_path / "converted"
    assert (
        main(
            [
                "--state-dict",
                str(tmp_path / "reward_model.pt"),
                "--base",
                str(base),
                "--template",
                str(tmp_path / "template.txt"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    converted = VideoAlignReward(VideoAlignReward.Config(pretrained=str(out), heads={"TA": 1.0}, **SMALL))
    torch.testing.assert_close(converted.score_heads(_videos(), PROMPTS), reward.score_heads(_videos(), PROMPTS))

    del state["module.rm_head.weight"]
    torch.save(state, tmp_path / "no_head.pt")
    with pytest.raises(VideoAlignError, match="rm_head.weight"):
        main(
            [
                "--state-dict",
                str(tmp_path / "no_head.pt"),
                "--base",
                str(base),
                "--template",
                str(tmp_path / "template.txt"),
                "--out",
                str(tmp_path / "bad"),
            ]
        )


def test_conformance_kit():
    from dancecore.testing import check_reward_plugin

    check_reward_plugin("videoalign", {"preset": "tiny", **SMALL})
