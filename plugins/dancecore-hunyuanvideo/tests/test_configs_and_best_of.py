"""The shipped video recipes validate with the paper's settings, and best-of-N selection works on
the whole pool's advantages."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dancecore import RewardScores
from dancecore.testing import group_advantages, load_plugin

GRPO = load_plugin("algorithm", "grpo")  # the built-in, loaded as a run loads it

ROOT = Path(__file__).resolve().parents[3]
HUNYUAN = ROOT / "configs" / "hunyuanvideo" / "videoalign.yaml"
SKYREELS = ROOT / "configs" / "skyreels" / "videoalign_i2v.yaml"


@pytest.fixture()
def at_repo_root(monkeypatch):
    # Prompt paths in the recipes are relative to the repository root, where `dancecore` is run.
    monkeypatch.chdir(ROOT)


def _load(path: Path, overrides: list[str] | None = None):
    pytest.importorskip("dancecore_rewards_videoalign", reason="install plugins/dancecore-rewards-videoalign")
    from dancecore.testing import load_run

    return load_run(path, overrides)


def test_hunyuanvideo_recipe_has_the_paper_settings(at_repo_root):
    run = _load(HUNYUAN)
    policy, sampler, optimizer = run.policy.config, run.sampler.config, run.optimizer.config
    assert run.policy.name == "hunyuanvideo"
    assert (policy.height, policy.width, policy.num_frames, policy.guidance) == (480, 848, 53, 6.0)
    assert policy.gradient_checkpointing
    assert (run.sampler.name, sampler.num_steps, sampler.shift, sampler.eta) == ("flow-sde", 16, 5.0, 0.25)
    assert (optimizer.group_size, optimizer.best_of) == (24, 4)
    assert [(r.name, r.config.heads) for r in run.rewards] == [("videoalign", {"VQ": 1.0}), ("videoalign", {"MQ": 1.0})]
    assert [r.display_name for r in run.config.rewards] == ["VQ", "MQ"]
    assert run.config.distributed.zero_stage == 3


def test_skyreels_recipe_has_the_paper_settings(at_repo_root):
    run = _load(SKYREELS)
    policy, sampler, optimizer = run.policy.config, run.sampler.config, run.optimizer.config
    assert run.policy.name == "skyreels-i2v"
    assert (policy.height, policy.width, policy.num_frames, policy.cfg_scale) == (400, 640, 53, 5.0)
    assert policy.negative_prompt == ""
    assert (sampler.num_steps, sampler.shift) == (16, 7.0)
    assert (optimizer.group_size, optimizer.best_of) == (8, None)
    assert [r.config.heads for r in run.rewards] == [{"MQ": 1.0}]


def test_skyreels_example_prompts_have_readable_images(at_repo_root):
    from dancecore_hunyuanvideo.skyreels_i2v import load_first_frame

    from dancecore.testing import read_prompt_file

    prompts = read_prompt_file(ROOT / "configs" / "prompts" / "skyreels_i2v_example.jsonl")
    assert len(prompts) >= 3 and all(p.image for p in prompts)
    for prompt in prompts:
        assert load_first_frame(prompt, 400, 640).shape == (3, 400, 640)


def test_recipes_switch_to_tiny_presets_by_override(at_repo_root):
    run = _load(
        HUNYUAN,
        ["policy.pretrained=null", "policy.preset=tiny", "rewards[1].pretrained=null", "rewards[1].preset=tiny"],
    )
    assert run.policy.config.preset == "tiny" and run.rewards[1].config.preset == "tiny"


def test_wrong_frame_count_in_a_recipe_is_reported_with_its_path(at_repo_root):
    from dancecore import ConfigError

    with pytest.raises(ConfigError, match=r"policy.*4k \+ 1"):
        _load(HUNYUAN, ["policy.num_frames=50"])


# ------------------------------------------------------------------------------------- best-of-N


def _pool_rewards(seed: int, size: int = 24) -> torch.Tensor:
    return torch.randn(size, generator=torch.Generator().manual_seed(seed))


def test_best_of_selects_top_and_bottom_k_of_each_pool_by_whole_pool_advantages():
    optimizer = GRPO(GRPO.Config(group_size=24, best_of=4))
    rewards = torch.cat([_pool_rewards(0), _pool_rewards(1)])  # two prompts, a pool of 24 each
    group_ids = torch.tensor([5] * 24 + [9] * 24)
    scores = RewardScores(names=("VQ",), weights=(1.0,), values=rewards.unsqueeze(0))
    advantages = optimizer.advantages(scores, group_ids)

    # Advantages are normalised over the whole pool of 24, by hand:
    for pool in (slice(0, 24), slice(24, 48)):
        r = rewards[pool].double()
        expected = ((r - r.mean()) / (r.std(unbiased=True) + 1e-8)).clamp(-5, 5).float()
        torch.testing.assert_close(advantages[pool], expected)

    chosen = optimizer.select_samples(advantages, group_ids)
    assert chosen.numel() == 16  # 4 best + 4 worst, per pool
    for offset in (0, 24):
        pool = rewards[offset : offset + 24]
        order = torch.argsort(pool, descending=True)
        expected = set((order[:4] + offset).tolist()) | set((order[-4:] + offset).tolist())
        assert set(chosen[(chosen >= offset) & (chosen < offset + 24)].tolist()) == expected

    # The chosen samples keep their whole-pool advantages, not ones recomputed over the 8 kept:
    subset = chosen[chosen < 24]
    recomputed = group_advantages(rewards[subset], torch.zeros(8, dtype=torch.long))
    assert not torch.allclose(advantages[subset], recomputed)
    assert (advantages[chosen] != 0).all()


def test_best_of_with_two_vq_mq_rewards_normalises_each_over_the_pool():
    optimizer = GRPO(GRPO.Config(group_size=24, best_of=4))
    vq, mq = _pool_rewards(2) * 3 + 5, _pool_rewards(3) * 0.1 + 1  # very different scales
    group_ids = torch.zeros(24, dtype=torch.long)
    scores = RewardScores(names=("VQ", "MQ"), weights=(1.0, 1.0), values=torch.stack([vq, mq]))
    advantages = optimizer.advantages(scores, group_ids)
    z = lambda r: (r.double() - r.double().mean()) / (r.double().std() + 1e-8)  # noqa: E731
    torch.testing.assert_close(advantages, (z(vq) + z(mq)).clamp(-5, 5).float())
    chosen = optimizer.select_samples(advantages, group_ids)
    order = torch.argsort(advantages, descending=True)
    assert set(chosen.tolist()) == set(order[:4].tolist()) | set(order[-4:].tolist())
