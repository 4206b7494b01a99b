"""The SD and FLUX recipes under configs/: they validate, carry the paper's settings, and the
tiny-preset commands written in their headers validate too. Validation loads no weights."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from dancecore.testing import load_run

ROOT = Path(__file__).resolve().parents[3]
RECIPES = ["configs/sd/hps.yaml", "configs/sd/hps_clip.yaml", "configs/flux/hps.yaml", "configs/flux/hps_clip.yaml"]


@pytest.fixture(autouse=True)
def _no_weights(monkeypatch):
    """Run from the repository root (prompt paths are relative to it) and fail loudly if
    validation tried to locate weights."""
    import dancecore_flux.policy
    import dancecore_rewards_clip.reward
    import dancecore_rewards_hps.reward
    import dancecore_sd.policy

    def forbidden(*args, **kwargs):
        raise AssertionError(f"config validation tried to locate weights: {args}")

    for module in (
        dancecore_sd.policy,
        dancecore_flux.policy,
        dancecore_rewards_hps.reward,
        dancecore_rewards_clip.reward,
    ):
        monkeypatch.setattr(module, "resolve_pretrained", forbidden)
    monkeypatch.chdir(ROOT)


def header_command(path: Path) -> list[str]:
    """The overrides of the ``dancecore train <path> ...`` command in a recipe's header comment."""
    lines = path.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip("# ").startswith("dancecore train "))
    command = ""
    for line in lines[start:]:
        if not line.startswith("#"):
            break
        command += " " + line.lstrip("#").strip().rstrip("\\")
        if not line.rstrip().endswith("\\"):
            break
    words = shlex.split(command)
    assert words[:3] == ["dancecore", "train", path.relative_to(ROOT).as_posix()], words[:3]
    return words[3:]


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_validates(recipe):
    run = load_run(ROOT / recipe)
    assert run.policy.config.pretrained and run.policy.config.preset is None
    assert all(r.config.preset is None for r in run.rewards)
    assert run.rewards[0].name == "hps-v2.1"
    assert run.rewards[0].config.checkpoint == "HPS_v2.1_compressed.pt"
    assert run.config.prompts.path is not None and (ROOT / run.config.prompts.path).is_file()


@pytest.mark.parametrize("recipe", RECIPES)
def test_header_command_validates_with_tiny_presets(recipe):
    overrides = header_command(ROOT / recipe)
    run = load_run(ROOT / recipe, overrides)
    assert run.policy.config.preset == "tiny"
    assert all(r.config.preset == "tiny" for r in run.rewards)
    assert run.config.train.mixed_precision == "no"


@pytest.mark.parametrize("recipe", ["configs/sd/hps.yaml", "configs/sd/hps_clip.yaml"])
def test_sd_recipes_have_the_paper_settings(recipe):
    run = load_run(ROOT / recipe)
    assert run.policy.name == "sd" and run.policy.config.pretrained == "CompVis/stable-diffusion-v1-4"
    assert run.policy.config.resolution == 512 and run.policy.config.guidance_scale == 5.0
    assert (run.sampler.name, run.sampler.config.num_steps, run.sampler.config.eta) == ("ddim-sde", 50, 1.0)
    grpo = run.optimizer.config
    assert (grpo.group_size, grpo.timestep_fraction, grpo.clip_range) == (16, 1.0, 1e-4)
    assert run.config.train.samples_per_update is None  # one update per iteration (CFG)


@pytest.mark.parametrize("recipe", ["configs/flux/hps.yaml", "configs/flux/hps_clip.yaml"])
def test_flux_recipes_have_the_paper_settings(recipe):
    run = load_run(ROOT / recipe)
    assert run.policy.name == "flux" and run.policy.config.resolution == 720
    sampler = run.sampler.config
    assert (run.sampler.name, sampler.num_steps, sampler.shift, sampler.eta) == ("flow-sde", 16, 3.0, 0.3)
    grpo = run.optimizer.config
    assert (grpo.group_size, grpo.timestep_fraction, grpo.clip_range) == (12, 0.6, 1e-4)


@pytest.mark.parametrize("recipe", ["configs/sd/hps_clip.yaml", "configs/flux/hps_clip.yaml"])
def test_mixed_recipes_weight_hps_and_clip_0_7_to_1_4(recipe):
    run = load_run(ROOT / recipe)
    assert [(r.name, r.weight) for r in run.config.rewards] == [("hps-v2.1", 0.7), ("clip-score", 1.4)]
    assert [r.display_name for r in run.config.rewards] == ["hps", "clip"]
