"""``sequence_parallel_differences``: a policy split over a sequence-parallel group against the
same policy whole, for the 2-rank equivalence tests of video policies (run it on every rank)."""

from __future__ import annotations

from typing import Any

import torch

from dancecore.builtins.samplers import FlowSDESampler
from dancecore.contracts.protocols import BuildContext, SequenceParallelGroup
from dancecore.contracts.records import PromptBatch, select_rows
from dancecore.training import sampling


def _rollout(policy: Any, sampler: Any, cond: Any, seed: int) -> Any:
    calls = sampling.NetworkCalls(torch.device("cpu"), 2, lambda: torch.autocast("cpu", enabled=False))
    schedule = sampler.schedule()
    return sampling.grouped_rollout(
        policy,
        sampler,
        calls,
        seed=seed,
        draw=0,
        prompt_ids=list(range(cond_rows(cond))),
        group_size=2,
        cond=cond,
        schedule=schedule,
        stochastic=torch.ones(schedule.num_steps, dtype=torch.bool),
    )


def cond_rows(cond: Any) -> int:
    """Rows (prompts) of a conditioning dataclass."""
    first = getattr(cond, getattr(cond, "batch_fields", ("prompt_embeds",))[0])
    return int(first.shape[0])


def _gradients(policy: Any, sampler: FlowSDESampler, cond: Any, traj: Any) -> dict[str, torch.Tensor]:
    """Gradients of a GRPO-like loss: weighted log-probs of two replayed transitions."""
    schedule = sampler.schedule()
    policy.module.zero_grad(set_to_none=True)
    rows, steps = torch.tensor([0, traj.latents.shape[0] - 1]), torch.tensor([0, 1])
    weights = torch.tensor([1.0, -0.5])
    x, x_next = traj.latents[rows, steps], traj.latents[rows, steps + 1]
    pred = policy.predict(x, schedule.timesteps[steps], select_rows(cond, traj.prompt_rows[rows]))
    out = sampler.step(schedule, steps, x, pred, next_latents=x_next)
    (weights * out.log_prob).sum().backward()
    return {n: p.grad.detach().clone() for n, p in policy.module.named_parameters() if p.grad is not None}


def _split_layers(module: torch.nn.Module) -> int:
    return sum(type(getattr(m, "processor", None)).__name__.startswith("Ulysses") for m in module.modules())


def sequence_parallel_differences(
    policy_cls: Any, options: dict[str, Any], prompts: PromptBatch, sp: SequenceParallelGroup, seed: int = 3
) -> dict[str, float]:
    """Build ``policy_cls`` whole and split over ``sp`` (with gradient checkpointing) from the same
    weights, roll out 2 samples per prompt (3 flow-SDE steps) from the same seeds, backpropagate one
    loss, and return the max |diff| of the latents, log-probs and gradients (the split gradients
    averaged over ``sp``'s ranks, as DeepSpeed does), their scales, and how many attention layers
    run a ``Ulysses*`` processor. Every rank of ``sp`` must call it."""
    sampler = FlowSDESampler(FlowSDESampler.Config(num_steps=3, shift=5.0, eta=0.25))
    torch.manual_seed(0)
    whole = policy_cls(policy_cls.Config(**options), BuildContext())
    split = policy_cls(policy_cls.Config(**options, gradient_checkpointing=True), BuildContext(sequence_parallel=sp))
    cond = whole.encode_prompts(prompts)
    reference, parallel = _rollout(whole, sampler, cond, seed), _rollout(split, sampler, cond, seed)
    grads, split_grads = _gradients(whole, sampler, cond, reference), _gradients(split, sampler, cond, reference)
    for g in split_grads.values():  # DeepSpeed's gradient average over all ranks
        torch.distributed.all_reduce(g, group=sp.group)
        g /= sp.size
    if set(grads) != set(split_grads):
        raise AssertionError(f"gradients reach different parameters: {sorted(set(grads) ^ set(split_grads))[:4]}")
    return {
        "latents": float((reference.latents - parallel.latents).abs().max()),
        "log_probs": float((reference.log_probs - parallel.log_probs).abs().max()),
        "log_prob_scale": float(reference.log_probs.abs().max()),
        "gradients": max(float((grads[k] - split_grads[k]).abs().max()) for k in grads),
        "gradient_scale": max(float(g.abs().max()) for g in grads.values()),
        "parameters": len(grads),
        "split_layers": _split_layers(split.module),
    }
