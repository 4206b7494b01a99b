"""The DanceGRPO paper's ablations in miniature, on the shapes world: held-out score at equal wall-clock.

    python -m benchmarks.ablations [--seeds 0 1 2] [--budget 300] [--eval-every 100] [--variants ...]
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
import json
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.algorithms import GRPO, ROOT, HeldOut, Run, _counted, _trainer, markdown, plot, run_all, summarise

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
    """A trainer of the shipped GRPO recipe with ``name``'s overrides (network calls counted)."""
    trainer = _trainer(GRPO, VARIANTS[name], seed, out / f"{name}-{seed}")
    counter = [0]
    trainer.policy.predict = _counted(trainer.policy.predict, counter)

    def evaluate() -> float:
        before = counter[0]
        score = held_out.score(trainer)
        counter[0] = before
        return score

    return Run(name, seed, step=trainer.iteration, evaluate=evaluate, calls=lambda: counter[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--budget", type=float, default=300.0, help="training seconds per run")
    parser.add_argument("--eval-every", type=float, default=100.0, help="training seconds between evaluations")
    parser.add_argument("--eval-samples", type=int, default=4, help="samples per held-out caption")
    parser.add_argument("--deltas", nargs="+", type=float, default=[0.15, 0.05], help="targets: base + delta")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/ablations")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    with tempfile.TemporaryDirectory(prefix="dancecore-ablations-") as tmp:
        held_out = HeldOut(_trainer(GRPO, [], 0, Path(tmp) / "probe"), args.eval_samples)
        base = held_out.score(held_out.probe)
        log(f"base held-out score {base:.3f} ({len(held_out.prompts)} captions x {args.eval_samples})")
        runs = [variant_run(name, seed, held_out, Path(tmp)) for seed in args.seeds for name in args.variants]
        run_all(runs, base, args.budget, args.eval_every, log)
    summary = summarise(runs, base, args.deltas)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    result = {
        "settings": settings,
        "base": base,
        "summary": summary,
        "curves": {f"{r.recipe}/{r.seed}": r.curve for r in runs},
    }
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(summary, base, args.budget, ["recipe"])
    args.out.with_suffix(".md").write_text(table)
    plot(runs, base, args.deltas, args.out.with_suffix(".png"))
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
