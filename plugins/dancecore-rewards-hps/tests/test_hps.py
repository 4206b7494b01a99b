"""The ``hps-v2.1`` reward on tiny random-init weights, checked against the ``hpsv2`` package itself."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from dancecore_rewards_hps.reward import TINY_CHECKPOINT, TINY_MODEL_CFG, HPSv21, tiny_hps_dir
from PIL import Image
from pydantic import ValidationError

from dancecore import Reward, WeightsNotFoundError
from dancecore.testing import contract_problems, load_plugin

TINY_NAME = "dancecore-tiny-hps"


@pytest.fixture(scope="module")
def reward() -> HPSv21:
    return HPSv21(HPSv21.Config(preset="tiny"))


def _images(sizes: list[tuple[int, int]], seed: int = 0) -> list[torch.Tensor]:
    """Random 8-bit images as (3, H, W) float tensors in [0, 1] (exactly what a PNG would hold)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, h, w), generator=generator).float() / 255 for h, w in sizes]


def _to_pil(image: torch.Tensor) -> Image.Image:
    array = (image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(array))


def _import_hpsv2(monkeypatch):
    """Import ``hpsv2.img_score``. The hpsv2 1.2.0 wheel ships without the OpenAI CLIP BPE
    vocabulary that its bundled tokenizer opens at import time; open_clip bundles the same file,
    so the import is pointed at that copy when the package's own is missing."""
    import gzip
    import importlib.util

    import open_clip.tokenizer

    spec = importlib.util.find_spec("hpsv2")
    assert spec is not None and spec.origin is not None, "hpsv2 (the reference implementation) is not installed"
    expected = Path(spec.origin).parent / "src" / "open_clip" / "bpe_simple_vocab_16e6.txt.gz"
    if not expected.exists():
        real_open = gzip.open

        def open_with_fallback(filename, *args, **kwargs):
            if Path(filename) == expected:
                filename = open_clip.tokenizer.default_bpe()
            return real_open(filename, *args, **kwargs)

        monkeypatch.setattr(gzip, "open", open_with_fallback)
    from hpsv2 import img_score

    return img_score


@pytest.fixture()
def hpsv2_score(monkeypatch, tmp_path):
    """The hpsv2 package's own ``score`` pipeline, with its model construction pointed at the tiny
    architecture (registered in hpsv2's bundled open_clip) instead of downloading ViT-H-14."""
    img_score = _import_hpsv2(monkeypatch)
    from hpsv2.src.open_clip import factory

    config_dir = tmp_path / "hpsv2-configs"
    config_dir.mkdir()
    (config_dir / f"{TINY_NAME}.json").write_text(json.dumps(TINY_MODEL_CFG))
    factory.add_model_config(config_dir)
    build = img_score.create_model_and_transforms

    def tiny_model_and_transforms(model_name, pretrained=None, **kwargs):
        assert model_name == "ViT-H-14"  # what hpsv2 builds for HPS v2.x
        return build(TINY_NAME, None, **kwargs)

    monkeypatch.setattr(img_score, "create_model_and_transforms", tiny_model_and_transforms)
    monkeypatch.setattr(img_score, "model_dict", {})
    monkeypatch.setattr(img_score, "root_path", str(tmp_path / "hpsv2-root"))

    def score(images: list[torch.Tensor], prompt: str, checkpoint: Path) -> list[float]:
        return [
            float(s)
            for s in img_score.score([_to_pil(i) for i in images], prompt, cp=str(checkpoint), hps_version="v2.1")
        ]

    return score


def _hpsv2_trained_checkpoint(directory: Path) -> Path:
    """A checkpoint written by hpsv2's own model code (as the real HPS checkpoint was), in an
    HPS-style directory with the tiny open_clip config next to it."""
    from hpsv2.src.open_clip import factory

    directory.mkdir()
    shutil.copy(tiny_hps_dir() / "open_clip_config.json", directory / "open_clip_config.json")
    torch.manual_seed(123)
    model = factory.create_model(TINY_NAME, None)
    torch.save({"state_dict": model.state_dict()}, directory / TINY_CHECKPOINT)
    return directory


def test_entry_point_honours_the_reward_contract(reward):
    assert load_plugin("reward", "hps-v2.1") is HPSv21
    assert contract_problems("reward", HPSv21) == []
    assert isinstance(reward, Reward)


@pytest.mark.parametrize("weights", ["preset", "hpsv2-written"])
def test_scores_equal_the_hpsv2_package(hpsv2_score, tmp_path, weights):
    if weights == "preset":
        plugin = HPSv21(HPSv21.Config(preset="tiny"))
        checkpoint = tiny_hps_dir() / TINY_CHECKPOINT
    else:
        directory = _hpsv2_trained_checkpoint(tmp_path / "hps")
        plugin = HPSv21(HPSv21.Config(pretrained=str(directory), architecture=f"local-dir:{directory}"))
        checkpoint = directory / TINY_CHECKPOINT
    # Square at the model's size, upscaled, downscaled and non-square (resize + centre crop).
    images = _images([(32, 32), (48, 40), (24, 64), (100, 90)])
    for prompt in ["a photo of a red bicycle", "Two Dogs, playing; in the SNOW!"]:
        expected = hpsv2_score(images, prompt, checkpoint)
        got = torch.cat([plugin.score(image[None], [prompt]) for image in images])
        np.testing.assert_allclose(got.numpy(), np.array(expected), rtol=0, atol=1e-5)
    assert len({round(v, 6) for v in expected}) > 1  # the scores do depend on the image


def test_scores_are_cosine_similarities_of_the_model_features(reward):
    images = torch.stack(_images([(32, 32)] * 3))
    prompts = ["a cat", "a dog", "a cat"]
    with torch.no_grad():
        img = reward.model.encode_image(reward.preprocess(images))
        txt = reward.model.encode_text(reward.tokenizer(prompts))
        expected = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
    torch.testing.assert_close(reward.score(images, prompts), expected, rtol=0, atol=1e-6)


def test_deterministic_and_batch_independent(reward):
    images = torch.stack(_images([(40, 40)] * 5, seed=1))
    prompts = ["a", "b", "a", "c", "b"]
    first = reward.score(images, prompts)
    assert first.shape == (5,) and first.dtype == torch.float32
    assert torch.equal(first, reward.score(images.clone(), list(prompts)))
    one_by_one = torch.cat([reward.score(images[i : i + 1], [prompts[i]]) for i in range(5)])
    torch.testing.assert_close(first, one_by_one, rtol=0, atol=1e-6)
    small_batches = HPSv21(HPSv21.Config(preset="tiny", batch_size=2))
    torch.testing.assert_close(first, small_batches.score(images, prompts), rtol=0, atol=1e-6)


def test_videos_average_their_frames(reward):
    frames = torch.stack(_images([(32, 32)] * 6, seed=2)).view(2, 3, 3, 32, 32)
    per_frame = reward.score(frames.reshape(6, 3, 32, 32), ["x"] * 3 + ["y"] * 3).view(2, 3)
    torch.testing.assert_close(reward.score(frames, ["x", "y"]), per_frame.mean(dim=1), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("samples", "prompts", "match"),
    [
        (torch.rand(2, 3, 32, 32), ["only one"], "2 prompts"),
        (torch.rand(2, 3, 32, 32) * 2 - 1, ["a", "b"], r"\[0, 1\]"),
        (torch.rand(2, 32, 32), ["a", "b"], "expected"),
        (torch.full((1, 3, 32, 32), float("nan")), ["a"], "NaN"),
    ],
)
def test_bad_inputs_raise(reward, samples, prompts, match):
    with pytest.raises(ValueError, match=match):
        reward.score(samples, prompts)


def test_missing_directory_is_named(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="nowhere"):
        HPSv21(HPSv21.Config(pretrained=str(tmp_path / "nowhere")))


def test_missing_checkpoint_file_is_named(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="HPS_v2.1_compressed.pt"):
        HPSv21(HPSv21.Config(pretrained=str(tmp_path)))


def test_uncached_repo_is_named():
    with pytest.raises(WeightsNotFoundError, match="dancecore-tests/no-such-hps"):
        HPSv21(HPSv21.Config(pretrained="dancecore-tests/no-such-hps"))


def test_checkpoint_that_does_not_fit_is_an_error(tmp_path):
    state = torch.load(tiny_hps_dir() / TINY_CHECKPOINT, weights_only=True)["state_dict"]
    del state["text_projection"]
    broken = tmp_path / "broken.pt"
    torch.save({"state_dict": state}, broken)
    config = HPSv21.Config(pretrained=str(broken), architecture=f"local-dir:{tiny_hps_dir()}")
    with pytest.raises(RuntimeError, match="(?s)broken.pt.*text_projection"):
        HPSv21(config)


def test_unreadable_checkpoint_is_named(tmp_path):
    (tmp_path / "HPS_v2.1_compressed.pt").write_bytes(b"not a checkpoint")
    config = HPSv21.Config(pretrained=str(tmp_path), architecture=f"local-dir:{tiny_hps_dir()}")
    with pytest.raises(RuntimeError, match="cannot read HPS checkpoint .*HPS_v2.1_compressed.pt"):
        HPSv21(config)


@pytest.mark.parametrize(
    "options",
    [
        {"pretrained": None},
        {"preset": "tiny", "pretrained": "xswu/HPSv2"},
        {"architecture": "hf-hub:laion/CLIP-ViT-H-14-laion2B-s32B-b79K"},
        {"preset": "tiny", "threshold": 0.2},
    ],
)
def test_invalid_configs_are_rejected(options):
    with pytest.raises(ValidationError):
        HPSv21.Config.model_validate(options)


def test_default_config_names_the_paper_checkpoint():
    config = HPSv21.Config()
    assert (config.pretrained, config.checkpoint, config.architecture) == (
        "xswu/HPSv2",
        "HPS_v2.1_compressed.pt",
        "ViT-H-14",
    )
    assert HPSv21.Config(preset="tiny", pretrained=None).preset == "tiny"


def test_real_vit_h_14_layout_matches_hpsv2(monkeypatch):
    """The real HPS checkpoint was written by hpsv2's bundled open_clip: its ViT-H-14 must have
    exactly the parameter names and shapes of the open_clip ViT-H-14 the plugin builds (checked
    on the meta device, without allocating the 1B parameters)."""
    import open_clip

    _import_hpsv2(monkeypatch)
    from hpsv2.src.open_clip import factory

    with torch.device("meta"):
        ours = open_clip.create_model("ViT-H-14", pretrained=None, load_weights=False, device="meta")
        theirs = factory.create_model("ViT-H-14", None, device="meta")
    ours_layout = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    theirs_layout = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert len(ours_layout) > 600
    assert ours_layout == theirs_layout
    assert ours.visual.image_size == (224, 224)


def test_passes_the_dancecore_conformance_kit():
    from dancecore.testing import check_reward_plugin

    check_reward_plugin("hps-v2.1", {"preset": "tiny"})


def test_served_over_http_it_scores_exactly_as_locally(reward: HPSv21) -> None:
    from dancecore.testing import check_served_reward

    scores = check_served_reward(reward, torch.stack(_images([(40, 48)] * 5, seed=3)))
    assert scores.shape == (5,)
