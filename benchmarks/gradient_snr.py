"""How much of a GRPO gradient is signal: pairwise cosines of independent batches' gradients.

    python -m benchmarks.gradient_snr configs/shapes/grpo.yaml --batches 12 [key=value ...]

Builds the run's trainer and takes ``--batches`` iterations at the *initial* weights: each
computes the full GRPO gradient of its own rollouts (own prompts, noise and advantages) but no
optimizer step is applied. For gradients ``g_k = mu + n_k`` with independent noise, the mean
pairwise cosine estimates ``|mu|^2 / E|g|^2``, the fraction of a batch gradient's energy that is
signal; its inverse is how many such batches must be averaged before signal and noise are equal.
Prints the figures and writes them as JSON (``--out``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from pathlib import Path

import torch


def gradients(config: Path, overrides: list[str], batches: int, output_dir: Path) -> list[torch.Tensor]:
    """``batches`` flattened GRPO gradients at the initial weights of ``config``'s run."""
    from dancecore.config.schema import load_run
    from dancecore.training.trainer import Trainer

    run = load_run(config, [*overrides, f"output_dir={output_dir}", "eval=null", "logging.tensorboard=false"])
    trainer = Trainer(run)
    torch.set_num_threads(run.config.train.num_threads or 1)
    params = list(trainer.engine.params.values())  # type: ignore[attr-defined]
    start = [p.detach().clone() for p in params]
    taken: list[torch.Tensor] = []

    def record() -> float:
        flat = torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel()) for p in params])
        taken.append(flat.clone())
        trainer.engine.zero_grad()
        return float(flat.norm())

    trainer.engine.step = record  # type: ignore[method-assign]
    for i in range(batches):
        trainer.iteration(i)
    if not all(torch.equal(a, p.detach()) for a, p in zip(start, params, strict=True)):
        raise RuntimeError("the weights changed: the gradients were not all taken at the initial weights")
    return taken


def summary(grads: list[torch.Tensor]) -> dict[str, float]:
    """Mean pairwise cosine (signal fraction of one batch), its spread, and the mean gradient's share."""
    cos = [float(torch.nn.functional.cosine_similarity(a, b, dim=0)) for a, b in itertools.combinations(grads, 2)]
    mean = torch.stack(grads).mean(0)
    signal = statistics.fmean(cos)
    return {
        "batches": len(grads),
        "pairwise_cosine_mean": signal,
        "pairwise_cosine_std": statistics.pstdev(cos),
        "batches_for_equal_signal_and_noise": (1 - signal) / signal if signal > 0 else float("inf"),
        "mean_grad_norm_over_batch_grad_norm": float(mean.norm() / statistics.fmean(float(g.norm()) for g in grads)),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gradient_snr", description=__doc__.split("\n")[0])
    p.add_argument("config", type=Path)
    p.add_argument("overrides", nargs="*")
    p.add_argument("--batches", type=int, default=12)
    p.add_argument("--output-dir", type=Path, default=Path("outputs/gradient-snr"))
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = p.parse_intermixed_args(argv)
    figures = {"config": str(args.config), "overrides": args.overrides}
    figures.update(summary(gradients(args.config, args.overrides, args.batches, args.output_dir)))
    print(json.dumps(figures, indent=1))
    if args.out:
        args.out.write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
