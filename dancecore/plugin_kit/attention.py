"""The attention kernel of a policy's networks: ``policy.attention_backend``.

One option, four values:

- ``sdpa`` (default): ``torch.nn.functional.scaled_dot_product_attention``, which picks the fastest
  kernel torch has for the inputs (flash, memory-efficient or cuDNN on CUDA; a fused kernel on CPU).
- ``native``: the reference. torch's math kernel (an explicit softmax(QK^T)V in plain ops) in every
  attention layer of the trained network, and ``eager`` attention in the frozen transformers text
  encoders.
- ``xformers``: xformers' memory-efficient kernel (CUDA, ``pip install 'dancecore[xformers]'``);
  HunyuanVideo's token refiner (text tokens only) stays on SDPA.
- ``flash``: flash-attn 2 through diffusers' dispatcher (CUDA, ``pip install 'dancecore[flash]'``),
  on networks whose attention has no mask.

:func:`apply_attention_backend` switches a diffusers model once, when the policy is built, so the
rollout and the training pass run the same kernel on the same module and the importance ratio
stays exactly 1 before an update. :func:`attention_backend_problem` is what config validation asks.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any, Literal, get_args

import torch

AttentionBackend = Literal["sdpa", "native", "xformers", "flash"]

#: Every value of ``attention_backend``.
ATTENTION_BACKENDS: tuple[str, ...] = get_args(AttentionBackend)

#: dancecore's name -> diffusers' attention-dispatcher backend name.
_DISPATCHER_NAMES = {"sdpa": "native", "native": "_native_math", "xformers": "xformers", "flash": "flash"}

#: dancecore's name -> the classic diffusers processor class with that kernel.
_CLASSIC_PROCESSORS = {
    "sdpa": "AttnProcessor2_0",
    "native": "MathKernelAttnProcessor",
    "xformers": "XFormersAttnProcessor",
}

#: Backends that need CUDA: (Python module that provides the kernel, the install command).
_CUDA_BACKENDS = {
    "xformers": ("xformers", "pip install 'dancecore[xformers]'"),
    "flash": ("flash_attn", "pip install 'dancecore[flash]'"),
}


def attention_backend_problem(backend: str, offered: tuple[str, ...] = ATTENTION_BACKENDS) -> str | None:
    """Why ``backend`` cannot run here, or ``None`` when it can.

    ``offered`` is what the policy's networks support (e.g. no ``flash`` where attention is masked).
    xformers and flash need CUDA and their package; the message names the install command.
    """
    if backend not in offered:
        return f"{backend!r} is not offered by this policy; choose one of {', '.join(offered)}"
    if backend not in _CUDA_BACKENDS:
        return None
    module, install = _CUDA_BACKENDS[backend]
    if not torch.cuda.is_available():
        return (
            f"{backend!r} runs only on a CUDA GPU and none is visible here; use 'sdpa' (the default) here, "
            f"and on a GPU machine install it with: {install}"
        )
    if importlib.util.find_spec(module) is None:
        return f"{backend!r} needs the {module} package, which is not installed: {install}"
    return None


def apply_attention_backend(module: torch.nn.Module, backend: str) -> torch.nn.Module:
    """Run every attention layer of a diffusers model with ``backend``; return the (same) module.

    Layers whose processors go through diffusers' attention dispatcher (FLUX, HunyuanVideo's main
    blocks) get the backend set on the processor, and diffusers' process-wide default is left as it
    was; layers with the classic processors (the SD UNet, HunyuanVideo's token refiner) get the
    matching processor class. Raises ``ValueError`` for a backend some layer cannot run (``flash``
    on a classic processor), before changing anything.
    """
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, got {backend!r}")
    layers = [m for m in module.modules() if getattr(m, "processor", None) is not None]
    dispatched = [m for m in layers if hasattr(m.processor, "_attention_backend")]
    classic = [m for m in layers if m not in dispatched]
    if backend != "sdpa":
        if not layers:
            raise ValueError(f"{type(module).__name__} has no diffusers attention layers to run {backend!r}")
        unknown = {type(m.processor).__name__ for m in classic} - set(_CLASSIC_PROCESSORS.values())
        if backend == "flash" and classic:
            unknown.add(f"{type(classic[0].processor).__name__} (no flash-attn variant)")
        if unknown:
            raise ValueError(f"{type(module).__name__}: cannot run {backend!r} in {', '.join(sorted(unknown))}")
    if dispatched:
        from diffusers.models.attention_dispatch import attention_backend

        # set_attention_backend also makes its backend diffusers' process-wide default; the context
        # manager puts the previous default back, so other models in the process are unaffected.
        # Its "experimental feature" warning, logged on every call, asks nothing of a dancecore user.
        log = logging.getLogger("diffusers.models.modeling_utils")
        level = log.level
        log.setLevel(logging.ERROR)
        try:
            with attention_backend("native"):
                module.set_attention_backend(_DISPATCHER_NAMES[backend])  # type: ignore[operator]
        finally:
            log.setLevel(level)
    if dispatched and backend == "xformers":
        # Classic layers beside dispatched ones are auxiliary (HunyuanVideo's token refiner, on the
        # text tokens only, with a 4-d boolean mask the classic xformers processor does not take):
        # they keep SDPA. attention_backend_of() then reports 'mixed'.
        classic = []
    if classic and backend in _CLASSIC_PROCESSORS:
        from diffusers.models import attention_processor

        processor_cls = (
            MathKernelAttnProcessor
            if backend == "native"
            else getattr(attention_processor, _CLASSIC_PROCESSORS[backend])
        )
        for layer in classic:
            if type(layer.processor).__name__ in _CLASSIC_PROCESSORS.values():
                layer.set_processor(processor_cls())  # type: ignore[operator]
    return module


class MathKernelAttnProcessor:
    """diffusers' classic SDPA processor restricted to torch's math kernel: the ``native`` reference
    for layers outside the dispatcher. It takes every mask SDPA takes (HunyuanVideo's token refiner
    passes a (B, 1, L, L) boolean one, which the old baddbmm processor cannot broadcast)."""

    def __init__(self) -> None:
        from diffusers.models.attention_processor import AttnProcessor2_0

        self._sdpa = AttnProcessor2_0()

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.MATH):
            return self._sdpa(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)


def attention_backend_of(module: torch.nn.Module) -> str:
    """The dancecore backend name every attention layer of ``module`` runs, ``'mixed'``, or
    ``'none'`` for a module without diffusers attention layers.

    Reads the processors back, so tests and the GPU check can see what actually runs.
    """
    names = {_backend_of_processor(p) for p in _processors(module)}
    if not names:
        return "none"
    return names.pop() if len(names) == 1 else "mixed"


def encoder_attention(backend: str) -> dict[str, Any]:
    """``from_pretrained`` keywords for a frozen transformers encoder under ``backend``.

    The encoders run once per prompt, without gradient, on at most a few hundred tokens, so only
    ``native`` changes them (to ``eager`` attention, the reference); the others keep transformers'
    default (SDPA where the model has it).
    """
    return {"attn_implementation": "eager"} if backend == "native" else {}


def _processors(module: torch.nn.Module) -> list[Any]:
    return [m.processor for m in module.modules() if getattr(m, "processor", None) is not None]


def _backend_of_processor(processor: Any) -> str:
    if hasattr(processor, "_attention_backend"):
        chosen = processor._attention_backend
        value = "native" if chosen is None else str(getattr(chosen, "value", chosen))
        return {v: k for k, v in _DISPATCHER_NAMES.items()}.get(value, value)
    name = type(processor).__name__
    return {v: k for k, v in _CLASSIC_PROCESSORS.items()}.get(name, name)
