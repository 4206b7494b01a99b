"""Old flat module paths (``dancecore.trainer``, ``dancecore.types``, ...) keep importing, for one
release, as aliases of their new homes in the subpackages; each use warns (DeprecationWarning).

Installed by :mod:`dancecore` on import; it imports nothing until an old path is asked for.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType

#: old module -> new module.
MOVED: dict[str, str] = {
    "dancecore.protocols": "dancecore.contracts.protocols",
    "dancecore.types": "dancecore.contracts.records",
    "dancecore.config_base": "dancecore.contracts.component",
    "dancecore.sde": "dancecore.functional.sde",
    "dancecore.grpo": "dancecore.functional.grpo",
    "dancecore.seeding": "dancecore.functional.seeding",
    "dancecore.adapters": "dancecore.plugin_kit.network",
    "dancecore.hub": "dancecore.plugin_kit.weights",
    "dancecore.pixels": "dancecore.plugin_kit.pixels",
    "dancecore.docgen": "dancecore.config.docgen",
    "dancecore.trainer": "dancecore.training.trainer",
    "dancecore.engine": "dancecore.training.engine",
    "dancecore.scoring": "dancecore.training.scoring",
    "dancecore.prompts": "dancecore.training.prompts",
    "dancecore.lr_schedule": "dancecore.training.lr_schedule",
    "dancecore.launch": "dancecore.distributed.launch",
    "dancecore.observability": "dancecore.outputs.observers",
    "dancecore.video": "dancecore.outputs.video",
    "dancecore.report": "dancecore.outputs.report",
    "dancecore.builtins.grpo": "dancecore.builtins.algorithms",
}


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        warnings.warn(
            f"{spec.name} moved to {self.target}; plugins should import from `dancecore` itself",
            DeprecationWarning,
            stacklevel=2,
        )
        return importlib.import_module(self.target)

    def exec_module(self, module: ModuleType) -> None:
        """The target module is already executed."""


class _MovedModules(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        new = MOVED.get(fullname)
        return importlib.util.spec_from_loader(fullname, _AliasLoader(new)) if new else None


def install() -> None:
    """Put the alias finder on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
        sys.meta_path.append(_MovedModules())
