"""The ``shapes`` reward: the Reward contract, exact scores, clear errors, and GenEval tables.

``dancecore.testing.check_reward_plugin`` scores fixed non-shapes prompts ("a red apple"), which
this prompt-dependent reward must reject, so the test below asserts that rejection and checks the
contract pieces (strict Config, shape, dtype, determinism, batch independence, no grad, input
unchanged) itself on shapes captions.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dancecore_shapes.geneval import format_table, task_counts, task_table
from dancecore_shapes.reward import NotAShapesPrompt, ShapesReward
from dancecore_shapes.scenes import TASKS, all_specs, caption, parse_caption, render
from pydantic import ValidationError

from dancecore import BuildContext


def _batch(captions: list[str], seed: int = 0, size: int = 32) -> torch.Tensor:
    images = [render(parse_caption(c), size, seed + i) for i, c in enumerate(captions)]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


CAPTIONS = [caption(all_specs(t)[1]) for t in TASKS]
# For each image of CAPTIONS, a caption it does not satisfy.
WRONG = [
    "a photo of a triangle",
    "a photo of a circle and a square",
    "a photo of four circles",
    "a photo of a blue circle",
    "a photo of a circle left of a square",
    "a photo of a blue circle and a red square",
]


def test_registered_and_config_is_strict() -> None:
    from dancecore import load_plugin

    assert load_plugin("reward", "shapes") is ShapesReward
    assert ShapesReward.Config.model_validate({}).partial_credit is False
    with pytest.raises(ValidationError):
        ShapesReward.Config.model_validate({"surely_not_an_option": 1})


def test_conformance_kit_rejects_non_shapes_prompts() -> None:
    from dancecore.testing import check_reward_plugin

    with pytest.raises(NotAShapesPrompt, match="a red apple"):
        check_reward_plugin("shapes")


@pytest.mark.parametrize("partial", [False, True])
def test_conforms_to_the_reward_contract_on_shapes_captions(partial: bool) -> None:
    from dancecore.testing import check_reward_plugin

    captions = [
        "a photo of a circle",
        "a photo of a red square",
        "a photo of three triangles",
        "a photo of a square left of a circle",
    ]
    check_reward_plugin("shapes", {"partial_credit": partial}, prompts=captions)


@pytest.mark.parametrize("partial, soft", [(False, False), (True, False), (True, True)])
def test_contract(partial: bool, soft: bool) -> None:
    reward = ShapesReward(ShapesReward.Config(partial_credit=partial, soft_shapes=soft), BuildContext())
    images = _batch(CAPTIONS)
    before = images.clone()
    scores = reward.score(images, CAPTIONS)
    assert scores.shape == (len(CAPTIONS),) and scores.dtype == torch.float32
    assert not scores.requires_grad and torch.equal(images, before)
    assert scores.tolist() == [1.0] * len(CAPTIONS)
    assert torch.equal(reward.score(images, CAPTIONS), scores)
    assert torch.equal(reward.score(images[2:4], CAPTIONS[2:4]), scores[2:4])
    off = reward.score(images, WRONG)
    assert bool(((off >= 0) & (off < 1)).all()), off
    if not partial:
        assert set(off.tolist()) == {0.0}
    if soft:  # the soft grades only add credit to the partial conditions
        exact = ShapesReward(ShapesReward.Config(partial_credit=True), BuildContext()).score(images, WRONG)
        assert bool((off >= exact).all()), (off, exact)
    random = reward.score(torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)), CAPTIONS[:3])
    assert bool(torch.isfinite(random).all())


def test_videos_average_frames_and_64px() -> None:
    reward = ShapesReward(ShapesReward.Config(), None)
    good = _batch(CAPTIONS[:2], size=64)
    bad = _batch(CAPTIONS[2:4], size=64)
    video = torch.stack([good, bad], dim=1)  # (2, F=2, 3, H, W): one good and one bad frame each
    assert reward.score(video, CAPTIONS[:2]).tolist() == [0.5, 0.5]


def test_errors_name_the_prompt() -> None:
    reward = ShapesReward(ShapesReward.Config(), None)
    with pytest.raises(NotAShapesPrompt, match="a blue car") as info:
        reward.score(_batch(CAPTIONS[:2]), [CAPTIONS[0], "a blue car"])
    assert isinstance(info.value, ValueError)
    with pytest.raises(ValueError, match="prompts"):
        reward.score(_batch(CAPTIONS[:2]), CAPTIONS[:1])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        reward.score(_batch(CAPTIONS[:1]) * 2 - 1, CAPTIONS[:1])


def test_task_table_and_format() -> None:
    prompts = [caption(s) for t in TASKS for s in all_specs(t)[:2]]
    scores = [1.0 if parse_caption(p).task != "counting" else (0.0 if i % 2 else 1.0) for i, p in enumerate(prompts)]
    table = task_table(prompts, scores)
    assert list(table) == [*TASKS, "overall"]
    assert table["counting"] == 0.5 and table["colors"] == 1.0
    assert table["overall"] == pytest.approx(5.5 / 6)
    text = format_table(table, task_counts(prompts))
    assert "| counting | 0.500 | 2 |" in text and "| **overall** | 0.917 | 12 |" in text
    assert format_table({"colors": 1.0, "overall": 1.0}).count("\n") == 3
    only = task_table(prompts[:2], [1.0, 0.0])
    assert only == {"single_object": 0.5, "overall": 0.5}
    with pytest.raises(ValueError):
        task_table(prompts, scores[:-1])
    with pytest.raises(ValueError, match="a cat"):
        task_table(["a cat"], [1.0])
