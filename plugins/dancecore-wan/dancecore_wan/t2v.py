"""Wan2.1 text-to-video as a dancecore policy: rectified flow on 3D video latents with
classifier-free guidance; with ``num_frames: 1`` it is the text-to-image model DanceGRPO trains
with HPS.

Loads a real Wan2.1 T2V checkpoint (1.3B or 14B, diffusers layout: ``transformer/``, ``vae/``,
``text_encoder/`` (UMT5), ``tokenizer/``) from a local directory or the Hugging Face cache,
offline. The ``tiny`` preset writes the same layout with random-init networks of the same
architecture and loads it through the same code.

Facts taken from diffusers' ``WanPipeline``:

- prompts are cleaned (ftfy when installed, HTML entities, whitespace), encoded by UMT5 with their
  attention mask, and the embeddings past each prompt's length are set to zero;
- the transformer is told ``sigma * 1000`` and has no attention mask;
- guidance is ``v_u + g (v_c - v_u)`` against the negative prompt (5.0 by default);
- latents are (16, (F - 1) / 4 + 1, H / 8, W / 8), normalised per channel: decoding maps
  ``x * latents_std + latents_mean``.
"""

from __future__ import annotations

import html
import re
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
    sequence_parallel_active,
    write_tiny_tokenizer,
)

#: Pixels per transformer token side: VAE spatial compression 8 times patch size 2.
PIXEL_MULTIPLE = 16
#: VAE temporal compression: F frames become (F - 1) / 4 + 1 latent frames.
TEMPORAL_COMPRESSION = 4
#: The transformer is told the sigma on the 0..1000 scale of its training scheduler.
TIMESTEP_SCALE = 1000.0
#: Sizes when the config gives none: Wan2.1's 480p (480 x 832, 81 frames); tiny: 32 x 32, 5 frames.
DEFAULTS = {"height": 480, "width": 832, "num_frames": 81, "max_sequence_length": 512}
TINY_DEFAULTS = {"height": 32, "width": 32, "num_frames": 5, "max_sequence_length": 16}


def clean_prompt(text: str) -> str:
    """The pipeline's prompt cleaning: ftfy (when installed), HTML entities, collapsed whitespace."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:  # pragma: no cover - ftfy is optional, as in diffusers
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


@dataclass(frozen=True)
class WanConditioning:
    """Encoded prompts, one row each: UMT5 embeddings (B, L, D) of the prompt and of the negative prompt."""

    batch_fields: ClassVar[tuple[str, ...]] = ("prompt_embeds", "negative_embeds")
    prompt_embeds: torch.Tensor
    negative_embeds: torch.Tensor


class WanT2VPolicy:
    """Wan2.1-T2V (1.3B / 14B) through diffusers' ``WanTransformer3DModel``, with CFG."""

    class Config(NetworkOptions):
        """Options of the ``wan-t2v`` policy (sizes default to 480 x 832 x 81; tiny: 32 x 32 x 5)."""

        pretrained: str | None = Field(None, description="Local diffusers directory or cached HF repo id.")
        preset: Literal["tiny"] | None = Field(None, description="'tiny': random-init model for tests and CPU.")
        height: int | None = Field(None, ge=PIXEL_MULTIPLE, description="Video height in pixels, a multiple of 16.")
        width: int | None = Field(None, ge=PIXEL_MULTIPLE, description="Video width in pixels, a multiple of 16.")
        num_frames: int | None = Field(
            None,
            ge=1,
            description="Frames, of the form 4k + 1; 1 makes it a text-to-image policy (DanceGRPO's HPS run).",
        )
        guidance_scale: float = Field(
            5.0, ge=1.0, description="Classifier-free guidance scale (Wan: 5.0); 1.0 drops the negative branch."
        )
        negative_prompt: str = Field(
            "", description="Text of the unconditional branch (the pipeline's default: empty)."
        )
        max_sequence_length: int | None = Field(None, ge=4, description="UMT5 tokens (512 for Wan2.1; tiny: 16).")
        transformer_dtype: Literal["float32", "bfloat16"] = Field(
            "float32",
            description="dtype the transformer is loaded in: float32 (fp32 master weights) or bfloat16 (for LoRA or a "
            "DeepSpeed bf16 engine; the 14B model needs 56 GB in fp32).",
        )

        @model_validator(mode="after")
        def _check(self) -> WanT2VPolicy.Config:
            dancecore.check_one_weights_source(self.pretrained, self.preset)
            for name in ("height", "width"):
                dancecore.check_multiple(name, getattr(self, name), PIXEL_MULTIPLE)
            dancecore.check_frame_count("num_frames", self.num_frames, TEMPORAL_COMPRESSION)
            return self

    prediction_type = "flow"
    #: the transformer splits its video tokens over ``distributed.sequence_parallel`` ranks
    supports_sequence_parallel = True

    def __init__(self, config: Config, context: BuildContext | None = None) -> None:
        from diffusers import AutoencoderKLWan, WanTransformer3DModel
        from transformers import AutoTokenizer, UMT5EncoderModel

        context = context or BuildContext()
        self.config = config
        self.device = context.device
        tiny = config.preset == "tiny"
        root = tiny_wan_dir() if tiny else resolve_pretrained(config.pretrained or "", "Wan2.1")
        frozen = DTYPES[config.frozen_dtype]
        load: dict[str, Any] = {"local_files_only": True}
        self.tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer", **load)
        self.text_encoder = UMT5EncoderModel.from_pretrained(root / "text_encoder", torch_dtype=frozen, **load)
        self.vae = AutoencoderKLWan.from_pretrained(root / "vae", torch_dtype=frozen, **load)
        transformer = WanTransformer3DModel.from_pretrained(
            root / "transformer", torch_dtype=DTYPES[config.transformer_dtype], **load
        )
        for frozen_module in (self.text_encoder, self.vae):
            frozen_module.requires_grad_(False).eval().to(self.device)
        self.module = prepare_trainable(transformer, config).to(self.device)
        self.module.train()

        defaults = TINY_DEFAULTS if tiny else DEFAULTS
        self.height = config.height or defaults["height"]
        self.width = config.width or defaults["width"]
        self.num_frames = config.num_frames or defaults["num_frames"]
        self.max_sequence_length = config.max_sequence_length or defaults["max_sequence_length"]
        vae_config = self.vae.config
        spatial, temporal = int(vae_config.scale_factor_spatial), int(vae_config.scale_factor_temporal)
        self.latent_shape = (
            int(transformer.config.in_channels),
            (self.num_frames - 1) // temporal + 1,
            self.height // spatial,
            self.width // spatial,
        )
        if sequence_parallel_active(context.sequence_parallel):
            from dancecore_wan.sequence_parallel import enable_sequence_parallel

            assert context.sequence_parallel is not None
            enable_sequence_parallel(self.module, context.sequence_parallel, self.latent_shape)
        channels = int(vae_config.z_dim)
        self.latents_mean = torch.tensor(vae_config.latents_mean, dtype=torch.float32).view(1, channels, 1, 1, 1)
        self.latents_std = torch.tensor(vae_config.latents_std, dtype=torch.float32).view(1, channels, 1, 1, 1)

    # ------------------------------------------------------------------------------ protocol

    @torch.no_grad()
    def encode_prompts(self, batch: PromptBatch) -> WanConditioning:
        """UMT5 embeddings of every prompt and, repeated per row, of the negative prompt."""
        embeds = self._encode(batch.texts)
        negative = self._encode([self.config.negative_prompt]).expand(len(batch), -1, -1).contiguous()
        return WanConditioning(prompt_embeds=embeds, negative_embeds=negative)

    def initial_noise(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Gaussian latents (n, 16, (F - 1) / 4 + 1, H / 8, W / 8)."""
        return torch.randn((n, *self.latent_shape), generator=generator)

    def predict(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: WanConditioning) -> torch.Tensor:
        """The CFG-combined velocity ``v_u + g (v_c - v_u)``; ``timesteps`` are sigmas in [0, 1]."""
        batch = latents.shape[0]
        t = timesteps.to(self.device, torch.float32)
        t = t.expand(batch) if t.ndim == 0 else t
        if t.shape != (batch,):
            raise ValueError(f"timesteps must be a scalar or have shape ({batch},), got {tuple(t.shape)}")
        t = t * TIMESTEP_SCALE
        dtype = self.module.dtype
        x = latents.to(self.device, dtype)
        embeds = cond.prompt_embeds.to(self.device, dtype)
        if self.config.guidance_scale == 1.0:
            return self._velocity(x, t, embeds)
        # One batch [unconditional; conditional]: both branches carry gradient, as in the rollout.
        v = self._velocity(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond.negative_embeds.to(x), embeds]))
        v_uncond, v_cond = v.float().chunk(2)
        return v_uncond + self.config.guidance_scale * (v_cond - v_uncond)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Videos (B, F, 3, H, W) in [0, 1], one sample at a time; images (B, 3, H, W) when F == 1."""
        mean, std = self.latents_mean.to(self.device), self.latents_std.to(self.device)
        videos = []
        for row in latents:
            z = row.unsqueeze(0).to(self.device, torch.float32) * std + mean
            videos.append(self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0].float())
        pixels = (torch.cat(videos).permute(0, 2, 1, 3, 4) / 2 + 0.5).clamp(0, 1)  # (B, 3, F, H, W) -> (B, F, 3, H, W)
        return pixels[:, 0] if self.num_frames == 1 else pixels

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """Every transformer weight, or only the LoRA weights."""
        return [p for p in self.module.parameters() if p.requires_grad]

    # ------------------------------------------------------------------------------ helpers

    def _velocity(self, x: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        return self.module(hidden_states=x, timestep=t, encoder_hidden_states=embeds, return_dict=False)[0]

    def _encode(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(
            [clean_prompt(t) for t in texts],
            padding="max_length",
            max_length=self.max_sequence_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        ids, mask = tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)
        hidden = self.text_encoder(ids, mask).last_hidden_state.float()
        return hidden * mask.unsqueeze(-1).to(hidden.dtype)  # zero past each prompt's length, as the pipeline


TINY_SPEC: dict[str, Any] = {
    "transformer": {
        "patch_size": [1, 2, 2],
        "num_attention_heads": 2,
        "attention_head_dim": 12,
        "in_channels": 16,
        "out_channels": 16,
        "text_dim": 32,
        "freq_dim": 32,
        "ffn_dim": 32,
        "num_layers": 2,
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "rope_max_seq_len": 32,
    },
    "vae": {
        "base_dim": 8,
        "z_dim": 16,
        "dim_mult": [1, 1, 1, 1],
        "num_res_blocks": 1,
        "temperal_downsample": [False, True, True],
    },
    "umt5": {
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


def tiny_wan_dir() -> Path:
    """A random-init Wan2.1-T2V of the real architecture (about 0.1M parameters) in diffusers layout."""
    return materialise("tiny-wan-t2v", TINY_SPEC, _write_tiny_wan)


def _write_tiny_wan(root: Path) -> None:
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(TINY_SPEC["seed"])
    spec = TINY_SPEC["transformer"]
    WanTransformer3DModel(**{**spec, "patch_size": tuple(spec["patch_size"])}).save_pretrained(root / "transformer")
    AutoencoderKLWan(**TINY_SPEC["vae"]).save_pretrained(root / "vae")
    UMT5EncoderModel(UMT5Config(**TINY_SPEC["umt5"])).save_pretrained(root / "text_encoder")
    write_tiny_tokenizer(root / "tokenizer", 16, bos=False)
