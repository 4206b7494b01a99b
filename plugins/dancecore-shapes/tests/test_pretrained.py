"""The shipped pretrained shapes-FLUX: it loads through the real ``flux`` policy, draws 32x32
images, and its base held-out score (deterministic ODE sampling, ``shapes`` reward) is in the
documented range: above chance, below perfect (docs/shapes.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dancecore_shapes.geneval import task_table
from dancecore_shapes.weights import flux_dir

from dancecore import Prompt, PromptBatch, resolve_pretrained
from dancecore.testing import build_component, read_prompt_file

REPO = Path(__file__).resolve().parents[3]
HELDOUT = REPO / "configs" / "prompts" / "shapes_heldout.txt"
TRAIN = REPO / "configs" / "prompts" / "shapes_train.txt"
CONFIG = REPO / "configs" / "shapes" / "grpo.yaml"
POLICY = {"resolution": 32, "max_sequence_length": 16, "guidance": 3.5}


@pytest.fixture(scope="module")
def policy():
    return build_component("policy", "flux", {"pretrained": str(flux_dir()), **POLICY})


def test_weights_are_small_and_complete():
    root = flux_dir()
    for part in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        assert list((root / part).glob("*.safetensors")), f"{part} has no safetensors file"
        assert (root / part / "config.json").is_file()
    for part in ("tokenizer", "tokenizer_2"):
        assert (root / part / "tokenizer.json").is_file() and (root / part / "tokenizer_config.json").is_file()
    size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    assert size < 20 * 2**20, f"shipped weights are {size / 2**20:.1f} MiB (> 20 MiB)"


def test_entry_point_resolves_to_the_shipped_directory():
    assert resolve_pretrained("plugin:shapes-flux") == flux_dir()


def test_tokenizers_know_every_caption_word(policy):
    """No word of either prompt split maps to <unk>; CLIP's end-of-text is the highest id."""
    texts = [p.text for p in read_prompt_file(TRAIN)] + [p.text for p in read_prompt_file(HELDOUT)]
    for tokenizer in (policy.tokenizer, policy.tokenizer_2):
        ids = tokenizer(texts, padding="max_length", max_length=16, truncation=True).input_ids
        assert all(tokenizer.unk_token_id not in row for row in ids)
        assert all(row.count(tokenizer.eos_token_id) == 1 for row in ids), "a caption was truncated"
    assert policy.tokenizer.eos_token_id == len(policy.tokenizer) - 1


def test_loads_through_the_flux_policy_and_draws_32px(policy):
    assert policy.resolution == 32 and policy.latent_side == 8 and policy.latent_channels == 8
    sampler = build_component("sampler", "flow-sde", {"num_steps": 8, "shift": 3.0})
    batch = PromptBatch((Prompt("a photo of a red circle", 0), Prompt("a photo of three squares", 1)))
    cond = policy.encode_prompts(batch)
    x = policy.initial_noise(2, torch.Generator().manual_seed(0))
    schedule = sampler.schedule()
    with torch.no_grad():
        for i in range(schedule.num_steps):
            out = sampler.step(
                schedule, i, x, policy.predict(x, schedule.timesteps[i].expand(2), cond), deterministic=True
            )
            x = out.next_latents
        images = policy.decode(out.x0_hat)
    assert images.shape == (2, 3, 32, 32)
    assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    assert images.std() > 0.05, "the images are flat"


def test_base_heldout_score_in_documented_range(tmp_path):
    """The real `dancecore eval` CLI on a subset of the held-out split (every 3rd prompt, 2 samples
    each): the base model is clearly above chance and clearly imperfect."""
    prompts = [p.text for p in read_prompt_file(HELDOUT)][::3]
    subset = tmp_path / "heldout_subset.txt"
    subset.write_text("\n".join(prompts) + "\n")
    out = tmp_path / "eval"
    cmd = [
        sys.executable, "-m", "dancecore.cli", "eval", str(CONFIG),
        f"policy.pretrained={flux_dir()}", f"output_dir={tmp_path / 'run'}",
        "--checkpoint", "base", "--prompts", str(subset), "--samples-per-prompt", "2", "--output", str(out),
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((out / "results.json").read_text())["samples"]
    table = task_table([r["prompt"] for r in rows], [r["shapes"] for r in rows])
    assert 0.08 <= table["overall"] <= 0.6, (
        f"base held-out GenEval overall {table['overall']:.3f} outside [0.08, 0.6]: {table}"
    )
