"""Stable Diffusion 3 / 3.5 as a dancecore policy: rectified flow with classifier-free guidance.

Loads a real SD3.x checkpoint (diffusers layout: ``transformer/``, ``vae/``, ``text_encoder/``
(CLIP-L with projection), ``text_encoder_2/`` (CLIP-G with projection), ``text_encoder_3/`` (T5),
``tokenizer/``, ``tokenizer_2/``, ``tokenizer_3/``) from a local directory or the Hugging Face
cache, offline. The ``tiny`` preset writes the same layout with random-init networks of the same
architecture and loads it through the same code.

Conditioning as diffusers' ``StableDiffusion3Pipeline`` builds it:

- each CLIP gives the hidden states of its penultimate layer and its projected (pooled) embedding;
  the two sequences are concatenated on the feature axis, zero-padded to T5's width, and put in
  front of T5's sequence on the token axis; the two pooled embeddings are concatenated;
- the transformer is told ``sigma * 1000`` (FlowMatchEulerDiscreteScheduler's timesteps);
- the VAE's latents are shifted and scaled: decoding maps ``x / scaling_factor + shift_factor``.

Guidance happens inside :meth:`SD3Policy.predict`: the unconditional (negative prompt) and the
conditional branch run in one batch, both with gradient, so rollout and training see the same
CFG-combined velocity.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator

import dancecore
from dancecore import (
    DTYPES,
    TINY_TOKENIZER,
    BuildContext,
    NetworkOptions,
    PromptBatch,
    materialise,
    prepare_trainable,
    resolve_pretrained,
    write_tiny_tokenizer,
)

#: The transformer is told the sigma on the 0..1000 scale of its training scheduler.
TIMESTEP_SCALE = 1000.0


@dataclass(frozen=True)
class SD3Conditioning:
    """Encoded prompts, one row each: the joint CLIP+T5 sequence (B, 77 + L, D) and the pooled
    CLIP-L+G embedding (B, D'), for the prompt and for the negative prompt."""

    batch_fields: ClassVar[tuple[str, ...]] = ("prompt_embeds", "pooled_embeds", "negative_embeds", "negative_pooled")
    prompt_embeds: torch.Tensor
    pooled_embeds: torch.Tensor
    negative_embeds: torch.Tensor
    negative_pooled: torch.Tensor


class SD3Policy:
    """SD3.5 Medium/Large (and SD3 Medium) through diffusers' ``SD3Transformer2DModel``, with CFG."""

    class Config(NetworkOptions):
        """Options of the ``sd3`` policy."""

        pretrained: str | None = Field(None, description="Local diffusers directory or cached HF repo id.")
        preset: Literal["tiny"] | None = Field(None, description="'tiny': random-init model for tests/CPU.")
        resolution: int | None = Field(
            None, ge=16, description="Image side in pixels, a multiple of 16 (Flow-GRPO: 512; tiny: 32)."
        )
        guidance_scale: float = Field(
            4.5, ge=1.0, description="Classifier-free guidance scale (Flow-GRPO: 4.5); 1.0 drops the negative branch."
        )
        negative_prompt: str = Field("", description="Text of the unconditional branch (empty, as the pipeline).")
        max_sequence_length: int | None = Field(
            None, ge=8, description="T5 tokens (the pipeline's 256 for real weights; tiny: 16)."
        )

        @model_validator(mode="after")
        def _check(self) -> SD3Policy.Config:
            dancecore.check_one_weights_source(self.pretrained, self.preset)
            dancecore.check_multiple("resolution", self.resolution, 16)
            return self

    prediction_type = "flow"

    def __init__(self, config: Config, context: BuildContext | None = None) -> None:
        from diffusers import AutoencoderKL, SD3Transformer2DModel
        from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

        context = context or BuildContext()
        self.config = config
        self.device = context.device
        tiny = config.preset == "tiny"
        root = tiny_sd3_dir() if tiny else resolve_pretrained(config.pretrained or "", "Stable Diffusion 3")
        frozen = DTYPES[config.frozen_dtype]
        load: dict[str, Any] = {"local_files_only": True}
        self.tokenizers = [AutoTokenizer.from_pretrained(root / f"tokenizer{s}", **load) for s in ("", "_2", "_3")]
        self.clip_encoders = [
            CLIPTextModelWithProjection.from_pretrained(root / name, torch_dtype=frozen, **load)
            for name in ("text_encoder", "text_encoder_2")
        ]
        self.t5 = T5EncoderModel.from_pretrained(root / "text_encoder_3", torch_dtype=frozen, **load)
        self.vae = AutoencoderKL.from_pretrained(root / "vae", torch_dtype=frozen, **load)
        transformer = SD3Transformer2DModel.from_pretrained(root / "transformer", torch_dtype=torch.float32, **load)
        for frozen_module in (*self.clip_encoders, self.t5, self.vae):
            frozen_module.requires_grad_(False).eval().to(self.device)
        self.module = prepare_trainable(transformer, config).to(self.device)
        self.module.train()

        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        multiple = self.vae_scale * int(transformer.config.patch_size)
        resolution = config.resolution or (32 if tiny else 512)
        self.latent_side = (resolution // multiple) * multiple // self.vae_scale
        self.resolution = self.latent_side * self.vae_scale
        self.latent_channels = int(transformer.config.in_channels)
        self.max_sequence_length = config.max_sequence_length or (16 if tiny else 256)

    # ------------------------------------------------------------------------------ protocol

    @torch.no_grad()
    def encode_prompts(self, batch: PromptBatch) -> SD3Conditioning:
        """Joint CLIP-L/CLIP-G/T5 embeddings and pooled embeddings for every prompt and, repeated per
        row, for the negative prompt."""
        texts = batch.texts
        embeds, pooled = self._encode(texts)
        negative, negative_pooled = self._encode([self.config.negative_prompt])
        n = len(texts)
        return SD3Conditioning(
            prompt_embeds=embeds,
            pooled_embeds=pooled,
            negative_embeds=negative.expand(n, -1, -1).contiguous(),
            negative_pooled=negative_pooled.expand(n, -1).contiguous(),
        )

    def initial_noise(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Gaussian latents (n, 16, H/8, W/8)."""
        return torch.randn((n, self.latent_channels, self.latent_side, self.latent_side), generator=generator)

    def predict(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: SD3Conditioning) -> torch.Tensor:
        """The CFG-combined velocity ``v_u + g (v_c - v_u)``; ``timesteps`` are sigmas in [0, 1]."""
        x = latents.to(self.device)
        batch = x.shape[0]
        t = timesteps.to(self.device, torch.float32)
        t = t.expand(batch) if t.ndim == 0 else t
        if t.shape != (batch,):
            raise ValueError(f"timesteps must be a scalar or have shape ({batch},), got {tuple(t.shape)}")
        t = t * TIMESTEP_SCALE
        embeds, pooled = cond.prompt_embeds.to(self.device), cond.pooled_embeds.to(self.device)
        if self.config.guidance_scale == 1.0:
            return self._velocity(x, t, embeds, pooled)
        # One batch [unconditional; conditional], as the pipeline: both branches carry gradient.
        v = self._velocity(
            torch.cat([x, x]),
            torch.cat([t, t]),
            torch.cat([cond.negative_embeds.to(self.device), embeds]),
            torch.cat([cond.negative_pooled.to(self.device), pooled]),
        )
        v_uncond, v_cond = v.chunk(2)
        return v_uncond + self.config.guidance_scale * (v_cond - v_uncond)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Undo the VAE scaling and shift, decode, map [-1, 1] to [0, 1]."""
        cfg = self.vae.config
        z = latents.to(self.device) / cfg.scaling_factor + cfg.shift_factor
        images = self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """Every transformer weight, or only the LoRA weights."""
        return [p for p in self.module.parameters() if p.requires_grad]

    # ------------------------------------------------------------------------------ helpers

    def _velocity(self, x: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        return self.module(
            hidden_states=x, timestep=t, encoder_hidden_states=embeds, pooled_projections=pooled, return_dict=False
        )[0]

    def _encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        sequences, pooled = [], []
        for tokenizer, encoder in zip(self.tokenizers[:2], self.clip_encoders, strict=True):
            ids = tokenizer(
                texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
            ).input_ids.to(self.device)
            out = encoder(ids, output_hidden_states=True)
            sequences.append(out.hidden_states[-2])  # the penultimate layer, as the pipeline (no clip skip)
            pooled.append(out.text_embeds)
        t5_ids = self.tokenizers[2](
            texts, padding="max_length", max_length=self.max_sequence_length, truncation=True, return_tensors="pt"
        ).input_ids.to(self.device)
        t5 = self.t5(t5_ids)[0]
        clip = torch.cat(sequences, dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5], dim=-2).float(), torch.cat(pooled, dim=-1).float()


def _clip_config(hidden: int, projection: int) -> dict[str, Any]:
    return {
        **TINY_TOKENIZER.model_config(),
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "projection_dim": projection,
        "max_position_embeddings": 77,
    }


TINY_SPEC: dict[str, Any] = {
    # SD3.5-Medium's block types: one dual-attention (MMDiT-X) block, RMS-normed q/k.
    "transformer": {
        "sample_size": 16,
        "patch_size": 2,
        "in_channels": 16,
        "out_channels": 16,
        "num_layers": 2,
        "attention_head_dim": 8,
        "num_attention_heads": 2,
        "joint_attention_dim": 32,
        "caption_projection_dim": 16,
        "pooled_projection_dim": 24,
        "pos_embed_max_size": 16,
        "dual_attention_layers": [0],
        "qk_norm": "rms_norm",
    },
    "vae": {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 16,
        "block_out_channels": [8, 16],
        "down_block_types": ["DownEncoderBlock2D"] * 2,
        "up_block_types": ["UpDecoderBlock2D"] * 2,
        "layers_per_block": 1,
        "norm_num_groups": 4,
        "scaling_factor": 1.5305,
        "shift_factor": 0.0609,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
    },
    # CLIP-L and CLIP-G of different widths (as 768 and 1280): the concatenation and padding matter.
    "clip_l": _clip_config(8, 8),
    "clip_g": _clip_config(16, 16),
    "t5": {
        **TINY_TOKENIZER.model_config(),
        "d_model": 32,
        "d_kv": 8,
        "d_ff": 64,
        "num_layers": 1,
        "num_heads": 2,
        "relative_attention_num_buckets": 8,
        "feed_forward_proj": "gated-gelu",
        "decoder_start_token_id": TINY_TOKENIZER.pad,
    },
    "seed": 0,
}


def tiny_sd3_dir() -> Path:
    """A random-init SD3.5 of the real architecture (about 0.1M parameters) in diffusers layout."""
    return materialise("tiny-sd3", TINY_SPEC, _write_tiny_sd3)


def _write_tiny_sd3(root: Path) -> None:
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(TINY_SPEC["seed"])
    SD3Transformer2DModel(**TINY_SPEC["transformer"]).save_pretrained(root / "transformer")
    AutoencoderKL(**TINY_SPEC["vae"]).save_pretrained(root / "vae")
    for name, key in (("text_encoder", "clip_l"), ("text_encoder_2", "clip_g")):
        CLIPTextModelWithProjection(CLIPTextConfig(**TINY_SPEC[key])).save_pretrained(root / name)
    T5EncoderModel(T5Config(**TINY_SPEC["t5"])).save_pretrained(root / "text_encoder_3")
    write_tiny_tokenizer(root / "tokenizer", 77)
    write_tiny_tokenizer(root / "tokenizer_2", 77)
    write_tiny_tokenizer(root / "tokenizer_3", 16, bos=False)
