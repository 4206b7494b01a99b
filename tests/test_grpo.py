"""GRPO functions against hand computations."""

import statistics

import pytest
import torch

from dancecore.functional.grpo import (
    best_and_worst,
    clipped_policy_loss,
    combined_advantages,
    group_advantages,
    sample_timestep_subset,
    trainable_steps,
)


def test_group_advantages_hand_computed():
    rewards = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 10.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    adv = group_advantages(rewards, groups)
    std = statistics.stdev([1.0, 2.0, 3.0])  # unbiased
    assert torch.allclose(adv[:3], torch.tensor([-1 / (std + 1e-8), 0.0, 1 / (std + 1e-8)]))
    assert torch.equal(adv[3:], torch.zeros(3)), "equal rewards give zero advantage"


def test_group_advantages_binary_all_equal_is_zero():
    adv = group_advantages(torch.tensor([1.0, 1.0, 0.0, 0.0]), torch.tensor([0, 0, 1, 1]))
    assert torch.equal(adv, torch.zeros(4))


def test_group_advantages_clamped():
    rewards = torch.tensor([0.0] * 99 + [1.0])
    adv = group_advantages(rewards, torch.zeros(100, dtype=torch.long))
    assert adv.max() == 5.0


def test_combined_advantages_normalise_each_reward_then_weight():
    values = torch.tensor([[1.0, 2.0, 3.0], [100.0, 300.0, 200.0]])
    groups = torch.zeros(3, dtype=torch.long)
    combined = combined_advantages(values, [0.7, 1.4], groups)
    expected = 0.7 * group_advantages(values[0], groups) + 1.4 * group_advantages(values[1], groups)
    assert torch.allclose(combined, expected)


def test_best_and_worst_over_the_whole_pool():
    adv = torch.tensor([0.1, 0.9, -0.5, 0.3, -0.9, 0.0, 5.0, -5.0])
    groups = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1])
    chosen = best_and_worst(adv, groups, 2)
    assert chosen.tolist() == [1, 2, 3, 4, 6, 7]


def test_clipped_loss_hand_computed():
    new = torch.log(torch.tensor([1.5, 0.5, 1.0]))
    old = torch.zeros(3)
    adv = torch.tensor([1.0, 1.0, -2.0])
    out = clipped_policy_loss(new, old, adv, clip_range=0.2)
    # max(-A*rho, -A*clip(rho)): [max(-1.5,-1.2), max(-0.5,-0.8), max(2,2)]
    assert torch.allclose(out.loss, torch.tensor([-1.2, -0.5, 2.0]))
    assert out.clip_fraction.tolist() == [1.0, 1.0, 0.0]


def test_ratio_is_exactly_one_for_identical_log_probs():
    logp = torch.randn(5)
    out = clipped_policy_loss(logp.clone(), logp, torch.randn(5), 1e-4)
    assert torch.equal(out.ratio, torch.ones(5))


def test_trainable_steps_exclude_last_and_ode_steps():
    mask = torch.tensor([True, False, True, True, True])
    assert trainable_steps(mask).tolist() == [0, 2, 3]


def test_timestep_subset_fraction_and_original_indices():
    g = torch.Generator().manual_seed(0)
    candidates = torch.arange(15)  # N = 16 -> 15 trainable
    subset = sample_timestep_subset(candidates, 0.6, g)
    assert subset.numel() == 9
    assert len(set(subset.tolist())) == 9 and max(subset.tolist()) <= 14
    window = torch.tensor([4, 5, 6, 7])
    assert set(sample_timestep_subset(window, 1.0, g).tolist()) == {4, 5, 6, 7}


def test_timestep_subset_rejects_empty():
    with pytest.raises(ValueError, match="no trainable step"):
        sample_timestep_subset(torch.tensor([], dtype=torch.long), 0.5, torch.Generator())


def test_global_std_advantages_divide_every_group_by_the_std_of_all_rewards():
    from dancecore.functional.grpo import global_std

    rewards = torch.tensor([1.0, 3.0, 10.0, 14.0])
    groups = torch.tensor([0, 0, 1, 1])
    values = rewards.tolist()
    std_all = statistics.stdev(values)  # Flow-GRPO: per-prompt mean, one std over the whole batch
    assert global_std(4, sum(values), sum(v * v for v in values)) == pytest.approx(std_all)
    adv = group_advantages(rewards, groups, std=std_all, clip=100.0)
    expected = [(1 - 2) / std_all, (3 - 2) / std_all, (10 - 12) / std_all, (14 - 12) / std_all]
    assert adv.tolist() == pytest.approx(expected, rel=1e-6)
    per_group = group_advantages(rewards, groups, clip=100.0)  # DanceGRPO: each group's own std
    assert per_group.tolist() == pytest.approx([-0.7071068, 0.7071068, -0.7071068, 0.7071068], rel=1e-6)
    assert global_std(1, 3.0, 9.0) == 0.0


def test_asymmetric_clip_range():
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    old = torch.zeros(4)
    new = torch.log(torch.tensor([1.5, 1.05, 0.5, 0.95]))
    out = clipped_policy_loss(new, old, adv, clip_range=0.1, clip_range_high=0.3)
    # A > 0: min(rho, clip(rho, 0.9, 1.3)) -> 1.3 and 1.05; A < 0: max(-rho, -clip) -> -0.9... as losses:
    assert out.loss.tolist() == pytest.approx([-1.3, -1.05, 0.9, 0.95], rel=1e-6)
    assert out.clip_fraction.tolist() == [1.0, 0.0, 1.0, 0.0]
    symmetric = clipped_policy_loss(new, old, adv, clip_range=0.1)
    assert symmetric.loss.tolist() == pytest.approx([-1.1, -1.05, 0.9, 0.95], rel=1e-6)
