"""Flow-GRPO's sigma-dependent SDE and coefficients-preserving sampling (CPS), against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from dancecore.builtins.samplers import FlowCPSSampler, FlowSDESampler
from dancecore.functional.sde import cps_coefficients, flow_coefficients, flow_grpo_noise_level, split_coefficients


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(3, 4, 8, generator=g, dtype=torch.float64) for _ in range(3))


def test_flow_grpo_noise_level_formula_and_the_sigma_one_guard():
    sigma = torch.tensor([1.0, 0.8, 0.5, 0.1])
    eps = flow_grpo_noise_level(sigma, 0.7, sigma_at_one=0.9)
    assert eps[1].item() == pytest.approx(0.7 * math.sqrt(0.8 / 0.2))
    assert eps[3].item() == pytest.approx(0.7 * math.sqrt(0.1 / 0.9))
    assert eps[0].item() == pytest.approx(0.7 * math.sqrt(1.0 / (1 - 0.9)))  # finite at sigma = 1
    assert bool(torch.isfinite(eps).all())


def test_flow_grpo_step_is_the_danceGRPO_mean_with_per_step_noise():
    x, v, noise = _batch()
    s, sn, a = 0.6, 0.45, 0.7
    eps_t = a * math.sqrt(s / (1 - s))
    d = s - sn
    # Flow-GRPO's own form: x (1 + e^2 dt / (2 s)) + v (1 + e^2 (1 - s) / (2 s)) dt, dt = -d
    dt = -d
    mean = x * (1 + eps_t**2 / (2 * s) * dt) + v * (1 + eps_t**2 * (1 - s) / (2 * s)) * dt
    k = split_coefficients(
        flow_coefficients(torch.tensor(s), torch.tensor(sn), flow_grpo_noise_level(torch.tensor(s), a, 0.0)).double(), 3
    )
    assert torch.allclose(k.a * x + k.b * v, mean, atol=1e-5)
    assert k.std.item() == pytest.approx(eps_t * math.sqrt(d), rel=1e-6)


def test_cps_step_keeps_the_schedule_coefficients():
    x0, eps, noise = _batch(1)
    s, sn, eta = 0.7, 0.4, 0.5
    x = (1 - s) * x0 + s * eps  # a latent on the schedule
    v = eps - x0
    alpha = eta * math.pi / 2
    expected_mean = (1 - sn) * x0 + sn * math.cos(alpha) * eps
    k = split_coefficients(cps_coefficients(torch.tensor(s), torch.tensor(sn), eta).double(), 3)
    assert torch.allclose(k.a * x + k.b * v, expected_mean, atol=1e-5)
    assert k.std.item() == pytest.approx(sn * math.sin(alpha), rel=1e-6)
    # x' = mean + std z has signal coefficient (1 - s') and total noise variance s'^2: coefficients preserved
    assert (math.cos(alpha) ** 2 + math.sin(alpha) ** 2) == pytest.approx(1.0)
    euler = split_coefficients(cps_coefficients(torch.tensor(s), torch.tensor(sn), 0.0).double(), 3)
    assert torch.allclose(euler.a * x + euler.b * v, x - (s - sn) * v, atol=1e-6)  # eta = 0 is the ODE step


@pytest.mark.parametrize(
    "sampler",
    [
        FlowSDESampler(FlowSDESampler.Config(num_steps=8, eta=0.7, noise="flow-grpo")),
        FlowCPSSampler(FlowCPSSampler.Config(num_steps=8, eta=0.5)),
    ],
    ids=["flow-grpo", "cps"],
)
def test_variant_samplers_score_rows_exactly_as_the_rollout_stepped_them(sampler):
    schedule = sampler.schedule()
    g = torch.Generator().manual_seed(3)
    steps = torch.tensor([0, 3, 6, 2])
    x, out, noise = (torch.randn(4, 2, 16, generator=g) for _ in range(3))
    rolled = [
        sampler.step(schedule, int(i), x[j : j + 1], out[j : j + 1], noise=noise[j : j + 1])
        for j, i in enumerate(steps)
    ]
    scored = sampler.step(schedule, steps, x, out, next_latents=torch.cat([r.next_latents for r in rolled]))
    assert torch.equal(scored.log_prob, torch.cat([r.log_prob for r in rolled]))
    assert bool(torch.isfinite(scored.log_prob).all())
    ode = sampler.step(schedule, 2, x, out, deterministic=True)
    euler = x - (schedule.sigmas[2] - schedule.sigmas[3]) * out
    assert torch.allclose(ode.next_latents, euler, atol=1e-6) and torch.equal(ode.log_prob, torch.zeros(4))


def test_the_last_cps_step_is_deterministic():
    sampler = FlowCPSSampler(FlowCPSSampler.Config(num_steps=4, eta=1.0))
    schedule = sampler.schedule()
    x, out, noise = (torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(s)) for s in range(3))
    a = sampler.step(schedule, 3, x, out, noise=noise).next_latents
    b = sampler.step(schedule, 3, x, out, noise=-noise).next_latents
    assert torch.equal(a, b)  # s' = 0: no fresh noise reaches the final latent


@pytest.mark.parametrize(
    "sampler",
    [
        {"name": "flow-sde", "noise": "flow-grpo", "eta": 0.7, "num_steps": 4},
        {"name": "flow-cps", "eta": 0.5, "num_steps": 4},
    ],
    ids=["flow-grpo", "cps"],
)
def test_variant_samplers_train_with_ratio_exactly_one_before_the_update(tiny_run, sampler):
    from dancecore.training.trainer import Trainer

    trainer = Trainer(tiny_run(sampler["name"] + sampler.get("noise", ""), sampler=sampler, train={"iterations": 2}))
    ratios: list[torch.Tensor] = []
    original = trainer.algorithm.loss

    def record(new, old, adv):
        out = original(new, old, adv)
        ratios.append(out.ratio.detach().clone())
        return out

    trainer.algorithm.loss = record
    assert trainer.train() == "finished"
    assert torch.equal(ratios[0], torch.ones_like(ratios[0]))
    records = trainer.metrics.read()
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in records)


@pytest.mark.parametrize(
    ("sampler_name", "policy_name"), [("ddim-sde", "testing-tiny-eps"), ("flow-sde", "testing-tiny")]
)
def test_rollout_and_eval_decode_what_the_sampler_declares(sampler_name, policy_name):
    """DDIM decodes its final sample (as diffusers, DDPO and DanceGRPO's SD code), flow samplers the
    last step's x0_hat (the ODE endpoint), in the training rollout and in evaluation alike."""
    import contextlib

    from dancecore.contracts.records import PromptBatch
    from dancecore.testing import build_component, deterministic_rollout, prompt_batch
    from dancecore.training.sampling import NetworkCalls, grouped_rollout

    policy = build_component("policy", policy_name)
    sampler = build_component("sampler", sampler_name, {"num_steps": 4})
    batch: PromptBatch = prompt_batch(["a red cube"])
    cond = policy.encode_prompts(batch)
    schedule = sampler.schedule()
    calls = NetworkCalls(device=torch.device("cpu"), micro_batch_size=2, autocast=contextlib.nullcontext)
    traj = grouped_rollout(
        policy, sampler, calls, seed=0, draw=0, prompt_ids=[0], group_size=2, cond=cond,
        schedule=schedule, stochastic=torch.ones(4, dtype=torch.bool),
    )  # fmt: skip
    decodes_sample = sampler_name == "ddim-sde"
    assert torch.equal(traj.final, traj.latents[:, -1]) == decodes_sample
    noise = policy.initial_noise(1, torch.Generator().manual_seed(0))
    ode = deterministic_rollout(policy, batch, noise, sampler=sampler)
    x, out = noise, None
    with torch.no_grad():
        for i in range(schedule.num_steps):
            out = sampler.step(
                schedule, i, x, policy.predict(x, schedule.timesteps[i].expand(1), cond), deterministic=True
            )
            x = out.next_latents
    assert torch.equal(ode.latents, out.next_latents if decodes_sample else out.x0_hat)
    if decodes_sample:  # at SD's last alpha (0.99915) the final sample is not x0_hat
        assert not torch.allclose(out.next_latents, out.x0_hat)
