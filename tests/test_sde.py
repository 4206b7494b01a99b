"""Sampling math against hand computations."""

import math

import pytest
import torch

from dancecore.functional.sde import (
    ddim_step,
    ddim_timesteps,
    flow_ode_step,
    flow_sde_step,
    gaussian_log_prob,
    shifted_sigmas,
)


def test_shifted_sigmas_match_formula():
    sigmas = shifted_sigmas(4, 3.0)
    expected = [3 * s / (1 + 2 * s) for s in (1.0, 0.75, 0.5, 0.25, 0.0)]
    assert sigmas.tolist() == [float(torch.tensor(e, dtype=torch.float32)) for e in expected]
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0


def test_shift_one_is_linear():
    assert torch.allclose(shifted_sigmas(8, 1.0), torch.linspace(1, 0, 9))


def test_gaussian_log_prob_is_averaged_not_summed():
    x = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    mean = torch.zeros(2, 2)
    std = torch.full((2, 2), 2.0)
    per_element = lambda v: -(v**2) / 8 - math.log(2.0) - 0.5 * math.log(2 * math.pi)  # noqa: E731
    expected = [(per_element(1.0) + per_element(2.0)) / 2, per_element(0.0)]
    assert torch.allclose(gaussian_log_prob(x, mean, std), torch.tensor(expected))


def test_flow_sde_step_matches_hand_computation():
    x = torch.tensor([[0.5, -1.0]])
    v = torch.tensor([[0.2, 0.4]])
    noise = torch.tensor([[1.0, -0.5]])
    s, s_next, eta = 0.8, 0.6, 0.3
    d = s - s_next
    x0 = x - s * v
    score = -(x - (1 - s) * x0) / s**2
    mean = x - d * v + 0.5 * eta**2 * d * score
    std = eta * math.sqrt(d)
    expected_next = mean + std * noise
    out = flow_sde_step(x, v, torch.tensor(s), torch.tensor(s_next), eta, noise=noise)
    assert torch.allclose(out.next_latents, expected_next, atol=1e-6)
    assert torch.allclose(out.x0_hat, x0)
    logp = (-((expected_next - mean) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)).mean()
    assert torch.allclose(out.log_prob, logp.reshape(1), atol=1e-6)


def test_flow_sde_scores_a_given_transition_identically():
    g = torch.Generator().manual_seed(0)
    x, v, noise = (torch.randn(3, 4, 5, generator=g) for _ in range(3))
    rolled = flow_sde_step(x, v, torch.tensor(0.9), torch.tensor(0.7), 0.3, noise=noise)
    rescored = flow_sde_step(x, v, torch.tensor(0.9), torch.tensor(0.7), 0.3, next_latents=rolled.next_latents)
    assert torch.equal(rolled.log_prob, rescored.log_prob)


def test_flow_sde_per_row_sigmas_equal_scalar_calls():
    g = torch.Generator().manual_seed(1)
    x, v, noise = (torch.randn(2, 6, generator=g) for _ in range(3))
    rows = flow_sde_step(x, v, torch.tensor([0.9, 0.5]), torch.tensor([0.7, 0.2]), 0.3, noise=noise)
    first = flow_sde_step(x[:1], v[:1], torch.tensor(0.9), torch.tensor(0.7), 0.3, noise=noise[:1])
    second = flow_sde_step(x[1:], v[1:], torch.tensor(0.5), torch.tensor(0.2), 0.3, noise=noise[1:])
    assert torch.allclose(rows.log_prob, torch.cat([first.log_prob, second.log_prob]))


def test_flow_ode_step_is_euler():
    x, v = torch.ones(1, 3), torch.full((1, 3), 2.0)
    out = flow_ode_step(x, v, torch.tensor(0.5), torch.tensor(0.25))
    assert torch.allclose(out.next_latents, x - 0.25 * v)


def test_ddim_timesteps_leading_spacing():
    assert ddim_timesteps(4, 1000).tolist() == [751, 501, 251, 1]


def test_ddim_step_matches_hand_computation():
    x = torch.tensor([[0.3, -0.2]])
    eps = torch.tensor([[0.1, 0.5]])
    noise = torch.tensor([[0.7, -1.2]])
    a_t, a_prev, eta = 0.5, 0.8, 1.0
    x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std = eta * math.sqrt(var)
    mean = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - std**2) * eps
    out = ddim_step(x, eps, torch.tensor(a_t), torch.tensor(a_prev), eta, noise=noise)
    assert torch.allclose(out.next_latents, mean + std * noise, atol=1e-6)
    logp = (-((std * noise) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)).mean()
    assert torch.allclose(out.log_prob, logp.reshape(1), atol=1e-5)


def test_ddim_eta_zero_is_deterministic():
    x, eps = torch.randn(2, 3), torch.randn(2, 3)
    out = ddim_step(x, eps, torch.tensor(0.5), torch.tensor(0.8), 0.0)
    assert torch.equal(out.log_prob, torch.zeros(2))


def test_gaussian_log_prob_per_row_std_equals_per_element_std():
    g = torch.Generator().manual_seed(2)
    x, mean = torch.randn(3, 4, 5, generator=g), torch.randn(3, 4, 5, generator=g)
    std = torch.tensor([0.5, 1.0, 2.0])
    full = gaussian_log_prob(x, mean, std.reshape(3, 1, 1).expand(3, 4, 5).contiguous())
    assert torch.allclose(gaussian_log_prob(x, mean, std), full, atol=1e-6)
    assert torch.allclose(gaussian_log_prob(x, mean, std.reshape(3, 1, 1)), full, atol=1e-6)
    assert torch.allclose(gaussian_log_prob(x[1:2], mean[1:2], std[1]), full[1:2], atol=1e-6)  # scalar std


@pytest.mark.parametrize("name", ["flow", "ddim"])
def test_sampler_scores_rows_exactly_as_the_rollout_stepped_them(name):
    """Rollout steps the whole batch at one step index; training scores rows at different steps.
    Both read the same per-schedule coefficients, so the log-probs agree bit for bit (rho == 1)."""
    from dancecore.builtins.samplers import DDIMSDESampler, FlowSDESampler

    sampler = (
        FlowSDESampler(FlowSDESampler.Config(num_steps=8))
        if name == "flow"
        else DDIMSDESampler(DDIMSDESampler.Config(num_steps=8))
    )
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
    # and the cached coefficients are those of the textbook step
    reference = (
        flow_sde_step(x, out, schedule.sigmas[steps], schedule.sigmas[steps + 1], sampler.config.eta, noise=noise)
        if name == "flow"
        else ddim_step(x, out, schedule.sigmas[steps], schedule.sigmas[steps + 1], sampler.config.eta, noise=noise)
    )
    assert torch.allclose(torch.cat([r.next_latents for r in rolled]), reference.next_latents, atol=1e-6)
    assert torch.allclose(scored.log_prob, reference.log_prob, atol=1e-5)
