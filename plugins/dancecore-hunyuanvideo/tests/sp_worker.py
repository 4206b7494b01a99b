"""One rank of the sequence-parallel equivalence check (started by torchrun, 2 ranks, gloo).

Each rank builds every tiny video policy twice from the same weights: split over the 2 ranks
(``distributed.sequence_parallel: 2``, gradient checkpointing on) and whole (the 1-rank
reference, checkpointing off). Both roll out the same prompts from the same seeds; then one
replayed loss is backpropagated through both. The split gradients are averaged over the ranks, as
DeepSpeed does, and compared with the reference's. Rank 0 writes the max |diff| of each to JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from dancecore import BuildContext, Prompt, PromptBatch, SequenceParallelGroup
from dancecore.builtins.samplers import FlowSDESampler
from dancecore.training import sampling


def _policies(image: str) -> list[tuple[str, Any, dict[str, Any], PromptBatch]]:
    from dancecore_hunyuanvideo.skyreels_i2v import SkyReelsI2VPolicy
    from dancecore_hunyuanvideo.t2v import HunyuanVideoPolicy

    texts = PromptBatch((Prompt("a red cube", 0), Prompt("a cat on a mat", 1)))
    images = PromptBatch((Prompt("a red cube", 0, image), Prompt("a cat on a mat", 1, image)))
    found = [
        ("hunyuanvideo", HunyuanVideoPolicy, {"preset": "tiny"}, texts),
        ("skyreels-i2v", SkyReelsI2VPolicy, {"preset": "tiny", "cfg_scale": 3.0}, images),
    ]
    try:
        from dancecore_wan.t2v import WanT2VPolicy
    except ImportError:  # the Wan plugin is not installed: check the others
        return found
    return [*found, ("wan-t2v", WanT2VPolicy, {"preset": "tiny"}, texts)]


def _rollout(policy: Any, sampler: FlowSDESampler, cond: Any) -> Any:
    calls = sampling.NetworkCalls(torch.device("cpu"), 2, lambda: torch.autocast("cpu", enabled=False))
    schedule = sampler.schedule()
    return sampling.grouped_rollout(
        policy,
        sampler,
        calls,
        seed=3,
        draw=0,
        prompt_ids=[0, 1],
        group_size=2,
        cond=cond,
        schedule=schedule,
        stochastic=torch.ones(schedule.num_steps, dtype=torch.bool),
    )


def _gradients(policy: Any, sampler: FlowSDESampler, cond: Any, traj: Any) -> dict[str, torch.Tensor]:
    """Gradients of a GRPO-like loss (weighted log-probs of replayed transitions)."""
    schedule = sampler.schedule()
    policy.module.zero_grad(set_to_none=True)
    rows, steps = torch.tensor([0, 3]), torch.tensor([0, 1])
    weights = torch.tensor([1.0, -0.5])
    x, x_next = traj.latents[rows, steps], traj.latents[rows, steps + 1]
    pred = policy.predict(x, schedule.timesteps[steps], sampling.select_rows(cond, traj.prompt_rows[rows]))
    out = sampler.step(schedule, steps, x, pred, next_latents=x_next)
    (weights * out.log_prob).sum().backward()
    return {n: p.grad.detach().clone() for n, p in policy.module.named_parameters() if p.grad is not None}


def _processors(module: torch.nn.Module) -> list[Any]:
    return [m.processor for m in module.modules() if getattr(m, "processor", None) is not None]


def main(out_path: str, image: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    sp = SequenceParallelGroup(size=world, rank=rank, group=torch.distributed.new_group(), ranks=tuple(range(world)))
    sampler = FlowSDESampler(FlowSDESampler.Config(num_steps=3, shift=5.0, eta=0.25))
    results: dict[str, Any] = {}
    for name, cls, options, prompts in _policies(image):
        torch.manual_seed(0)
        whole = cls(cls.Config(**options), BuildContext())
        split = cls(cls.Config(**options, gradient_checkpointing=True), BuildContext(sequence_parallel=sp))
        cond = whole.encode_prompts(prompts)
        reference, parallel = _rollout(whole, sampler, cond), _rollout(split, sampler, cond)
        grads, split_grads = _gradients(whole, sampler, cond, reference), _gradients(split, sampler, cond, reference)
        for g in split_grads.values():  # DeepSpeed's gradient average over all ranks
            torch.distributed.all_reduce(g)
            g /= world
        assert set(grads) == set(split_grads), sorted(set(grads) ^ set(split_grads))[:4]
        results[name] = {
            "latents": float((reference.latents - parallel.latents).abs().max()),
            "log_probs": float((reference.log_probs - parallel.log_probs).abs().max()),
            "log_prob_scale": float(reference.log_probs.abs().max()),
            "gradients": max(float((grads[k] - split_grads[k]).abs().max()) for k in grads),
            "gradient_scale": max(float(g.abs().max()) for g in grads.values()),
            "parameters": len(grads),
            "split_layers": sum(type(m).__name__.startswith("Ulysses") for m in _processors(split.module)),
        }
    if rank == 0:
        Path(out_path).write_text(json.dumps(results, indent=1))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
