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
    "Policy": "dancecore.contracts.protocols",
    "Sampler": "dancecore.contracts.protocols",
    "Reward": "dancecore.contracts.protocols",
    "Algorithm": "dancecore.contracts.protocols",
    "StatefulAlgorithm": "dancecore.contracts.protocols",
    "TrainingServices": "dancecore.contracts.protocols",
    "WindowedSampler": "dancecore.contracts.protocols",
    "ExportablePolicy": "dancecore.contracts.protocols",
    "PlannablePolicy": "dancecore.contracts.protocols",
    "PlannableReward": "dancecore.contracts.protocols",
    "SummarizingReward": "dancecore.contracts.protocols",
    "Optimizer": "dancecore.contracts.protocols",
    "BuildContext": "dancecore.contracts.protocols",
    "SequenceParallelGroup": "dancecore.contracts.protocols",
    # records that flow between components
    "Prompt": "dancecore.contracts.records",
    "PromptBatch": "dancecore.contracts.records",
    "Schedule": "dancecore.contracts.records",
    "StepResult": "dancecore.contracts.records",
    "Trajectory": "dancecore.contracts.records",
    "Rollout": "dancecore.contracts.records",
    "Transitions": "dancecore.contracts.records",
    "RewardScores": "dancecore.contracts.records",
    "LossOutput": "dancecore.contracts.records",
    "select_rows": "dancecore.contracts.records",
    "DiffusersExport": "dancecore.contracts.records",
    "MemoryPlanSpec": "dancecore.contracts.records",
    # component configuration
    "ComponentConfig": "dancecore.contracts.component",
    "NetworkOptions": "dancecore.plugin_kit.network",
    "LoraOptions": "dancecore.plugin_kit.network",
    "DTYPES": "dancecore.plugin_kit.network",
    "prepare_trainable": "dancecore.plugin_kit.network",
    # export to diffusers
    "flow_match_scheduler": "dancecore.plugin_kit.export",
    # dancecore plan: architecture configs and meta modules
    "architecture_configs": "dancecore.plugin_kit.planning",
    "on_meta": "dancecore.plugin_kit.planning",
    "config_kwargs": "dancecore.plugin_kit.planning",
    # attention kernels
    "ATTENTION_BACKENDS": "dancecore.plugin_kit.attention",
    "apply_attention_backend": "dancecore.plugin_kit.attention",
    "attention_backend_of": "dancecore.plugin_kit.attention",
    "attention_backend_problem": "dancecore.plugin_kit.attention",
    "encoder_attention": "dancecore.plugin_kit.attention",
    # sequence parallelism (distributed.sequence_parallel)
    "sequence_parallel_active": "dancecore.plugin_kit.sequence_parallel",
    "sequence_parallel_problems": "dancecore.plugin_kit.sequence_parallel",
    "split_tokens": "dancecore.plugin_kit.sequence_parallel",
    "gather_tokens": "dancecore.plugin_kit.sequence_parallel",
    "tokens_to_heads": "dancecore.plugin_kit.sequence_parallel",
    "heads_to_tokens": "dancecore.plugin_kit.sequence_parallel",
    "split_output_hook": "dancecore.plugin_kit.sequence_parallel",
    "gather_output_hook": "dancecore.plugin_kit.sequence_parallel",
    # weights and tiny presets
    "resolve_pretrained": "dancecore.plugin_kit.weights",
    "plugin_weights": "dancecore.plugin_kit.weights",
    "materialise": "dancecore.plugin_kit.weights",
    "cache_root": "dancecore.plugin_kit.weights",
    "write_tiny_tokenizer": "dancecore.plugin_kit.weights",
    "TINY_TOKENIZER": "dancecore.plugin_kit.weights",
    "TinyTokenizerIds": "dancecore.plugin_kit.weights",
    # pixel checks for rewards
    "check_pixels": "dancecore.plugin_kit.pixels",
    "flatten_frames": "dancecore.plugin_kit.pixels",
    "relative_position": "dancecore.plugin_kit.relations",
    "check_one_weights_source": "dancecore.plugin_kit.validation",
    "check_multiple": "dancecore.plugin_kit.validation",
    "check_frame_count": "dancecore.plugin_kit.validation",
    "finite_or_raise": "dancecore.plugin_kit.pixels",
    "FlatFrames": "dancecore.plugin_kit.pixels",
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
    "generator": "dancecore.functional.seeding",
    "derive_seed": "dancecore.functional.seeding",
}

__all__ = ["__version__", *_EXPORTS]

from dancecore import _compat  # noqa: E402  (old module paths as aliases, for one release)

_compat.install()


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
    from dancecore.contracts.component import ComponentConfig
    from dancecore.contracts.protocols import (
        Algorithm,
        BuildContext,
        ExportablePolicy,
        Optimizer,
        PlannablePolicy,
        PlannableReward,
        Policy,
        Reward,
        Sampler,
        SequenceParallelGroup,
        StatefulAlgorithm,
        SummarizingReward,
        TrainingServices,
        WindowedSampler,
    )
    from dancecore.contracts.records import (
        DiffusersExport,
        LossOutput,
        MemoryPlanSpec,
        Prompt,
        PromptBatch,
        RewardScores,
        Rollout,
        Schedule,
        StepResult,
        Trajectory,
        Transitions,
        select_rows,
    )
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
    from dancecore.functional.seeding import derive_seed, generator
    from dancecore.hooks import hookimpl
    from dancecore.plugin_kit.attention import (
        ATTENTION_BACKENDS,
        apply_attention_backend,
        attention_backend_of,
        attention_backend_problem,
        encoder_attention,
    )
    from dancecore.plugin_kit.export import flow_match_scheduler
    from dancecore.plugin_kit.network import DTYPES, LoraOptions, NetworkOptions, prepare_trainable
    from dancecore.plugin_kit.pixels import FlatFrames, check_pixels, finite_or_raise, flatten_frames
    from dancecore.plugin_kit.planning import architecture_configs, config_kwargs, on_meta
    from dancecore.plugin_kit.relations import relative_position
    from dancecore.plugin_kit.sequence_parallel import (
        gather_output_hook,
        gather_tokens,
        heads_to_tokens,
        sequence_parallel_active,
        sequence_parallel_problems,
        split_output_hook,
        split_tokens,
        tokens_to_heads,
    )
    from dancecore.plugin_kit.validation import check_frame_count, check_multiple, check_one_weights_source
    from dancecore.plugin_kit.weights import (
        TINY_TOKENIZER,
        TinyTokenizerIds,
        cache_root,
        materialise,
        plugin_weights,
        resolve_pretrained,
        write_tiny_tokenizer,
    )
    from dancecore.registry import load_plugin
