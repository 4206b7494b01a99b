"""Sequence parallelism (DeepSpeed-Ulysses) for diffusers' ``HunyuanVideoTransformer3DModel``,
without changing the model's code: forward hooks split the video tokens after the patch embedding
(and the rotary table with them) and gather them after the output projection, and every attention
layer of the dual- and single-stream blocks gets :class:`UlyssesHunyuanVideoAttnProcessor`.

The text tokens stay whole on every rank (they are few: 256 against 6,000-80,000 video tokens, and
the token refiner masks them). In attention each rank sends its video tokens' queries, keys and
values to the others by heads (all-to-all), takes its own heads of the text's, attends over the
whole joint sequence [video; text] with the text mask, and sends the video result back by tokens;
the text result is gathered over heads. Every step has an exact inverse for the backward pass
(see :mod:`dancecore.plugin_kit.sequence_parallel`), so gradients equal one rank's.
"""

from __future__ import annotations

from typing import Any

import torch

from dancecore import (
    ConfigError,
    SequenceParallelGroup,
    gather_output_hook,
    gather_tokens,
    heads_to_tokens,
    sequence_parallel_problems,
    split_output_hook,
    split_tokens,
    tokens_to_heads,
)


class UlyssesHunyuanVideoAttnProcessor:
    """HunyuanVideo's joint attention with this rank's 1/N of the video tokens (see the module doc).

    Runs the attention kernel the layer's processor ran (``_attention_backend``, set by
    ``policy.attention_backend``) through diffusers' dispatcher.
    """

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
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.embeddings import apply_rotary_emb

        if encoder_hidden_states is None:
            raise ValueError("sequence-parallel HunyuanVideo attention expects the text tokens")
        sp, text_len = self.sp, encoder_hidden_states.shape[1]
        video, text = _project(attn, hidden_states, encoder_hidden_states)  # each (q, k, v) of (B, L, H, D)
        if image_rotary_emb is not None:  # this rank's rows of the table (split with the tokens)
            video = (
                apply_rotary_emb(video[0], image_rotary_emb, sequence_dim=1),
                apply_rotary_emb(video[1], image_rotary_emb, sequence_dim=1),
                video[2],
            )
        # (B, S/N, H, D) -> (B, S, H/N, D) for the video; this rank's heads of the (whole) text
        query, key, value = (
            torch.cat([tokens_to_heads(v, sp), split_tokens(t, sp, dim=2)], dim=1)
            for v, t in zip(video, text, strict=True)
        )
        video_len = query.shape[1] - text_len
        mask = None
        if attention_mask is not None:  # (B, 1, 1, S/N + T) built for the local tokens: rebuild for S
            text_mask = attention_mask[..., -text_len:]
            mask = torch.cat([text_mask.new_ones((*text_mask.shape[:-1], video_len)), text_mask], dim=-1)
        out = dispatch_attention_fn(
            query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False, backend=self._attention_backend
        )
        video_out = heads_to_tokens(out[:, :video_len], sp).flatten(2, 3).to(query.dtype)
        text_out = gather_tokens(out[:, video_len:], sp, dim=2).flatten(2, 3).to(query.dtype)
        if getattr(attn, "to_out", None) is not None:
            video_out = attn.to_out[1](attn.to_out[0](video_out))
        if getattr(attn, "to_add_out", None) is not None:
            text_out = attn.to_add_out(text_out)
        return video_out, text_out


def _project(attn: Any, hidden_states: torch.Tensor, text: torch.Tensor) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """Queries, keys and values (B, L, H, D), normalised, of the video and of the text tokens:
    through the added projections (dual-stream blocks) or the shared ones (single-stream)."""

    def heads(x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(2, (attn.heads, -1))

    def qkv(x: torch.Tensor, q: Any, k: Any, v: Any, norm_q: Any, norm_k: Any) -> tuple[torch.Tensor, ...]:
        query, key, value = heads(q(x)), heads(k(x)), heads(v(x))
        return (norm_q(query) if norm_q is not None else query, norm_k(key) if norm_k is not None else key, value)

    if attn.add_q_proj is None:  # single-stream: one projection of [video; text], split after it
        joint = qkv(torch.cat([hidden_states, text], dim=1), attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k)
        length = text.shape[1]
        return tuple(t[:, :-length] for t in joint), tuple(t[:, -length:] for t in joint)
    video = qkv(hidden_states, attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k)
    words = qkv(text, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj, attn.norm_added_q, attn.norm_added_k)
    return video, words


def enable_sequence_parallel(
    module: torch.nn.Module, sp: SequenceParallelGroup, latent_shape: tuple[int, int, int, int], what: str
) -> None:
    """Split ``module`` (a ``HunyuanVideoTransformer3DModel``) over ``sp`` for latents of
    ``latent_shape`` (C, F', H', W'). Raises :class:`~dancecore.ConfigError` naming
    ``distributed.sequence_parallel`` when the heads or the video tokens do not divide."""
    from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0

    config = module.config  # type: ignore[attr-defined]
    _, frames, height, width = latent_shape
    tokens = (frames // config.patch_size_t) * (height // config.patch_size) * (width // config.patch_size)
    problems = sequence_parallel_problems(sp.size, what, heads=config.num_attention_heads, tokens=tokens)
    if config.image_condition_type == "token_replace":
        problems.append(f"distributed.sequence_parallel: {what} replaces first-frame tokens, which is not split")
    if problems:
        raise ConfigError(problems)
    for layer in module.modules():
        processor = getattr(layer, "processor", None)
        if isinstance(processor, HunyuanVideoAttnProcessor2_0):
            layer.set_processor(UlyssesHunyuanVideoAttnProcessor(sp, processor._attention_backend))  # type: ignore[operator]
    module.x_embedder.register_forward_hook(split_output_hook(sp, dim=1))  # type: ignore[union-attr]
    module.rope.register_forward_hook(split_output_hook(sp, dim=0))  # type: ignore[union-attr]  # (S, D/2) x 2
    module.proj_out.register_forward_hook(gather_output_hook(sp, dim=1))  # type: ignore[union-attr]
