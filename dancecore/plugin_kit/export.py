"""What policy plugins share to export themselves as diffusers pipelines (``dancecore export``):
the diffusers scheduler whose steps are the deterministic steps of the run's flow sampler.

diffusers is imported only when called.
"""

from __future__ import annotations

from typing import Any

import torch


def flow_match_scheduler(sampler: Any, pipeline: str) -> Any:
    """A ``FlowMatchEulerDiscreteScheduler`` at the sampler's fixed shift (no dynamic shifting):
    given the sigmas ``linspace(1, 1/N, N)`` that FLUX's and HunyuanVideo's pipelines ask for, it
    takes exactly the sampler's shifted sigmas, and its Euler step is the flow samplers' ODE step
    (the last one lands on the last ``x0_hat``, which dancecore decodes). Raises ``ValueError``
    naming ``pipeline`` when the sampler's schedule is not of that form."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler

    schedule = sampler.schedule()
    n = schedule.num_steps
    scheduler: Any = FlowMatchEulerDiscreteScheduler(shift=float(sampler.config.shift), use_dynamic_shifting=False)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / n, n))
    if not torch.allclose(scheduler.sigmas.float(), schedule.sigmas.float().cpu(), atol=1e-6):
        raise ValueError(
            f"the sampler's sigmas {schedule.sigmas.tolist()} are not FlowMatchEulerDiscreteScheduler's "
            f"{scheduler.sigmas.tolist()}: this sampler cannot be exported to {pipeline}"
        )
    return scheduler
