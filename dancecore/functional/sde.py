"""Sampling math: schedules and stochastic steps that return their own log-probability.

Everything here is a small pure function of tensors. Log-probabilities are computed in fp32 and
averaged (not summed) over every non-batch dimension: the PPO clip range used by GRPO (1e-4) is
calibrated to that averaging.
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import torch

from dancecore.contracts.records import StepResult

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def shifted_sigmas(num_steps: int, shift: float) -> torch.Tensor:
    """Rectified-flow noise levels: ``linspace(1, 0, N + 1)`` then the SD3 shift ``k s / (1 + (k-1) s)``."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    s = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return (shift * s / (1.0 + (shift - 1.0) * s)).to(torch.float32)


def ddim_timesteps(num_steps: int, num_train_timesteps: int = 1000, steps_offset: int = 1) -> torch.Tensor:
    """DDIM "leading" timestep spacing as Stable Diffusion uses it (descending integers)."""
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_train_timesteps}], got {num_steps}")
    ratio = num_train_timesteps // num_steps
    return (torch.arange(num_steps) * ratio).flip(0) + steps_offset


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per-element Gaussian log-density in fp32, averaged over all non-batch dimensions.

    ``std`` is a scalar, one value per row (shape ``(B,)`` or ``(B, 1, ..., 1)``) or one per element.
    """
    x, mean = x.float(), mean.float()
    std = std.float()
    dims = tuple(range(1, x.ndim))
    if std.ndim == 0 or (x.shape[0] > 0 and std.numel() == x.shape[0]):
        std = std.reshape(-1) if std.ndim else std
        return -(x - mean).square().mean(dim=dims) / (2.0 * std**2) - torch.log(std) - _LOG_SQRT_2PI
    log_density = -((x - mean) ** 2) / (2.0 * std**2) - torch.log(std) - _LOG_SQRT_2PI
    return log_density.mean(dim=dims)


# ----------------------------------------------------------------------- linear-Gaussian steps
#
# Every step below is linear in the current latent x and the network output m:
#     mean = a x + b m,   x0_hat = r x + u m,   next = mean + std * noise.
# Its constants depend only on the noise levels, so a sampler computes them once per schedule
# (``*_coefficients`` on the whole schedule) and a step is a handful of full-size operations.
# A coefficient tensor's last dimension holds, in order: a, b, r, u, std, and the log-density's
# scale (-1 / (2 std^2)) and shift (-log std - log sqrt(2 pi)); see :class:`StepCoefficients`.


def _stack_coefficients(
    a: torch.Tensor, b: torch.Tensor, r: torch.Tensor, u: torch.Tensor, std: torch.Tensor
) -> torch.Tensor:
    """float64 pieces -> the float32 (..., 7) coefficient tensor, log-density constants included."""
    std = torch.as_tensor(std, dtype=torch.float64)
    safe = torch.where(std > 0, std, torch.ones_like(std))
    scale = torch.where(std > 0, -0.5 / safe**2, torch.zeros_like(std))  # multiplies mean((next - mean)^2)
    shift = torch.where(std > 0, -torch.log(safe) - _LOG_SQRT_2PI, torch.zeros_like(std))
    parts = torch.broadcast_tensors(*(torch.as_tensor(v, dtype=torch.float64) for v in (a, b, r, u, std, scale, shift)))
    return torch.stack(parts, dim=-1).float()


def flow_grpo_noise_level(sigma: torch.Tensor, a: float, sigma_at_one: float | torch.Tensor) -> torch.Tensor:
    """Flow-GRPO's sigma-dependent noise level ``eps_t = a sqrt(sigma / (1 - sigma))`` (a = 0.7 in
    Flow-GRPO). At ``sigma == 1`` the ratio is infinite; as Flow-GRPO does, ``1 - sigma`` is then
    taken at ``sigma_at_one`` (the schedule's next sigma), which keeps the first step finite."""
    s = sigma.to(torch.float64)
    guarded = torch.where(s >= 1.0, torch.as_tensor(sigma_at_one, dtype=torch.float64), s)
    return a * torch.sqrt(s / (1.0 - guarded))


def flow_coefficients(sigma: torch.Tensor, sigma_next: torch.Tensor, eta: float | torch.Tensor) -> torch.Tensor:
    """Constants of the rectified-flow step from ``sigma`` to ``sigma_next`` (scalars or vectors).

    With ``s = sigma``, ``d = sigma - sigma_next``, ``x0 = x - s v`` and the score
    ``-(x - (1 - s) x0) / s^2``, DanceGRPO's SDE step has mean ``x - d v + eta^2 d score / 2`` and
    std ``eta sqrt(d)``. Expanded: ``c = eta^2 d / (2 s)``, ``mean = (1 - c) x - (d + c (1 - s)) v``.
    ``eta = 0`` gives the Euler (ODE) step ``x - d v``. ``eta`` may be one value per step (Flow-GRPO's
    sigma-dependent noise, :func:`flow_grpo_noise_level`): the mean has the same form, the std is
    ``eta_t sqrt(d)``.
    """
    s = sigma.to(torch.float64)
    d = s - sigma_next.to(torch.float64)
    e = torch.as_tensor(eta, dtype=torch.float64)
    c = e**2 * d / (2.0 * s)
    return _stack_coefficients(1.0 - c, -(d + c * (1.0 - s)), torch.ones_like(s), -s, e * torch.sqrt(d))


def cps_coefficients(sigma: torch.Tensor, sigma_next: torch.Tensor, eta: float) -> torch.Tensor:
    """Constants of the coefficients-preserving (CPS) step from ``sigma`` to ``sigma_next``.

    With ``x0 = x - s v`` and ``eps = x + (1 - s) v`` (both exact for rectified flow), the next latent
    keeps the deterministic schedule's signal/noise coefficients:
    ``x' = (1 - s') x0 + s' (cos(alpha) eps + sin(alpha) z)``, ``alpha = eta pi / 2``, ``z ~ N(0, I)``.
    So ``mean = (1 - s' + s' cos(alpha)) x + (s' cos(alpha) (1 - s) - (1 - s') s) v`` and
    ``std = s' sin(alpha)``. ``eta = 0`` is the Euler step; the last step (``s' = 0``) is
    deterministic whatever eta.

    Log-probability convention: dancecore scores a CPS transition with the full Gaussian density
    (the same averaged log-density as every other step), so ratios are exact and comparable across
    samplers. Flow-GRPO's CPS code drops the ``1 / (2 std^2)`` scale and the normaliser, which
    changes the size of a log-prob difference (hence what a clip range means) but not its sign.
    """
    s = sigma.to(torch.float64)
    sn = sigma_next.to(torch.float64)
    alpha = torch.as_tensor(eta * math.pi / 2.0, dtype=torch.float64)
    cos, sin = torch.cos(alpha), torch.sin(alpha)
    a = (1.0 - sn) + sn * cos
    b = sn * cos * (1.0 - s) - (1.0 - sn) * s
    return _stack_coefficients(a, b, torch.ones_like(s), -s, sn * sin)


def ddim_coefficients(alpha_prod: torch.Tensor, alpha_prod_prev: torch.Tensor, eta: float) -> torch.Tensor:
    """Constants of the DDIM step between cumulative alphas ``alpha_prod`` -> ``alpha_prod_prev``.

    ``x0 = (x - sqrt(1 - a_t) e) / sqrt(a_t)``, ``std = eta sqrt(var)`` with
    ``var = (1 - a_prev) / (1 - a_t) (1 - a_t / a_prev)``, and
    ``mean = sqrt(a_prev) x0 + sqrt(1 - a_prev - std^2) e``.
    """
    a_t = alpha_prod.to(torch.float64)
    a_prev = alpha_prod_prev.to(torch.float64)
    variance = ((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)).clamp(min=0.0)
    std = eta * torch.sqrt(variance)
    r, u = 1.0 / torch.sqrt(a_t), -torch.sqrt(1.0 - a_t) / torch.sqrt(a_t)
    direction = torch.sqrt((1.0 - a_prev - std**2).clamp(min=0.0))
    return _stack_coefficients(torch.sqrt(a_prev) * r, torch.sqrt(a_prev) * u + direction, r, u, std)


class StepCoefficients(NamedTuple):
    """One step's constants, each a 0-d tensor (whole batch) or one value per row: ``a``..``std``
    shaped ``(B, 1, ..., 1)`` to broadcast over a latent, ``logp_*`` shaped ``(B,)``."""

    a: torch.Tensor
    b: torch.Tensor
    r: torch.Tensor
    u: torch.Tensor
    std: torch.Tensor
    logp_scale: torch.Tensor
    logp_shift: torch.Tensor


def split_coefficients(coefficients: torch.Tensor, latent_ndim: int) -> StepCoefficients:
    """A ``(7,)`` or ``(B, 7)`` coefficient tensor as :class:`StepCoefficients` for latents with
    ``latent_ndim`` dimensions."""
    a, b, r, u, std, logp_scale, logp_shift = coefficients.unbind(-1)
    if coefficients.ndim > 1:  # one step per row: broadcast over each row's latent
        shape = (-1, *([1] * (latent_ndim - 1)))
        a, b, r, u, std = (c.reshape(shape) for c in (a, b, r, u, std))
    return StepCoefficients(a, b, r, u, std, logp_scale, logp_shift)


def _fp32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 else t.float()


def linear_gaussian_step(
    latents: torch.Tensor,
    model_output: torch.Tensor,
    coefficients: torch.Tensor | StepCoefficients,
    *,
    stochastic: bool = True,
    noise: torch.Tensor | None = None,
    next_latents: torch.Tensor | None = None,
) -> StepResult:
    """Apply one step given its coefficients (a ``(7,)`` tensor for the whole batch, ``(B, 7)``
    for one step per row, or already split as :class:`StepCoefficients`).

    Rollout passes ``noise``; training passes the recorded ``next_latents`` to score that
    transition (then ``x0_hat`` carries no gradient). The log-probability is averaged over
    non-batch dimensions (0 when not stochastic).
    """
    x = _fp32(latents)
    m = _fp32(model_output)
    k = (
        coefficients
        if isinstance(coefficients, StepCoefficients)
        else split_coefficients(coefficients.to(x.device), x.ndim)
    )
    mean = torch.addcmul(k.a * x, k.b, m)
    with torch.no_grad() if next_latents is not None else contextlib.nullcontext():  # no gradient needed when scoring
        x0_hat = torch.addcmul(k.r * x, k.u, m)
    if not stochastic:
        zeros = torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)
        return StepResult(next_latents=mean.to(latents.dtype), log_prob=zeros, x0_hat=x0_hat.to(latents.dtype))
    if next_latents is None:
        if noise is None:
            raise ValueError("a stochastic step needs either noise (rollout) or next_latents (training)")
        next_latents = torch.addcmul(mean, k.std, _fp32(noise))
    mean_square = (_fp32(next_latents) - mean).square().mean(dim=tuple(range(1, x.ndim)))
    log_prob = torch.addcmul(k.logp_shift, k.logp_scale, mean_square)
    return StepResult(
        next_latents=next_latents.to(latents.dtype),
        log_prob=log_prob,
        x0_hat=x0_hat.to(latents.dtype),
        mean=mean,
        std=k.std,
    )


def flow_dpm2m_step(
    latents: torch.Tensor,
    x0: torch.Tensor,
    x0_previous: torch.Tensor,
    sigma_previous: float,
    sigma: float,
    sigma_next: float,
) -> torch.Tensor:
    """One DPM-Solver++(2M) step of the rectified-flow ODE (data prediction, midpoint form).

    With ``alpha = 1 - sigma`` and ``lambda = log(alpha / sigma)``, ``h = lambda_next - lambda``
    and ``r = (lambda - lambda_previous) / h``, the update is
    ``x_next = (sigma_next / sigma) x + alpha_next (1 - exp(-h)) D`` with
    ``D = x0 + (x0 - x0_previous) / (2 r)``. For flow ``alpha_next (1 - exp(-h))`` simplifies to
    ``(sigma - sigma_next) / sigma``, so with ``D = x0`` this is exactly the Euler step. Needs
    ``0 < sigma_next < sigma < sigma_previous < 1``: the first step (sigma = 1) and the last
    (sigma_next = 0) are first-order.
    """
    if not 0.0 < sigma_next < sigma < sigma_previous < 1.0:
        raise ValueError(
            f"DPM-Solver++(2M) needs 0 < sigma_next < sigma < sigma_previous < 1, got "
            f"{sigma_next}, {sigma}, {sigma_previous}"
        )

    def lam(s: float) -> float:
        return math.log((1.0 - s) / s)

    r = (lam(sigma) - lam(sigma_previous)) / (lam(sigma_next) - lam(sigma))
    x0f, prev = _fp32(x0), _fp32(x0_previous)
    d = x0f + (x0f - prev) * (1.0 / (2.0 * r))
    out = _fp32(latents) * (sigma_next / sigma) + d * ((sigma - sigma_next) / sigma)
    return out.to(latents.dtype)


def gaussian_mean_kl(mean: torch.Tensor, reference_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL between two Gaussian steps with the same std, averaged over non-batch dimensions (as the
    log-probabilities are): ``mean((mu - mu_ref)^2) / (2 std^2)`` per row (Flow-GRPO's KL term)."""
    dims = tuple(range(1, mean.ndim))
    per_element = (mean.float() - reference_mean.float()).square() / (2.0 * std.float().square().clamp(min=1e-20))
    return per_element.mean(dim=dims)


def flow_sde_step(
    latents: torch.Tensor,
    velocity: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    eta: float,
    *,
    noise: torch.Tensor | None = None,
    next_latents: torch.Tensor | None = None,
) -> StepResult:
    """One stochastic rectified-flow step (DanceGRPO's SDE, see :func:`flow_coefficients`) with
    its log-probability. ``sigma``/``sigma_next`` are scalars or one value per row. With
    ``next_latents`` the given transition is scored instead of sampling one (the training pass)."""
    coefficients = flow_coefficients(sigma, sigma_next, eta)
    return linear_gaussian_step(latents, velocity, coefficients, noise=noise, next_latents=next_latents)


def flow_ode_step(
    latents: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor
) -> StepResult:
    """The deterministic Euler step of the flow ODE. Its log-probability is reported as 0: such
    steps are never trained."""
    return linear_gaussian_step(latents, velocity, flow_coefficients(sigma, sigma_next, 0.0), stochastic=False)


def ddim_step(
    latents: torch.Tensor,
    eps: torch.Tensor,
    alpha_prod: torch.Tensor,
    alpha_prod_prev: torch.Tensor,
    eta: float,
    *,
    noise: torch.Tensor | None = None,
    next_latents: torch.Tensor | None = None,
) -> StepResult:
    """One DDIM step with stochasticity ``eta`` (eta = 1 is DDPM-like) and its log-probability
    (see :func:`ddim_coefficients`). ``alpha_prod`` is the cumulative alpha at the current timestep
    and ``alpha_prod_prev`` at the next (less noisy) one. With ``eta == 0`` the step is
    deterministic and its log-prob is 0."""
    coefficients = ddim_coefficients(alpha_prod, alpha_prod_prev, eta)
    return linear_gaussian_step(
        latents, eps, coefficients, stochastic=eta != 0.0, noise=noise, next_latents=next_latents
    )
