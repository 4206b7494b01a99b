"""The diffusion-nft algorithm: its loss against the hand-derived gradient, and a tiny run."""

from __future__ import annotations

import json

import pytest
import torch

from dancecore.builtins.nft import DiffusionNFT, nft_loss, optimality
from dancecore.training.trainer import Trainer


def test_optimality_maps_advantages_into_0_1() -> None:
    adv = torch.tensor([-3.0, -0.5, 0.0, 0.5, 3.0])
    assert optimality(adv, 1.0).tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert optimality(adv, 2.0).tolist() == [0.0, 0.375, 0.5, 0.625, 1.0]


@pytest.mark.parametrize("beta", [1.0, 0.1])
def test_gradient_at_the_old_policy_is_reward_weighted_flow_matching(beta: float) -> None:
    gen = torch.Generator().manual_seed(0)
    v_old, target = torch.randn(3, 2, 4, generator=gen), torch.randn(3, 2, 4, generator=gen)
    r = torch.tensor([1.0, 0.5, 0.2])
    v = v_old.clone().requires_grad_(True)
    nft_loss(v, v_old, target, r, beta).sum().backward()
    # d/dv at v = v_old: 2 beta (2r - 1) (v_old - target) / D, D = elements per sample
    expected = 2 * beta * (2 * r - 1).view(-1, 1, 1) * (v_old - target) / 8
    assert torch.allclose(v.grad, expected, atol=1e-6)
    assert float(v.grad[1].abs().max()) < 1e-7, "r = 0.5 carries no signal"


def test_adaptive_weighting_is_the_x0_space_loss_over_its_mean_absolute_error() -> None:
    gen = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(2, 3, 4, generator=gen), torch.randn(2, 3, 4, generator=gen)
    v_old, v = torch.randn(2, 3, 4, generator=gen), torch.randn(2, 3, 4, generator=gen)
    t = torch.tensor([0.3, 0.8])
    r = torch.tensor([0.9, 0.2])
    beta = 0.5
    x_t = (1 - t.view(-1, 1, 1)) * x0 + t.view(-1, 1, 1) * eps
    expected = []
    for i in range(2):  # DiffusionNFT's form written out: x0_hat = x_t - t v for each implicit policy
        terms = []
        for branch in ((1 - beta) * v_old[i] + beta * v[i], (1 + beta) * v_old[i] - beta * v[i]):
            x0_hat = x_t[i] - t[i] * branch
            weight = (x0_hat - x0[i]).abs().mean().clamp(min=1e-5)
            terms.append(((x0_hat - x0[i]) ** 2).mean() / weight)
        expected.append(r[i] * terms[0] + (1 - r[i]) * terms[1])
    got = nft_loss(v, v_old, eps - x0, r, beta, t)
    assert torch.allclose(got, torch.stack(expected), atol=1e-5)
    # the divisor carries no gradient: at v = v_old the gradient is the unweighted one scaled per sample
    w = v_old.clone().requires_grad_(True)
    nft_loss(w, v_old, eps - x0, r, beta, t).sum().backward()
    err = t.view(-1, 1, 1) * (v_old - (eps - x0))
    scale = err.abs().mean(dim=(1, 2)).view(-1, 1, 1)
    manual = 2 * beta * (2 * r - 1).view(-1, 1, 1) * t.view(-1, 1, 1) * err / 12 / scale
    assert torch.allclose(w.grad, manual, atol=1e-5)


def test_positive_samples_pull_towards_their_flow_and_the_step_is_bounded() -> None:
    gen = torch.Generator().manual_seed(1)
    v_old, target = torch.randn(1, 16, generator=gen), torch.randn(1, 16, generator=gen)
    v = v_old.clone().requires_grad_(True)
    opt = torch.optim.SGD([v], lr=10.0)  # a huge step: the quadratic terms still bound the optimum
    for _ in range(200):
        opt.zero_grad()
        nft_loss(v, v_old, target, torch.tensor([1.0]), 1.0).sum().backward()
        opt.step()
    assert float((v - target).norm()) < 1e-4, "r = 1, beta = 1: the minimiser is the flow-matching target"
    w = v_old.clone().requires_grad_(True)
    opt = torch.optim.SGD([w], lr=5.0)
    for _ in range(200):
        opt.zero_grad()
        nft_loss(w, v_old, target, torch.tensor([0.0]), 1.0).sum().backward()
        opt.step()
    # r = 0: pushed away from the target, to v_old + (v_old - target) / beta, not to infinity
    assert torch.allclose(w.detach(), 2 * v_old - target, atol=1e-4)


def test_trains_a_tiny_run_and_changes_the_weights(tmp_path) -> None:
    from dancecore.config.schema import validate
    from tests.conftest import TINY_RUN, deep_update

    data = deep_update(
        TINY_RUN, {"output_dir": str(tmp_path / "nft"), "train": {"iterations": 2, "samples_per_update": 4}}
    )
    data.pop("optimizer")
    data["algorithm"] = {"name": "diffusion-nft", "group_size": 4, "timesteps_per_sample": 2}
    run = validate(data)
    trainer = Trainer(run)
    assert isinstance(trainer.algorithm, DiffusionNFT)
    before = {k: v.clone() for k, v in trainer.engine.model_state().items()}
    assert trainer.train() == "finished"
    after = trainer.engine.model_state()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    rows = [json.loads(line) for line in (run.config.output_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    assert len(rows) == 2 and all(r["updates"] == 2.0 and 0.0 <= r["r_mean"] <= 1.0 for r in rows)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
