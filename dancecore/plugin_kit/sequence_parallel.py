"""Sequence parallelism (DeepSpeed-Ulysses): the collectives a policy's attention processors and
hooks use to split one sample's tokens over the ranks of a :class:`~dancecore.SequenceParallelGroup`.

Each rank of a group of N holds a contiguous 1/N of the video tokens and every head; before
attention an all-to-all gives it the whole sequence for 1/N of the heads, and after attention the
inverse all-to-all gives the tokens back. Tokens that every rank holds in full (the text of
HunyuanVideo, the conditioning) are *replicated*.

Gradients follow one rule: a replicated tensor's gradient on each rank is a *share*, and the
shares of a group sum to the true gradient; a split tensor's gradient is its part's. So

- :func:`split_tokens` (replicated -> this rank's part) backpropagates the part's gradient padded
  with zeros (no communication);
- :func:`gather_tokens` (parts -> replicated) backpropagates the group's sum of the shares,
  restricted to this rank's part (an all-reduce);
- :func:`tokens_to_heads` / :func:`heads_to_tokens` are all-to-alls whose backward is the inverse
  all-to-all.

Parameter gradients are then shares too: the group sums to N times the gradient of the loss that
every rank of the group computes identically. DeepSpeed averages gradients over *all* ranks, so
with G groups the result is (1 / (N G)) * N * (sum over groups) = the mean over groups, which is
what a run with G ranks and no sequence parallelism computes: the loss needs no rescaling.
"""

from __future__ import annotations

from typing import Any

import torch

from dancecore.contracts.protocols import SequenceParallelGroup

#: The config key every sequence-parallel error names.
KEY = "distributed.sequence_parallel"


def sequence_parallel_active(sp: SequenceParallelGroup | None) -> bool:
    """Whether ``sp`` splits anything (a group of more than one rank)."""
    return sp is not None and sp.size > 1


def sequence_parallel_problems(sp_size: int, what: str, *, heads: int, tokens: int) -> list[str]:
    """Messages (naming ``distributed.sequence_parallel``) when ``heads`` attention heads or a
    sequence of ``tokens`` tokens cannot be split over ``sp_size`` ranks; empty when they can."""
    problems = []
    if heads % sp_size:
        problems.append(
            f"{KEY}: {sp_size} does not divide the {heads} attention heads of {what} "
            "(each rank computes attention for heads / N heads)"
        )
    if tokens % sp_size:
        problems.append(
            f"{KEY}: {sp_size} does not divide the {tokens} video tokens of {what} at this size "
            "(change height, width or num_frames, or the degree)"
        )
    return problems


def _all_to_all(x: torch.Tensor, sp: SequenceParallelGroup, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Send the i-th of ``sp.size`` chunks of ``x`` along ``scatter_dim`` to rank i of the group;
    concatenate what arrives, in rank order, along ``gather_dim``."""
    send = torch.stack(x.chunk(sp.size, dim=scatter_dim)).contiguous()
    received = torch.empty_like(send)
    torch.distributed.all_to_all_single(received, send, group=sp.group)
    return torch.cat(received.unbind(0), dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, sp: SequenceParallelGroup, scatter_dim: int, gather_dim: int) -> Any:
        ctx.sp, ctx.dims = sp, (scatter_dim, gather_dim)
        return _all_to_all(x, sp, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        scatter_dim, gather_dim = ctx.dims
        return _all_to_all(grad.contiguous(), ctx.sp, gather_dim, scatter_dim), None, None, None


class _Split(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, sp: SequenceParallelGroup, dim: int) -> Any:
        ctx.sp, ctx.dim, ctx.size = sp, dim, x.shape[dim]
        return x.chunk(sp.size, dim=dim)[sp.rank].contiguous()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        shape = list(grad.shape)
        shape[ctx.dim] = ctx.size
        full = grad.new_zeros(shape)
        full.narrow(ctx.dim, ctx.sp.rank * grad.shape[ctx.dim], grad.shape[ctx.dim]).copy_(grad)
        return full, None, None


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, sp: SequenceParallelGroup, dim: int) -> Any:
        ctx.sp, ctx.dim = sp, dim
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(sp.size)]
        torch.distributed.all_gather(parts, x, group=sp.group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        total = grad.contiguous().clone()
        torch.distributed.all_reduce(total, group=ctx.sp.group)
        return total.chunk(ctx.sp.size, dim=ctx.dim)[ctx.sp.rank].contiguous(), None, None


def split_tokens(x: torch.Tensor, sp: SequenceParallelGroup, dim: int = 1) -> torch.Tensor:
    """This rank's contiguous 1/N of a replicated ``x`` along ``dim`` (the size must divide)."""
    if x.shape[dim] % sp.size:
        raise ValueError(f"{KEY}: {sp.size} ranks cannot split {x.shape[dim]} entries of dim {dim}")
    if not torch.is_grad_enabled() or not x.requires_grad:  # the same values as _Split's forward
        return x.chunk(sp.size, dim=dim)[sp.rank].contiguous()
    out: torch.Tensor = _Split.apply(x, sp, dim)
    return out


def gather_tokens(x: torch.Tensor, sp: SequenceParallelGroup, dim: int = 1) -> torch.Tensor:
    """The parts of the group concatenated in rank order along ``dim`` (replicated result)."""
    out: torch.Tensor = _Gather.apply(x, sp, dim)
    return out


def tokens_to_heads(x: torch.Tensor, sp: SequenceParallelGroup) -> torch.Tensor:
    """(B, S / N, H, D) -> (B, S, H / N, D): the whole sequence for this rank's heads."""
    out: torch.Tensor = _AllToAll.apply(x, sp, 2, 1)
    return out


def heads_to_tokens(x: torch.Tensor, sp: SequenceParallelGroup) -> torch.Tensor:
    """(B, S, H / N, D) -> (B, S / N, H, D): the inverse of :func:`tokens_to_heads`."""
    out: torch.Tensor = _AllToAll.apply(x, sp, 1, 2)
    return out


def split_output_hook(sp: SequenceParallelGroup, dim: int = 1) -> Any:
    """A forward hook that replaces a module's output (a tensor, or a tuple of tensors) by this
    rank's part along ``dim``: registered on the layer after which the tokens are split."""

    def hook(module: torch.nn.Module, args: Any, output: Any) -> Any:
        if isinstance(output, tuple):
            return tuple(split_tokens(t, sp, dim) for t in output)
        return split_tokens(output, sp, dim)

    return hook


def gather_output_hook(sp: SequenceParallelGroup, dim: int = 1) -> Any:
    """A forward hook that replaces a module's output by the group's gathered sequence."""

    def hook(module: torch.nn.Module, args: Any, output: Any) -> Any:
        return gather_tokens(output, sp, dim)

    return hook
