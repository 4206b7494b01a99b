"""``make bench``: dancecore against the bare network and the reference loop, on CPU (or GPU).

    python -m benchmarks.run              # everything, about 5 minutes on 2 quiet cores
    python -m benchmarks.run --quick      # a smoke run (fewer repeats and points)
    python -m benchmarks.run --only headline,equivalence

Writes ``benchmarks/results/*.json`` and ``*.png`` and prints a table. See docs/performance.md
for what each number means and how it is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from benchmarks.cases import bare_runner, build_trainer, iteration_runner, shapes_of
from benchmarks.equivalence import compare, reference_for
from benchmarks.measure import Samples, interleaved, machine, peak_memory, timed
from benchmarks.reference_loop import ReferenceLoop
from benchmarks.scaling import SWEEPS, plot, run_sweep

RESULTS = Path(__file__).resolve().parent / "results"
SUITES = ("shapes", "headline", "equivalence", "policies", "scaling")
WINDOW = 4  # SDE window of the mixed ODE/SDE variant (steps 16, so a quarter of the schedule)


def _reference_variant(base: ReferenceLoop, **changes: Any) -> ReferenceLoop:
    from dataclasses import replace

    from dancecore_flux.policy import tiny_flux_dir

    return ReferenceLoop(tiny_flux_dir(), replace(base.s, **changes), device=str(base.device))


def _reference_runner(loop: ReferenceLoop, prompt: str) -> Any:
    def run(it: int) -> dict[str, float]:
        loop.iteration(it, [prompt])
        return loop.phase_times

    return run


# ------------------------------------------------------------------------------------- suites


def suite_headline(args: argparse.Namespace) -> dict[str, Any]:
    """Tiny FLUX, G=8, 16 steps: dancecore, its bare passes, the reference loop and the ladder of
    optimisations between them, all interleaved in this one process."""
    dancecore = build_trainer([], args.threads)
    prompt = dancecore.local_prompts(0)[0].text
    reference = reference_for(dancecore)
    systems: dict[str, Any] = {
        "dancecore": iteration_runner(dancecore),
        "bare": bare_runner(dancecore),
        "bare_all_passes": bare_runner(dancecore, all_passes=True),
        "reference": _reference_runner(reference, prompt),
        "reference+recomputed_old_log_probs": _reference_runner(
            _reference_variant(reference, recompute_old_log_probs=True), prompt
        ),
        "reference+encode_once": _reference_runner(_reference_variant(reference, encode_per_sample=False), prompt),
        "reference+encode_once+batched_rollout": _reference_runner(
            _reference_variant(reference, encode_per_sample=False, rollout_batch=8), prompt
        ),
        "reference+encode_once+batched_rollout+batched_training": _reference_runner(
            _reference_variant(reference, encode_per_sample=False, rollout_batch=8, train_batch=8), prompt
        ),
        "dancecore(micro_batch_size=1)": iteration_runner(build_trainer(["train.micro_batch_size=1"], args.threads)),
        f"dancecore+sde_window={WINDOW}": iteration_runner(
            build_trainer([f"sampler.sde_window={WINDOW}"], args.threads)
        ),
        "dancecore+gradient_checkpointing": iteration_runner(
            build_trainer(["policy.gradient_checkpointing=true"], args.threads)
        ),
    }
    compile_warmup = None
    if not args.no_compile:
        compiled = build_trainer(["train.compile=true"], args.threads)
        runner = iteration_runner(compiled)
        compile_warmup, _, _ = timed(lambda: runner(0))  # first call compiles (no-grad and grad graphs)
        systems["dancecore+compile"] = runner
        log(
            f"  torch.compile warm-up (first iteration, cache {os.environ.get('TORCHINDUCTOR_CACHE_DIR', 'default')}): {compile_warmup:.1f} s"
        )
    log(f"  {len(systems)} systems x ({args.warmup} warm-up + {args.repeats} interleaved rounds)")
    samples = interleaved(systems, repeats=args.repeats, warmup=args.warmup, device=dancecore.device)
    memory = {name: peak_memory(lambda run=run: run(1000), dancecore.device).as_dict() for name, run in systems.items()}
    out: dict[str, Any] = {
        "setting": {
            "policy": "flux (tiny preset)",
            "resolution": dancecore.policy.resolution,
            **shapes_of(dancecore),
            "sde_window_variant": WINDOW,
            "torch_threads": args.threads,
            "device": str(dancecore.device),
        },
        "systems": {name: {**s.summary(), "memory": memory[name]} for name, s in samples.items()},
        "compile_warmup_s": compile_warmup,
        "compile_cache": "warm (reused)" if args.warm_compile_cache else "fresh (first compile on this machine)",
    }
    out["ratios"] = ratios(samples)
    out["observability_cost"] = observability_cost(dancecore)
    return out


def observability_cost(trainer: Any) -> dict[str, Any]:
    """What TensorBoard logging adds per iteration (scalars) and per saved sample grid (image)."""
    from dancecore.outputs.observers import ObservabilityError, open_observers

    record = trainer.iteration(2000)
    pixels = trainer._last_pixels
    with tempfile.TemporaryDirectory(prefix="dancecore-bench-tb-") as tmp:
        logging = trainer.cfg.logging.model_copy(update={"tensorboard": True, "wandb": False})
        try:
            observers = open_observers(trainer.cfg.model_copy(update={"logging": logging}), Path(tmp))
        except ObservabilityError as exc:
            return {"skipped": str(exc)}
        scalars = [timed(lambda i=i: observers.scalars(i, record))[0] for i in range(200)]
        images = [timed(lambda i=i: observers.images(i, pixels, trainer.group_size))[0] for i in range(20)]
        observers.close()
    scalars.sort()
    images.sort()
    return {
        "scalars_per_iteration_ms": scalars[len(scalars) // 2] * 1e3,
        "sample_grid_image_ms": images[len(images) // 2] * 1e3,
        "tags_per_iteration": len(record) + len(trainer.phase_times),
    }


def ratios(samples: dict[str, Samples]) -> dict[str, dict[str, float]]:
    """Efficiency, speed-ups and each optimisation's before/after, on both clocks."""
    pairs = {
        "efficiency (bare network passes / dancecore)": ("bare", "dancecore"),
        "efficiency incl. encode/decode/reward passes": ("bare_all_passes", "dancecore"),
        "speed-up vs reference loop": ("reference", "dancecore"),
        f"speed-up vs reference loop, dancecore with sde_window={WINDOW}": (
            "reference",
            f"dancecore+sde_window={WINDOW}",
        ),
        "opt: old log-probs from rollout (vs recomputed)": ("reference+recomputed_old_log_probs", "reference"),
        "opt: prompt embeddings once per prompt": ("reference", "reference+encode_once"),
        "opt: batched group rollout (reference ladder)": (
            "reference+encode_once",
            "reference+encode_once+batched_rollout",
        ),
        "opt: batched training passes (reference ladder)": (
            "reference+encode_once+batched_rollout",
            "reference+encode_once+batched_rollout+batched_training",
        ),
        "opt: micro_batch_size 8 vs 1 (dancecore)": ("dancecore(micro_batch_size=1)", "dancecore"),
        f"opt: sde_window={WINDOW} (dancecore)": ("dancecore", f"dancecore+sde_window={WINDOW}"),
        "opt: gradient checkpointing (dancecore; <1 = slower)": ("dancecore", "dancecore+gradient_checkpointing"),
        "opt: torch.compile (dancecore, after warm-up)": ("dancecore", "dancecore+compile"),
        "framework vs hand-batched reference (same batching)": (
            "reference+encode_once+batched_rollout+batched_training",
            "dancecore",
        ),
    }
    out = {}
    for label, (before, after) in pairs.items():
        if before in samples and after in samples:
            out[label] = {
                "before": before,
                "after": after,
                "wall": samples[before].median() / samples[after].median(),
                "cpu": samples[before].median("cpu") / samples[after].median("cpu"),
                "paired": paired_ratio(samples[before], samples[after]),
            }
    return out


def paired_ratio(before: Samples, after: Samples) -> float:
    """Median over rounds of before/after wall time within the same round. Rounds interleave the
    systems, so the two runs of a round share the machine's load; on a noisy shared machine this
    is steadier than the ratio of the two medians."""
    return statistics.median(b / a for b, a in zip(before.wall, after.wall, strict=True))


def suite_equivalence(args: argparse.Namespace) -> dict[str, Any]:
    """Identical noise through both loops: full SDE, the mixed ODE/SDE window, and compiled."""
    out = {
        "full_sde": compare([], iterations=2, threads=args.threads),
        f"sde_window={WINDOW}": compare([f"sampler.sde_window={WINDOW}"], iterations=3, threads=args.threads),
    }
    if not args.no_compile:  # the headline suite compiled the same graphs: the cache makes this quick
        out["compile"] = compare(["train.compile=true"], iterations=1, threads=args.threads)
    return out


def suite_policies(args: argparse.Namespace) -> dict[str, Any]:
    """The other backbones' tiny presets (if their plugins import): phases, efficiency, memory."""
    from dancecore import registry

    out: dict[str, Any] = {}
    for name in ("sd", "hunyuanvideo"):
        try:
            registry.load("policy", name)
            trainer = build_trainer([], args.threads, policy=name)
        except Exception as exc:  # a plugin being written, or not installed: skip with the reason
            out[name] = {"skipped": f"{type(exc).__name__}: {exc}"}
            log(f"  {name}: skipped ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})")
            continue
        out[name] = efficiency(trainer, repeats=max(3, args.repeats // 2), warmup=1)
    return out


def efficiency(trainer: Any, repeats: int, warmup: int) -> dict[str, Any]:
    """A trainer's iteration against its bare network passes (with and without the encode/decode/
    reward passes), interleaved: medians, the ratios of medians and the paired (per-round) ratios."""
    systems = {
        "dancecore": iteration_runner(trainer),
        "bare": bare_runner(trainer),
        "bare_all_passes": bare_runner(trainer, all_passes=True),
    }
    samples = interleaved(systems, repeats=repeats, warmup=warmup, device=trainer.device)
    memory = peak_memory(lambda: trainer.iteration(1000), trainer.device).as_dict()
    return {
        "setting": {**shapes_of(trainer), "sampler": trainer.run.sampler.name},
        "systems": {k: s.summary() for k, s in samples.items()},
        "memory": memory,
        "efficiency": samples["bare"].median() / samples["dancecore"].median(),
        "efficiency_cpu": samples["bare"].median("cpu") / samples["dancecore"].median("cpu"),
        "efficiency_all_passes": samples["bare_all_passes"].median() / samples["dancecore"].median(),
        "efficiency_paired": paired_ratio(samples["bare"], samples["dancecore"]),
        "efficiency_all_passes_paired": paired_ratio(samples["bare_all_passes"], samples["dancecore"]),
    }


def suite_shapes(args: argparse.Namespace) -> dict[str, Any]:
    """The headline efficiency: the shapes world's GRPO recipe on its pretrained FLUX (0.5M-parameter
    transformer; its exact reward and VAE decode are about a fifth of the iteration, docs/performance.md)."""
    trainer = build_trainer([], args.threads, policy="shapes")
    return efficiency(trainer, repeats=args.repeats, warmup=args.warmup)


def suite_scaling(args: argparse.Namespace) -> dict[str, Any]:
    """Every sweep whose policy is installed; plots to results/scaling.png."""
    from dancecore import registry

    results, skipped = [], {}
    for sweep in SWEEPS.values():
        try:
            registry.load("policy", sweep.policy)
            results.append(run_sweep(sweep, repeats=args.scaling_repeats, threads=args.threads, quick=args.quick))
        except Exception as exc:
            skipped[sweep.name] = f"{type(exc).__name__}: {exc}"
            log(f"  sweep {sweep.name}: skipped ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})")
            continue
        fit = results[-1]["fits"]["time_s"]
        log(f"  sweep {sweep.name}: slope {fit['slope']:.4g} s per unit, R^2 {fit['r2']:.4f}")
    if results:
        plot(results, args.out / "scaling.png")
    return {"sweeps": results, "skipped": skipped}


# ------------------------------------------------------------------------------------- output


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def plot_headline(headline: dict[str, Any], path: Path) -> None:
    """Stacked phase bars for every system of the headline suite."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = headline["systems"]
    names = list(systems)
    phases = ["encode", "rollout", "decode", "decode+reward", "reward", "update", "other"]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(names) + 1.5), dpi=100)
    for i, name in enumerate(names):
        s = systems[name]
        left = 0.0
        parts = s.get("phases_median_s") or {"(not broken down)": s["wall_median_s"]}
        for phase in [p for p in phases if p in parts] + [p for p in parts if p not in phases]:
            width = parts[phase] * 1e3
            ax.barh(
                i,
                width,
                left=left,
                color=f"C{phases.index(phase) if phase in phases else 9}",
                label=phase if i == 0 or phase not in ax.get_legend_handles_labels()[1] else None,
            )
            left += width
        ax.text(s["wall_median_s"] * 1e3, i, f" {s['wall_median_s'] * 1e3:.0f} ms", va="center", fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("ms per iteration (median)")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=False))
    ax.legend(unique.values(), unique.keys(), fontsize=7, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def table(results: dict[str, Any]) -> str:
    """The summary printed at the end."""
    lines: list[str] = []
    shapes = results.get("shapes")
    if shapes:
        st, sy = shapes["setting"], shapes["systems"]
        lines.append(
            f"HEADLINE: shapes-FLUX GRPO recipe ({st['prompts']} prompts x G={st['samples'] // st['prompts']}, "
            f"{st['steps']} steps, micro-batch {st['micro_batch']}; {st['rollout_calls']} rollout + "
            f"{st['train_calls']} training calls): dancecore {sy['dancecore']['wall_median_s'] * 1e3:.0f} ms/iteration, "
            f"bare network passes {sy['bare']['wall_median_s'] * 1e3:.0f} ms, with encode/decode/reward "
            f"{sy['bare_all_passes']['wall_median_s'] * 1e3:.0f} ms"
        )
        lines.append(
            f"  efficiency (bare / dancecore, paired) {shapes['efficiency_paired']:.3f}; incl. encode/decode/reward "
            f"passes {shapes['efficiency_all_passes_paired']:.3f} (ratio of medians {shapes['efficiency']:.3f} / "
            f"{shapes['efficiency_all_passes']:.3f}); {sy['dancecore']['repeats']} interleaved rounds"
        )
        lines.append("")
    head = results.get("headline")
    if head:
        st = head["setting"]
        lines.append(
            f"tiny FLUX {st['resolution']}px, G={st['samples'] // st['prompts']}, {st['steps']} steps, "
            f"{st['prompts']} prompt/iteration, micro-batch {st['micro_batch']}, {st['torch_threads']} torch thread(s), "
            f"{st['device']}; medians of {head['systems']['dancecore']['repeats']} interleaved rounds"
        )
        peak_rss = max(sy["memory"]["rss_peak_mib"] for sy in head["systems"].values())
        lines.append(
            "phase columns: medians (ms); 'other' = what no phase covers; heap MiB = peak C-heap in use during one "
            f"iteration above its start (CPU analogue of max_memory_allocated); process peak RSS {peak_rss:.0f} MiB"
        )
        lines.append(
            f"{'system':<56}{'wall ms':>9}{'cpu ms':>9}{'encode':>8}{'rollout':>9}{'decode':>8}{'reward':>8}"
            f"{'train':>8}{'other':>7}{'heap MiB':>9}"
        )

        def ms(v: float | None) -> str:
            return "-" if v is None else f"{v * 1e3:.1f}"

        for name, s in head["systems"].items():
            ph = s.get("phases_median_s", {})
            mem = s["memory"]
            heap = mem["heap_peak_over_start_mib"]
            lines.append(
                f"{name:<56}{s['wall_median_s'] * 1e3:>9.1f}{s['cpu_median_s'] * 1e3:>9.1f}{ms(ph.get('encode')):>8}"
                f"{ms(ph.get('rollout')):>9}{ms(ph.get('decode', ph.get('decode+reward'))):>8}{ms(ph.get('reward')):>8}"
                f"{ms(ph.get('update')):>8}{ms(ph.get('other')):>7}"
                f"{'-' if heap is None else f'{heap:.1f}':>9}"
            )
        if head.get("compile_warmup_s"):
            lines.append(
                f"torch.compile warm-up (first iteration, {head.get('compile_cache', '?')} inductor cache): "
                f"{head['compile_warmup_s']:.1f} s"
            )
        obs = head.get("observability_cost", {})
        if "scalars_per_iteration_ms" in obs:
            lines.append(
                f"TensorBoard logging: {obs['scalars_per_iteration_ms']:.2f} ms per iteration (scalars), "
                f"{obs['sample_grid_image_ms']:.2f} ms per sample grid (image)"
            )
        lines.append("")
        lines.append(
            f"{'ratio (before / after): of medians (wall, cpu), median of per-round ratios':<78}{'wall':>8}{'cpu':>8}{'paired':>8}"
        )
        for label, r in head["ratios"].items():
            lines.append(f"{label:<78}{r['wall']:>8.2f}{r['cpu']:>8.2f}{r['paired']:>8.2f}")
    eq = results.get("equivalence")
    if eq:
        lines.append("")
        for name, res in eq.items():
            if not isinstance(res, dict):
                continue
            worst: dict[str, float] = {}
            for it in res["iterations"]:
                for k, v in it["max_abs_diff"].items():
                    worst[k] = max(worst.get(k, 0.0), v)
            checks = all(all(it["checks"].values()) for it in res["iterations"])
            windows = [it["stochastic_steps"] for it in res["iterations"]]
            lines.append(
                f"equivalence vs reference ({name}): {'OK' if res['equivalent'] else 'MISMATCH'}; checks "
                f"{'pass' if checks else 'FAIL'}; max |diff| " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items())
            )
            if name != "full_sde":
                lines.append(f"  stochastic steps per iteration: {windows}")
    pol = results.get("policies")
    if pol:
        lines.append("")
        for name, res in pol.items():
            if not isinstance(res, dict):
                continue
            if "skipped" in res:
                lines.append(f"{name}: skipped ({res['skipped'].splitlines()[0][:100]})")
                continue
            ph = res["systems"]["dancecore"].get("phases_median_s", {})
            st = res["setting"]
            lines.append(
                f"{name} (tiny, G={st['samples'] // st['prompts']}, {st['steps']} steps, {st['sampler']}): "
                f"{res['systems']['dancecore']['wall_median_s'] * 1e3:.0f} ms/iteration (rollout "
                f"{ph.get('rollout', 0) * 1e3:.0f}, decode {ph.get('decode', 0) * 1e3:.0f}, reward "
                f"{ph.get('reward', 0) * 1e3:.0f}, train {ph.get('update', 0) * 1e3:.0f}); efficiency "
                f"{res['efficiency']:.2f} (cpu {res['efficiency_cpu']:.2f}; incl. encode/decode/reward passes "
                f"{res['efficiency_all_passes']:.2f}); heap peak {res['memory']['heap_peak_over_start_mib'] or 0:.1f} MiB"
            )
    sc = results.get("scaling")
    if sc:
        lines.append("")
        for res in sc["sweeps"]:
            wall, cpu = res["fits"]["time_s"], res["fits"]["time_cpu_s"]
            mem = res["fits"].get("gpu_peak_mib") or res["fits"].get("heap_peak_mib")
            mem_text = f"; memory {mem['slope']:.3g} MiB/unit (R^2 {mem['r2']:.3f})" if mem else ""
            lines.append(
                f"scaling {res['policy']} {res['sweep']} vs {res['x_label']}: time {cpu['slope'] * 1e3:.4g} ms/unit "
                f"(CPU R^2 {cpu['r2']:.4f}; wall R^2 {wall['r2']:.4f}){mem_text}"
                + ("" if res["linear_expected"] else " [work not linear in x]")
            )
            values = ", ".join(
                f"{p['value']}: {p['dancecore']['cpu_median_s'] * 1e3:.0f} ms cpu/{p['dancecore']['wall_median_s'] * 1e3:.0f} wall,"
                f" eff {p['efficiency_cpu']:.2f}"
                for p in res["points"]
            )
            lines.append(f"  {values}")
        for name, why in sc["skipped"].items():
            lines.append(f"scaling {name}: skipped ({why.splitlines()[0][:100]})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the selected suites, write results, print the table."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(SUITES), help=f"comma-separated suites of {SUITES}")
    parser.add_argument("--repeats", type=int, default=15, help="interleaved rounds of the headline suite")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--scaling-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: robust to other load)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant (warm-up ~1 min)")
    parser.add_argument(
        "--warm-compile-cache", action="store_true", help="reuse torch inductor's on-disk cache (default: a fresh one)"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 rounds, 2 points per sweep, no compile")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup, args.scaling_repeats, args.no_compile = 3, 1, 2, True
    suites = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(suites) - set(SUITES))
    if unknown:
        parser.error(f"unknown suite(s) {unknown}; choose from {SUITES}")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    if not args.no_compile and not args.warm_compile_cache:  # measure the first-ever compile, not a cache hit
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="dancecore-bench-inductor-")
    began = time.perf_counter()
    results: dict[str, Any] = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}}
    for name in suites:
        log(f"[bench] {name} ...")
        t0 = time.perf_counter()
        results[name] = globals()[f"suite_{name}"](args)
        results[name]["suite_seconds"] = time.perf_counter() - t0
        (out / f"{name}.json").write_text(json.dumps(results[name], indent=1, default=str))
        log(f"[bench] {name}: {results[name]['suite_seconds']:.0f} s")
    if "headline" in results:
        plot_headline(results["headline"], out / "headline.png")
    results["machine"]["load_average_at_end"] = machine()["load_average_1_5_15"]
    results["total_seconds"] = time.perf_counter() - began
    (out / "bench.json").write_text(json.dumps(results, indent=1, default=str))
    text = table(results)
    (out / "table.txt").write_text(text + "\n")
    print(text)
    print(
        f"\nresults in {out} ({results['total_seconds']:.0f} s; load average at start "
        f"{results['machine']['load_average_1_5_15']}, at end {results['machine']['load_average_at_end']})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
