"""MixGRPO's progressive SDE window and MixGRPO-Flash's compressed second-order ODE tail."""

from __future__ import annotations

import math

import pytest
import torch

from dancecore.builtins.samplers import FlowSDESampler
from dancecore.functional.sde import flow_dpm2m_step, shifted_sigmas


def _gaussian_world(mu: float = 0.7, tau: float = 0.5):
    """Data x0 ~ N(mu, tau^2): the flow ODE is exact in closed form. x_t = (1 - t) x0 + t eps has
    E[x0 | x_t] linear in x_t, and the ODE maps z (at t = 1) to x_t = (1 - t) mu + std(t) z with
    std(t) = sqrt((1 - t)^2 tau^2 + t^2)."""

    def std(t: float) -> float:
        return math.sqrt((1 - t) ** 2 * tau**2 + t**2)

    def x0_hat(x: torch.Tensor, t: float) -> torch.Tensor:
        gain = (1 - t) * tau**2 / std(t) ** 2
        return mu + gain * (x - (1 - t) * mu)

    def exact(z: torch.Tensor, t: float) -> torch.Tensor:
        return (1 - t) * mu + std(t) * z

    return x0_hat, exact


def test_dpm2m_step_is_the_published_update():
    g = torch.Generator().manual_seed(0)
    x, x0, x0_prev = (torch.randn(2, 3, 4, generator=g, dtype=torch.float64) for _ in range(3))
    sp, s, sn = 0.8, 0.6, 0.35

    def lam(v):  # log SNR of rectified flow: alpha = 1 - sigma
        return math.log((1 - v) / v)

    h, h_prev = lam(sn) - lam(s), lam(s) - lam(sp)
    r = h_prev / h
    d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev  # DPM-Solver++(2M), midpoint form
    expected = (sn / s) * x - (1 - sn) * (math.exp(-h) - 1) * d
    assert torch.allclose(flow_dpm2m_step(x, x0, x0_prev, sp, s, sn), expected, atol=1e-6)  # computed in fp32
    # with x0_previous = x0 the correction vanishes and the step is Euler with v = (x - x0) / s
    euler = x - (s - sn) * (x - x0) / s
    assert torch.allclose(flow_dpm2m_step(x, x0, x0, sp, s, sn), euler, atol=1e-6)
    with pytest.raises(ValueError, match="sigma_next"):
        flow_dpm2m_step(x, x0, x0_prev, sp, s, 0.0)  # the last step is first-order


def test_dpm2m_converges_at_second_order_on_an_exact_flow():
    x0_hat, exact = _gaussian_world()
    z = torch.linspace(-2, 2, 9, dtype=torch.float64)
    t0, t1 = 0.9, 0.1

    def solve(n: int, second_order: bool) -> torch.Tensor:
        ts = torch.linspace(t0, t1, n + 1, dtype=torch.float64).tolist()
        x, previous = exact(z, t0), None
        for i in range(n):
            x0 = x0_hat(x, ts[i])
            if second_order and previous is not None:
                x_next = flow_dpm2m_step(x, x0, previous, ts[i - 1], ts[i], ts[i + 1])
            else:
                x_next = x - (ts[i] - ts[i + 1]) * (x - x0) / ts[i]
            x, previous = x_next, x0
        return (x - exact(z, t1)).abs().max()

    euler = [float(solve(n, False)) for n in (16, 32)]
    dpm = [float(solve(n, True)) for n in (16, 32)]
    assert dpm[0] < euler[0] / 5  # far more accurate at the same number of network calls
    assert euler[0] / euler[1] == pytest.approx(2.0, rel=0.25)  # Euler: first order
    assert dpm[0] / dpm[1] > 3.0  # 2M: about 4x less error for 2x the steps (measured 3.7)


def test_progressive_window_moves_every_shift_interval_and_restarts():
    cfg = FlowSDESampler.Config(num_steps=25, sde_window=4, sde_window_shift_every=20)
    sampler = FlowSDESampler(cfg)
    starts = [int(sampler.stochastic_steps(25, it).nonzero()[0]) for it in (0, 19, 20, 39, 40, 20 * 20, 20 * 21)]
    assert starts == [0, 0, 1, 1, 2, 20, 0]  # 21 positions keep the last step out; then it restarts
    assert int(sampler.stochastic_steps(25, 5).sum()) == 4
    stay = FlowSDESampler(cfg.model_copy(update={"sde_window_end": "stay", "sde_window_stride": 2}))
    assert [int(stay.stochastic_steps(25, it).nonzero()[0]) for it in (0, 20, 200, 10_000)] == [0, 2, 20, 20]
    # the defaults keep the earlier sweep: one step per iteration
    sweep = FlowSDESampler(FlowSDESampler.Config(num_steps=8, sde_window=2))
    assert [int(sweep.stochastic_steps(8, it).nonzero()[0]) for it in range(8)] == [0, 1, 2, 3, 4, 5, 0, 1]


def test_flash_schedule_keeps_the_grid_to_the_window_end_and_compresses_the_rest():
    cfg = FlowSDESampler.Config(
        num_steps=25, shift=3.0, sde_window=4, sde_window_shift_every=20, ode_solver="dpm++2m", ode_compress=0.4
    )
    sampler = FlowSDESampler(cfg)
    base = shifted_sigmas(25, 3.0)
    flash = sampler.rollout_schedule(20)  # window at steps 1..4, tail from step 5: 20 steps -> 8
    assert flash.num_steps == 5 + 8
    assert torch.equal(flash.sigmas[:6], base[:6])
    assert float(flash.sigmas[-1]) == 0.0
    assert bool((flash.sigmas[1:] < flash.sigmas[:-1]).all())
    assert flash.orders is not None and flash.orders.tolist() == [1] * 6 + [2] * 6 + [1]
    mask = sampler.stochastic_steps(flash.num_steps, 20)
    assert mask.tolist() == [False, True, True, True, True] + [False] * 8
    # a window near the end leaves a short tail: still at least one step
    late = sampler.rollout_schedule(20 * 20)  # window 20..23, one step after it
    assert late.num_steps == 25 and late.orders is not None and late.orders.tolist() == [1] * 25
    # without Flash options the rollout schedule is the configured one
    plain = FlowSDESampler(FlowSDESampler.Config(num_steps=25, sde_window=4)).rollout_schedule(20)
    assert torch.equal(plain.sigmas, base) and plain.orders is None


def test_flash_options_need_a_window():
    with pytest.raises(ValueError, match="sde_window"):
        FlowSDESampler.Config(num_steps=8, ode_compress=0.5)


def test_flash_rollout_trains_with_fewer_calls_and_ratio_one(tiny_run):
    from dancecore.training.trainer import Trainer

    sampler = {
        "name": "flow-sde",
        "num_steps": 8,
        "sde_window": 2,
        "ode_solver": "dpm++2m",
        "ode_compress": 0.5,
    }
    trainer = Trainer(tiny_run("flash", sampler=sampler, train={"iterations": 2}))
    lengths: list[int] = []
    ratios: list[torch.Tensor] = []
    rollout, loss = trainer.rollout, trainer.algorithm.loss

    def recorded_rollout(draw, cond, schedule, stochastic, *rest):
        traj = rollout(draw, cond, schedule, stochastic, *rest)
        lengths.append(traj.log_probs.shape[1])
        assert bool((traj.log_probs[:, ~stochastic] == 0).all())
        return traj

    def recorded_loss(new, old, adv):
        out = loss(new, old, adv)
        ratios.append(out.ratio.detach().clone())
        return out

    trainer.rollout, trainer.algorithm.loss = recorded_rollout, recorded_loss
    assert trainer.train() == "finished"
    assert lengths == [2 + 3, 3 + 3]  # window at 0 then 1; the 6 and 5 steps after it halved, rounded up
    assert torch.equal(ratios[0], torch.ones_like(ratios[0]))
    assert all(math.isfinite(r["loss"]) for r in trainer.metrics.read())


def test_global_std_advantages_in_a_run(tiny_run):
    """Flow-GRPO's normalisation inside the training pass: each group's mean, the batch's std."""
    import statistics

    from dancecore.training.trainer import Trainer

    algorithm = {"advantage_std": "global", "clip_range_high": 2e-3, "advantage_clip": 100.0}
    trainer = Trainer(tiny_run("global-std", optimizer=algorithm, train={"iterations": 1}))
    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    original = trainer.algorithm.advantages

    def record(scores, group_ids):
        out = original(scores, group_ids)
        seen.append((scores.values[0].clone(), group_ids.clone(), out))
        return out

    trainer.algorithm.advantages = record
    assert trainer.train() == "finished"
    rewards, groups, advantages = seen[0]
    std_all = statistics.stdev(rewards.tolist())
    for g in torch.unique(groups):
        members = groups == g
        expected = (rewards[members] - rewards[members].mean()) / std_all
        assert torch.allclose(advantages[members], expected.float(), atol=1e-5)
