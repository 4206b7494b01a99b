"""The public API: ``import dancecore`` (lazy re-exports) and ``dancecore.testing`` are all a plugin imports."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import dancecore

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = {"dancecore", "dancecore.testing"}


def _core_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of a ``dancecore`` module in a file; ``from dancecore import x``
    of a name that is not public counts as importing ``dancecore.x``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module == "dancecore" and node.level == 0:
            public = set(dancecore.__all__)
            modules = ["dancecore" if a.name in public else f"dancecore.{a.name}" for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules = [node.module]
        elif isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        else:
            continue
        found += [(node.lineno, m) for m in modules if m == "dancecore" or m.startswith("dancecore.")]
    return found


def _plugin_files() -> list[Path]:
    return sorted(p for top in ("plugins", "examples") for p in (ROOT / top).rglob("*.py"))


def test_plugins_and_examples_import_only_the_public_api() -> None:
    offending = [
        f"{path.relative_to(ROOT)}:{line}: imports {module}"
        for path in _plugin_files()
        for line, module in _core_imports(path)
        if module not in ALLOWED
    ]
    assert not offending, "plugins may import only `dancecore` and `dancecore.testing`:\n" + "\n".join(offending)


def test_the_check_itself_catches_a_private_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from dancecore.training.trainer import Trainer\nimport dancecore.functional.sde as s\n"
        "from dancecore import Policy\nfrom dancecore import registry\n"
    )
    assert [m for _, m in _core_imports(bad)] == [
        "dancecore.training.trainer",
        "dancecore.functional.sde",
        "dancecore",
        "dancecore.registry",
    ]


@pytest.mark.parametrize("name", sorted(dancecore._EXPORTS))
def test_every_public_name_resolves(name: str) -> None:
    value = getattr(dancecore, name)
    assert value is not None
    assert name in dir(dancecore)


def test_unknown_public_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'Polcy'"):
        dancecore.Polcy  # noqa: B018


def test_import_dancecore_is_cheap() -> None:
    code = "import sys, dancecore; print(sorted(m for m in ('torch', 'pydantic', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_no_core_module_over_500_lines_and_the_iteration_reads_as_a_short_loop() -> None:
    core = ROOT / "dancecore"
    long = {str(p.relative_to(ROOT)): n for p in core.rglob("*.py") if (n := len(p.read_text().splitlines())) > 500}
    assert not long, f"split these modules: {long}"
    iteration = (core / "training" / "iteration.py").read_text()
    assert len(iteration.splitlines()) <= 300
    phases = [line.strip() for line in iteration.splitlines() if line.strip()[:3] in {f"# {i}" for i in range(1, 10)}]
    assert [p.split(".")[0] for p in phases] == [f"# {i}" for i in range(1, 8)], phases


def test_architecture_doc_names_every_subpackage() -> None:
    doc = (ROOT / "docs" / "architecture.md").read_text()
    packages = sorted(p.parent.name for p in (ROOT / "dancecore").glob("*/__init__.py"))
    assert len(packages) >= 4
    missing = [name for name in packages if f"`{name}/`" not in doc]
    assert not missing, f"docs/architecture.md does not place {missing}"


#: package -> the dancecore packages/modules it may import (docs/architecture.md, "The tree").
ALLOWED_IMPORTS = {
    "errors": set(),
    "contracts": {"contracts"},
    "functional": {"functional", "contracts"},
    "plugin_kit": {"plugin_kit", "contracts", "errors"},
    "builtins": {"builtins", "functional", "contracts", "plugin_kit", "errors"},
    "checkpoint": {"checkpoint", "errors"},
    "outputs": {"outputs", "contracts", "errors"},
    "serving": {"serving", "contracts", "errors", "registry", "config", "dancecore"},
}


def test_subpackages_import_only_what_is_below_them() -> None:
    problems = []
    for package, allowed in ALLOWED_IMPORTS.items():
        base = ROOT / "dancecore" / package
        files = [base.with_suffix(".py")] if base.with_suffix(".py").is_file() else sorted(base.rglob("*.py"))
        for path in files:
            for line, module in _core_imports(path):
                top = module.split(".")[1] if module.count(".") else "dancecore"
                if top not in allowed:
                    problems.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not problems, "dependency order broken:\n" + "\n".join(problems)


def test_only_the_distributed_package_imports_deepspeed() -> None:
    offending = []
    for path in sorted((ROOT / "dancecore").rglob("*.py")):
        if "distributed" in path.parts:
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else ([node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            )
            offending += [f"{path.relative_to(ROOT)}:{node.lineno}" for n in names if n.split(".")[0] == "deepspeed"]
    assert not offending, offending
