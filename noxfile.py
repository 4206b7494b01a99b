"""Test matrix: the core plus one session per plugin package under plugins/.

Sessions reuse the project's one virtual environment (``make test`` builds it) instead of
installing torch once per session: ``venv_backend="none"`` runs them with nox's own interpreter.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nox

ROOT = Path(__file__).parent
nox.options.default_venv_backend = "none"
nox.options.reuse_existing_virtualenvs = True


@nox.session(venv_backend="none")
def core(session: nox.Session) -> None:
    """The core: math, config, registry, trainer, CLI, docs freshness, fault injection."""
    session.run(sys.executable, "-m", "pytest", "tests", "-q", "-m", "not gpu", *session.posargs)


@nox.session(venv_backend="none", default=False)
def gpu(session: nox.Session) -> None:
    """make gpu-check: real-size networks on one GPU, then the tests marked gpu (not in the default run).

    Writes the table to benchmarks/results/gpu-<device>.json; without CUDA it runs the tiny CPU path
    and says so (CI runs that path in the core session, tests/test_gpu_check.py)."""
    session.run(sys.executable, "-m", "benchmarks.gpu", *session.posargs)
    session.run(sys.executable, "-m", "pytest", "tests", "-q", "-m", "gpu", "-rs")


@nox.session(venv_backend="none")
def lint(session: nox.Session) -> None:
    """ruff (lint and format) over the whole tree and mypy over the core."""
    tree = ("dancecore", "tests", "plugins", "benchmarks", "examples", "noxfile.py")
    session.run(sys.executable, "-m", "ruff", "check", *tree)
    session.run(sys.executable, "-m", "ruff", "format", "--check", *tree)
    session.run(sys.executable, "-m", "mypy")


def _plugin_session(plugin: Path) -> None:
    def run(session: nox.Session) -> None:
        session.run(
            sys.executable, "-m", "pytest", str(plugin / "tests"), "-q", "-p", "no:cacheprovider", *session.posargs
        )

    run.__doc__ = f"Tests of the {plugin.name} plugin."
    nox.session(name=plugin.name.removeprefix("dancecore-"), venv_backend="none")(run)


for _plugin in sorted(p for p in (ROOT / "plugins").iterdir() if (p / "tests").is_dir()):
    _plugin_session(_plugin)
