"""The ``dancecore`` command line: train, validate, plugins, recipes (ls/cp) and plugin commands.

Bad input (a config error, a missing file, a broken plugin) prints one clear line per problem
and exits with code 2; a run that fails prints what failed and exits with 1. Tracebacks are shown
only with ``--debug``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from dancecore import __version__

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1


def _report(exc: BaseException) -> int:
    """Print an exception as one line per problem; return the exit code its class encodes
    (:class:`dancecore.errors.UserError`: 2, anything else: 1)."""
    from dancecore.errors import ConfigError, DancecoreError

    if isinstance(exc, ConfigError):
        where = f" in {exc.source}" if exc.source else ""
        print(f"error: {len(exc.errors)} problem(s){where}:", file=sys.stderr)
        for message in exc.errors:
            print(f"  {message}", file=sys.stderr)
        return exc.exit_code
    if isinstance(exc, DancecoreError):
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", file=sys.stderr)
    return EXIT_FAILED


def configs_root() -> Path:
    """The directory of bundled recipes (``configs/`` of the source tree)."""
    return Path(os.environ.get("DANCECORE_CONFIGS", Path(__file__).resolve().parent.parent / "configs"))


def cmd_validate(args: argparse.Namespace) -> int:
    """Validate a config (structure and every component's options) without loading any model."""
    from dancecore.config.schema import load_run

    run = load_run(Path(args.config), args.overrides)
    if run.config.distributed.backend == "deepspeed":
        from dancecore.config.schema import ConfigError
        from dancecore.distributed.config import deepspeed_config

        try:  # passthrough conflicts are config errors too (deepspeed itself is not needed here)
            deepspeed_config(run.config, check_with_deepspeed=False)
        except ConfigError as exc:
            raise ConfigError(exc.errors, args.config) from None
    rewards = ", ".join(f"{r.display_name} (x{r.weight:g})" for r in run.config.rewards)
    print(
        f"{args.config}: OK - policy {run.policy.name}, sampler {run.sampler.name}, "
        f"algorithm {run.algorithm.name}, rewards {rewards}"
    )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train; with ``--nproc N`` start N local ranks (DeepSpeed)."""
    from dancecore.config.schema import load_run

    run = load_run(Path(args.config), args.overrides)
    if not args.resume:  # before any model is loaded (Trainer.train checks again, on every rank)
        from dancecore.training.trainer import refuse_earlier_run

        refuse_earlier_run(run.config.output_dir)
    if args.nproc and args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        from dancecore.distributed.launch import launch_local

        return launch_local(args)
    if run.config.distributed.backend == "deepspeed" or "LOCAL_RANK" in os.environ:
        from dancecore.training.run import train_distributed

        status = train_distributed(run, resume=args.resume, allow_pickle=args.allow_pickle)
    else:
        from dancecore.training.trainer import Trainer

        status = Trainer(run).train(resume=args.resume, allow_pickle=args.allow_pickle)
    out = run.config.output_dir
    if os.environ.get("RANK", "0") != "0":  # in multi-rank runs only rank 0 reports
        return 0
    if status == "stopped":
        print(
            f"stopped by signal (or by the divergence alarm); checkpoint saved under {out / 'checkpoints'} (continue with --resume)"
        )
    else:
        from dancecore.outputs.images import MetricsLog, reward_summary

        summary = reward_summary(MetricsLog(out / "metrics.jsonl").read())
        if summary:
            print(summary)
        if run.config.eval is not None:
            from dancecore.outputs.report import load_eval_history
            from dancecore.training.evaluation import eval_summary

            held_out = eval_summary(load_eval_history(out), out)
            if held_out:
                print(held_out)
        print(
            f"done: metrics in {out / 'metrics.jsonl'}, samples in {out / 'samples'}, curve in {out / 'reward_curve.png'}"
        )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Score base weights or a checkpoint with deterministic sampling; write tables and a grid."""
    from dancecore.config.schema import load_run
    from dancecore.errors import ConfigError
    from dancecore.evaluate import evaluate

    if args.compare:
        from dancecore.outputs.compare import compare_results, format_comparison

        a, b = (Path(p) for p in args.compare)
        print(format_comparison(compare_results(a, b), str(a), str(b)))
        return 0
    if args.config is None:
        raise ConfigError(["dancecore eval needs a run config (or --compare A/results.json B/results.json)"])
    run = load_run(Path(args.config), args.overrides)
    output = (
        Path(args.output)
        if args.output
        else run.config.output_dir
        / "eval"
        / ((args.checkpoint or "base") + ("-ema" if args.ema else "")).replace("/", "_")
    )
    result = evaluate(
        run,
        Path(args.prompts) if args.prompts else None,
        output,
        checkpoint=args.checkpoint,
        samples_per_prompt=args.samples_per_prompt
        or (run.config.eval.samples_per_prompt if run.config.eval is not None else 1),
        seed=args.seed,
        ema=args.ema,
    )
    print((result.output_dir / "results.md").read_text().rstrip())
    print(f"wrote {result.output_dir}/results.json, results.csv, results.md, grid.png")
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    """List installed plugins from package metadata, importing none of them."""
    from dancecore.registry import installed, is_blocked

    rows = installed()
    if not rows:
        print("no plugin installed")
        return 0
    width = max(len(r.name) for r in rows)
    current = None
    for row in rows:
        if row.kind != current:
            current = row.kind
            print(f"{row.kind}:")
        blocked = "  [blocked]" if is_blocked(row.kind, row.name) else ""
        print(f"  {row.name:<{width}}  {row.package} {row.version}  ({row.target}){blocked}")
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    """List bundled recipes."""
    root = configs_root()
    for path in sorted(root.rglob("*.yaml")):
        print(path.relative_to(root).as_posix())
    return 0


def cmd_cp(args: argparse.Namespace) -> int:
    """Copy a bundled recipe to edit it."""
    source = configs_root() / args.recipe
    if not source.is_file():
        print(f"error: no recipe {args.recipe!r} (see `dancecore ls`)", file=sys.stderr)
        return EXIT_BAD_INPUT
    destination = Path(args.destination)
    if destination.exists() and not args.force:
        print(f"error: {destination} exists (use --force to overwrite)", file=sys.stderr)
        return EXIT_BAD_INPUT
    shutil.copyfile(source, destination)
    print(f"copied {args.recipe} to {destination}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Write a self-contained HTML report of a run's output directory."""
    from dancecore.outputs.report import write_report

    path = write_report(Path(args.output_dir), Path(args.output) if args.output else None)
    print(f"report written to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, including sub-commands contributed by hook plugins."""
    parser = argparse.ArgumentParser(prog="dancecore", description="GRPO fine-tuning of image and video generators.")
    parser.add_argument("--version", action="version", version=f"dancecore {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a policy with GRPO")
    train.add_argument("config", help="YAML config file")
    train.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.iterations=10")
    train.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint")
    train.add_argument(
        "--allow-pickle",
        action="store_true",
        help="let --resume load pickle files (.pt/.bin/.ckpt) that the checkpoint's verified manifest lists, "
        "as plain tensors only (torch.load weights_only=True); refused otherwise",
    )
    train.add_argument("--nproc", type=int, default=None, help="start N local ranks (DeepSpeed)")
    train.set_defaults(func=cmd_train)

    validate = sub.add_parser("validate", help="check a config without loading any model")
    validate.add_argument("config")
    validate.add_argument("overrides", nargs="*")
    validate.set_defaults(func=cmd_validate)

    evaluate = sub.add_parser("eval", help="score a policy or checkpoint on a prompt file (deterministic sampling)")
    evaluate.add_argument("config", nargs="?", help="run config (policy, sampler and rewards are taken from it)")
    evaluate.add_argument("overrides", nargs="*")
    evaluate.add_argument(
        "--checkpoint", default=None, help="checkpoint directory, 'latest', or omitted for base weights"
    )
    evaluate.add_argument(
        "--prompts", default=None, help="prompt file (.txt one per line, or .jsonl); default: the config's"
    )
    evaluate.add_argument(
        "--samples-per-prompt", type=int, default=None, help="default: the config's eval.samples_per_prompt, else 1"
    )
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--ema", action="store_true", help="evaluate the checkpoint's EMA weights (train.ema)")
    evaluate.add_argument("--output", default=None, help="output directory (default: <output_dir>/eval/<checkpoint>)")
    evaluate.add_argument(
        "--compare",
        nargs=2,
        metavar=("A", "B"),
        help="compare two evaluations (results.json or their directories): B - A and its standard error",
    )
    evaluate.set_defaults(func=cmd_eval)

    plugins = sub.add_parser("plugins", help="list installed plugins (imports none)")
    plugins.set_defaults(func=cmd_plugins)

    ls = sub.add_parser("ls", help="list bundled recipes")
    ls.set_defaults(func=cmd_ls)
    cp = sub.add_parser("cp", help="copy a bundled recipe")
    cp.add_argument("recipe")
    cp.add_argument("destination")
    cp.add_argument("--force", action="store_true")
    cp.set_defaults(func=cmd_cp)

    report = sub.add_parser("report", help="write a self-contained HTML report of a run (curves, sample grids)")
    report.add_argument("output_dir", help="the run's output_dir")
    report.add_argument("-o", "--output", default=None, help="where to write it (default: OUTPUT_DIR/report.html)")
    report.set_defaults(func=cmd_report)

    from dancecore.export.command import add_export_command

    add_export_command(sub)

    from dancecore.planning.command import add_plan_command

    add_plan_command(sub)

    from dancecore.serving.serve import add_command as add_serve_reward

    add_serve_reward(sub)

    from dancecore.hooks import plugin_manager

    plugin_manager().hook.dancecore_add_commands(subparsers=sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dancecore`` script.

    A rank of a multi-process run (``LOCAL_RANK`` set by the launcher) leaves through ``os._exit``
    once everything is written and flushed: the C++ threads of the communication libraries can
    otherwise abort the process during interpreter teardown (seen as SIGABRT, "terminate called
    without an active exception", after a run had finished), which the launcher reports as a failure.
    """
    code = _main(sys.argv[1:] if argv is None else argv)
    if "LOCAL_RANK" in os.environ and argv is None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def parse_arguments(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse ``argv``; ``key=value`` overrides may also follow the options
    (``dancecore train CONFIG --resume train.iterations=200``), as users type them."""
    args, extra = parser.parse_known_args(argv)
    takes_overrides = isinstance(getattr(args, "overrides", None), list)
    late = [a for a in extra if takes_overrides and "=" in a and not a.startswith("-")]
    unknown = [a for a in extra if a not in late]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if late:
        args.overrides = [*args.overrides, *late]
    return args


def _main(argv: list[str]) -> int:
    """Parse and run one command; bad input and failures become an exit code and clear lines."""
    debug = "--debug" in argv
    try:
        parser = build_parser()
        args = parse_arguments(parser, argv)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            raise
        return _report(exc)


if __name__ == "__main__":
    sys.exit(main())
