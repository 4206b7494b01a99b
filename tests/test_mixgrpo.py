"""MixGRPO's progressive SDE window and MixGRPO-Flash's compressed second-order ODE tail."""

from __future__ import annotations

import dataclasses
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


def test_flow_ode_rollout_schedule_is_second_order_inside_and_never_stochastic():
    from dancecore.builtins.samplers import FlowODESampler

    sampler = FlowODESampler(FlowODESampler.Config(num_steps=8, shift=3.0))
    assert sampler.uses_previous_step
    schedule = sampler.rollout_schedule(5)
    assert torch.equal(schedule.sigmas, shifted_sigmas(8, 3.0))
    assert schedule.orders is not None and schedule.orders.tolist() == [1, 1] + [2] * 5 + [1]
    assert sampler.schedule().orders is None  # evaluation: Euler on the same grid
    assert not bool(sampler.stochastic_steps(8, 0).any())
    euler = FlowODESampler(FlowODESampler.Config(num_steps=8, solver="euler"))
    assert not euler.uses_previous_step and euler.rollout_schedule(0).orders is None
    # a second-order step is the published 2M update from the previous clean estimate
    g = torch.Generator().manual_seed(1)
    x, v, x0_prev = (torch.randn(2, 4, generator=g) for _ in range(3))
    first = sampler.step(schedule, 1, x, v)
    assert torch.equal(first.log_prob, torch.zeros(2))
    sig = schedule.sigmas.tolist()
    assert torch.allclose(first.next_latents, x - (sig[1] - sig[2]) * v, atol=1e-6)  # first-order: Euler
    third = sampler.step(schedule, 2, x, v, previous=dataclasses.replace(first, x0_hat=x0_prev))
    x0 = x - sig[2] * v
    assert torch.allclose(third.next_latents, flow_dpm2m_step(x, x0, x0_prev, sig[1], sig[2], sig[3]), atol=1e-6)
    with pytest.raises(ValueError, match="previous step"):
        sampler.step(schedule, 2, x, v)


def test_diffusion_nft_trains_from_deterministic_second_order_rollouts(tmp_path):
    from dancecore.config.schema import validate
    from dancecore.training.trainer import Trainer
    from tests.conftest import TINY_RUN, deep_update

    data = deep_update(TINY_RUN, {"output_dir": str(tmp_path / "nft-ode")})
    data["sampler"] = {"name": "flow-ode", "num_steps": 6}
    data.pop("optimizer")
    data["algorithm"] = {"name": "diffusion-nft", "group_size": 4, "timesteps_per_sample": 2}
    trainer = Trainer(validate(data))
    finals: list[torch.Tensor] = []
    rollout = trainer.rollout

    def recorded(draw, cond, schedule, stochastic, *rest):
        traj = rollout(draw, cond, schedule, stochastic, *rest)
        assert not bool(stochastic.any()) and bool((traj.log_probs == 0).all())
        finals.append(traj.final.clone())
        return traj

    trainer.rollout = recorded
    before = {k: v.clone() for k, v in trainer.engine.model_state().items()}
    assert trainer.train() == "finished"
    assert any(not torch.equal(before[k], v) for k, v in trainer.engine.model_state().items())
    group = finals[0][:4].flatten(1)
    assert torch.cdist(group, group).triu(1)[0, 1:].min() > 0  # own initial noise per sample: distinct samples


def test_grpo_refuses_a_sampler_without_stochastic_steps(tiny_run):
    from dancecore.config.schema import validate
    from dancecore.errors import TrainingError
    from dancecore.training.trainer import Trainer

    run = tiny_run("grpo-ode")
    data = run.config.model_dump(mode="json")  # the tiny GRPO run with the deterministic sampler
    data["sampler"] = {"name": "flow-ode", "num_steps": 6}
    with pytest.raises(TrainingError, match="sampler 'flow-ode' takes no stochastic step.*'grpo'"):
        Trainer(validate(data))
