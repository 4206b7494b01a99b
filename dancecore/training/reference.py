"""The reference policy of KL-regularised algorithms (Flow-GRPO's ``beta ||mu - mu_ref||^2 / 2 std^2``).

With LoRA the reference is the same network with its adapters switched off: no extra memory.
Otherwise it is a frozen copy of the trainable network made when training starts (optionally in
bf16 and/or kept in CPU memory), whose size is reported once.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any, Literal

import torch

from dancecore.contracts.protocols import Policy
from dancecore.errors import TrainingError


def _has_adapters(module: torch.nn.Module) -> bool:
    return bool(getattr(module, "peft_config", None)) and callable(getattr(module, "disable_adapters", None))


class ReferencePolicy:
    """Runs the policy's ``predict`` with the reference weights instead of the trained ones."""

    def __init__(
        self,
        policy: Policy,
        *,
        dtype: Literal["float32", "bfloat16"] = "float32",
        device: Literal["same", "cpu"] = "same",
        distributed: bool = False,
    ) -> None:
        self.policy = policy
        self.adapters_off = _has_adapters(policy.module)
        self.copy: torch.nn.Module | None = None
        self.device = device
        if self.adapters_off:
            self.description = "the LoRA-disabled network (no extra memory)"
            return
        if distributed:
            raise TrainingError(
                "a KL reference without LoRA is a frozen copy, supported on one process; use policy.lora "
                "(the reference is then the adapter-free network) or set the algorithm's kl_beta to 0"
            )
        frozen = copy.deepcopy(policy.module).requires_grad_(False).eval()
        if dtype == "bfloat16":
            frozen = frozen.to(torch.bfloat16)
        if device == "cpu":
            frozen = frozen.cpu()
        self.copy = frozen
        megabytes = sum(p.numel() * p.element_size() for p in frozen.parameters()) / 2**20
        where = "CPU memory" if device == "cpu" else "the training device"
        self.description = f"a frozen copy ({megabytes:.1f} MiB in {dtype}, in {where})"

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Inside the block, ``policy.predict`` uses the reference weights (without gradient)."""
        module: Any = self.policy.module
        if self.adapters_off:
            module.disable_adapters()
            try:
                with torch.no_grad():
                    yield
            finally:
                module.enable_adapters()
            return
        assert self.copy is not None
        live = self.policy.module
        reference = self.copy
        if self.device == "cpu":  # visit the device only for this call
            target = next(live.parameters()).device
            reference = reference.to(target)
        self.policy.module = reference
        try:
            with torch.no_grad():
                yield
        finally:
            self.policy.module = live
            if self.device == "cpu":
                self.copy = reference.cpu()
