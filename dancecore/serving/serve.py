"""``dancecore serve-reward CONFIG_OR_SPEC``: build rewards and serve them with uvicorn.

``CONFIG_OR_SPEC`` is a YAML file whose ``rewards:`` list (a run config's, or a file holding only
that list) names the rewards to serve, each under its ``label`` (default: its plugin name), or a
comma-separated list of reward plugin names served with default options (``brightness,jpeg-compressibility``).

The token is read from an environment variable (never from the command line, where ``ps`` shows
it); binding to anything but a loopback address without one is refused. SIGTERM and SIGINT stop
the server cleanly: no new connection is accepted, requests in flight are answered (for up to
``--grace`` seconds), then the reward threads are stopped and the process exits 0.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dancecore.errors import ConfigError, UserError

if TYPE_CHECKING:  # the server's modules (torch, starlette) load only when it runs
    from dancecore.serving.server import ServedReward

DEFAULT_TOKEN_ENV = "DANCECORE_REWARD_TOKEN"


def is_loopback(host: str) -> bool:
    """Whether ``host`` names only this machine (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def reward_specs(config_or_spec: str) -> list[dict[str, Any]]:
    """The reward blocks to serve: the ``rewards:`` list of a YAML file, or plugin names."""
    from dancecore.config.schema import load_yaml_file

    path = Path(config_or_spec)
    if path.suffix in {".yaml", ".yml"} or path.is_file():
        data = load_yaml_file(path)
        specs = data.get("rewards")
        if not isinstance(specs, list) or not specs or not all(isinstance(s, dict) for s in specs):
            raise ConfigError(["rewards: expected a non-empty list of reward blocks ({name: ..., options})"], str(path))
        return [dict(s) for s in specs]
    names = [n.strip() for n in config_or_spec.split(",") if n.strip()]
    if not names:
        raise UserError(f"nothing to serve in {config_or_spec!r}: give a YAML file or reward plugin names")
    return [{"name": n} for n in names]


def _package_of(name: str) -> tuple[str, str]:
    from dancecore.registry import installed

    for info in installed("reward"):
        if info.name == name:
            return info.package, info.version
    return "?", "?"


def build_served(specs: list[dict[str, Any]], default_batch_size: int, device: str) -> list[ServedReward]:
    """Validate and build every reward block; all problems are reported together."""
    import torch
    from pydantic import ValidationError

    from dancecore.config.schema import RewardSpec, _format_errors, _resolve_component
    from dancecore.contracts.protocols import BuildContext
    from dancecore.serving.server import ServedReward

    errors: list[str] = []
    resolved = []
    for i, block in enumerate(specs):
        try:
            spec = RewardSpec.model_validate(block)
        except ValidationError as exc:
            errors.extend(_format_errors(exc, f"rewards[{i}]"))
            continue
        component = _resolve_component("reward", spec, f"rewards[{i}]", errors)
        if component is not None:
            resolved.append((spec, component))
    names = [spec.display_name for spec, _ in resolved]
    errors += [
        f"rewards: {n!r} is served twice (give one a label)" for n in sorted({n for n in names if names.count(n) > 1})
    ]
    if errors:
        raise ConfigError(errors)
    chosen = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else "cpu" if device == "auto" else device
    )
    context = BuildContext(device=chosen)
    served = []
    for spec, component in resolved:
        package, version = _package_of(spec.name)
        served.append(
            ServedReward(
                name=spec.display_name,
                plugin=spec.name,
                component=component.cls(component.config, context),
                batch_size=int(getattr(component.config, "batch_size", None) or default_batch_size),
                options=component.config.model_dump(mode="json"),
                package=package,
                version=version,
            )
        )
    return served


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(args: argparse.Namespace) -> int:
    """Run the server until SIGTERM/SIGINT; returns the exit code."""
    token = os.environ.get(args.token_env) or None
    if token is None and not is_loopback(args.host):  # checked before anything heavy is imported
        raise UserError(
            f"refusing to serve on {args.host} without a bearer token: set {args.token_env} (or bind to 127.0.0.1)"
        )
    import uvicorn

    import dancecore
    from dancecore.serving.server import ServerLimits, build_app

    limits = ServerLimits(
        max_request_bytes=int(args.max_request_mb * 1024 * 1024),
        max_batch=args.max_batch,
        request_timeout_s=args.request_timeout,
        max_wait_s=args.max_wait_ms / 1000.0,
    )
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    rewards = build_served(reward_specs(args.config_or_spec), args.batch_size, args.device)
    sock = _bind(args.host, args.port)
    app = build_app(rewards, limits, token, dancecore.__version__)
    config = uvicorn.Config(
        app,
        log_level=args.log_level,
        timeout_graceful_shutdown=args.grace,
        access_log=args.log_level == "debug",
    )
    server = uvicorn.Server(config)

    def stop_early(signum: int, frame: Any) -> None:  # a signal before uvicorn installs its own handlers
        server.should_exit = True

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop_early)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    names = ", ".join(f"{r.name} ({r.plugin}, batch {r.batch_size})" for r in rewards)
    auth = "bearer token required" if token else "no token (loopback only)"
    print(f"serving rewards {names} on http://{shown}:{port} ({auth})", flush=True)
    server.run(sockets=[sock])
    busy = [t.name for t in threading.enumerate() if t is not threading.main_thread() and t.is_alive() and not t.daemon]
    print(
        "reward server stopped" + (f" (abandoning {len(busy)} reward call(s) still running)" if busy else ""),
        flush=True,
    )
    if busy:  # a hung reward call must not keep the process alive after SIGTERM
        sys.stderr.flush()
        os._exit(0)
    return 0


def add_command(sub: Any) -> None:
    """The ``serve-reward`` sub-command of the CLI."""
    cmd = sub.add_parser("serve-reward", help="serve installed reward plugins over HTTP (docs/serving.md)")
    cmd.add_argument("config_or_spec", help="YAML with a rewards: list, or reward plugin names (a,b)")
    cmd.add_argument("--host", default="127.0.0.1", help="address to bind (non-loopback needs a token)")
    cmd.add_argument("--port", type=int, default=8765, help="port (0: any free port, printed at start)")
    cmd.add_argument("--token-env", default=DEFAULT_TOKEN_ENV, help="environment variable holding the bearer token")
    cmd.add_argument(
        "--batch-size", type=int, default=32, help="samples per reward call, unless the reward sets batch_size"
    )
    cmd.add_argument("--max-batch", type=int, default=1024, help="most samples one request may carry")
    cmd.add_argument("--max-request-mb", type=float, default=256.0, help="largest request body, in MiB")
    cmd.add_argument("--request-timeout", type=float, default=300.0, help="seconds a request may wait for its scores")
    cmd.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a batch waits for more requests")
    cmd.add_argument("--grace", type=int, default=30, help="seconds requests in flight get at shutdown")
    cmd.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda[:N]'")
    cmd.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    cmd.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    cmd.set_defaults(func=serve)
