"""The DanceGRPO paper's ablations in miniature, on the shapes world: held-out score at equal wall-clock.

    python -m benchmarks.ablations [--seeds 0 1] [--budget 150] [--eval-every 75] [--variants ...]
    make ablations

The same machinery as benchmarks/algorithms.py (read its docstring for the method): every variant is
a trainer on the pretrained shapes-FLUX, all stepped round-robin in one process, each with its own
clock of training seconds, evaluated on the held-out captions (ODE, fixed seeds, exact ``shapes``
verdict, GenEval-style task mean) every ``--eval-every`` seconds and at ``--budget``.

Variants are overrides on the shipped GRPO recipe (configs/shapes/grpo.yaml: shared initial noise
per group, timestep fraction 0.6, partial-credit reward, no best-of-N, G = 8):
(a) ``independent-noise``; (b) ``tf-0.2``, ``tf-1.0`` and ``early-window`` (SDE and training only on
the first 2 of the 8 steps, ODE after: the miniature's "early 30 %"; unlike the paper's, the later
steps are not stochastic); (c) ``binary-reward``; (d) ``best-of-2`` (top 2 and bottom 2 of each group
of 8 trained); (e) ``G4`` and ``G16`` (4 prompts per iteration either way, so G16 costs twice as much
per iteration). ``recipe`` is the shipped recipe itself. Writes ``<out>.json``, ``.md`` and ``.png``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks.algorithms import GRPO, HeldOut, Run, _trainer, add_arguments, benchmark, trainer_run

VARIANTS: dict[str, list[str]] = {
    "recipe": [],
    "independent-noise": ["algorithm.shared_noise=false"],
    "tf-0.2": ["algorithm.timestep_fraction=0.2"],
    "tf-1.0": ["algorithm.timestep_fraction=1.0"],
    "early-window": [
        "sampler.sde_window=2",
        "sampler.sde_window_end=stay",
        "sampler.sde_window_shift_every=100000000",
        "algorithm.timestep_fraction=1.0",
    ],
    "binary-reward": ["rewards.0.partial_credit=false"],
    "best-of-2": ["algorithm.best_of=2"],
    "G4": ["algorithm.group_size=4"],
    "G16": ["algorithm.group_size=16"],
}


def variant_run(name: str, seed: int, held_out: HeldOut, out: Path) -> Run:
    """A trainer of the shipped GRPO recipe with ``name``'s overrides."""
    return trainer_run(name, seed, _trainer(GRPO, VARIANTS[name], seed, out / f"{name}-{seed}"), held_out)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    add_arguments(parser, seeds=2, budget=150.0, eval_every=75.0, eval_samples=4, out="ablations")
    args = parser.parse_args(argv)
    specs = [(name, seed) for seed in args.seeds for name in args.variants]
    return benchmark(args, specs, variant_run, ["recipe"], module="benchmarks.ablations", argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
