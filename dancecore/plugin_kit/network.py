"""Options shared by policy plugins: LoRA adapters, gradient checkpointing, weight dtypes, the
attention kernel (:mod:`dancecore.plugin_kit.attention`).

peft is imported only when LoRA is switched on.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field, field_validator

from dancecore.contracts.component import ComponentConfig
from dancecore.plugin_kit.attention import (
    ATTENTION_BACKENDS,
    AttentionBackend,
    apply_attention_backend,
    attention_backend_problem,
)

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class LoraOptions(ComponentConfig):
    """A LoRA adapter on the trained network (full fine-tuning when absent)."""

    rank: int = Field(32, ge=1)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"], description="Module names to adapt."
    )


class NetworkOptions(ComponentConfig):
    """Training-related options every policy accepts."""

    lora: LoraOptions | None = Field(None, description="Train a LoRA adapter instead of all weights.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    frozen_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype of the frozen parts (VAE, text encoders)."
    )
    attention_backend: AttentionBackend = Field(
        "sdpa",
        description="Attention kernel of the trained network (and, for 'native', the text encoders): 'sdpa' "
        "(torch's fused kernels), 'native' (the math reference), 'xformers' or 'flash' (CUDA only; "
        "pip install 'dancecore[xformers]' / 'dancecore[flash]'). Rollout and training use the same one.",
    )

    #: The backends the policy's networks offer; a policy narrows it (e.g. no 'flash' with masked attention).
    attention_backends: ClassVar[tuple[str, ...]] = ATTENTION_BACKENDS

    @field_validator("attention_backend")
    @classmethod
    def _attention_backend_runs_here(cls, value: str) -> str:
        problem = attention_backend_problem(value, cls.attention_backends)
        if problem:
            raise ValueError(problem)
        return value


def prepare_trainable(module: torch.nn.Module, options: NetworkOptions) -> torch.nn.Module:
    """Switch on the attention backend, gradient checkpointing and LoRA as configured; return the
    (same) module.

    With LoRA only the adapter weights require grad; otherwise every weight does.
    """
    apply_attention_backend(module, options.attention_backend)
    if options.gradient_checkpointing:
        module.enable_gradient_checkpointing()  # type: ignore[operator]  # diffusers ModelMixin
    if options.lora is None:
        module.requires_grad_(True)
        return module
    from peft import LoraConfig

    module.requires_grad_(False)
    module.add_adapter(  # type: ignore[operator]  # diffusers' PeftAdapterMixin
        LoraConfig(
            r=options.lora.rank,
            lora_alpha=options.lora.alpha,  # type: ignore[arg-type]  # peft accepts floats
            lora_dropout=options.lora.dropout,
            target_modules=list(options.lora.target_modules),
            init_lora_weights="gaussian",
        )
    )
    return module
