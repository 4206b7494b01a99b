"""Activation memory of one network call, measured by running the real modules on the meta device.

A meta tensor has a shape, a dtype and a storage size but no data, so the policy's real network
(built on ``meta`` from its config) runs its real forward and backward at the run's real shapes in
a second or two, allocating nothing. :class:`LiveStorages` is a ``TorchDispatchMode`` that sees
every tensor each aten op returns: a storage seen for the first time counts its bytes as allocated
and a weakref finalizer takes them off when the storage dies, so ``live`` follows what a caching
allocator would be asked for (no fragmentation, no allocator rounding) and ``peak`` is its maximum.
Weights and buffers are registered up front and never counted. Gradients are taken off the count
as soon as they are accumulated (a post-accumulate-grad hook drops them), because ZeRO-2/3 hand
them to a bucket right away and the planner counts gradient memory with the model states.

Attention: on ``meta``, ``scaled_dot_product_attention`` falls back to the math path, which
materialises the L x L scores. GPUs run a fused kernel (flash or memory-efficient) that keeps
only the output and a fp32 log-sum-exp per query, so while measuring, the call is routed to
aten's fused CPU flash kernel, whose meta implementation has exactly those outputs.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary


class LiveStorages(TorchDispatchMode):
    """Counts the bytes of live tensor storages created inside the mode; see the module docstring."""

    def __init__(self, ignore: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        # storage -> [bytes still counted]; a finalizer takes them off when the storage dies
        self._seen: WeakIdKeyDictionary = WeakIdKeyDictionary()
        for tensor in ignore:
            self._seen[tensor.untyped_storage()] = [0]
        self.live = 0
        self.peak = 0

    def forget(self, tensor: torch.Tensor) -> None:
        """Take a live storage off the count (it is accounted for elsewhere, e.g. a gradient)."""
        cell = self._seen.get(tensor.untyped_storage())
        if cell is not None:
            self.live -= cell[0]
            cell[0] = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                if storage not in self._seen:
                    cell = [storage.nbytes()]
                    self._seen[storage] = cell
                    self.live += cell[0]
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, _release, weakref.ref(self), cell)
        return out


def _release(owner: weakref.ref, cell: list[int]) -> None:
    mode = owner()
    if mode is not None:
        mode.live -= cell[0]
        cell[0] = 0


@dataclass(frozen=True)
class ActivationFigures:
    """Measured bytes of one network call of ``rows`` samples (beyond weights and gradients).

    ``rollout_peak``: peak of the no-grad forward (sampling). ``saved``: what the forward leaves
    alive for backward (with gradient checkpointing: the checkpointed blocks' inputs).
    ``train_peak``: peak over forward and backward (saved activations plus one block's recompute
    and the backward's temporaries).
    """

    rows: int
    rollout_peak: int
    saved: int
    train_peak: int


def _fused_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """``scaled_dot_product_attention`` through the fused flash kernel (output + log-sum-exp)."""
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        # Same bytes as the kernels that take boolean masks would read: keep the mask as it is and
        # let the fused kernel see no mask (the mask changes no activation shape).
        attn_mask = None
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        repeat = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(repeat, -3), value.repeat_interleave(repeat, -3)
    out, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale
    )
    return out


@contextlib.contextmanager
def fused_attention() -> Iterator[None]:
    """Route ``F.scaled_dot_product_attention`` to the fused kernel while measuring (see module doc)."""
    functional = torch.nn.functional
    original = functional.scaled_dot_product_attention
    functional.scaled_dot_product_attention = _fused_attention  # type: ignore[assignment]
    try:
        yield
    finally:
        functional.scaled_dot_product_attention = original


def _drop_gradients(module: torch.nn.Module, tracker: LiveStorages) -> list[Any]:
    """Hooks that drop each gradient once accumulated (and take it off the count)."""

    def drop(param: torch.Tensor) -> None:
        if param.grad is not None:
            tracker.forget(param.grad)
            param.grad = None

    return [p.register_post_accumulate_grad_hook(drop) for p in module.parameters() if p.requires_grad]


def measure_call(
    module: torch.nn.Module, call: Callable[[torch.nn.Module, int], torch.Tensor], rows: int
) -> ActivationFigures:
    """Measure one call of ``rows`` samples: the no-grad forward, then forward + backward.

    ``module`` must be on the meta device (its dtype is the training dtype); the loss is the
    mean of the fp32 prediction, so the backward's inputs are as in training.
    """
    resident = [*module.parameters(), *module.buffers()]
    with fused_attention():
        with torch.no_grad(), LiveStorages(resident) as tracker:
            out = call(module, rows)
            del out
        rollout_peak = tracker.peak
        with LiveStorages(resident) as tracker:
            hooks = _drop_gradients(module, tracker)
            try:
                out = call(module, rows)
                saved = tracker.live - out.untyped_storage().nbytes()
                out.float().square().mean().backward()
                del out
            finally:
                for hook in hooks:
                    hook.remove()
        train_peak = tracker.peak
    for param in module.parameters():
        param.grad = None
    return ActivationFigures(rows=rows, rollout_peak=rollout_peak, saved=saved, train_peak=train_peak)
