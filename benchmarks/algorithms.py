"""Every algorithm recipe side by side on the shapes world: held-out score against wall-clock seconds.

    python -m benchmarks.algorithms [--seeds 0 1 2] [--budget 420] [--eval-every 70] [--workers 2] [--recipes ...]
    make bench-algorithms

Each (recipe, seed) is its own trainer on the pretrained shapes-FLUX, all built in one process and
stepped **round-robin, one iteration each in turn**, so a slow or noisy machine slows every recipe
alike. A run's clock is the sum of its own iterations' wall seconds (evaluation excluded). Every
``--eval-every`` seconds of its clock, and when it reaches ``--budget``, its weights (the EMA when the
recipe keeps one) sample the held-out captions with the deterministic ODE from fixed seeds, as
``dancecore eval`` does, and the exact ``shapes`` verdict is summarised GenEval-style (mean over tasks
of the per-task accuracy). The base weights are evaluated once: every curve starts there at 0 s.

Recipes (configs/shapes/*.yaml; see docs/algorithms.md): ``dancegrpo`` (the quickstart's GRPO
recipe, configs/quickstart.yaml: lr 5e-5 and an EMA of the weights, which every GRPO-family recipe
here shares), ``flow-grpo`` (sigma-dependent SDE noise, own initial noise per sample, every step trained),
``flow-grpo-kl`` (the same with KL 0.04 to the base), ``mixgrpo`` (2-step SDE window moving every 10
iterations, ODE elsewhere), ``mixgrpo-flash`` (the same with DPM-Solver++(2M) after the window on 40%
of its steps), ``diffusion-nft`` (configs/shapes/nft.yaml), and ``reference``: the research-script loop
of benchmarks/reference_loop.py (batch-1 everything, no EMA: the research scripts keep none) with the
quickstart recipe's hyperparameters.

Reported per recipe: time to reach each target (base + delta, ``--deltas``; the earliest evaluation at
or above it, so its resolution is ``--eval-every``), the final score at the budget, seconds and network
calls per iteration. Writes ``<out>.json``, ``<out>.md`` and ``<out>.png``.

``--workers N`` splits the runs over N processes (run i to worker i mod N, so each worker steps
every recipe), each stepping its share round-robin on one torch thread; on an N-core machine the
table then takes 1/N of the time. Every run still has its own clock, and every recipe shares each
worker's machine alike.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
GRPO = ROOT / "configs/shapes/grpo.yaml"
QUICKSTART = ROOT / "configs/quickstart.yaml"
NFT = ROOT / "configs/shapes/nft.yaml"
HELD_OUT = ROOT / "configs/prompts/shapes_heldout.txt"
EVAL_SEED = 1234

SHAPES = ROOT / "configs/shapes"
RECIPES: dict[str, Path | None] = {
    "dancegrpo": QUICKSTART,
    "flow-grpo": SHAPES / "flow_grpo.yaml",
    "flow-grpo-kl": SHAPES / "flow_grpo_kl.yaml",
    "mixgrpo": SHAPES / "mixgrpo.yaml",
    "mixgrpo-flash": SHAPES / "mixgrpo_flash.yaml",
    "diffusion-nft": NFT,
    "reference": None,
}


@dataclass
class Run:
    """One (recipe, seed): how to take an iteration and evaluate, and what it measured."""

    recipe: str
    seed: int
    step: Callable[[int], None]
    evaluate: Callable[[], float]
    calls: Callable[[], int]
    seconds: float = 0.0
    iterations: int = 0
    iteration_seconds: list[float] = field(default_factory=list)
    curve: list[tuple[float, int, float]] = field(default_factory=list)  # (seconds, iterations, score)


def task_mean(prompts: Sequence[str], verdicts: torch.Tensor) -> float:
    """GenEval's overall score: the mean over tasks of each task's accuracy."""
    from dancecore_shapes.geneval import task_table

    return float(task_table(list(prompts), verdicts.tolist())["overall"])


def _counted(fn: Callable[..., Any], counter: list[int]) -> Callable[..., Any]:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        counter[0] += 1
        return fn(*args, **kwargs)

    return wrapped


class HeldOut:
    """The held-out evaluation: ODE samples from fixed seeds, scored by the exact ``shapes`` verdict."""

    def __init__(self, probe: Any, samples: int) -> None:
        from dancecore.training.prompts import read_prompt_file

        self.probe = probe  # a trainer whose policy/sampler/rewards evaluate (and whose weights the reference borrows)
        self.prompts = read_prompt_file(HELD_OUT)
        self.samples = samples
        gold = [r for r in probe.rewards if r.name == "shapes"]
        partial = [r for r in probe.rewards if r.name == "shapes_partial"]
        if not gold or not partial:
            raise RuntimeError(f"{QUICKSTART} must log the exact `shapes` reward and train on `shapes_partial`")
        self.gold, self.partial = gold[0].component, partial[0].component

    def score(self, trainer: Any, *, ema: bool = True) -> float:
        """Held-out score of ``trainer``'s weights (its EMA when it keeps one, unless ``ema`` is False)."""
        from dancecore.training.evaluation import ode_samples

        module = trainer.policy.module
        was_training = module.training
        module.eval()
        try:
            with trainer.ema.swapped_in(module) if ema and trainer.ema is not None else contextlib.nullcontext():
                items, pixels = ode_samples(
                    trainer.policy,
                    trainer.sampler,
                    self.prompts,
                    samples_per_prompt=self.samples,
                    seed=EVAL_SEED,
                    batch_size=32,
                    device=trainer.device,
                )
        finally:
            module.train(was_training)
        texts = [p.text for p, _ in items]
        return task_mean(texts, self.gold.score(pixels, texts))


def _trainer(config: Path, overrides: list[str], seed: int, out: Path) -> Any:
    from dancecore.config.schema import load_run
    from dancecore.training.trainer import Trainer

    common = [
        f"output_dir={out}",
        f"seed={seed}",
        "eval=null",
        "logging.tensorboard=false",
        "train.iterations=1000000",
        "train.checkpoint_every=1000000",
        "train.sample_every=1000000",
    ]
    return Trainer(load_run(config, [*overrides, *common]))


def trainer_run(name: str, seed: int, trainer: Any, held_out: HeldOut) -> Run:
    """A :class:`Run` of a dancecore trainer; network calls are counted at ``policy.predict``
    (evaluation's calls excluded)."""
    counter = [0]
    trainer.policy.predict = _counted(trainer.policy.predict, counter)

    def evaluate() -> float:
        before = counter[0]
        score = held_out.score(trainer)
        counter[0] = before  # evaluation calls are not the recipe's
        return score

    return Run(name, seed, step=trainer.iteration, evaluate=evaluate, calls=lambda: counter[0])


def dancecore_run(recipe: str, seed: int, held_out: HeldOut, out: Path) -> Run:
    """A dancecore trainer of ``recipe``."""
    config = RECIPES[recipe]
    assert config is not None
    return trainer_run(recipe, seed, _trainer(config, [], seed, out / f"{recipe}-{seed}"), held_out)


def reference_run(seed: int, held_out: HeldOut) -> Run:
    """The research-script loop with the quickstart recipe's settings (no EMA), scored by ``shapes_partial``."""
    from benchmarks.reference_loop import ReferenceLoop, ReferenceSettings
    from dancecore.training.prompts import read_prompt_file

    cfg = held_out.probe.cfg
    settings = ReferenceSettings(
        group_size=cfg.algorithm.group_size,
        num_steps=cfg.sampler.num_steps,
        shift=cfg.sampler.shift,
        eta=cfg.sampler.eta,
        clip_range=cfg.algorithm.clip_range,
        timestep_fraction=cfg.algorithm.timestep_fraction,
        learning_rate=cfg.train.learning_rate,
        weight_decay=cfg.train.weight_decay,
        grad_clip=cfg.train.grad_clip,
        seed=seed,
        resolution=cfg.policy.resolution,
        max_sequence_length=cfg.policy.max_sequence_length,
    )
    from dancecore_shapes.weights import flux_dir

    loop = ReferenceLoop(flux_dir(), settings)
    loop.reward = held_out.partial.score
    counter = [0]
    loop.transformer.register_forward_pre_hook(lambda *_: counter.__setitem__(0, counter[0] + 1))
    train_prompts = [p.text for p in read_prompt_file(ROOT / "configs/prompts/shapes_train.txt")]
    per_iteration = cfg.train.prompts_per_iteration

    def step(it: int) -> None:
        start = it * per_iteration
        loop.iteration(it, [train_prompts[(start + k) % len(train_prompts)] for k in range(per_iteration)])

    def evaluate() -> float:
        module = held_out.probe.policy.module
        saved = {k: v.clone() for k, v in module.state_dict().items()}
        module.load_state_dict(loop.transformer.state_dict())
        try:
            return held_out.score(held_out.probe, ema=False)  # the loaded reference weights, not the probe's EMA
        finally:
            module.load_state_dict(saved)

    return Run("reference", seed, step=step, evaluate=evaluate, calls=lambda: counter[0])


def run_all(runs: list[Run], base: float, budget: float, eval_every: float, log: Callable[[str], None]) -> None:
    """Step ``runs`` round-robin until each has used ``budget`` seconds, evaluating on schedule."""
    for run in runs:
        run.curve.append((0.0, 0, base))
    active = list(runs)
    while active:
        for run in list(active):
            began = time.perf_counter()
            run.step(run.iterations)
            spent = time.perf_counter() - began
            run.seconds += spent
            run.iterations += 1
            run.iteration_seconds.append(spent)
            due = math.floor(run.seconds / eval_every) > math.floor((run.seconds - spent) / eval_every)
            done = run.seconds >= budget
            if due or done:
                score = run.evaluate()
                run.curve.append((run.seconds, run.iterations, score))
                log(f"{run.recipe} seed {run.seed}: {run.iterations} it, {run.seconds:.0f} s, held-out {score:.3f}")
            if done:
                active.remove(run)


def time_to(curve: Sequence[tuple[float, int, float]], target: float) -> float | None:
    """Seconds of the first evaluation at or above ``target`` (None if never)."""
    return next((s for s, _, score in curve if score >= target), None)


def summarise(runs: list[Run], base: float, deltas: Sequence[float]) -> dict[str, Any]:
    """Per recipe: time to each target over seeds, final score, seconds and calls per iteration."""
    table: dict[str, Any] = {}
    for recipe in dict.fromkeys(r.recipe for r in runs):
        mine = [r for r in runs if r.recipe == recipe]
        finals = [r.curve[-1][2] for r in mine]
        targets = {}
        for delta in deltas:
            times = [time_to(r.curve, base + delta) for r in mine]
            reached = [t for t in times if t is not None]
            targets[f"+{delta:g}"] = {
                "reached": f"{len(reached)}/{len(mine)}",
                "mean_seconds": statistics.fmean(reached) if reached else None,
            }
        table[recipe] = {
            "seeds": [r.seed for r in mine],
            "final_mean": statistics.fmean(finals),
            "final_std": statistics.pstdev(finals),
            "seconds_per_iteration": statistics.median(s for r in mine for s in r.iteration_seconds),
            "network_calls_per_iteration": statistics.fmean(r.calls() / max(1, r.iterations) for r in mine),
            "iterations_in_budget": statistics.fmean(r.iterations for r in mine),
            "time_to_target": targets,
        }
    return table


def markdown(summary: dict[str, Any], base: float, budget: float, baselines: Sequence[str]) -> str:
    """The summary as a markdown table; speed-ups are time-to-target ratios against ``baselines``."""
    deltas = list(next(iter(summary.values()))["time_to_target"])
    head = "| recipe | s/it | calls/it | it in budget | final (mean ± sd) |"
    head += "".join(f" time to base{d} |" for d in deltas)
    rows = [head, "|---" * (5 + len(deltas)) + "|"]
    for recipe, r in summary.items():
        cells = [
            recipe,
            f"{r['seconds_per_iteration']:.2f}",
            f"{r['network_calls_per_iteration']:.0f}",
            f"{r['iterations_in_budget']:.0f}",
            f"{r['final_mean']:.3f} ± {r['final_std']:.3f}",
        ]
        for d in deltas:
            t = r["time_to_target"][d]
            cell = (
                f"{t['mean_seconds']:.0f} s ({t['reached']})"
                if t["mean_seconds"] is not None
                else f"not reached (0/{len(r['seeds'])})"
            )
            for b in baselines:
                ref = summary.get(b, {}).get("time_to_target", {}).get(d, {}).get("mean_seconds")
                if b != recipe and ref and t["mean_seconds"]:
                    cell += f", {ref / t['mean_seconds']:.1f}x vs {b}"
            cells.append(cell)
        rows.append("| " + " | ".join(cells) + " |")
    note = f"Base held-out score {base:.3f}; budget {budget:.0f} s of training per run."
    return note + "\n\n" + "\n".join(rows) + "\n"


def plot(runs: list[Run], base: float, deltas: Sequence[float], path: Path) -> None:
    """Held-out score against seconds: one line per recipe (mean over seeds), a band from min to max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for recipe in dict.fromkeys(r.recipe for r in runs):
        mine = [r for r in runs if r.recipe == recipe]
        grid = sorted({round(s, 1) for r in mine for s, _, _ in r.curve})
        values = [[_at(r.curve, t) for r in mine] for t in grid]
        (line,) = ax.plot(grid, [statistics.fmean(v) for v in values], label=recipe)
        if len(mine) > 1:
            ax.fill_between(grid, [min(v) for v in values], [max(v) for v in values], alpha=0.2, color=line.get_color())
    for delta in deltas:
        ax.axhline(base + delta, linestyle=":", color="grey")
    ax.set_xlabel("training seconds (interleaved, this machine)")
    ax.set_ylabel("held-out shapes score (ODE, fixed seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _at(curve: Sequence[tuple[float, int, float]], t: float) -> float:
    """The score of the last evaluation at or before ``t`` (a step function of seconds)."""
    return [score for s, _, score in curve if s <= t + 1e-6][-1]


def add_arguments(
    parser: argparse.ArgumentParser, *, seeds: int, budget: float, eval_every: float, eval_samples: int, out: str
) -> None:
    """The options every side-by-side benchmark on the shapes world takes (defaults: the committed run's)."""
    parser.add_argument("--seeds", nargs="+", type=int, default=list(range(seeds)))
    parser.add_argument("--budget", type=float, default=budget, help="training seconds per run")
    parser.add_argument("--eval-every", type=float, default=eval_every, help="training seconds between evaluations")
    parser.add_argument("--eval-samples", type=int, default=eval_samples, help="samples per held-out caption")
    parser.add_argument("--deltas", nargs="+", type=float, default=[0.15, 0.05], help="targets: base + delta")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results" / out)
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes (one torch thread each) that share the runs: run i goes to worker i mod N, and each "
        "worker steps its runs round-robin; the results are merged into one table",
    )
    parser.add_argument("--shard", default=None, help=argparse.SUPPRESS)  # "k/N": set by --workers for its workers


Spec = tuple[str, int]  # (recipe or variant, seed)
Build = Callable[[str, int, HeldOut, Path], Run]


def shard_of(specs: Sequence[Spec], shard: str | None) -> list[Spec]:
    """The runs of worker ``k`` of ``N`` (``shard`` = "k/N"): every N-th run starting at k."""
    if shard is None:
        return list(specs)
    k, n = (int(x) for x in shard.split("/"))
    if not 0 <= k < n:
        raise ValueError(f"--shard {shard}: want k/N with 0 <= k < N")
    return list(specs)[k::n]


def record(run: Run) -> dict[str, Any]:
    """What a run measured, JSON-safe (a worker's result, merged by the parent)."""
    return {
        "recipe": run.recipe,
        "seed": run.seed,
        "seconds": run.seconds,
        "iterations": run.iterations,
        "calls": run.calls(),
        "iteration_seconds": run.iteration_seconds,
        "curve": [list(point) for point in run.curve],
    }


def from_record(data: dict[str, Any]) -> Run:
    """The inverse of :func:`record` (a finished run: it cannot step or evaluate)."""

    def finished(*_: Any) -> Any:
        raise RuntimeError(f"{data['recipe']} seed {data['seed']} was measured by a worker; it cannot run here")

    calls = int(data["calls"])
    run = Run(data["recipe"], int(data["seed"]), step=finished, evaluate=finished, calls=lambda: calls)
    run.seconds, run.iterations = float(data["seconds"]), int(data["iterations"])
    run.iteration_seconds = [float(s) for s in data["iteration_seconds"]]
    run.curve = [(float(s), int(i), float(v)) for s, i, v in data["curve"]]
    return run


def _measure(args: argparse.Namespace, specs: Sequence[Spec], build: Build) -> tuple[float, list[Run]]:
    """Build this process's runs and step them round-robin; the base score and the finished runs."""
    torch.set_num_threads(1)
    prefix = f"[worker {args.shard}] " if args.shard else ""

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {prefix}{message}", flush=True)

    with tempfile.TemporaryDirectory(prefix="dancecore-bench-") as tmp:
        held_out = HeldOut(_trainer(QUICKSTART, [], 0, Path(tmp) / "probe"), args.eval_samples)
        base = held_out.score(held_out.probe)
        log(f"base held-out score {base:.3f} ({len(held_out.prompts)} captions x {args.eval_samples})")
        runs = [build(name, seed, held_out, Path(tmp)) for name, seed in shard_of(specs, args.shard)]
        run_all(runs, base, args.budget, args.eval_every, log)
    return base, runs


def _workers(args: argparse.Namespace, module: str, argv: Sequence[str]) -> tuple[float, list[Run]]:
    """Run ``args.workers`` copies of ``module`` on their shards and merge what they measured."""
    import subprocess

    with tempfile.TemporaryDirectory(prefix="dancecore-bench-parts-") as tmp:
        parts = [Path(tmp) / f"part-{k}" for k in range(args.workers)]
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    module,
                    *argv,
                    "--workers",
                    "1",
                    "--shard",
                    f"{k}/{args.workers}",
                    "--out",
                    str(part),
                ],
                cwd=ROOT,
            )
            for k, part in enumerate(parts)
        ]
        codes = [p.wait() for p in procs]
        failed = [f"worker {k}/{args.workers} exited {c}" for k, c in enumerate(codes) if c != 0]
        if failed:
            raise RuntimeError("; ".join(failed))
        results = [json.loads(part.with_suffix(".json").read_text()) for part in parts]
    bases = {round(r["base"], 9) for r in results}
    if len(bases) != 1:
        raise RuntimeError(
            f"the workers scored the base differently ({sorted(bases)}): evaluation is not deterministic"
        )
    runs = [from_record(d) for r in results for d in r["runs"]]
    return results[0]["base"], runs


def benchmark(
    args: argparse.Namespace,
    specs: Sequence[Spec],
    build: Build,
    baselines: Sequence[str],
    *,
    module: str,
    argv: Sequence[str],
) -> int:
    """Measure the runs ``specs`` (in this process, or in ``--workers`` processes), write
    ``<out>.json/.md/.png`` and print the table. ``module`` and ``argv`` re-invoke this benchmark
    for its workers."""
    if args.workers < 1:
        raise SystemExit("--workers must be at least 1")
    if args.workers > 1 and args.shard is None:
        base, runs = _workers(args, module, argv)
    else:
        base, runs = _measure(args, specs, build)
    order = {spec: i for i, spec in enumerate(specs)}
    runs.sort(key=lambda r: order.get((r.recipe, r.seed), len(order)))
    summary = summarise(runs, base, args.deltas)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "shard"}
    result = {"settings": settings, "base": base, "summary": summary, "runs": [record(r) for r in runs]}
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    if args.shard is not None:
        return 0  # a worker: the parent merges, tabulates and plots
    table = markdown(summary, base, args.budget, baselines)
    args.out.with_suffix(".md").write_text(table)
    plot(runs, base, args.deltas, args.out.with_suffix(".png"))
    print(table)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    add_arguments(parser, seeds=3, budget=420.0, eval_every=70.0, eval_samples=4, out="algorithms")
    parser.set_defaults(deltas=[0.15, 0.1, 0.05])
    args = parser.parse_args(argv)

    def build(recipe: str, seed: int, held_out: HeldOut, tmp: Path) -> Run:
        return reference_run(seed, held_out) if recipe == "reference" else dancecore_run(recipe, seed, held_out, tmp)

    specs = [(recipe, seed) for seed in args.seeds for recipe in args.recipes]
    return benchmark(args, specs, build, ["dancegrpo", "reference"], module="benchmarks.algorithms", argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
