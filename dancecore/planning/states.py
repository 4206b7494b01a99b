"""Bytes per GPU of the model states (weights, gradients, AdamW) under each ZeRO stage and offload.

The accounting follows DeepSpeed's bf16 mixed precision as dancecore configures it
(docs/distributed.md, "The DeepSpeed config"): per trained parameter, bf16 weights (2 B), bf16
gradients (2 B; stage 1's bf16 optimizer accumulates them in fp32, 4 B) and fp32 optimizer states:
master weights, first and second moments (12 B). Stage 1 partitions the optimizer states over the
N ranks, stage 2 also the gradients, stage 3 also the weights. Optimizer offload moves the states
and the partition's fp32 gradients to CPU memory; parameter offload (stage 3) the weights'
partitions too. Without mixed precision the weights and gradients are fp32 and AdamW keeps two
fp32 moments (no master copy). A single process without DeepSpeed (``distributed.backend: none``)
keeps everything whole, in the module's dtype; under bf16 autocast it also caches a bf16 copy of
the weights used in a call.

Weights that are not trained (the base of a LoRA run) carry no gradient or optimizer state; ZeRO-3
partitions them with the rest, the other stages keep them whole.
"""

from __future__ import annotations

from dataclasses import dataclass

#: DeepSpeed's defaults: ZeRO-3 keeps at most this many gathered parameters live ...
STAGE3_MAX_LIVE_PARAMETERS = 1_000_000_000
#: ... and prefetches this many; gradients are reduced in buckets of this many elements.
STAGE3_PREFETCH = 50_000_000
REDUCE_BUCKET = 500_000_000


@dataclass(frozen=True)
class Setting:
    """One engine setting: ZeRO stage (None: one process, no DeepSpeed) and what is offloaded."""

    zero_stage: int | None
    offload_optimizer: bool = False
    offload_params: bool = False

    @property
    def label(self) -> str:
        """How the table names it, e.g. ``ZeRO-3 + opt offload``."""
        if self.zero_stage is None:
            return "one process (no DeepSpeed)"
        extra = " + opt+param offload" if self.offload_params else " + opt offload" if self.offload_optimizer else ""
        return f"ZeRO-{self.zero_stage}{extra}"


#: The settings ``plan`` compares, cheapest first: lower stages communicate less, and offload
#: costs PCIe traffic and CPU time on every step.
SETTINGS: tuple[Setting, ...] = (
    Setting(0),
    Setting(1),
    Setting(2),
    Setting(3),
    Setting(1, offload_optimizer=True),
    Setting(2, offload_optimizer=True),
    Setting(3, offload_optimizer=True),
    Setting(3, offload_optimizer=True, offload_params=True),
)


@dataclass(frozen=True)
class ModelStates:
    """Per-GPU bytes of the trained network's states, and the CPU bytes per rank of offload."""

    weights: int
    gradients: int
    optimizer: int
    buffers: int  # ZeRO's gathered-parameter and reduce buckets
    cpu: int

    @property
    def total(self) -> int:
        """GPU bytes."""
        return self.weights + self.gradients + self.optimizer + self.buffers


def model_states(trained: int, frozen_base: int, setting: Setting, gpus: int, bf16: bool) -> ModelStates:
    """States of a network with ``trained`` trained and ``frozen_base`` untrained parameters
    (the LoRA base), under ``setting`` on ``gpus`` ranks (see the module docstring)."""
    n = max(1, gpus)
    weight_bytes = 2 if bf16 else 4
    if setting.zero_stage is None:
        autocast_cache = 2 * (trained + frozen_base) if bf16 else 0
        return ModelStates(
            weights=4 * (trained + frozen_base) + autocast_cache, gradients=4 * trained,
            optimizer=8 * trained, buffers=0, cpu=0,
        )  # fmt: skip
    stage = setting.zero_stage
    all_weights = weight_bytes * (trained + frozen_base)
    optimizer_bytes = (12 if bf16 else 8) * trained
    if stage >= 3:
        weights = 0 if setting.offload_params else all_weights // n
    else:
        weights = all_weights
    grad_bytes = 4 if (stage == 1 and bf16) or not bf16 else 2
    gradients = grad_bytes * trained // (n if stage >= 2 else 1)
    optimizer = optimizer_bytes // (n if stage >= 1 else 1)
    cpu = 0
    if setting.offload_optimizer:
        cpu = optimizer + 4 * trained // n  # the states and the partition's fp32 gradients
        optimizer = 0
    if setting.offload_params:
        cpu += all_weights // n
    buffers = 0
    if stage >= 2:
        buffers += weight_bytes * min(REDUCE_BUCKET, trained)
    if stage == 3:
        buffers += weight_bytes * min(STAGE3_MAX_LIVE_PARAMETERS + STAGE3_PREFETCH, trained + frozen_base)
    return ModelStates(weights=weights, gradients=gradients, optimizer=optimizer, buffers=buffers, cpu=cpu)
