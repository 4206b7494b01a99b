"""``dancecore eval``: score a policy (base weights or a checkpoint) on a prompt file.

The sampling and the tables are shared with the periodic evaluation of a run
(:mod:`dancecore.training.evaluation`): deterministic ODE sampling with fixed per-(prompt, sample)
seeds, so two evaluations of the same weights give the same table.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dancecore.checkpoint import CheckpointError, find_latest, read_checkpoint
from dancecore.config.schema import ResolvedRun
from dancecore.contracts.protocols import BuildContext, Policy
from dancecore.training.engine import load_trainable
from dancecore.training.evaluation import EvalResult, ode_samples, score_and_report
from dancecore.training.prompts import load_prompts, read_prompt_file
from dancecore.training.scoring import build_eval_rewards
from dancecore.training.trainer import check_writable, pick_device

__all__ = ["EvalResult", "LoadedPolicy", "evaluate", "load_policy", "resolve_checkpoint"]


@dataclass(frozen=True)
class LoadedPolicy:
    """A built policy with the weights it was given: ``checkpoint`` (None: base weights), the
    checkpoint's iteration, and ``weights``, a one-line description (``base``, a path, ``EMA of ...``)."""

    policy: Policy
    checkpoint: Path | None
    iteration: int | None
    weights: str


def resolve_checkpoint(run: ResolvedRun, checkpoint: str | None) -> Path | None:
    """The checkpoint directory ``checkpoint`` names: None for ``base``/``none``/None (the base
    weights), the newest valid checkpoint of the run's ``output_dir`` for ``latest``, else the path."""
    if checkpoint in (None, "none", "base"):
        return None
    if checkpoint == "latest":
        out = run.config.output_dir
        path, passed_over = find_latest(out)
        if path is None:
            why = "; ".join(passed_over) if passed_over else f"{out / 'checkpoints'} holds none"
            raise CheckpointError(f"no checkpoint in {out} ({why}): train first, or give --checkpoint PATH (or base)")
        return path
    return Path(checkpoint)


def load_policy(run: ResolvedRun, checkpoint: str | None, context: BuildContext, *, ema: bool = False) -> LoadedPolicy:
    """Build the run's policy with the weights ``checkpoint`` names (see :func:`resolve_checkpoint`):
    the base weights, or a checkpoint's trained weights (its EMA with ``ema``). Shared by
    ``dancecore eval`` and ``dancecore export``. The checkpoint is found before any model loads."""
    path = resolve_checkpoint(run, checkpoint)
    if ema and path is None:
        raise CheckpointError("--ema needs a checkpoint (--checkpoint latest or a path): the base weights have no EMA")
    loaded = read_checkpoint(path) if path is not None else None
    if ema and loaded is not None and loaded.ema is None:
        raise CheckpointError(f"checkpoint {path} holds no EMA (train.ema was not set)")
    policy = run.policy.cls(run.policy.config, context)
    if loaded is not None:
        load_trainable(policy.module, loaded.ema if ema and loaded.ema is not None else loaded.model)
    policy.module.eval()
    weights = (f"EMA of {path}" if ema else str(path)) if path else "base"
    return LoadedPolicy(policy, path, loaded.iteration if loaded is not None else None, weights)


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
    loaded = load_policy(run, checkpoint, context, ema=ema)
    sampler = run.sampler.cls(run.sampler.config, context)
    rewards = build_eval_rewards(run, context)
    items, pixels = ode_samples(
        loaded.policy,
        sampler,
        prompts,
        samples_per_prompt=samples_per_prompt,
        seed=seed,
        batch_size=batch_size,
        device=device,
        num_steps=cfg.eval.num_steps if cfg.eval is not None else None,  # the run's evaluation steps
    )
    return score_and_report(
        rewards, items, pixels, output_dir, weights=loaded.weights, failure_policy=cfg.reward_failure
    )
