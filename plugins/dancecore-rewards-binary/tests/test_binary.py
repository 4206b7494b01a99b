"""The ``binary`` reward: thresholding, inner-config validation at the right path, failures."""

from __future__ import annotations

import pytest
import torch
from dancecore_rewards_binary.reward import BinaryReward
from pydantic import ValidationError

from dancecore import ConfigError, Reward
from dancecore.testing import contract_problems, load_plugin, validate

Brightness = load_plugin("reward", "brightness")  # the built-in, loaded as a run loads it


def _gray(levels: list[float]) -> torch.Tensor:
    """Uniform gray images whose mean luma is exactly each level."""
    return torch.tensor(levels).view(-1, 1, 1, 1).expand(-1, 3, 8, 8).contiguous()


def _run(rewards: list[dict]) -> dict:
    return {
        "output_dir": "runs/test",
        "prompts": {"texts": ["a"]},
        "policy": {"name": "sd", "preset": "tiny"},
        "sampler": {"name": "ddim-sde"},
        "rewards": rewards,
        "train": {"iterations": 1},
    }


def test_entry_point_honours_the_reward_contract():
    assert load_plugin("reward", "binary") is BinaryReward
    assert contract_problems("reward", BinaryReward) == []
    reward = BinaryReward(BinaryReward.Config(reward={"name": "brightness"}, threshold=0.5))
    assert isinstance(reward, Reward)
    assert isinstance(reward.inner, Brightness)


def test_thresholds_strictly_above():
    reward = BinaryReward(BinaryReward.Config(reward={"name": "brightness"}, threshold=0.5))
    levels = [0.1, 0.4999, 0.5, 0.5001, 0.9]
    got = reward.score(_gray(levels), ["p"] * 5)
    assert got.dtype == torch.float32
    assert got.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]


def test_inner_options_reach_the_inner_reward():
    reward = BinaryReward(BinaryReward.Config(reward={"name": "brightness", "target": 0.5}, threshold=-0.1))
    # Brightness with a target scores minus the distance to it: only levels within 0.1 pass.
    assert reward.score(_gray([0.3, 0.45, 0.55, 0.7]), ["p"] * 4).tolist() == [0.0, 1.0, 1.0, 0.0]


def test_wraps_a_model_reward_and_agrees_with_it():
    from dancecore_rewards_hps.reward import HPSv21

    hps = HPSv21(HPSv21.Config(preset="tiny"))
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    prompts = ["a cat", "a dog", "a bird", "a cat", "a dog", "a bird"]
    raw = hps.score(images, prompts)
    threshold = float(raw.median())
    binary = BinaryReward(BinaryReward.Config(reward={"name": "hps-v2.1", "preset": "tiny"}, threshold=threshold))
    got = binary.score(images, prompts)
    assert torch.equal(got, (raw > threshold).float())
    assert 0 < got.sum() < 6


@pytest.mark.parametrize(
    ("inner", "where"),
    [
        ({"name": "brightness", "targt": 0.5}, ("reward", "targt")),
        ({"name": "brightness", "target": "bright"}, ("reward", "target")),
        ({"name": "no-such-reward"}, ("reward", "name")),
        ({"target": 0.5}, ("reward", "name")),
    ],
)
def test_inner_errors_are_located_at_the_inner_key(inner, where):
    with pytest.raises(ValidationError) as info:
        BinaryReward.Config(reward=inner, threshold=0.5)
    assert [e["loc"] for e in info.value.errors()] == [where]


def test_run_config_reports_inner_errors_with_their_yaml_path():
    rewards = [
        {"name": "brightness"},
        {"name": "binary", "threshold": 0.28, "reward": {"name": "hps-v2.1", "pretraind": "x", "batch_size": 0}},
    ]
    with pytest.raises(ConfigError) as info:
        validate(_run(rewards))
    errors = info.value.errors
    assert any(e.startswith("rewards[1].reward.pretraind: unknown key") for e in errors), errors
    assert any(e.startswith("rewards[1].reward.batch_size:") for e in errors), errors
    assert len(errors) == 2


def test_run_config_accepts_a_valid_binary_reward_without_loading_weights():
    resolved = validate(_run([{"name": "binary", "threshold": 0.28, "reward": {"name": "hps-v2.1"}}]))
    assert resolved.rewards[0].cls is BinaryReward
    assert resolved.rewards[0].config.reward == {"name": "hps-v2.1"}


def test_missing_threshold_is_an_error():
    with pytest.raises(ValidationError, match="threshold"):
        BinaryReward.Config(reward={"name": "brightness"})


class _Broken:
    def __init__(self, result):
        self.result = result

    def score(self, samples, prompts):
        return self.result


@pytest.mark.parametrize(
    ("result", "error"),
    [
        (torch.tensor([0.3, float("nan")]), FloatingPointError),
        (torch.tensor([0.3]), ValueError),
        ([0.3, 0.4], ValueError),
    ],
)
def test_malformed_inner_scores_raise_instead_of_becoming_zero_or_one(result, error):
    reward = BinaryReward(BinaryReward.Config(reward={"name": "brightness"}, threshold=0.5))
    reward.inner = _Broken(result)
    with pytest.raises(error, match="brightness"):
        reward.score(_gray([0.2, 0.8]), ["a", "b"])


def test_inner_failures_propagate():
    reward = BinaryReward(BinaryReward.Config(reward={"name": "hps-v2.1", "preset": "tiny"}, threshold=0.0))
    with pytest.raises(ValueError, match="prompts"):
        reward.score(torch.rand(2, 3, 32, 32), ["only one"])


def test_passes_the_dancecore_conformance_kit():
    from dancecore.testing import check_reward_plugin

    check_reward_plugin("binary", {"reward": {"name": "hps-v2.1", "preset": "tiny"}, "threshold": -0.2})
