"""The pretraining corpus: which captions the base model is pretrained on, and the caption noise
option (each noisy render shows its task's typical mistake, which the exact evaluator rejects)."""

from __future__ import annotations

import numpy as np
import pytest
from dancecore_shapes import prompts, scenes
from dancecore_shapes.evaluator import detect, verdict
from dancecore_shapes.pretrain import corpus_captions, mistake, render_dataset


def test_the_all_corpus_is_every_caption_of_the_grammar_and_train_is_the_training_split():
    every = corpus_captions("all", None)
    assert len(every) == len(set(every)) == sum(len(scenes.all_specs(t)) for t in scenes.TASKS)
    train, heldout = prompts.split()
    assert set(train) | set(heldout) <= set(every)
    assert corpus_captions("train", None) == train
    with pytest.raises(ValueError, match="corpus must be"):
        corpus_captions("web", None)


@pytest.mark.parametrize("task", scenes.TASKS)
def test_a_mistake_is_a_valid_scene_that_the_evaluator_rejects_for_the_original_caption(task):
    rng = np.random.default_rng(0)
    for i, spec in enumerate(scenes.all_specs(task)[:12]):
        wrong = scenes.validate(mistake(spec, rng))
        assert wrong != spec
        image = scenes.render(wrong, size=32, seed=i)
        assert not verdict(spec, detect(image)), f"{scenes.caption(spec)} accepted a render of {scenes.caption(wrong)}"
        assert verdict(wrong, detect(image))  # the render itself is a correct picture of the mistake


def test_caption_noise_changes_about_that_fraction_of_renders_and_zero_changes_none():
    captions = corpus_captions("train", None)[:20]
    clean, index = render_dataset(captions, 10, seed=3)
    noisy, same_index = render_dataset(captions, 10, seed=3, caption_noise=0.3)
    assert (index == same_index).all()
    changed = (clean - noisy).abs().flatten(1).amax(dim=1) > 0
    assert 0.15 < changed.float().mean().item() < 0.45
    again, _ = render_dataset(captions, 10, seed=3)
    assert (again == clean).all()
