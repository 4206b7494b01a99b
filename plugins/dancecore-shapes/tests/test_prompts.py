"""The shipped shapes prompt files equal the generator's output and are disjoint."""

from __future__ import annotations

from pathlib import Path

from dancecore_shapes import prompts
from dancecore_shapes.scenes import TASKS, all_specs, caption, parse_caption

PROMPT_DIR = Path(__file__).resolve().parents[3] / "configs" / "prompts"


def test_shipped_files_equal_the_generator(tmp_path: Path) -> None:
    train, heldout = prompts.split()
    assert (PROMPT_DIR / prompts.TRAIN_FILE).read_text(encoding="utf-8").splitlines() == train
    assert (PROMPT_DIR / prompts.HELDOUT_FILE).read_text(encoding="utf-8").splitlines() == heldout
    prompts.main(["--write", str(tmp_path)])
    assert (tmp_path / prompts.TRAIN_FILE).read_text(encoding="utf-8").splitlines() == train


def test_split_is_disjoint_and_compositional() -> None:
    train, heldout = prompts.split()
    assert len(set(train)) == len(train) and len(set(heldout)) == len(heldout)
    assert not set(train) & set(heldout)
    assert 60 <= len(heldout) <= 120
    train_specs = [parse_caption(c) for c in train]
    heldout_specs = [parse_caption(c) for c in heldout]
    assert not any(prompts.is_heldout(s) for s in train_specs)
    assert all(prompts.is_heldout(s) for s in heldout_specs)
    # No held-out colour-shape pair is named by any training caption.
    trained_pairs = {(o.color, o.shape) for s in train_specs for o in s.objects if o.color}
    assert not trained_pairs & prompts.HELDOUT_PAIRS
    # Held-out captions use only the training vocabulary.
    vocabulary = {w for c in train for w in c.split()}
    assert {w for c in heldout for w in c.split()} <= vocabulary
    # Every task is trained, and every task with more than three specs has held-out prompts.
    tasks_train = {s.task for s in train_specs}
    tasks_heldout = {s.task for s in heldout_specs}
    assert tasks_train == set(TASKS)
    assert tasks_heldout == set(TASKS) - {"single_object"}


def test_every_spec_is_train_or_heldout_combination() -> None:
    train, heldout = prompts.split()
    for task in TASKS:
        for spec in all_specs(task):
            if caption(spec) in train:
                assert not prompts.is_heldout(spec)
            if caption(spec) in heldout:
                assert prompts.is_heldout(spec)
