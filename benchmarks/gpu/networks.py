"""The networks the GPU check measures: real architectures built from their published configs.

Each :class:`Workload` is one trained network of a dancecore policy at the size of its recipe:
the architecture (``architectures/*.json``: the ``config.json`` of the published checkpoint, shipped
as data, so nothing is downloaded), the input shapes of one network call (resolution, frames, text
tokens, rows per call) and how the policy calls it. ``tiny=True`` gives the same class with the
plugin's tiny preset config and tiny inputs: the code path CI runs on CPU.

Weights are random. At real size the network is built directly on the device in bf16 (12B
parameters take 24 GB; building in fp32 first would need 72 GB).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ARCHITECTURES = Path(__file__).resolve().parent / "architectures"


@dataclass(frozen=True)
class Workload:
    """One network call of a policy: which network, at which size, with which inputs."""

    name: str
    architecture: str  # file stem under architectures/
    policy: str  # the dancecore policy that trains this network
    shape: dict[str, int]  # the sizes inputs() reads
    notes: str  # where the sizes come from
    tiny_config: Callable[[], dict[str, Any]] = field(repr=False)
    prediction: str = "flow"  # what the network predicts: 'flow' or 'epsilon' (picks the sampler)

    def spec(self) -> dict[str, Any]:
        """The shipped architecture file: ``class``, ``source`` and the ``config`` dict."""
        return json.loads((ARCHITECTURES / f"{self.architecture}.json").read_text())

    def config(self, tiny: bool) -> dict[str, Any]:
        """Constructor keywords of the network: the published config, or the tiny preset's."""
        return self.tiny_config() if tiny else dict(self.spec()["config"])

    def build(self, tiny: bool, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
        """A random-init network of the architecture, created on ``device`` in ``dtype``."""
        import diffusers

        cls = getattr(diffusers, self.spec()["class"])
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with device:
                module = cls(**self.config(tiny))
        finally:
            torch.set_default_dtype(previous)
        return module

    def parameter_count(self, tiny: bool = False) -> int:
        """Parameters of the architecture, counted on the meta device (no memory, no compute)."""
        return sum(p.numel() for p in self.build(tiny, torch.device("meta"), torch.float32).parameters())

    def sizes(self, tiny: bool) -> dict[str, int]:
        """The input sizes: the recipe's, or tiny ones."""
        return TINY_SHAPES[self.name] if tiny else self.shape

    def inputs(self, tiny: bool, device: torch.device, dtype: torch.dtype, seed: int = 0) -> dict[str, Any]:
        """Random inputs of one network call (rows = micro-batch, times 2 with CFG)."""
        g = torch.Generator().manual_seed(seed)
        return {
            k: v.to(device, dtype) if v.is_floating_point() else v.to(device)
            for k, v in INPUTS[self.name](self.config(tiny), self.sizes(tiny), g).items()
        }

    def latents_key(self) -> str:
        """The input that holds the noisy latents (what the sampler steps)."""
        return "sample" if self.name == "sd" else "hidden_states"


def _flux_tiny() -> dict[str, Any]:
    from dancecore_flux.policy import TINY_SPEC

    return dict(TINY_SPEC["transformer"])


def _sd_tiny() -> dict[str, Any]:
    from dancecore_sd.policy import TINY_SPEC

    return dict(TINY_SPEC["unet"])


def _hunyuan_tiny() -> dict[str, Any]:
    from dancecore_hunyuanvideo.common import TINY_SPEC

    return dict(TINY_SPEC["transformer"])


def _flux_inputs(cfg: dict[str, Any], s: dict[str, int], g: torch.Generator) -> dict[str, torch.Tensor]:
    side = s["resolution"] // 16  # VAE 8x, then 2x2 packing
    ids = torch.zeros(side, side, 3)
    ids[..., 1] += torch.arange(side)[:, None]
    ids[..., 2] += torch.arange(side)[None, :]
    b = s["rows"]
    return {
        "hidden_states": torch.randn(b, side * side, cfg["in_channels"], generator=g),
        "encoder_hidden_states": torch.randn(b, s["text_tokens"], cfg["joint_attention_dim"], generator=g),
        "pooled_projections": torch.randn(b, cfg["pooled_projection_dim"], generator=g),
        "timestep": torch.full((b,), 0.7),
        "img_ids": ids.reshape(side * side, 3),
        "txt_ids": torch.zeros(s["text_tokens"], 3),
        "guidance": torch.full((b,), 3.5),
    }


def _sd_inputs(cfg: dict[str, Any], s: dict[str, int], g: torch.Generator) -> dict[str, torch.Tensor]:
    side, b = s["resolution"] // 8, s["rows"]
    return {
        "sample": torch.randn(b, cfg.get("in_channels", 4), side, side, generator=g),
        "timestep": torch.full((b,), 700, dtype=torch.long),
        "encoder_hidden_states": torch.randn(b, s["text_tokens"], cfg["cross_attention_dim"], generator=g),
    }


def _hunyuan_inputs(cfg: dict[str, Any], s: dict[str, int], g: torch.Generator) -> dict[str, torch.Tensor]:
    b, frames = s["rows"], (s["frames"] - 1) // 4 + 1
    mask = torch.ones(b, s["text_tokens"], dtype=torch.long)
    mask[:, s["text_tokens"] // 2 :] = 0  # padded prompts: the transformer masks the padding
    return {
        "hidden_states": torch.randn(b, cfg["in_channels"], frames, s["height"] // 8, s["width"] // 8, generator=g),
        "timestep": torch.full((b,), 700, dtype=torch.long),
        "encoder_hidden_states": torch.randn(b, s["text_tokens"], cfg["text_embed_dim"], generator=g),
        "encoder_attention_mask": mask,
        "pooled_projections": torch.randn(b, cfg["pooled_projection_dim"], generator=g),
        "guidance": torch.full((b,), 6000.0),
    }


INPUTS = {"flux": _flux_inputs, "sd": _sd_inputs, "hunyuanvideo": _hunyuan_inputs}

#: Tiny inputs for the CPU path (the tiny presets' sizes).
TINY_SHAPES: dict[str, dict[str, int]] = {
    "flux": {"resolution": 32, "text_tokens": 32, "rows": 2},
    "sd": {"resolution": 32, "text_tokens": 77, "rows": 2},
    "hunyuanvideo": {"height": 32, "width": 48, "frames": 5, "text_tokens": 16, "rows": 1},
}

WORKLOADS: tuple[Workload, ...] = (
    Workload(
        "flux",
        "flux1-dev-transformer",
        "flux",
        {"resolution": 720, "text_tokens": 512, "rows": 2},
        "720 px (2025 image + 512 T5 tokens), micro-batch 2 (configs/flux/hps.yaml), no CFG",
        _flux_tiny,
    ),
    Workload(
        "sd",
        "sd14-unet",
        "sd",
        {"resolution": 512, "text_tokens": 77, "rows": 16},
        "512 px (64x64 latents), micro-batch 8 with the CFG branch = 16 UNet rows (configs/sd/hps.yaml)",
        _sd_tiny,
        prediction="epsilon",
    ),
    Workload(
        "hunyuanvideo",
        "hunyuanvideo-transformer",
        "hunyuanvideo",
        {"height": 480, "width": 848, "frames": 53, "text_tokens": 256, "rows": 1},
        "480x848 x 53 frames (14x30x53 = 22,260 video + 256 Llama tokens), micro-batch 1 (configs/hunyuanvideo)",
        _hunyuan_tiny,
    ),
)


def workload(name: str) -> Workload:
    """The workload called ``name`` (flux, sd, hunyuanvideo)."""
    for w in WORKLOADS:
        if w.name == name:
            return w
    raise KeyError(f"no GPU-check workload {name!r}; there are {', '.join(w.name for w in WORKLOADS)}")


def tokens(w: Workload, tiny: bool) -> int:
    """Attention sequence length of one row (image/video tokens plus text tokens; SD: the largest
    self-attention, at the first level)."""
    s = w.sizes(tiny)
    if w.name == "flux":
        return (s["resolution"] // 16) ** 2 + s["text_tokens"]
    if w.name == "sd":
        return (s["resolution"] // 8) ** 2
    return ((s["frames"] - 1) // 4 + 1) * (s["height"] // 16) * (s["width"] // 16) + s["text_tokens"]


def call(module: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """One forward of the network as the policy makes it; returns the prediction."""
    return module(**inputs, return_dict=False)[0]
