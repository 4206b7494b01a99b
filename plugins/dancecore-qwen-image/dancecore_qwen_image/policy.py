"""Qwen-Image as a dancecore policy: rectified flow on packed 2x2 latents with classifier-free
guidance as ``QwenImagePipeline`` applies it.

Loads a real Qwen-Image checkpoint (diffusers layout: ``transformer/``, ``vae/``, ``text_encoder/``
(Qwen2.5-VL-7B-Instruct), ``tokenizer/``) from a local directory or the Hugging Face cache, offline.
The ``tiny`` preset writes the same layout with random-init networks of the same architecture and
loads it through the same code.

Conventions, checked against diffusers' ``QwenImagePipeline`` (the equivalence test runs it):

- the prompt is wrapped in Qwen-Image's chat template and encoded by Qwen2.5-VL; the last hidden
  states of the non-padding tokens are kept, minus the template's first 34 tokens (the system
  prefix), zero-padded to the longest prompt of the batch with a mask;
- the transformer is told the **sigma itself** in [0, 1] (it scales by 1000 internally) and
  predicts the velocity ``noise - x0``: the Euler step is ``x + (sigma' - sigma) v``, no sign flip;
- guidance ("true CFG") is ``c = v_u + g (v_c - v_u)`` followed by a rescale of every token of
  ``c`` to the norm of ``v_c``'s token (norms over the channel axis); it needs a negative prompt;
- the pipeline's schedule is ``linspace(1, 1/N, N)`` with an exponential time shift ``exp(mu)``,
  which is the SD3 shift ``k s / (1 + (k - 1) s)`` with ``k = exp(mu)``: ``flow-sde`` with
  ``shift: k`` is that schedule (DanceGRPO uses k = 3);
- latents are (16, H/8, W/8), normalised per channel (``x * latents_std + latents_mean`` before
  the VAE), packed into (H/16 * W/16, 64) tokens like FLUX's.
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

#: Qwen-Image's prompt template and the number of its tokens dropped from the front (diffusers' values).
PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
TEMPLATE_DROP = 34
#: The tokenizer keeps at most this many prompt tokens (the pipeline's ``tokenizer_max_length``).
TOKENIZER_MAX_LENGTH = 1024


@dataclass(frozen=True)
class QwenImageConditioning:
    """Encoded prompts, one row each: Qwen2.5-VL embeddings (B, L, D) with their mask (B, L), for the
    prompt and for the negative prompt (its own length L')."""

    batch_fields: ClassVar[tuple[str, ...]] = ("prompt_embeds", "prompt_mask", "negative_embeds", "negative_mask")
    prompt_embeds: torch.Tensor
    prompt_mask: torch.Tensor
    negative_embeds: torch.Tensor
    negative_mask: torch.Tensor


class QwenImagePolicy:
    """Qwen-Image (20B MMDiT) through diffusers' ``QwenImageTransformer2DModel``, with true CFG."""

    class Config(NetworkOptions):
        """Options of the ``qwen-image`` policy."""

        pretrained: str | None = Field(None, description="Local diffusers directory or cached HF repo id.")
        preset: Literal["tiny"] | None = Field(None, description="'tiny': random-init model for tests/CPU.")
        resolution: int | None = Field(
            None, ge=16, description="Image side in pixels, a multiple of 16 (1328 native; tiny: 32)."
        )
        guidance_scale: float = Field(
            4.0, ge=1.0, description="The pipeline's true_cfg_scale (4.0); 1.0 drops the negative branch."
        )
        negative_prompt: str = Field(" ", description="Text of the unconditional branch (Qwen-Image's examples: ' ').")
        max_sequence_length: int = Field(512, ge=1, le=1024, description="Prompt tokens kept after the template.")
        template_drop: int | None = Field(
            None,
            ge=0,
            description="Template tokens dropped from the front: diffusers' 34 for the real tokenizer; counted from "
            "the tokenizer for the tiny preset.",
        )
        transformer_dtype: Literal["float32", "bfloat16"] = Field(
            "float32", description="dtype the transformer is loaded in (bfloat16: for LoRA or a DeepSpeed bf16 engine)."
        )

        @model_validator(mode="after")
        def _check(self) -> QwenImagePolicy.Config:
            dancecore.check_one_weights_source(self.pretrained, self.preset)
            dancecore.check_multiple("resolution", self.resolution, 16)
            return self

    prediction_type = "flow"

    def __init__(self, config: Config, context: BuildContext | None = None) -> None:
        from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
        from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

        context = context or BuildContext()
        self.config = config
        self.device = context.device
        tiny = config.preset == "tiny"
        root = tiny_qwen_image_dir() if tiny else resolve_pretrained(config.pretrained or "", "Qwen-Image")
        frozen = DTYPES[config.frozen_dtype]
        load: dict[str, Any] = {"local_files_only": True}
        self.tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer", **load)
        self.text_encoder = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            root / "text_encoder", torch_dtype=frozen, **load
        )
        self.vae = AutoencoderKLQwenImage.from_pretrained(root / "vae", torch_dtype=frozen, **load)
        transformer = QwenImageTransformer2DModel.from_pretrained(
            root / "transformer", torch_dtype=DTYPES[config.transformer_dtype], **load
        )
        for frozen_module in (self.text_encoder, self.vae):
            frozen_module.requires_grad_(False).eval().to(self.device)
        self.module = prepare_trainable(transformer, config).to(self.device)
        self.module.train()

        if config.template_drop is not None:
            self.template_drop = config.template_drop
        elif tiny:
            self.template_drop = len(self.tokenizer(PROMPT_TEMPLATE.split("{}")[0]).input_ids)
        else:
            self.template_drop = TEMPLATE_DROP
        self.vae_scale = 2 ** len(self.vae.config.temperal_downsample)
        resolution = config.resolution or (32 if tiny else 1328)
        self.latent_side = 2 * (resolution // (self.vae_scale * 2))
        self.resolution = self.latent_side * self.vae_scale
        self.latent_channels = int(transformer.config.in_channels) // 4
        channels = int(self.vae.config.z_dim)
        self.latents_mean = torch.tensor(self.vae.config.latents_mean, dtype=torch.float32).view(1, channels, 1, 1, 1)
        self.latents_std = torch.tensor(self.vae.config.latents_std, dtype=torch.float32).view(1, channels, 1, 1, 1)

    # ------------------------------------------------------------------------------ protocol

    @torch.no_grad()
    def encode_prompts(self, batch: PromptBatch) -> QwenImageConditioning:
        """Templated Qwen2.5-VL embeddings of every prompt and, repeated per row, of the negative prompt."""
        embeds, mask = self._encode(batch.texts)
        negative, negative_mask = self._encode([self.config.negative_prompt])
        n = len(batch)
        return QwenImageConditioning(
            prompt_embeds=embeds,
            prompt_mask=mask,
            negative_embeds=negative.expand(n, -1, -1).contiguous(),
            negative_mask=negative_mask.expand(n, -1).contiguous(),
        )

    def initial_noise(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Gaussian latents in the unpacked (16, H/8, W/8) layout, returned packed (L, 64)."""
        noise = torch.randn((n, self.latent_channels, self.latent_side, self.latent_side), generator=generator)
        return pack_latents(noise)

    def predict(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: QwenImageConditioning) -> torch.Tensor:
        """The guided, norm-rescaled velocity (as the pipeline); ``timesteps`` are sigmas in [0, 1]."""
        batch = latents.shape[0]
        t = timesteps.to(self.device, torch.float32)
        t = t.expand(batch) if t.ndim == 0 else t
        if t.shape != (batch,):
            raise ValueError(f"timesteps must be a scalar or have shape ({batch},), got {tuple(t.shape)}")
        x = latents.to(self.device, self.module.dtype)
        v_cond = self._velocity(x, t, cond.prompt_embeds, cond.prompt_mask).float()
        if self.config.guidance_scale == 1.0:
            return v_cond
        # Two calls, as the pipeline (the two branches have different text lengths); both carry gradient.
        v_uncond = self._velocity(x, t, cond.negative_embeds, cond.negative_mask).float()
        guided = v_uncond + self.config.guidance_scale * (v_cond - v_uncond)
        return guided * (v_cond.norm(dim=-1, keepdim=True) / guided.norm(dim=-1, keepdim=True))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Unpack, undo the per-channel normalisation, decode (one frame), map to [0, 1]."""
        z = unpack_latents(latents.to(self.device, torch.float32), self.latent_side).unsqueeze(2)  # (B, C, 1, H, W)
        z = z * self.latents_std.to(self.device) + self.latents_mean.to(self.device)
        images = self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0][:, :, 0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """Every transformer weight, or only the LoRA weights."""
        return [p for p in self.module.parameters() if p.requires_grad]

    # ------------------------------------------------------------------------------ helpers

    def _velocity(self, x: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        side = self.latent_side // 2
        mask = mask.to(self.device)
        return self.module(
            hidden_states=x,
            timestep=t.to(x.dtype),
            encoder_hidden_states=embeds.to(self.device, x.dtype),
            encoder_hidden_states_mask=None if bool(mask.all()) else mask,  # as the pipeline
            img_shapes=[[(1, side, side)]] * x.shape[0],
            return_dict=False,
        )[0]

    def _encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        drop = self.template_drop
        tokens = self.tokenizer(
            [PROMPT_TEMPLATE.format(t) for t in texts],
            max_length=TOKENIZER_MAX_LENGTH + drop,
            padding=True,
            truncation=True,
            return_tensors="pt",
        )
        ids, mask = tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)
        hidden = self.text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        kept = [row[m.bool()][drop:] for row, m in zip(hidden, mask, strict=True)]  # real tokens after the template
        length = min(max(k.shape[0] for k in kept), self.config.max_sequence_length)
        embeds = hidden.new_zeros(len(kept), length, hidden.shape[-1])
        out_mask = torch.zeros(len(kept), length, dtype=torch.long, device=self.device)
        for i, k in enumerate(kept):
            k = k[:length]
            embeds[i, : k.shape[0]] = k
            out_mask[i, : k.shape[0]] = 1
        return embeds.float(), out_mask


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): 2x2 patches, as the pipeline packs."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(latents: torch.Tensor, side: int) -> torch.Tensor:
    """(B, L, 4C) -> (B, C, side, side): the inverse of :func:`pack_latents`."""
    b, _, packed = latents.shape
    c = packed // 4
    x = latents.view(b, side // 2, side // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, side, side)


TINY_SPEC: dict[str, Any] = {
    "transformer": {
        "patch_size": 2,
        "in_channels": 64,
        "out_channels": 16,
        "num_layers": 2,
        "attention_head_dim": 8,
        "num_attention_heads": 2,
        "joint_attention_dim": 32,
        "axes_dims_rope": [2, 2, 4],
    },
    "vae": {
        "base_dim": 8,
        "z_dim": 16,
        "dim_mult": [1, 1, 1, 1],
        "num_res_blocks": 1,
        "temperal_downsample": [False, True, True],
    },
    "qwen2_5_vl": {
        "text_config": {
            **TINY_TOKENIZER.model_config(),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "max_position_embeddings": 1024,
            "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        },
        "vision_config": {
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_heads": 2,
            "out_hidden_size": 32,
            "fullatt_block_indexes": [0],
        },
        # the byte-level tiny vocabulary has no image tokens: point them at <unk>, which no text produces
        "vocab_size": TINY_TOKENIZER.vocab_size,
        "image_token_id": TINY_TOKENIZER.unk,
        "video_token_id": TINY_TOKENIZER.unk,
        "vision_start_token_id": TINY_TOKENIZER.unk,
    },
    "seed": 0,
}


def tiny_qwen_image_dir() -> Path:
    """A random-init Qwen-Image of the real architecture (about 0.1M parameters) in diffusers layout."""
    return materialise("tiny-qwen-image", TINY_SPEC, _write_tiny_qwen_image)


def _write_tiny_qwen_image(root: Path) -> None:
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(TINY_SPEC["seed"])
    spec = TINY_SPEC["transformer"]
    QwenImageTransformer2DModel(**{**spec, "axes_dims_rope": tuple(spec["axes_dims_rope"])}).save_pretrained(
        root / "transformer"
    )
    AutoencoderKLQwenImage(**TINY_SPEC["vae"]).save_pretrained(root / "vae")
    text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**TINY_SPEC["qwen2_5_vl"]))
    text_encoder.save_pretrained(root / "text_encoder")
    write_tiny_tokenizer(root / "tokenizer", TOKENIZER_MAX_LENGTH + 128, bos=False)
