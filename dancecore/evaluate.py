"""``dancecore eval``: score a policy (base weights or a checkpoint) on a prompt file.

The sampling and the tables are shared with the periodic evaluation of a run
(:mod:`dancecore.training.evaluation`): deterministic ODE sampling with fixed per-(prompt, sample)
seeds, so two evaluations of the same weights give the same table.
"""

from __future__ import annotations

from pathlib import Path

from dancecore.checkpoint import CheckpointError, find_latest, read_checkpoint
from dancecore.config.schema import ResolvedRun
from dancecore.contracts.protocols import BuildContext
from dancecore.training.engine import load_trainable
from dancecore.training.evaluation import EvalResult, ode_samples, score_and_report
from dancecore.training.prompts import load_prompts, read_prompt_file
from dancecore.training.scoring import build_eval_rewards
from dancecore.training.trainer import check_writable, pick_device

__all__ = ["EvalResult", "evaluate"]


def _resolve_checkpoint(run: ResolvedRun, checkpoint: str | None) -> Path | None:
    if checkpoint in (None, "none", "base"):
        return None
    if checkpoint == "latest":
        path, skipped = find_latest(run.config.output_dir)
        if path is None:
            raise CheckpointError(f"no valid checkpoint under {run.config.output_dir / 'checkpoints'}: {skipped}")
        return path
    return Path(checkpoint)


def evaluate(
    run: ResolvedRun,
    prompts_file: Path | None,
    output_dir: Path,
    *,
    checkpoint: str | None = None,
    samples_per_prompt: int = 1,
    seed: int = 0,
    batch_size: int = 8,
    ema: bool = False,
) -> EvalResult:
    """Generate deterministically and score; returns the table and writes it to ``output_dir``.

    The rewards are the run's ``eval.rewards`` when it has them, otherwise its training rewards.
    """
    cfg = run.config
    check_writable(output_dir)
    prompts = read_prompt_file(prompts_file) if prompts_file is not None else load_prompts(cfg.prompts)
    device = pick_device(cfg.train.device)
    context = BuildContext(device=device, seed=seed, output_dir=output_dir)
    policy = run.policy.cls(run.policy.config, context)
    sampler = run.sampler.cls(run.sampler.config, context)
    rewards = build_eval_rewards(run, context)
    ckpt_path = _resolve_checkpoint(run, checkpoint)
    if ema and ckpt_path is None:
        raise CheckpointError("--ema needs a checkpoint (--checkpoint latest or a path): the base weights have no EMA")
    if ckpt_path is not None:
        loaded = read_checkpoint(ckpt_path)
        if ema and loaded.ema is None:
            raise CheckpointError(f"checkpoint {ckpt_path} holds no EMA (train.ema was not set)")
        load_trainable(policy.module, loaded.ema if ema and loaded.ema is not None else loaded.model)
    policy.module.eval()
    items, pixels = ode_samples(
        policy,
        sampler,
        prompts,
        samples_per_prompt=samples_per_prompt,
        seed=seed,
        batch_size=batch_size,
        device=device,
        num_steps=cfg.eval.num_steps if cfg.eval is not None else None,  # the run's evaluation steps
    )
    return score_and_report(
        rewards,
        items,
        pixels,
        output_dir,
        weights=(f"EMA of {ckpt_path}" if ema else str(ckpt_path)) if ckpt_path else "base",
        failure_policy=cfg.reward_failure,
    )
