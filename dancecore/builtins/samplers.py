"""Built-in samplers: ``flow-sde`` (rectified flow) and ``ddim-sde`` (DDIM with eta)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from pydantic import Field, model_validator

from dancecore.contracts.component import ComponentConfig
from dancecore.contracts.protocols import BuildContext
from dancecore.contracts.records import Schedule, StepResult
from dancecore.functional.sde import (
    StepCoefficients,
    cps_coefficients,
    ddim_coefficients,
    ddim_timesteps,
    flow_coefficients,
    flow_grpo_noise_level,
    linear_gaussian_step,
    shifted_sigmas,
    split_coefficients,
)


class _CoefficientTables:
    """Per-step constants of a sampler's steps for a schedule, computed once per schedule (and
    eta, and device) and indexed by step: rollout (one step for the whole batch) and training (one
    step per row) then read the very same numbers."""

    def __init__(self, build: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]) -> None:
        self.build = build
        self.tables: dict[tuple[int, float, str], tuple[torch.Tensor, torch.Tensor, list[StepCoefficients]]] = {}

    def __call__(
        self, schedule: Schedule, eta: float, index: int | torch.Tensor, like: torch.Tensor
    ) -> StepCoefficients:
        key = (id(schedule.sigmas), eta, str(like.device))
        hit = self.tables.get(key)
        if hit is None or hit[0] is not schedule.sigmas:
            if len(self.tables) >= 8:  # a new schedule per iteration: keep only the recent ones
                self.tables.clear()
            table = self.build(schedule.sigmas[:-1], schedule.sigmas[1:], eta).to(like.device)
            per_step = [split_coefficients(row, like.ndim) for row in table]
            hit = self.tables[key] = (schedule.sigmas, table, per_step)  # holding sigmas keeps its id unused
        if isinstance(index, int):
            return hit[2][index]
        return split_coefficients(hit[1][index.to(like.device)], like.ndim)

    def step(
        self,
        schedule: Schedule,
        eta: float,
        index: int | torch.Tensor,
        latents: torch.Tensor,
        model_output: torch.Tensor,
        noise: torch.Tensor | None,
        next_latents: torch.Tensor | None,
    ) -> StepResult:
        """The linear-Gaussian step with this table's constants; ``eta == 0`` is the deterministic step."""
        return linear_gaussian_step(
            latents,
            model_output,
            self(schedule, eta, index, latents),
            stochastic=eta != 0.0,
            noise=noise,
            next_latents=next_latents,
        )


class _FlowScheduleConfig(ComponentConfig):
    """The schedule options every rectified-flow sampler shares."""

    num_steps: int = Field(16, ge=2, description="Number of sampling steps N.")
    shift: float = Field(3.0, gt=0, description="SD3 time shift k (3 FLUX, 5 HunyuanVideo, 7 SkyReels).")
    sde_window: int | None = Field(
        None, ge=1, description="If set, only this many consecutive steps are stochastic (mixed ODE/SDE)."
    )

    @model_validator(mode="after")
    def _window_fits(self) -> _FlowScheduleConfig:
        if self.sde_window is not None and self.sde_window > self.num_steps - 1:
            raise ValueError(f"sde_window ({self.sde_window}) must be <= num_steps - 1 ({self.num_steps - 1})")
        return self


def _flow_schedule(config: _FlowScheduleConfig, num_steps: int | None) -> Schedule:
    sigmas = shifted_sigmas(num_steps or config.num_steps, config.shift)
    return Schedule(timesteps=sigmas[:-1].clone(), sigmas=sigmas)


def _window_mask(config: _FlowScheduleConfig, num_steps: int, iteration: int) -> torch.Tensor:
    """Without a window every step is stochastic. With a window of W steps, the window starts at
    ``iteration mod (N - W)`` so that it sweeps the schedule over training; the last step is never
    inside it."""
    mask = torch.ones(num_steps, dtype=torch.bool)
    window = config.sde_window
    if window is None:
        return mask
    start = iteration % max(1, num_steps - window)
    mask[:] = False
    mask[start : start + window] = True
    return mask


class FlowSDESampler:
    """The DanceGRPO stochastic sampler for rectified-flow models (FLUX, HunyuanVideo, SkyReels).

    Sigmas follow ``linspace(1, 0, N+1)`` with the SD3 shift; the network is given the sigma
    itself as its timestep. An optional SDE window makes only steps inside the window
    stochastic (the rest are ODE steps that are never trained).
    """

    class Config(_FlowScheduleConfig):
        """Options of the ``flow-sde`` sampler."""

        eta: float = Field(
            0.3, gt=0, description="Noise level of the SDE (0.25 HunyuanVideo); with `noise: flow-grpo`, its a (0.7)."
        )
        noise: Literal["constant", "flow-grpo"] = Field(
            "constant",
            description="'constant': DanceGRPO's std eta sqrt(d); 'flow-grpo': eta_t = eta sqrt(sigma / (1 - sigma)).",
        )

    prediction_type = "flow"

    def __init__(self, config: Config, context: BuildContext | None = None) -> None:
        self.config = config
        build = _flow_grpo_coefficients if config.noise == "flow-grpo" else flow_coefficients
        self._coefficients = _CoefficientTables(build)

    def schedule(self, num_steps: int | None = None) -> Schedule:
        """Shifted sigmas; timesteps are the first N sigmas."""
        return _flow_schedule(self.config, num_steps)

    def stochastic_steps(self, num_steps: int, iteration: int) -> torch.Tensor:
        """Boolean mask of the stochastic (trainable) steps at ``iteration`` (see :func:`_window_mask`)."""
        return _window_mask(self.config, num_steps, iteration)

    def step(
        self,
        schedule: Schedule,
        index: int | torch.Tensor,
        latents: torch.Tensor,
        model_output: torch.Tensor,
        *,
        noise: torch.Tensor | None = None,
        next_latents: torch.Tensor | None = None,
        deterministic: bool = False,
    ) -> StepResult:
        """One SDE (or, if ``deterministic``, ODE) step."""
        eta = 0.0 if deterministic else self.config.eta
        return self._coefficients.step(schedule, eta, index, latents, model_output, noise, next_latents)


def _flow_grpo_coefficients(sigma: torch.Tensor, sigma_next: torch.Tensor, eta: float) -> torch.Tensor:
    """Flow-GRPO's SDE: DanceGRPO's mean with the per-step noise level a sqrt(sigma / (1 - sigma))."""
    if eta == 0.0:
        return flow_coefficients(sigma, sigma_next, 0.0)
    guard = sigma_next[0] if sigma_next.numel() else sigma.new_tensor(0.0)  # the schedule's second sigma
    return flow_coefficients(sigma, sigma_next, flow_grpo_noise_level(sigma, eta, guard))


class FlowCPSSampler:
    """Coefficients-preserving sampling (CPS) for rectified flow: each stochastic step lands on the
    deterministic schedule's signal/noise coefficients (see :func:`~dancecore.functional.sde.cps_coefficients`);
    ``eta`` sets the angle alpha = eta pi / 2 of fresh noise. Same schedule, window and options as ``flow-sde``."""

    class Config(_FlowScheduleConfig):
        """Options of the ``flow-cps`` sampler."""

        eta: float = Field(
            0.5, gt=0, le=1, description="Fraction of a quarter turn of fresh noise per step (alpha = eta pi/2)."
        )

    prediction_type = "flow"

    def __init__(self, config: Config, context: BuildContext | None = None) -> None:
        self.config = config
        self._coefficients = _CoefficientTables(cps_coefficients)

    def schedule(self, num_steps: int | None = None) -> Schedule:
        """The same shifted sigmas as ``flow-sde``."""
        return _flow_schedule(self.config, num_steps)

    def stochastic_steps(self, num_steps: int, iteration: int) -> torch.Tensor:
        """The same SDE window as ``flow-sde``."""
        return _window_mask(self.config, num_steps, iteration)

    def step(
        self,
        schedule: Schedule,
        index: int | torch.Tensor,
        latents: torch.Tensor,
        model_output: torch.Tensor,
        *,
        noise: torch.Tensor | None = None,
        next_latents: torch.Tensor | None = None,
        deterministic: bool = False,
    ) -> StepResult:
        """One CPS step (the Euler step when ``deterministic``)."""
        eta = 0.0 if deterministic else self.config.eta
        return self._coefficients.step(schedule, eta, index, latents, model_output, noise, next_latents)


class DDIMSDESampler:
    """DDIM with stochasticity eta (1.0 by default) for epsilon-prediction diffusion models (SD).

    The decoded sample is the final DDIM sample (at SD's last cumulative alpha 0.99915, not 1), as
    diffusers' pipeline, DDPO and DanceGRPO's SD code decode it, not the last step's ``x0_hat``.
    """

    decodes = "sample"

    class Config(ComponentConfig):
        """Options of the ``ddim-sde`` sampler (defaults: Stable Diffusion v1.x's scheduler)."""

        num_steps: int = Field(50, ge=2, description="Number of DDIM steps.")
        eta: float = Field(1.0, ge=0, description="DDIM stochasticity (1.0 as in DDPO / DanceGRPO).")
        num_train_timesteps: int = Field(1000, ge=2)
        beta_start: float = Field(0.00085, gt=0)
        beta_end: float = Field(0.012, gt=0)
        beta_schedule: str = Field("scaled_linear", pattern="^(scaled_linear|linear)$")
        steps_offset: int = Field(1, ge=0)

    prediction_type = "epsilon"

    def __init__(self, config: Config, context: BuildContext | None = None) -> None:
        self.config = config
        c = config
        if c.beta_schedule == "scaled_linear":
            betas = torch.linspace(c.beta_start**0.5, c.beta_end**0.5, c.num_train_timesteps, dtype=torch.float64) ** 2
        else:
            betas = torch.linspace(c.beta_start, c.beta_end, c.num_train_timesteps, dtype=torch.float64)
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self._coefficients = _CoefficientTables(ddim_coefficients)

    def schedule(self, num_steps: int | None = None) -> Schedule:
        """Integer timesteps; ``sigmas`` holds the cumulative alphas at them plus the final one."""
        n = num_steps or self.config.num_steps
        timesteps = ddim_timesteps(n, self.config.num_train_timesteps, self.config.steps_offset)
        alphas = self.alphas_cumprod[timesteps]
        final = self.alphas_cumprod[0:1]  # SD's set_alpha_to_one=False
        return Schedule(timesteps=timesteps, sigmas=torch.cat([alphas, final]).float())

    def stochastic_steps(self, num_steps: int, iteration: int) -> torch.Tensor:
        """Every DDIM step is stochastic."""
        return torch.ones(num_steps, dtype=torch.bool)

    def step(
        self,
        schedule: Schedule,
        index: int | torch.Tensor,
        latents: torch.Tensor,
        model_output: torch.Tensor,
        *,
        noise: torch.Tensor | None = None,
        next_latents: torch.Tensor | None = None,
        deterministic: bool = False,
    ) -> StepResult:
        """One DDIM step (eta = 0 when ``deterministic``)."""
        eta = 0.0 if deterministic else self.config.eta
        return self._coefficients.step(schedule, eta, index, latents, model_output, noise, next_latents)
