"""GenEval's prompts and rules on constructed detections (no model)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from dancecore_rewards_geneval.prompts import (
    CLASS_NAMES,
    COLORS,
    PUBLISHED_COUNTS,
    TASKS,
    generate_suite,
    read_jsonl,
    spec_from_json,
    task_counts,
    write_jsonl,
)
from dancecore_rewards_geneval.reward import load_specs, task_table
from dancecore_rewards_geneval.rules import (
    MAX_OBJECTS,
    Detection,
    flow_grpo_score,
    geneval_correct,
    judge,
    kept_objects,
    relative_position,
)

from dancecore import PromptFileError

ROOT = Path(__file__).resolve().parents[3]


def spec(record: dict) -> object:
    return spec_from_json({"prompt": "p", **record})


def det(label: str, score: float = 0.95, box=(0, 0, 10, 10), color: str | None = None) -> Detection:
    d = Detection(label, score, tuple(float(v) for v in box))
    COLOR_OF[id(d)] = color
    return d


COLOR_OF: dict[int, str | None] = {}


def colors(name: str, objects) -> list[str]:
    """The colours the constructed detections were given (the classifier's output, for the rules)."""
    return [COLOR_OF[id(d)] or "white" for d in objects]


def verdict(record: dict, detections: list[Detection]):
    return judge(spec(record), detections, colors)


# --- prompts -------------------------------------------------------------------------------------


def test_the_suite_has_genevals_published_counts_and_prompts():
    suite = generate_suite()
    assert task_counts(suite) == PUBLISHED_COUNTS and len(suite) == 553
    assert [s.prompt for s in suite[:3]] == ["a photo of a bench", "a photo of a cow", "a photo of a bicycle"]
    first = {t: next(s.prompt for s in suite if s.tag == t) for t in TASKS}
    assert first == {  # the examples GenEval's published list opens each task with
        "single_object": "a photo of a bench",
        "two_object": "a photo of a bench and a sports ball",
        "counting": "a photo of two clocks",
        "colors": "a photo of a blue fire hydrant",
        "position": "a photo of a dog right of a teddy bear",
        "color_attr": "a photo of a purple wine glass and a black apple",
    }
    assert len({s.prompt for s in suite}) == 553 and len(CLASS_NAMES) == 80 and len(COLORS) == 10
    assert not any(c.cls == "person" and c.color for s in suite for c in s.include)
    position = next(s for s in suite if s.tag == "position")
    assert position.include[0].cls == "teddy bear" and position.include[1].position == ("right of", 0)
    counting = next(s for s in suite if s.tag == "counting")
    assert counting.include[0].count == 2 and counting.exclude[0].count == 3


def test_the_shipped_prompt_file_is_the_generators_output(tmp_path):
    write_jsonl(generate_suite(), tmp_path / "g.jsonl")
    shipped = ROOT / "configs" / "prompts" / "geneval.jsonl"
    assert shipped.read_text() == (tmp_path / "g.jsonl").read_text()
    assert read_jsonl(shipped) == generate_suite()
    assert load_specs(shipped) == load_specs(None)


@pytest.mark.parametrize(
    ("record", "match"),
    [
        ({"tag": "size", "include": [{"class": "cat"}]}, "tag"),
        ({"tag": "colors", "include": [{"class": "cat", "color": "teal"}]}, "teal"),
        ({"tag": "colors", "include": [{"class": "unicorn"}]}, "unicorn"),
        ({"tag": "counting", "include": [{"class": "cat", "count": 0}]}, "count"),
        ({"tag": "position", "include": [{"class": "cat", "position": ["left of", 0]}]}, "earlier"),
        ({"tag": "single_object", "include": []}, "include"),
    ],
)
def test_bad_specs_are_named(record, match):
    with pytest.raises(ValueError, match=match):
        spec(record)


def test_a_bad_metadata_file_names_file_and_line(tmp_path):
    bad = tmp_path / "m.jsonl"
    bad.write_text('{"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a"}\n{oops\n')
    with pytest.raises(PromptFileError, match=r"m.jsonl:2"):
        load_specs(bad)
    with pytest.raises(PromptFileError, match="not found"):
        load_specs(tmp_path / "missing.jsonl")


# --- thresholds ----------------------------------------------------------------------------------


def test_thresholds_are_strict_at_0_3_and_0_9():
    at, above = det("cat", 0.3), det("cat", 0.3 + 1e-6)
    assert kept_objects([at], "single_object") == {}
    assert kept_objects([at, above], "single_object") == {"cat": [above]}
    assert kept_objects([det("cat", 0.9)], "counting") == {}
    assert len(kept_objects([det("cat", 0.9 + 1e-6), det("cat", 0.89)], "counting")["cat"]) == 1
    assert not verdict({"tag": "single_object", "include": [{"class": "cat", "count": 1}]}, [at]).correct
    assert verdict({"tag": "single_object", "include": [{"class": "cat", "count": 1}]}, [above]).correct


def test_at_most_16_objects_per_class_the_most_confident():
    many = [det("cup", 0.31 + i / 100) for i in range(20)]
    kept = kept_objects(many, "single_object")["cup"]
    assert len(kept) == MAX_OBJECTS == 16
    assert [d.score for d in kept] == sorted((d.score for d in many), reverse=True)[:16]
    # a count asked beyond 16 can never be met, and the exclude clause sees 16 at most
    record = {"tag": "counting", "include": [{"class": "cup", "count": 16}], "exclude": [{"class": "cup", "count": 17}]}
    assert verdict(record, [det("cup", 0.95) for _ in range(20)]).correct


# --- the six tasks -------------------------------------------------------------------------------


def test_single_and_two_objects():
    single = {"tag": "single_object", "include": [{"class": "dog", "count": 1}]}
    two = {"tag": "two_object", "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1}]}
    assert verdict(single, [det("dog"), det("cat", 0.99)]).correct
    assert not verdict(single, [det("cat")]).correct
    both = verdict(two, [det("dog"), det("cat")])
    assert both.correct and both.strict and both.score == 1.0
    one = verdict(two, [det("dog"), det("dog", 0.8)])
    assert not one.correct and not one.strict
    assert one.score == pytest.approx(((1 - 1 / 1) + (1 - 1 / 1)) / 2)  # two dogs for one, no cat: 0 and 0


def test_counting_is_exact_and_ignores_detections_below_0_9():
    record = {"tag": "counting", "include": [{"class": "cat", "count": 3}], "exclude": [{"class": "cat", "count": 4}]}
    three = [det("cat", 0.95), det("cat", 0.92), det("cat", 0.99)]
    assert verdict(record, three + [det("cat", 0.85), det("cat", 0.5)]).correct
    four = verdict(record, [*three, det("cat", 0.91)])
    assert not four.correct and not four.strict and four.score == pytest.approx(1 - 1 / 3)
    two = verdict(record, three[:2])
    assert not two.correct and two.score == pytest.approx(1 - 1 / 3)
    assert verdict(record, three).score == 1.0


def test_overlapping_masks_are_separate_objects():
    """No non-maximum suppression: two overlapping instances of a class are two objects."""
    mask = np.zeros((20, 20), dtype=bool)
    mask[2:12, 2:12] = True
    a = Detection("cat", 0.95, (2, 2, 12, 12), mask)
    b = Detection("cat", 0.93, (3, 3, 12, 12), mask.copy())
    record = {"tag": "counting", "include": [{"class": "cat", "count": 2}], "exclude": [{"class": "cat", "count": 3}]}
    assert judge(spec(record), [a, b], lambda n, o: ["white"] * len(o)).correct


def test_colors_check_the_most_confident_object_only():
    record = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]}
    red, blue = det("car", 0.9, color="red"), det("car", 0.8, color="blue")
    got = verdict(record, [red, blue])
    assert got.correct and not got.strict  # GenEval: the top car is red; Flow-GRPO: two cars for one
    assert got.score == pytest.approx((0.0 + 0.0) / 2)  # 1 - |1 - 2| / 1 = 0, then 0 for the colour
    assert not verdict(record, [det("car", 0.9, color="blue"), det("car", 0.8, color="red")]).correct
    alone = verdict(record, [det("car", 0.9, color="red")])
    assert alone.correct and alone.strict and alone.score == 1.0
    wrong = verdict(record, [det("car", 0.9, color="pink")])
    assert not wrong.correct and wrong.score == pytest.approx(0.5)  # count term 1, colour term 0


def test_color_attr_binds_each_colour_to_its_object():
    record = {
        "tag": "color_attr",
        "include": [{"class": "cup", "count": 1, "color": "red"}, {"class": "bowl", "count": 1, "color": "green"}],
    }
    assert verdict(record, [det("cup", color="red"), det("bowl", color="green")]).correct
    swapped = verdict(record, [det("cup", color="green"), det("bowl", color="red")])
    assert not swapped.correct and swapped.score == pytest.approx(0.5)  # (1 + 0 + 1 + 0) / 4
    half = verdict(record, [det("cup", color="red"), det("bowl", color="blue")])
    assert not half.correct and half.score == pytest.approx(0.75)


# --- positions -----------------------------------------------------------------------------------


def test_relative_position_at_the_margin():
    """Margin: 0.1 x (width_a + width_b) on x; boxes 10 wide: 2 pixels. A relation then needs the
    shrunk offset over half the full one: a horizontal offset over 4 pixels."""
    target = Detection("cat", 1.0, (0, 0, 10, 10))
    at_margin = Detection("dog", 1.0, (2, 0, 12, 10))  # centre offset exactly 2: shrunk to 0
    at_half = Detection("dog", 1.0, (4, 0, 14, 10))  # shrunk 2 of 4: exactly 0.5, not above it
    past = Detection("dog", 1.0, (4.5, 0, 14.5, 10))
    assert relative_position(at_margin, target) == set()
    assert relative_position(at_half, target) == set()
    assert relative_position(past, target) == {"right of"}
    assert relative_position(target, past) == {"left of"}
    below = Detection("dog", 1.0, (0, 30, 10, 40))
    assert relative_position(below, target) == {"below"} and relative_position(target, below) == {"above"}
    diagonal = Detection("dog", 1.0, (30, 30, 40, 40))  # 45 degrees: both components over 0.5
    assert relative_position(diagonal, target) == {"right of", "below"}
    steep = Detection("dog", 1.0, (3, 30, 13, 40))  # x offset 3, margin 2: 1 / |(3, 30)| < 0.5
    assert relative_position(steep, target) == {"below"}


def test_position_prompts():
    record = {
        "tag": "position",
        "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1, "position": ["right of", 0]}],
    }
    cat, dog = det("cat", box=(0, 0, 10, 10)), det("dog", box=(20, 0, 30, 10))
    ok = verdict(record, [cat, dog])
    assert ok.correct and ok.strict and ok.score == 1.0
    left = verdict(record, [cat, det("dog", box=(-30, 0, -20, 10))])
    assert not left.correct and not left.strict
    assert left.score == pytest.approx((1 + 1 + 0 + 1) / 4)  # Flow-GRPO adds 0 then 1 on a failed relation
    margin = verdict(record, [cat, det("dog", box=(2, 0, 12, 10))])
    assert not margin.correct
    no_target = verdict(record, [dog])
    assert not no_target.correct and no_target.score == pytest.approx((0 + 1 + 0) / 3)


def test_geneval_and_flow_grpo_agree_on_exact_scenes():
    record = {"tag": "two_object", "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}]}
    objects = kept_objects([det("cat"), det("dog")], "two_object")
    assert geneval_correct(spec(record), objects, colors)[0] is True
    assert flow_grpo_score(spec(record), objects, colors) == (True, 1.0)


def test_flow_grpo_score_is_not_clamped():
    record = {"tag": "single_object", "include": [{"class": "cat", "count": 1}]}
    assert verdict(record, [det("cat") for _ in range(3)]).score == pytest.approx(-1.0)


def test_task_table_is_the_mean_of_task_means():
    table = task_table(["colors", "single_object", "single_object"], [1.0, 0.0, 1.0])
    assert list(table) == ["single_object", "colors", "overall"]
    assert table == {"single_object": 0.5, "colors": 1.0, "overall": 0.75}
    with pytest.raises(ValueError):
        task_table(["colors"], [])
