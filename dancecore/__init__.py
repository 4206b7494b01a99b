"""dancecore: GRPO fine-tuning of image and video generators from reward models (DanceGRPO).

This module is the public API for plugin authors: everything a policy, sampler, reward or algorithm
plugin needs is importable from ``dancecore`` itself (and test helpers from ``dancecore.testing``).
Names are re-exported lazily (PEP 562), so ``import dancecore`` imports neither torch nor pydantic;
the first access of a name imports the module that defines it. The core may reorganise its modules
freely; these names stay.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> the core module that defines it.
_EXPORTS: dict[str, str] = {
    # contracts
    "Policy": "dancecore.protocols",
    "Sampler": "dancecore.protocols",
    "Reward": "dancecore.protocols",
    "Optimizer": "dancecore.protocols",
    "BuildContext": "dancecore.protocols",
    # records that flow between components
    "Prompt": "dancecore.types",
    "PromptBatch": "dancecore.types",
    "Schedule": "dancecore.types",
    "StepResult": "dancecore.types",
    "Trajectory": "dancecore.types",
    "RewardScores": "dancecore.types",
    "LossOutput": "dancecore.types",
    "select_rows": "dancecore.types",
    # component configuration
    "ComponentConfig": "dancecore.config_base",
    "NetworkOptions": "dancecore.adapters",
    "LoraOptions": "dancecore.adapters",
    "DTYPES": "dancecore.adapters",
    "prepare_trainable": "dancecore.adapters",
    # weights and tiny presets
    "resolve_pretrained": "dancecore.hub",
    "plugin_weights": "dancecore.hub",
    "materialise": "dancecore.hub",
    "cache_root": "dancecore.hub",
    "write_tiny_tokenizer": "dancecore.hub",
    "TINY_TOKENIZER": "dancecore.hub",
    "TinyTokenizerIds": "dancecore.hub",
    # pixel checks for rewards
    "check_pixels": "dancecore.pixels",
    "flatten_frames": "dancecore.pixels",
    "finite_or_raise": "dancecore.pixels",
    "FlatFrames": "dancecore.pixels",
    # errors
    "DancecoreError": "dancecore.errors",
    "UserError": "dancecore.errors",
    "RunError": "dancecore.errors",
    "ConfigError": "dancecore.errors",
    "PluginError": "dancecore.errors",
    "PromptFileError": "dancecore.errors",
    "WeightsNotFoundError": "dancecore.errors",
    "OutputDirError": "dancecore.errors",
    "CheckpointError": "dancecore.errors",
    "TrainingError": "dancecore.errors",
    "RewardFailure": "dancecore.errors",
    # plugins that build other plugins (e.g. a reward wrapping another reward)
    "load_plugin": "dancecore.registry",
    # lifecycle hooks
    "hookimpl": "dancecore.hooks",
    # seeded generators (a policy or sampler that draws its own noise)
    "generator": "dancecore.seeding",
    "derive_seed": "dancecore.seeding",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dancecore' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # static checkers see the real names
    from dancecore.adapters import DTYPES, LoraOptions, NetworkOptions, prepare_trainable
    from dancecore.config_base import ComponentConfig
    from dancecore.errors import (
        CheckpointError,
        ConfigError,
        DancecoreError,
        OutputDirError,
        PluginError,
        PromptFileError,
        RewardFailure,
        RunError,
        TrainingError,
        UserError,
        WeightsNotFoundError,
    )
    from dancecore.hooks import hookimpl
    from dancecore.hub import (
        TINY_TOKENIZER,
        TinyTokenizerIds,
        cache_root,
        materialise,
        plugin_weights,
        resolve_pretrained,
        write_tiny_tokenizer,
    )
    from dancecore.pixels import FlatFrames, check_pixels, finite_or_raise, flatten_frames
    from dancecore.protocols import BuildContext, Optimizer, Policy, Reward, Sampler
    from dancecore.registry import load_plugin
    from dancecore.seeding import derive_seed, generator
    from dancecore.types import (
        LossOutput,
        Prompt,
        PromptBatch,
        RewardScores,
        Schedule,
        StepResult,
        Trajectory,
        select_rows,
    )
