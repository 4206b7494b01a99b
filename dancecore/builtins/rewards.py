"""Weight-free rewards that need no download: JPEG (in)compressibility as in DDPO, and brightness.

They make the quickstart and the tests self-contained; real preference models live in plugins.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from pydantic import Field

from dancecore.contracts.component import ComponentConfig
from dancecore.contracts.protocols import BuildContext


def _frames(samples: torch.Tensor) -> torch.Tensor:
    """View images (B,3,H,W) or videos (B,F,3,H,W) as (B, F, 3, H, W)."""
    if samples.ndim == 4:
        return samples.unsqueeze(1)
    if samples.ndim == 5:
        return samples
    raise ValueError(f"expected (B,3,H,W) images or (B,F,3,H,W) videos, got shape {tuple(samples.shape)}")


def jpeg_size_kb(image: torch.Tensor, quality: int) -> float:
    """Size in kilobytes of one (3, H, W) image in [0, 1] encoded as JPEG."""
    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="JPEG", quality=quality)
    return buffer.tell() / 1000.0


def jpeg_sizes(samples: torch.Tensor, quality: int) -> torch.Tensor:
    """JPEG size in kB of every sample (videos: the mean over their frames)."""
    sizes = [np.mean([jpeg_size_kb(frame, quality) for frame in video]) for video in _frames(samples)]
    return torch.tensor(sizes, dtype=torch.float32)


class JpegConfig(ComponentConfig):
    """Options of the JPEG rewards."""

    quality: int = Field(95, ge=1, le=100, description="JPEG quality used for encoding.")


class JpegCompressibility:
    """Minus the JPEG file size in kB (DDPO's compressibility reward): rewards smooth images."""

    Config = JpegConfig

    def __init__(self, config: JpegConfig, context: BuildContext | None = None) -> None:
        self.config = config

    @torch.no_grad()
    def score(self, samples: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Negative JPEG size per sample, in kB."""
        return -jpeg_sizes(samples, self.config.quality)


class JpegIncompressibility:
    """The JPEG file size in kB: rewards detail and texture."""

    Config = JpegConfig

    def __init__(self, config: JpegConfig, context: BuildContext | None = None) -> None:
        self.config = config

    @torch.no_grad()
    def score(self, samples: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """JPEG size per sample, in kB."""
        return jpeg_sizes(samples, self.config.quality)


class Brightness:
    """Mean luma (ITU-R BT.601) of the sample in [0, 1]; a simple, fast, fully differentiable-free
    statistic that a tiny model learns within minutes."""

    class Config(ComponentConfig):
        """Options of the ``brightness`` reward."""

        target: float | None = Field(
            None, ge=0, le=1, description="If set, reward is minus the distance of mean luma to this target."
        )

    def __init__(self, config: Config, context: BuildContext | None = None) -> None:
        self.config = config

    @torch.no_grad()
    def score(self, samples: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Mean luma per sample (or minus its distance to ``target``)."""
        frames = _frames(samples).float()
        weights = torch.tensor([0.299, 0.587, 0.114], device=frames.device).view(1, 1, 3, 1, 1)
        luma = (frames * weights).sum(dim=2).mean(dim=(1, 2, 3))
        if self.config.target is not None:
            luma = -(luma - self.config.target).abs()
        return luma.cpu()
