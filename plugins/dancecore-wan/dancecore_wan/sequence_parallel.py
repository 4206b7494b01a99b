"""Sequence parallelism (DeepSpeed-Ulysses) for diffusers' ``WanTransformer3DModel``, without
changing the model's code.

Hooks split the video tokens where the first block receives them (and the rotary table with them)
and gather them after the output projection. Only self-attention needs the other ranks' tokens:
it gets :class:`UlyssesWanSelfAttnProcessor` (all-to-all to the whole sequence for 1/N of the
heads, attention, all-to-all back). Cross-attention is left as it is: each query attends to the
whole text, which every rank holds. Gradients follow :mod:`dancecore.plugin_kit.sequence_parallel`.
"""

from __future__ import annotations

from typing import Any

import torch

from dancecore import (
    ConfigError,
    SequenceParallelGroup,
    gather_output_hook,
    heads_to_tokens,
    sequence_parallel_problems,
    split_output_hook,
    split_tokens,
    tokens_to_heads,
)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding on interleaved (even, odd) channel pairs: (a, b) -> (a c - b s, a s + b c)."""
    even, odd = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    return torch.stack([even * c - odd * s, even * s + odd * c], dim=-1).flatten(-2).type_as(x)


class UlyssesWanSelfAttnProcessor:
    """Wan's self-attention with this rank's 1/N of the tokens, through diffusers' dispatcher with the
    kernel of the processor it replaces (``policy.attention_backend``)."""

    _parallel_config = None

    def __init__(self, sp: SequenceParallelGroup, backend: Any = None) -> None:
        self.sp = sp
        self._attention_backend = backend

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("the sequence-parallel Wan processor is for (unmasked) self-attention only")
        if attn.fused_projections:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query, key = attn.norm_q(query), attn.norm_k(key)  # across heads, per token
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
        if rotary_emb is not None:
            query, key = _rotate(query, *rotary_emb), _rotate(key, *rotary_emb)
        query, key, value = (tokens_to_heads(t, self.sp) for t in (query, key, value))
        out = dispatch_attention_fn(
            query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, backend=self._attention_backend
        )
        out = heads_to_tokens(out, self.sp).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))  # type: ignore[no-any-return]


def _split_first_argument(sp: SequenceParallelGroup) -> Any:
    def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (split_tokens(args[0], sp, dim=1), *args[1:])

    return hook


def enable_sequence_parallel(
    module: torch.nn.Module, sp: SequenceParallelGroup, latent_shape: tuple[int, int, int, int]
) -> None:
    """Split ``module`` (a ``WanTransformer3DModel``) over ``sp`` for latents (C, F', H', W').
    Raises :class:`~dancecore.ConfigError` naming ``distributed.sequence_parallel`` when the heads
    or the video tokens do not divide."""
    config = module.config  # type: ignore[attr-defined]
    _, frames, height, width = latent_shape
    p_t, p_h, p_w = config.patch_size
    tokens = (frames // p_t) * (height // p_h) * (width // p_w)
    problems = sequence_parallel_problems(sp.size, "Wan2.1", heads=config.num_attention_heads, tokens=tokens)
    if config.image_dim is not None or config.added_kv_proj_dim is not None:
        problems.append("distributed.sequence_parallel: the image-conditioned Wan variants are not split")
    if problems:
        raise ConfigError(problems)
    blocks = module.blocks  # type: ignore[union-attr]
    for block in blocks:
        backend = block.attn1.processor._attention_backend
        block.attn1.set_processor(UlyssesWanSelfAttnProcessor(sp, backend))
    blocks[0].register_forward_pre_hook(_split_first_argument(sp))
    module.rope.register_forward_hook(split_output_hook(sp, dim=1))  # type: ignore[union-attr]  # (1, S, 1, D) x 2
    module.proj_out.register_forward_hook(gather_output_hook(sp, dim=1))  # type: ignore[union-attr]
