"""What a policy's pipeline-equivalence test needs: the deterministic rollout exactly as
``dancecore eval`` samples it, from given initial noise, to compare with the model's reference
(e.g. diffusers) pipeline run from the same noise and schedule."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dancecore.contracts.records import Prompt, PromptBatch
from dancecore.testing.helpers import build_component, prompt_batch
from dancecore.training.evaluation import ode_latents


@dataclass(frozen=True)
class DeterministicRollout:
    """The decoded latents (B, *latent), their pixels (CPU, in [0, 1]) and the schedule's sigmas."""

    latents: torch.Tensor
    pixels: torch.Tensor
    sigmas: torch.Tensor


@torch.no_grad()
def deterministic_rollout(
    policy: Any,
    prompts: PromptBatch | Sequence[str | Prompt],
    noise: torch.Tensor,
    *,
    sampler: str | Any = "flow-sde",
    sampler_options: dict[str, Any] | None = None,
    num_steps: int | None = None,
) -> DeterministicRollout:
    """Encode ``prompts``, run the ODE (eta = 0) version of ``sampler`` (a registered name built from
    ``sampler_options``, or a built sampler) from ``noise`` over ``num_steps`` steps (default: the
    sampler's) with the same code as ``dancecore eval``, and decode. The module is put in eval mode."""
    the_sampler = build_component("sampler", sampler, sampler_options) if isinstance(sampler, str) else sampler
    schedule = the_sampler.schedule(num_steps)
    cond = policy.encode_prompts(prompt_batch(prompts))
    was_training = policy.module.training
    policy.module.eval()
    try:
        latents = ode_latents(policy, the_sampler, schedule, noise, cond)
    finally:
        policy.module.train(was_training)
    return DeterministicRollout(latents=latents, pixels=policy.decode(latents).cpu(), sigmas=schedule.sigmas)
