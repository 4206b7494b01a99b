"""Same seed, same noise, same numbers: dancecore's loop against the reference loop.

Both start from the same tiny FLUX weights and draw identical noise (initial noise per prompt,
SDE noise per sample, trained-step subsets per sample). dancecore batches 8 rows per network
call and the reference runs one, so results agree to floating-point rounding, not bit for bit;
the check reports the largest differences of every quantity GRPO depends on, iteration by
iteration (the second iteration runs on the weights both loops updated in the first).
"""

from __future__ import annotations

from typing import Any

import torch

from benchmarks.cases import build_trainer
from benchmarks.reference_loop import ReferenceLoop, ReferenceSettings
from dancecore.training.trainer import Trainer

# Largest differences accepted as rounding (fp32, batch 8 against batch 1). Weights are compared in
# units of the learning rate: AdamW moves each weight by about lr per step, so a gradient element
# near zero whose sign differs by rounding moves by up to 2 lr; a systematic difference would
# exceed that on many weights.
TOLERANCES = {
    "latents": 1e-3,
    "rollout_log_probs": 1e-5,
    "rewards": 1e-5,
    "advantages": 1e-3,
    "new_log_probs": 1e-5,
    "ratio_minus_one": 1e-6,
    "grad_norm_relative": 1e-4,
    "parameters_over_lr": 0.5,
}


def reference_for(trainer: Trainer) -> ReferenceLoop:
    """A reference loop with the trainer's settings and the same initial weights."""
    from dancecore_flux.policy import tiny_flux_dir

    cfg, policy = trainer.cfg, trainer.policy
    opt, sampler = trainer.algorithm.config, trainer.sampler.config
    settings = ReferenceSettings(
        group_size=trainer.group_size,
        num_steps=sampler.num_steps,
        shift=sampler.shift,
        eta=sampler.eta,
        guidance=policy.config.guidance,
        clip_range=opt.clip_range,
        advantage_clip=opt.advantage_clip,
        timestep_fraction=opt.timestep_fraction,
        learning_rate=cfg.train.learning_rate,
        weight_decay=cfg.train.weight_decay,
        grad_clip=cfg.train.grad_clip,
        seed=cfg.seed,
        resolution=policy.resolution,
        max_sequence_length=policy.max_sequence_length,
        sde_window=sampler.sde_window,
    )
    return ReferenceLoop(tiny_flux_dir(), settings, device=str(trainer.device))


class _Recorder:
    """Wraps a trainer's components (instance attributes only) to record what one iteration did."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.data: dict[str, Any] = {}
        rollout, select_steps, advantages, loss = (
            trainer.rollout,
            trainer.algorithm.select_steps,
            trainer.algorithm.advantages,
            trainer.algorithm.loss,
        )
        reward = trainer.rewards[0].component
        score = reward.score  # type: ignore[attr-defined]

        def record_rollout(*args: Any, **kwargs: Any) -> Any:
            self.data["traj"] = out = rollout(*args, **kwargs)
            return out

        def record_steps(*args: Any, **kwargs: Any) -> Any:
            self.data["steps"] = out = select_steps(*args, **kwargs)
            return out

        def record_advantages(*args: Any, **kwargs: Any) -> Any:
            self.data["advantages"] = out = advantages(*args, **kwargs)
            return out

        def record_loss(new: torch.Tensor, old: torch.Tensor, adv: torch.Tensor) -> Any:
            out = loss(new, old, adv)
            self.data.setdefault("new_log_probs", []).append(new.detach().cpu())
            self.data.setdefault("ratios", []).append(out.ratio.detach().cpu())
            return out

        def record_score(samples: torch.Tensor, prompts: Any) -> Any:
            self.data["rewards"] = out = score(samples, prompts)
            return out

        trainer.rollout = record_rollout  # type: ignore[method-assign]
        trainer.algorithm.select_steps = record_steps  # type: ignore[method-assign]
        trainer.algorithm.advantages = record_advantages  # type: ignore[method-assign]
        trainer.algorithm.loss = record_loss  # type: ignore[method-assign]
        reward.score = record_score  # type: ignore[attr-defined]

    def iteration(self, it: int) -> dict[str, Any]:
        """Run one trainer iteration and return what it did, per (sample, trained step)."""
        self.data = {}
        record = self.trainer.iteration(it)
        steps = self.data["steps"]
        pairs = steps.numel()
        new = torch.cat(self.data["new_log_probs"])[:pairs].reshape(steps.shape)
        ratios = torch.cat(self.data["ratios"])[:pairs].reshape(steps.shape)
        traj = self.data["traj"]
        return {
            "latents": traj.latents,
            "log_probs": traj.log_probs,
            "rewards": torch.as_tensor(self.data["rewards"]).float(),
            "advantages": self.data["advantages"],
            "steps": steps,
            "new_log_probs": new,
            "ratios": ratios,
            "grad_norm": record["grad_norm"],
        }


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def compare(overrides: list[str], iterations: int = 2, threads: int = 1) -> dict[str, Any]:
    """Run ``iterations`` of both loops from the same weights; report the largest differences."""
    trainer = build_trainer(overrides, threads)
    reference = reference_for(trainer)
    recorder = _Recorder(trainer)
    per_iteration = []
    for it in range(iterations):
        prompts = [p.text for p in trainer.local_prompts(it)]  # the trainer's data cursor moves on
        draw = int(getattr(trainer, "noise_position", it))  # what keys this iteration's random draws
        ours = recorder.iteration(it)
        ref = reference.iteration(draw, prompts)
        params = dict(reference.transformer.named_parameters())
        diffs = {
            "latents": _max_diff(ours["latents"], ref.latents),
            "rollout_log_probs": _max_diff(ours["log_probs"], ref.log_probs),
            "rewards": _max_diff(ours["rewards"], ref.rewards),
            "advantages": _max_diff(ours["advantages"], ref.advantages),
            "new_log_probs": _max_diff(ours["new_log_probs"], ref.new_log_probs),
            "ratio_minus_one": max(_max_diff(ours["ratios"], torch.ones(1)), _max_diff(ref.ratios, torch.ones(1))),
            "grad_norm_relative": abs(ours["grad_norm"] - ref.grad_norm) / max(abs(ref.grad_norm), 1e-30),
            "parameters_over_lr": max(
                _max_diff(p.detach(), params[n].detach()) for n, p in trainer.policy.module.named_parameters()
            )
            / trainer.cfg.train.learning_rate,
        }
        stochastic = trainer.stochastic_mask(ours["log_probs"].shape[1], draw)
        checks = {
            "same_trained_steps": bool(torch.equal(ours["steps"], ref.trained_steps)),
            "dancecore_ratio_exactly_one": bool((ours["ratios"] == 1).all()),
            "reference_ratio_exactly_one": bool((ref.ratios == 1).all()),
            "ode_steps_have_zero_log_prob": bool((ours["log_probs"][:, ~stochastic] == 0).all()),
            "trained_steps_are_stochastic": bool(stochastic[ours["steps"]].all()),
            "last_step_never_trained": bool((ours["steps"] != len(stochastic) - 1).all()),
        }
        window = torch.nonzero(stochastic).flatten().tolist()
        per_iteration.append(
            {
                "iteration": it,
                "max_abs_diff": diffs,
                "within_tolerance": {k: v <= TOLERANCES[k] for k, v in diffs.items()},
                "checks": checks,
                "stochastic_steps": window,
                "advantages": ours["advantages"].tolist(),
                "reference_advantages": ref.advantages.tolist(),
            }
        )
    ok = all(all(r["within_tolerance"].values()) and all(r["checks"].values()) for r in per_iteration)
    return {"overrides": overrides, "tolerances": TOLERANCES, "iterations": per_iteration, "equivalent": ok}
