"""The ``geneval`` reward on tiny random-init Mask2Former (Swin) and CLIP models, loaded through
the plugin's real loading code."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from dancecore_rewards_clip.reward import tiny_clip_dir
from dancecore_rewards_geneval.colors import GREY, TEMPLATES, ColorClassifier
from dancecore_rewards_geneval.detector import (
    TINY_MASK2FORMER_SPEC,
    InstanceSegmenter,
    instances,
    mask_box,
    resized_size,
    tiny_mask2former_dir,
)
from dancecore_rewards_geneval.prompts import CLASS_NAMES, COLORS, generate_suite, spec_from_json, write_jsonl
from dancecore_rewards_geneval.reward import GenEvalReward
from dancecore_rewards_geneval.rules import Detection
from pydantic import ValidationError

from dancecore import Reward, WeightsNotFoundError
from dancecore.testing import check_reward_plugin, contract_problems, load_plugin

RED_BENCH = {
    "tag": "colors",
    "include": [{"class": "bench", "count": 1, "color": "red"}],
    "prompt": "a photo of a red bench",
}
PROMPTS = ["a photo of a bench", "a photo of two clocks", "a photo of a blue fire hydrant", "a photo of a cow"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny() -> GenEvalReward:
    return GenEvalReward(GenEvalReward.Config(preset="tiny"))


@pytest.fixture(scope="module")
def bench_detector(tmp_path_factory):
    """The tiny Mask2Former with its class head biased to "bench", saved with save_pretrained: every
    query becomes a confident bench, so detections pass GenEval's thresholds."""
    from transformers import Mask2FormerForUniversalSegmentation

    model = Mask2FormerForUniversalSegmentation.from_pretrained(tiny_mask2former_dir(), local_files_only=True)
    with torch.no_grad():
        model.class_predictor.bias[CLASS_NAMES.index("bench")] += 50.0
    root = tmp_path_factory.mktemp("bench-mask2former")
    model.save_pretrained(root)
    return root


def _images(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=generator).float() / 255


def test_entry_point_and_contract(tiny):
    assert load_plugin("reward", "geneval") is GenEvalReward
    assert contract_problems("reward", GenEvalReward) == []
    assert isinstance(tiny, Reward)


def test_passes_the_conformance_kit():
    check_reward_plugin("geneval", {"preset": "tiny"}, image_size=48, prompts=PROMPTS)


def test_tiny_preset_is_the_real_architecture(tiny):
    from transformers import CLIPModel, Mask2FormerForUniversalSegmentation, SwinConfig

    assert isinstance(tiny.segmenter.model, Mask2FormerForUniversalSegmentation)
    assert isinstance(tiny.segmenter.model.config.backbone_config, SwinConfig)
    assert tiny.segmenter.model.config.num_queries == TINY_MASK2FORMER_SPEC["num_queries"]
    assert isinstance(tiny.colors.embedder.model, CLIPModel)


def test_loads_saved_directories_and_batches(tiny, tmp_path):
    """save_pretrained -> the plugin's loading code; the detections of a batch equal those of its images one by one."""
    from transformers import Mask2FormerForUniversalSegmentation

    Mask2FormerForUniversalSegmentation.from_pretrained(tiny_mask2former_dir(), local_files_only=True).save_pretrained(
        tmp_path / "m2f"
    )
    loaded = GenEvalReward(GenEvalReward.Config(detector=str(tmp_path / "m2f"), clip=str(tiny_clip_dir())))
    loaded.segmenter.scale = tiny.segmenter.scale
    images = _images(3, 64)
    batch = loaded.segmenter(images)
    single = [tiny.segmenter(images[i : i + 1])[0] for i in range(3)]
    assert len(batch) == 3 and all(len(d) == 100 for d in batch)
    for got, want in zip(batch, single, strict=True):
        np.testing.assert_allclose([d.score for d in got], [d.score for d in want], rtol=0, atol=1e-5)
        assert [d.label for d in got] == [d.label for d in want]
        assert all(g.mask.shape == (64, 64) and np.array_equal(g.mask, w.mask) for g, w in zip(got, want, strict=True))
    assert len({round(d.score, 6) for d in batch[0]}) > 10  # the scores differ: the comparison means something


def test_end_to_end_verdicts_on_confident_detections(bench_detector, tmp_path):
    specs = [*generate_suite()[:3], spec_from_json(RED_BENCH)]
    write_jsonl(specs, tmp_path / "meta.jsonl")
    reward = GenEvalReward(
        GenEvalReward.Config(detector=str(bench_detector), clip=str(tiny_clip_dir()), metadata=tmp_path / "meta.jsonl")
    )
    reward.segmenter.scale = (96, 64)
    images = _images(2, 64, seed=3)
    prompts = ["a photo of a bench", "a photo of a cow"]  # the first and second of GenEval's prompts
    benches = [d for d in reward.segmenter(images[:1])[0] if d.label == "bench" and d.score > 0.3]
    assert 1 < len(benches) <= 12  # one per query at most
    verdicts = reward.verdicts(images, prompts)
    assert [v.correct for v in verdicts] == [True, False]
    assert not verdicts[0].strict and verdicts[0].score == pytest.approx(1 - (len(benches) - 1))
    small = GenEvalReward(
        GenEvalReward.Config(detector=str(bench_detector), clip=str(tiny_clip_dir()), output="score", batch_size=1)
    )
    small.segmenter.scale = (96, 64)
    assert torch.equal(small.score(images, prompts), torch.tensor([v.score for v in verdicts]))
    colour = reward.verdicts(images[:1], ["a photo of a red bench"])[0]  # the colour path runs on real crops
    assert colour.correct == ("red" == reward.colors(images[0], "bench", benches[:1])[0])
    assert reward.summarize(prompts, [1.0, 0.0]) == {"single_object": 0.5, "overall": 0.5}


def test_colour_weights_and_crops_follow_geneval(tiny):
    classifier = tiny.colors
    weights = classifier.class_weights("cup")
    by_hand = torch.stack(
        [
            torch.nn.functional.normalize(
                tiny.colors.embedder.text_features([t.format(c=c, name="cup") for t in TEMPLATES]).mean(0), dim=0
            )
            for c in COLORS
        ]
    )
    torch.testing.assert_close(weights, by_hand, rtol=0, atol=1e-6)
    image = torch.rand(3, 20, 30)
    mask = np.zeros((20, 30), dtype=bool)
    mask[5:10, 4:12] = True
    mask[7, 20] = True  # another blob of the mask, outside nothing
    crop = ColorClassifier.crop(image, Detection("cup", 0.9, mask_box(mask), mask))
    assert crop.shape == (3, 5, 17)  # rows 5-9, columns 4-20
    assert torch.equal(crop[:, :, :8], image[:, 5:10, 4:12])
    assert torch.all(crop[:, 0, 8:16] == GREY)  # outside the mask: grey
    overlapping = mask.copy()
    overlapping[5:10, 8:16] = True
    named = classifier(image, "cup", [Detection("cup", 0.9, mask_box(m), m) for m in (mask, overlapping)])
    assert len(named) == 2 and set(named) <= set(COLORS)


def test_instance_post_processing_by_hand():
    """Two queries, three classes: the best (query, class) pairs, scored class prob x mean mask prob."""
    logits = torch.tensor([[4.0, 0.0, 0.0, 0.0], [0.0, 0.0, 3.0, 1.0]])
    masks = torch.full((2, 4, 5), -5.0)
    masks[0, 1:3, 1:4] = 2.0
    masks[1, 0, 0] = 1.0
    found = instances(logits, masks, top_k=2)
    probs = logits.softmax(-1)[:, :-1]
    assert [d.label for d in found] == [CLASS_NAMES[0], CLASS_NAMES[2]]
    assert found[0].score == pytest.approx(float(probs[0, 0] * torch.sigmoid(torch.tensor(2.0))), rel=1e-5)
    assert found[1].score == pytest.approx(float(probs[1, 2] * torch.sigmoid(torch.tensor(1.0))), rel=1e-5)
    assert found[0].box == (1.0, 1.0, 4.0, 3.0) and found[1].box == (0.0, 0.0, 1.0, 1.0)
    assert found[0].mask.sum() == 6


def test_input_size_follows_mmdetection():
    assert resized_size(512, 512) == (800, 800)
    assert resized_size(1024, 1024) == (800, 800)
    assert resized_size(400, 1200) == (444, 1333)  # the long side caps the factor
    segmenter = InstanceSegmenter.__new__(InstanceSegmenter)
    segmenter.scale = (1333, 800)
    pixels, size = segmenter.preprocess(torch.rand(1, 3, 512, 512))
    assert size == (800, 800) and pixels.shape[-2:] == (800, 800)
    pixels, size = segmenter.preprocess(torch.rand(1, 3, 333, 500))
    assert size == (800, 1201) and pixels.shape[-2:] == (800, 1216)  # padded to a multiple of 32
    assert torch.all(pixels[..., 1201:] == 0)


def test_errors_are_named(tmp_path, tiny):
    with pytest.raises(ValueError, match="no GenEval spec for prompt 'a dragon'"):
        tiny.score(torch.rand(1, 3, 32, 32), ["a dragon"])
    with pytest.raises(ValueError, match="images"):
        tiny.score(torch.rand(1, 2, 3, 32, 32), ["a photo of a cow"])
    with pytest.raises(WeightsNotFoundError, match="nowhere"):
        GenEvalReward(GenEvalReward.Config(detector=str(tmp_path / "nowhere"), clip=str(tiny_clip_dir())))
    with pytest.raises(WeightsNotFoundError, match="'clip' model, not Mask2Former"):
        GenEvalReward(GenEvalReward.Config(detector=str(tiny_clip_dir()), clip=str(tiny_clip_dir())))


@pytest.mark.parametrize(
    "options",
    [{"detector": None}, {"preset": "tiny", "clip": "openai/clip-vit-large-patch14"}, {"output": "soft"}, {"x": 1}],
)
def test_invalid_configs_are_rejected(options):
    with pytest.raises(ValidationError):
        GenEvalReward.Config.model_validate(options)


def test_scores_a_geneval_folder_and_compares_with_genevals_results(tmp_path, capsys):
    from dancecore_rewards_geneval.folder import main, read_png
    from PIL import Image

    specs = generate_suite()[:2]
    reference = []
    for i, spec in enumerate(specs):
        samples = tmp_path / "images" / f"{i:05d}" / "samples"
        samples.mkdir(parents=True)
        (samples.parent / "metadata.jsonl").write_text(json.dumps(spec.to_json()))
        for j in range(2):
            pixels = (_images(1, 40, seed=10 * i + j)[0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            Image.fromarray(pixels).save(samples / f"{j:04d}.png")
            reference.append(
                {"filename": f"/elsewhere/{i:05d}/samples/{j:04d}.png", "tag": spec.tag, "correct": j == 0}
            )
    (tmp_path / "ref.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reference))
    assert (
        main(
            [
                str(tmp_path / "images"),
                "--preset",
                "tiny",
                "--reference",
                str(tmp_path / "ref.jsonl"),
                "--out",
                str(tmp_path / "ours.jsonl"),
            ]
        )
        == 0
    )
    ours = [json.loads(line) for line in (tmp_path / "ours.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in ours] == [specs[0].prompt] * 2 + [specs[1].prompt] * 2
    assert all(r["correct"] is False for r in ours)  # random weights: nothing passes GenEval's thresholds
    table = capsys.readouterr().out
    assert "| single_object | 0.000 | 0.500 | 0.500 |" in table and "| overall | 0.000 | 0.500 |  |" in table
    assert read_png(next((tmp_path / "images").rglob("*.png"))).shape == (3, 40, 40)
