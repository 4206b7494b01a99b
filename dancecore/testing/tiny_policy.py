"""A torch-only tiny policy for tests: no diffusers, no transformers, no download.

``testing-tiny`` (:class:`TinyFlowPolicy`, rectified flow, for ``flow-sde``) and ``testing-tiny-eps``
(:class:`TinyEpsilonPolicy`, epsilon prediction, for ``ddim-sde``) honour the :class:`~dancecore.Policy`
contract with a small convolutional network (a few thousand weights) on (4, 8, 8) latents,
conditioned on a deterministic hash embedding of the prompt's words. ``decode`` maps latents to
pixels in [0, 1] by a fixed (frozen) projection and nearest-neighbour upsampling. Weights are a
function of ``seed`` only, so two builds are identical; a training iteration takes milliseconds.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from dancecore.contracts.component import ComponentConfig
from dancecore.contracts.protocols import BuildContext
from dancecore.contracts.records import PromptBatch

__all__ = ["TinyConditioning", "TinyEpsilonPolicy", "TinyFlowNet", "TinyFlowPolicy", "hash_embedding"]


@dataclass(frozen=True)
class TinyConditioning:
    """Encoded prompts: one hash embedding per prompt, shape (B, embed_dim)."""

    prompt_embeds: torch.Tensor


def hash_embedding(text: str, dim: int) -> torch.Tensor:
    """A deterministic embedding of ``text``: the mean of one fixed Gaussian vector per lower-cased
    word (seeded by the word's SHA-256), zeros for an empty prompt. The same in every process."""
    words = text.lower().split()
    if not words:
        return torch.zeros(dim)
    vectors = [
        torch.randn(
            dim, generator=torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(w.encode()).digest()[:7], "big"))
        )
        for w in words
    ]
    return torch.stack(vectors).mean(0)


class TinyFlowNet(nn.Module):
    """conv -> FiLM(prompt, time) -> conv -> conv; the trained ``module`` of the tiny policies."""

    def __init__(self, channels: int, hidden: int, embed_dim: int) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.conv_in = nn.Conv2d(channels, hidden, 3, padding=1)
        self.film = nn.Linear(2 * embed_dim, 2 * hidden)
        self.conv_mid = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.conv_out = nn.Conv2d(hidden, channels, 3, padding=1)

    def time_embedding(self, t: torch.Tensor) -> torch.Tensor:
        """Sinusoidal features of ``t`` (one value per row, roughly in [0, 1])."""
        half = self.embed_dim // 2
        freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * (-math.log(100.0) / max(1, half)))
        angles = t.float()[:, None] * freqs[None] * 10.0
        emb = torch.cat([angles.sin(), angles.cos()], dim=1)
        return nn.functional.pad(emb, (0, self.embed_dim - emb.shape[1]))

    def forward(self, latents: torch.Tensor, t: torch.Tensor, prompt_embeds: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(torch.cat([prompt_embeds, self.time_embedding(t)], dim=1)).chunk(2, dim=1)
        h = self.conv_in(latents)
        h = nn.functional.silu(h * (1 + scale[:, :, None, None]) + shift[:, :, None, None])
        h = nn.functional.silu(self.conv_mid(h))
        return self.conv_out(h)


class TinyFlowPolicy:
    """``testing-tiny``: a torch-only rectified-flow policy for tests (predicts a velocity; the
    sampler tells it the sigma itself as its timestep)."""

    class Config(ComponentConfig):
        """Options of the ``testing-tiny`` policies."""

        seed: int = Field(0, ge=0, description="Seed of the random-init weights and the decoder projection.")
        hidden: int = Field(16, ge=1, le=1024, description="Hidden channels of the network.")
        latent_channels: int = Field(4, ge=1, le=64, description="Channels of the latents.")
        latent_size: int = Field(8, ge=1, le=256, description="Height and width of the latents.")
        image_size: int = Field(
            16, ge=1, le=1024, description="Side of the decoded images (a multiple of latent_size)."
        )
        embed_dim: int = Field(16, ge=2, le=1024, description="Size of the prompt and time embeddings.")
        trainable: Literal["all", "output"] = Field(
            "all", description="'output' trains only the last layer (the rest stays frozen, like an adapter)."
        )

        @model_validator(mode="after")
        def _image_size_fits(self) -> TinyFlowPolicy.Config:
            if self.image_size % self.latent_size:
                raise ValueError(
                    f"image_size ({self.image_size}) must be a multiple of latent_size ({self.latent_size})"
                )
            return self

    prediction_type = "flow"
    #: what the sampler's timesteps are multiplied by before the network sees them
    timestep_scale = 1.0

    def __init__(self, config: Config, context: BuildContext | None = None) -> None:
        context = context or BuildContext()
        self.config = config
        self.device = context.device
        c = config
        self.latent_shape = (c.latent_channels, c.latent_size, c.latent_size)
        module = TinyFlowNet(c.latent_channels, c.hidden, c.embed_dim)
        generator = torch.Generator().manual_seed(c.seed)
        with torch.no_grad():
            for name, p in module.named_parameters():
                if name.endswith("bias"):
                    p.zero_()
                else:
                    fan_in = p[0].numel()
                    p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(fan_in))
        if c.trainable == "output":
            module.requires_grad_(False)
            module.conv_out.requires_grad_(True)
        self.module: nn.Module = module.to(self.device)
        self.module.train()
        # The frozen "VAE": a fixed channel projection to RGB (not part of the trained module).
        self.projection = torch.randn((3, c.latent_channels), generator=generator).to(self.device) / math.sqrt(
            c.latent_channels
        )

    # ------------------------------------------------------------------------------ protocol

    @torch.no_grad()
    def encode_prompts(self, batch: PromptBatch) -> TinyConditioning:
        """One hash embedding per prompt."""
        embeds = torch.stack([hash_embedding(text, self.config.embed_dim) for text in batch.texts])
        return TinyConditioning(prompt_embeds=embeds.to(self.device))

    def initial_noise(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Gaussian latents (n, C, S, S), on the CPU in fp32, drawn from ``generator``."""
        return torch.randn((n, *self.latent_shape), generator=generator)

    def predict(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: TinyConditioning) -> torch.Tensor:
        """The network's prediction; ``timesteps`` is a scalar or has one entry per row."""
        batch = latents.shape[0]
        t = timesteps.to(self.device, torch.float32)
        t = t.expand(batch) if t.ndim == 0 else t
        if t.shape != (batch,):
            raise ValueError(f"timesteps must be a scalar or have one entry per row ({batch}), got {tuple(t.shape)}")
        embeds = cond.prompt_embeds.to(self.device)
        if embeds.shape[0] != batch:
            raise ValueError(f"conditioning has {embeds.shape[0]} rows for {batch} latents")
        out: torch.Tensor = self.module(latents.to(self.device), t * self.timestep_scale, embeds)
        return out

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Fixed projection to RGB, sigmoid, nearest-neighbour upsampling: (B, 3, image_size, image_size)."""
        x = latents.to(self.device, torch.float32)
        rgb = torch.einsum("oc,bchw->bohw", self.projection, x).sigmoid()
        factor = self.config.image_size // self.config.latent_size
        return rgb.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The weights that require grad (all, or the output layer's)."""
        return [p for p in self.module.parameters() if p.requires_grad]


class TinyEpsilonPolicy(TinyFlowPolicy):
    """``testing-tiny-eps``: the same network predicting noise, for ``ddim-sde`` (integer timesteps
    in [0, 1000), scaled to [0, 1) for the network)."""

    prediction_type = "epsilon"
    timestep_scale = 1e-3
