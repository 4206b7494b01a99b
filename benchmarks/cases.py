"""What is measured: dancecore trainers built from configs, and the bare network passes they make.

The *bare* loop makes exactly the network calls one dancecore iteration makes, with the same
batch shapes, and nothing else: ``ceil(B / micro_batch) * N`` no-grad forwards for the rollout and
``ceil(trained pairs / micro_batch)`` forward+backward passes for training. For FLUX it calls the
transformer directly; for other policies it calls ``policy.predict`` (the network with its
classifier-free guidance, if any). The optional ``all_passes`` variant adds the other model
passes an iteration cannot avoid: text encoding, VAE decoding and the reward models.
"""

from __future__ import annotations

import atexit
import math
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dancecore.config.schema import apply_overrides, load_yaml_file, validate
from dancecore.contracts.records import PromptBatch, select_rows
from dancecore.functional.grpo import trainable_steps
from dancecore.training.trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "configs" / "smoke.yaml"  # the tiny-FLUX smoke recipe (brightness)
SHAPES_RECIPE = ROOT / "configs" / "shapes" / "grpo.yaml"

# The setting the performance targets are stated for: tiny FLUX, G = 8, 16 steps, one group.
HEADLINE = [
    "sampler.num_steps=16",
    "optimizer.group_size=8",
    "train.prompts_per_iteration=1",
    "train.micro_batch_size=8",
]


def flux_overrides(extra: list[str] | None = None) -> list[str]:
    """Overrides of the quickstart config for the tiny FLUX headline case."""
    return [*HEADLINE, *(extra or [])]


def policy_config(name: str) -> dict[str, Any]:
    """The config dict a benchmark trains: the smoke recipe on a policy's tiny preset in the headline
    setting, or (``shapes``) the shapes world's GRPO recipe as it ships (its own batch: 4 prompts x 8,
    8 steps) on its pretrained FLUX, without its periodic evaluation."""
    if name == "shapes":
        data = load_yaml_file(SHAPES_RECIPE)
        data.pop("eval", None)
        return data
    data = load_yaml_file(SMOKE)
    if name == "sd":
        data["policy"] = {"name": "sd", "preset": "tiny"}
        data["sampler"] = {"name": "ddim-sde", "num_steps": 16}
    elif name == "hunyuanvideo":
        data["policy"] = {"name": "hunyuanvideo", "preset": "tiny"}
        data["sampler"] = {"name": "flow-sde", "num_steps": 16, "shift": 5.0, "eta": 0.25}
    elif name != "flux":
        raise ValueError(f"no benchmark config for policy {name!r}")
    apply_overrides(data, HEADLINE)
    return data


def build_trainer(overrides: list[str], threads: int = 1, policy: str = "flux") -> Trainer:
    """A Trainer for :func:`policy_config` on a throw-away output directory, without progress bar or
    TensorBoard."""
    data = policy_config(policy)
    out = tempfile.mkdtemp(prefix="dancecore-bench-")
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    apply_overrides(
        data,
        [
            f"output_dir={out}",
            f"train.num_threads={threads}",
            "logging.progress_bar=false",
            "logging.tensorboard=false",
            *overrides,
        ],
    )
    return Trainer(validate(data, f"bench:{policy}"))


def iteration_runner(trainer: Trainer) -> Callable[[int], dict[str, float]]:
    """Run one Trainer iteration; return its phase seconds with 'other' = the rest of the wall time."""

    def run(it: int) -> dict[str, float]:
        began = trainer.clock()
        trainer.iteration(it)
        total = trainer.clock() - began
        phases = dict(trainer.phase_times)
        phases["other"] = total - sum(phases.values())
        return phases

    return run


def shapes_of(trainer: Trainer, iteration: int = 0) -> dict[str, int]:
    """How many network calls of which batch size an iteration of ``trainer`` makes."""
    cfg = trainer.cfg
    prompts = len(trainer.local_prompts(iteration))
    samples = prompts * trainer.group_size
    micro = cfg.train.micro_batch_size
    steps = trainer.sampler.schedule().num_steps
    candidates = trainable_steps(trainer.stochastic_mask(steps, iteration))
    k = int(trainer.algorithm.select_steps(candidates, [torch.Generator().manual_seed(0)]).shape[1])
    best_of = getattr(trainer.algorithm.config, "best_of", None)
    chosen = samples if best_of is None else prompts * min(trainer.group_size, 2 * best_of)
    return {
        "prompts": prompts,
        "samples": samples,
        "micro_batch": micro,
        "steps": steps,
        "trained_steps_per_sample": k,
        "rollout_calls": math.ceil(samples / micro) * steps,
        "train_calls": math.ceil(chosen * k / micro),
    }


def _network(trainer: Trainer) -> Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]:
    """The bare network call: the FLUX transformer itself, or ``policy.predict`` for others."""
    policy = trainer.policy
    if type(policy).__name__ != "FluxPolicy":
        return policy.predict
    module = policy.module
    micro = trainer.cfg.train.micro_batch_size
    guidance = torch.full((micro,), float(policy.config.guidance), device=trainer.device)

    def forward(x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        return module(
            hidden_states=x,
            encoder_hidden_states=cond.prompt_embeds,
            pooled_projections=cond.pooled_embeds,
            timestep=t,
            img_ids=policy.image_ids,
            txt_ids=cond.text_ids,
            guidance=guidance,
            return_dict=False,
        )[0]

    return forward


def bare_runner(trainer: Trainer, all_passes: bool = False) -> Callable[[int], dict[str, float]]:
    """The bare passes of one iteration of ``trainer`` in a plain loop (see module docstring)."""
    shapes = shapes_of(trainer)
    micro, steps = shapes["micro_batch"], shapes["steps"]
    device = trainer.device
    prompts = PromptBatch(tuple(trainer.local_prompts(0)))
    cond = trainer.policy.encode_prompts(prompts)
    rows = select_rows(cond, torch.zeros(micro, dtype=torch.long))
    start = trainer.policy.initial_noise(micro, torch.Generator().manual_seed(0)).to(device)
    timesteps = trainer.sampler.schedule().timesteps.to(device)
    train_t = timesteps[torch.arange(micro) % max(1, steps - 1)]
    forward = _network(trainer)
    module = trainer.policy.module
    texts = prompts.texts * trainer.group_size

    def run(it: int) -> dict[str, float]:
        clock = trainer.clock
        began = clock()
        if all_passes:
            trainer.policy.encode_prompts(prompts)
        encoded = clock()
        states = []
        with torch.no_grad():
            for _ in range(math.ceil(shapes["samples"] / micro)):
                x = start
                for i in range(steps):
                    states.append(x)
                    x = x - forward(x, timesteps[i].expand(micro), rows) / steps
        rolled = clock()
        if all_passes:
            pixels = torch.cat([trainer.policy.decode(x) for _ in range(math.ceil(shapes["samples"] / micro))])
            for reward in trainer.rewards:
                reward.component.score(pixels[: len(texts)], texts)  # type: ignore[attr-defined]
        scored = clock()
        for c in range(shapes["train_calls"]):
            forward(states[c % len(states)], train_t, rows).float().mean().backward()
        module.zero_grad(set_to_none=True)
        trained = clock()
        return {
            "encode": encoded - began,
            "rollout": rolled - encoded,
            "decode+reward": scored - rolled,
            "update": trained - scored,
        }

    return run
