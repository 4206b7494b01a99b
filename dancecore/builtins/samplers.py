"""Built-in samplers: ``flow-sde`` and ``flow-cps`` (stochastic rectified flow), ``flow-ode``
(deterministic rectified flow, for algorithms that need no log-probabilities) and ``ddim-sde``
(DDIM with eta)."""

from __future__ import annotations

import math
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
    flow_dpm2m_step,
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
    sde_window_shift_every: int = Field(
        1, ge=1, description="Iterations the SDE window stays at one position (MixGRPO's shift interval, 20 there)."
    )
    sde_window_stride: int = Field(1, ge=1, description="Steps the SDE window moves at each shift (MixGRPO: 1).")
    sde_window_end: Literal["restart", "stay"] = Field(
        "restart", description="When the window reaches the last position: start again at step 0, or stay there."
    )
    ode_solver: Literal["euler", "dpm++2m"] = Field(
        "euler",
        description="Solver of the ODE steps after the SDE window in rollouts: Euler, or DPM-Solver++(2M) (MixGRPO-Flash).",
    )
    ode_compress: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Fraction of the steps after the SDE window kept in rollouts (MixGRPO-Flash: 0.4); needs sde_window.",
    )

    @model_validator(mode="after")
    def _window_fits(self) -> _FlowScheduleConfig:
        if self.sde_window is not None and self.sde_window > self.num_steps - 1:
            raise ValueError(f"sde_window ({self.sde_window}) must be <= num_steps - 1 ({self.num_steps - 1})")
        if self.sde_window is None and (self.ode_solver != "euler" or self.ode_compress != 1.0):
            raise ValueError("ode_solver / ode_compress apply to the steps after the SDE window: set sde_window too")
        return self


def _unshifted(num_steps: int) -> torch.Tensor:
    return torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)


def _shift(s: torch.Tensor, shift: float) -> torch.Tensor:
    """The SD3 shift of :func:`~dancecore.functional.sde.shifted_sigmas`, for any float64 grid."""
    return (shift * s / (1.0 + (shift - 1.0) * s)).to(torch.float32)


def _flow_schedule(config: _FlowScheduleConfig, num_steps: int | None) -> Schedule:
    sigmas = shifted_sigmas(num_steps or config.num_steps, config.shift)
    return Schedule(timesteps=sigmas[:-1].clone(), sigmas=sigmas)


def _window_start(config: _FlowScheduleConfig, iteration: int) -> int:
    """First step of the SDE window at ``iteration``: it moves ``sde_window_stride`` steps every
    ``sde_window_shift_every`` iterations over the ``N - W`` positions that keep the last step out
    of it; at the end it restarts at step 0 or stays (MixGRPO's progressive window; the defaults
    move it one step per iteration)."""
    window = config.sde_window or 0
    positions = max(1, config.num_steps - window)
    moved = (iteration // config.sde_window_shift_every) * config.sde_window_stride
    return moved % positions if config.sde_window_end == "restart" else min(moved, positions - 1)


def _window_mask(config: _FlowScheduleConfig, num_steps: int, iteration: int) -> torch.Tensor:
    """Without a window every step is stochastic. With a window of W steps, W consecutive steps
    from :func:`_window_start` (placed on the configured N-step grid, which a compressed rollout
    schedule keeps up to the window's end; the last step is never inside it)."""
    mask = torch.ones(num_steps, dtype=torch.bool)
    window = config.sde_window
    if window is None:
        return mask
    start = _window_start(config, iteration)
    mask[:] = False
    mask[start : start + window] = True
    return mask


def _rollout_schedule(config: _FlowScheduleConfig, iteration: int) -> Schedule:
    """The rollout schedule at ``iteration``: the configured one, or (MixGRPO-Flash) the same
    grid up to the end of the SDE window followed by ``ceil(ode_compress x R)`` steps spread evenly
    (before the shift) over what the R remaining steps covered, solved with ``ode_solver``."""
    base = _flow_schedule(config, None)
    if config.sde_window is None or (config.ode_compress == 1.0 and config.ode_solver == "euler"):
        return base
    tail = _window_start(config, iteration) + config.sde_window  # first step after the window
    s = _unshifted(config.num_steps)
    kept = max(1, math.ceil(config.ode_compress * (config.num_steps - tail) - 1e-9))
    grid = torch.cat([s[:tail], torch.linspace(float(s[tail]), 0.0, kept + 1, dtype=torch.float64)])
    sigmas = _shift(grid, config.shift)
    orders = torch.ones(tail + kept, dtype=torch.long)
    if config.ode_solver == "dpm++2m":
        orders[tail + 1 : tail + kept - 1] = 2  # the first step after the window and the last are first-order
    return Schedule(timesteps=sigmas[:-1].clone(), sigmas=sigmas, orders=orders)


class _FlowSchedules:
    """Schedule, window and ODE solver of the rectified-flow samplers (shared by ``flow-sde`` and ``flow-cps``)."""

    config: _FlowScheduleConfig
    _coefficients: _CoefficientTables

    @property
    def uses_previous_step(self) -> bool:
        """Whether rollouts must pass each step the previous step's result (a multistep ODE solver)."""
        return self.config.ode_solver != "euler"

    def schedule(self, num_steps: int | None = None) -> Schedule:
        """Shifted sigmas; timesteps are the first N sigmas."""
        return _flow_schedule(self.config, num_steps)

    def rollout_schedule(self, iteration: int) -> Schedule:
        """The schedule rollouts use at ``iteration`` (see :func:`_rollout_schedule`)."""
        return _rollout_schedule(self.config, iteration)

    def stochastic_steps(self, num_steps: int, iteration: int) -> torch.Tensor:
        """Boolean mask of the stochastic (trainable) steps at ``iteration`` (see :func:`_window_mask`)."""
        return _window_mask(self.config, num_steps, iteration)

    def _step(
        self,
        eta: float,
        schedule: Schedule,
        index: int | torch.Tensor,
        latents: torch.Tensor,
        model_output: torch.Tensor,
        noise: torch.Tensor | None,
        next_latents: torch.Tensor | None,
        previous: StepResult | None,
    ) -> StepResult:
        result = self._coefficients.step(schedule, eta, index, latents, model_output, noise, next_latents)
        if eta != 0.0 or schedule.orders is None or not isinstance(index, int) or int(schedule.orders[index]) != 2:
            return result
        if previous is None:
            raise ValueError(f"step {index} is a second-order ODE step: pass the previous step's result")
        sig = schedule.sigmas.tolist()
        moved = flow_dpm2m_step(latents, result.x0_hat, previous.x0_hat, sig[index - 1], sig[index], sig[index + 1])
        return StepResult(next_latents=moved, log_prob=result.log_prob, x0_hat=result.x0_hat)


class FlowSDESampler(_FlowSchedules):
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
    config: Config

    def __init__(self, config: Config, context: BuildContext | None = None) -> None:
        self.config = config
        build = _flow_grpo_coefficients if config.noise == "flow-grpo" else flow_coefficients
        self._coefficients = _CoefficientTables(build)

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
        previous: StepResult | None = None,
    ) -> StepResult:
        """One SDE (or, if ``deterministic``, ODE) step; ``previous`` feeds a second-order ODE step."""
        eta = 0.0 if deterministic else self.config.eta
        return self._step(eta, schedule, index, latents, model_output, noise, next_latents, previous)


def _flow_grpo_coefficients(sigma: torch.Tensor, sigma_next: torch.Tensor, eta: float) -> torch.Tensor:
    """Flow-GRPO's SDE: DanceGRPO's mean with the per-step noise level a sqrt(sigma / (1 - sigma))."""
    if eta == 0.0:
        return flow_coefficients(sigma, sigma_next, 0.0)
    guard = sigma_next[0] if sigma_next.numel() else sigma.new_tensor(0.0)  # the schedule's second sigma
    return flow_coefficients(sigma, sigma_next, flow_grpo_noise_level(sigma, eta, guard))


class FlowCPSSampler(_FlowSchedules):
    """Coefficients-preserving sampling (CPS) for rectified flow: each stochastic step lands on the
    deterministic schedule's signal/noise coefficients (see :func:`~dancecore.functional.sde.cps_coefficients`);
    ``eta`` sets the angle alpha = eta pi / 2 of fresh noise. Same schedule, window and options as ``flow-sde``."""

    class Config(_FlowScheduleConfig):
        """Options of the ``flow-cps`` sampler."""

        eta: float = Field(
            0.5, gt=0, le=1, description="Fraction of a quarter turn of fresh noise per step (alpha = eta pi/2)."
        )

    prediction_type = "flow"
    config: Config

    def __init__(self, config: Config, context: BuildContext | None = None) -> None:
        self.config = config
        self._coefficients = _CoefficientTables(cps_coefficients)

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
        previous: StepResult | None = None,
    ) -> StepResult:
        """One CPS step (the ODE step when ``deterministic``; ``previous`` feeds a second-order one)."""
        eta = 0.0 if deterministic else self.config.eta
        return self._step(eta, schedule, index, latents, model_output, noise, next_latents, previous)


class FlowODESampler(_FlowSchedules):
    """Deterministic rollouts for rectified flow: every step is an ODE step (log-probability 0, none
    trainable), Euler or DPM-Solver++(2M) (first-order at the first two and the last step). For algorithms
    that learn from the clean samples alone, such as DiffusionNFT (whose code samples with a
    second-order solver and no noise); the G samples of a group then differ only by their initial
    noise, so the algorithm must not share it. Evaluation samples the configured grid with Euler,
    as for every sampler. GRPO cannot train on it: the trainer refuses the pair."""

    class Config(ComponentConfig):
        """Options of the ``flow-ode`` sampler."""

        num_steps: int = Field(16, ge=2, description="Number of sampling steps N.")
        shift: float = Field(3.0, gt=0, description="SD3 time shift k (3 FLUX, 5 HunyuanVideo, 7 SkyReels).")
        solver: Literal["euler", "dpm++2m"] = Field(
            "dpm++2m", description="ODE solver of the rollouts: Euler, or DPM-Solver++(2M) (second order)."
        )

    prediction_type = "flow"
    config: Config  # type: ignore[assignment]

    def __init__(self, config: Config, context: BuildContext | None = None) -> None:
        self.config = config
        self._coefficients = _CoefficientTables(flow_coefficients)

    @property
    def uses_previous_step(self) -> bool:
        """Whether rollouts must pass each step the previous step's result (DPM-Solver++(2M))."""
        return self.config.solver != "euler"

    def schedule(self, num_steps: int | None = None) -> Schedule:
        """Shifted sigmas; timesteps are the first N sigmas."""
        sigmas = shifted_sigmas(num_steps or self.config.num_steps, self.config.shift)
        return Schedule(timesteps=sigmas[:-1].clone(), sigmas=sigmas)

    def rollout_schedule(self, iteration: int) -> Schedule:
        """The configured grid; with ``dpm++2m`` every step is second-order but the first two (whose previous
        sigma is 1, where the log-SNR is -inf) and the last (sigma_next = 0)."""
        base = self.schedule()
        if self.config.solver == "euler":
            return base
        orders = torch.ones(self.config.num_steps, dtype=torch.long)
        orders[2:-1] = 2  # the 2M step needs the previous sigma below 1 and the next above 0
        return Schedule(timesteps=base.timesteps, sigmas=base.sigmas, orders=orders)

    def stochastic_steps(self, num_steps: int, iteration: int) -> torch.Tensor:
        """No step is stochastic."""
        return torch.zeros(num_steps, dtype=torch.bool)

    def step(
        self,
        schedule: Schedule,
        index: int | torch.Tensor,
        latents: torch.Tensor,
        model_output: torch.Tensor,
        *,
        noise: torch.Tensor | None = None,
        next_latents: torch.Tensor | None = None,
        deterministic: bool = True,
        previous: StepResult | None = None,
    ) -> StepResult:
        """One ODE step (``deterministic`` is ignored: every step is); ``previous`` feeds a 2M step."""
        return self._step(0.0, schedule, index, latents, model_output, None, next_latents, previous)


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
