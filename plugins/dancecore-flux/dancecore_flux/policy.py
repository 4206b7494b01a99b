"""FLUX.1 as a dancecore policy: rectified flow on packed 2x2 latents with the guidance embedding.

Loads a real FLUX.1 checkpoint (diffusers layout: transformer/, vae/, text_encoder/ (CLIP),
text_encoder_2/ (T5), tokenizer/, tokenizer_2/) from a local directory or the Hugging Face cache,
offline. The ``tiny`` preset writes the same layout with a random-init model of the same
architecture and loads it through the same code.
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
    DiffusersExport,
    MemoryPlanSpec,
    NetworkOptions,
    PromptBatch,
    architecture_configs,
    encoder_attention,
    flow_match_scheduler,
    materialise,
    on_meta,
    prepare_trainable,
    resolve_pretrained,
    write_tiny_tokenizer,
)


@dataclass(frozen=True)
class FluxConditioning:
    """Encoded prompts: T5 sequence embeddings, the pooled CLIP embedding, and text position ids."""

    batch_fields: ClassVar[tuple[str, ...]] = ("prompt_embeds", "pooled_embeds")
    prompt_embeds: torch.Tensor
    pooled_embeds: torch.Tensor
    text_ids: torch.Tensor


class FluxPolicy:
    """FLUX.1-dev/schnell through diffusers' ``FluxTransformer2DModel``; distilled guidance, no CFG."""

    class Config(NetworkOptions):
        """Options of the ``flux`` policy."""

        pretrained: str | None = Field(None, description="Local diffusers directory or cached HF repo id.")
        preset: Literal["tiny"] | None = Field(None, description="'tiny': random-init model for tests/CPU.")
        resolution: int | None = Field(None, ge=16, description="Image side in pixels (720 in the paper; tiny: 32).")
        guidance: float = Field(3.5, ge=0, description="Value fed to the guidance embedding.")
        max_sequence_length: int | None = Field(None, ge=8, description="T5 tokens (512 for dev; tiny: 32).")

        @model_validator(mode="after")
        def _one_source(self) -> FluxPolicy.Config:
            dancecore.check_one_weights_source(self.pretrained, self.preset)
            return self

    prediction_type = "flow"

    def __init__(self, config: Config, context: BuildContext | None = None) -> None:
        from diffusers import AutoencoderKL, FluxTransformer2DModel
        from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

        context = context or BuildContext()
        self.config = config
        self.device = context.device
        root = tiny_flux_dir() if config.preset == "tiny" else resolve_pretrained(config.pretrained or "", "FLUX")
        frozen = DTYPES[config.frozen_dtype]
        load = {"local_files_only": True}
        encoders = {**load, **encoder_attention(config.attention_backend)}
        self.tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer", **load)
        self.tokenizer_2 = AutoTokenizer.from_pretrained(root / "tokenizer_2", **load)
        self.text_encoder = CLIPTextModel.from_pretrained(root / "text_encoder", torch_dtype=frozen, **encoders)
        self.text_encoder_2 = T5EncoderModel.from_pretrained(root / "text_encoder_2", torch_dtype=frozen, **encoders)
        self.vae = AutoencoderKL.from_pretrained(root / "vae", torch_dtype=frozen, **load)
        transformer = FluxTransformer2DModel.from_pretrained(root / "transformer", torch_dtype=torch.float32, **load)
        for frozen_module in (self.text_encoder, self.text_encoder_2, self.vae):
            frozen_module.requires_grad_(False).eval().to(self.device)
        self.module = prepare_trainable(transformer, config).to(self.device)
        self.module.train()

        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        default_resolution = 32 if config.preset == "tiny" else 720
        resolution = config.resolution or default_resolution
        self.latent_side = 2 * (resolution // (self.vae_scale * 2))  # unpacked latent height/width
        self.resolution = self.latent_side * self.vae_scale
        self.latent_channels = self.module.config.in_channels // 4
        self.max_sequence_length = config.max_sequence_length or (32 if config.preset == "tiny" else 512)
        side = self.latent_side // 2
        ids = torch.zeros(side, side, 3)
        ids[..., 1] += torch.arange(side)[:, None]
        ids[..., 2] += torch.arange(side)[None, :]
        self.image_ids = ids.reshape(side * side, 3).to(self.device)

    # ------------------------------------------------------------------------------ protocol

    @torch.no_grad()
    def encode_prompts(self, batch: PromptBatch) -> FluxConditioning:
        """CLIP pooled embedding and T5 sequence embeddings, one row per prompt."""
        texts = batch.texts
        clip_ids = self.tokenizer(
            texts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        pooled = self.text_encoder(clip_ids, output_hidden_states=False).pooler_output
        t5_ids = self.tokenizer_2(
            texts, padding="max_length", max_length=self.max_sequence_length, truncation=True, return_tensors="pt"
        ).input_ids.to(self.device)
        embeds = self.text_encoder_2(t5_ids, output_hidden_states=False)[0]
        text_ids = torch.zeros(embeds.shape[1], 3, device=self.device)
        return FluxConditioning(prompt_embeds=embeds.float(), pooled_embeds=pooled.float(), text_ids=text_ids)

    def initial_noise(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Gaussian latents in the unpacked (C, H, W) layout, returned packed (L, 4C)."""
        noise = torch.randn((n, self.latent_channels, self.latent_side, self.latent_side), generator=generator)
        return pack_latents(noise)

    def predict(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: FluxConditioning) -> torch.Tensor:
        """The transformer's velocity; FLUX is told the sigma itself as its timestep."""
        batch = latents.shape[0]
        guidance = torch.full((batch,), self.config.guidance, device=self.device, dtype=torch.float32)
        t = (
            timesteps.to(self.device, torch.float32).expand(batch)
            if timesteps.ndim == 0
            else timesteps.to(self.device, torch.float32)
        )
        return self.module(
            hidden_states=latents.to(self.device),
            encoder_hidden_states=cond.prompt_embeds.to(self.device),
            pooled_projections=cond.pooled_embeds.to(self.device),
            timestep=t,
            img_ids=self.image_ids,
            txt_ids=cond.text_ids.to(self.device),
            guidance=guidance,
            return_dict=False,
        )[0]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Unpack, undo the VAE scaling/shift, decode, map to [0, 1]."""
        unpacked = unpack_latents(latents.to(self.device), self.latent_side)
        cfg = self.vae.config
        shift = cfg.shift_factor if cfg.shift_factor is not None else 0.0
        unpacked = unpacked / cfg.scaling_factor + shift
        images = self.vae.decode(unpacked.to(self.vae.dtype), return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """Every transformer weight, or only the LoRA weights."""
        return [p for p in self.module.parameters() if p.requires_grad]

    # ------------------------------------------------------------------------------ export

    def diffusers_export(self, sampler: Any) -> DiffusersExport:
        """A ``FluxPipeline`` of this policy's modules with a flow-matching Euler scheduler at the
        sampler's fixed shift: the deterministic steps of ``dancecore eval`` (Euler is the ODE
        step of the flow samplers, and its last step lands on the last ``x0_hat``)."""
        from diffusers import FluxPipeline

        scheduler = flow_match_scheduler(sampler, "FluxPipeline")
        pipeline = FluxPipeline(
            scheduler=scheduler,
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            text_encoder_2=self.text_encoder_2,
            tokenizer_2=self.tokenizer_2,
            transformer=self.module,
        )
        call = {
            "num_inference_steps": sampler.schedule().num_steps,
            "guidance_scale": self.config.guidance,
            "height": self.resolution,
            "width": self.resolution,
            "max_sequence_length": self.max_sequence_length,
        }
        return DiffusersExport(pipeline=pipeline, trained="transformer", call=call)

    # ------------------------------------------------------------------------------ planning

    @classmethod
    def memory_plan_spec(cls, config: Config) -> MemoryPlanSpec:
        """The transformer, CLIP, T5 and VAE on the meta device, and one transformer call at the
        run's resolution and T5 length (``dancecore plan``)."""
        from diffusers import AutoencoderKL, FluxTransformer2DModel
        from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

        parts = ("transformer", "vae", "text_encoder", "text_encoder_2")
        if config.preset == "tiny":
            tiny = TINY_SPEC
            configs = {"transformer": tiny["transformer"], "vae": tiny["vae"]}
            configs |= {"text_encoder": tiny["clip"], "text_encoder_2": tiny["t5"]}
            source = "the tiny preset"
        else:
            configs, source = architecture_configs(config.pretrained, ARCHITECTURE, parts)
        transformer = on_meta(lambda: FluxTransformer2DModel.from_config(configs["transformer"]))
        module = prepare_trainable(transformer, config)
        frozen = DTYPES[config.frozen_dtype]
        vae = on_meta(lambda: AutoencoderKL.from_config(configs["vae"]))
        clip = on_meta(lambda: CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])))
        t5 = on_meta(lambda: T5EncoderModel(T5Config(**configs["text_encoder_2"])))
        vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
        resolution = config.resolution or (32 if config.preset == "tiny" else 720)
        side = resolution // (vae_scale * 2)  # packed tokens per side
        text = config.max_sequence_length or (32 if config.preset == "tiny" else 512)
        tc = transformer.config

        def call(network: torch.nn.Module, rows: int) -> torch.Tensor:
            p = next(network.parameters())
            ids = torch.zeros(side * side, 3, device=p.device)
            return network(
                hidden_states=torch.randn(rows, side * side, tc.in_channels, device=p.device, dtype=p.dtype),
                encoder_hidden_states=torch.randn(rows, text, tc.joint_attention_dim, device=p.device, dtype=p.dtype),
                pooled_projections=torch.randn(rows, tc.pooled_projection_dim, device=p.device, dtype=p.dtype),
                timestep=torch.rand(rows, device=p.device),
                img_ids=ids,
                txt_ids=torch.zeros(text, 3, device=p.device),
                guidance=torch.full((rows,), config.guidance, device=p.device),
                return_dict=False,
            )[0]

        return MemoryPlanSpec(
            trained=module,
            frozen={"CLIP text encoder": (clip, frozen), "T5 text encoder": (t5, frozen), "VAE": (vae, frozen)},
            call=call,
            shapes=f"{2 * side * vae_scale} x {2 * side * vae_scale} px: {side * side:,} image + {text} text tokens",
            source=source,
        )


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): FLUX's 2x2 patch packing."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(latents: torch.Tensor, side: int) -> torch.Tensor:
    """(B, L, 4C) -> (B, C, side, side): the inverse of :func:`pack_latents`."""
    b, _, packed = latents.shape
    c = packed // 4
    x = latents.view(b, side // 2, side // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, side, side)


#: The published FLUX.1-dev architecture (used when the checkpoint is not on disk).
ARCHITECTURE = Path(__file__).parent / "architectures" / "flux1-dev.json"

TINY_SPEC = {
    "transformer": {
        "patch_size": 1,
        "in_channels": 16,
        "num_layers": 1,
        "num_single_layers": 1,
        "attention_head_dim": 8,
        "num_attention_heads": 2,
        "joint_attention_dim": 32,
        "pooled_projection_dim": 32,
        "guidance_embeds": True,
        "axes_dims_rope": [2, 2, 4],
    },
    "vae": {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "block_out_channels": [8, 16],
        "down_block_types": ["DownEncoderBlock2D"] * 2,
        "up_block_types": ["UpDecoderBlock2D"] * 2,
        "layers_per_block": 1,
        "norm_num_groups": 4,
        "scaling_factor": 0.3611,
        "shift_factor": 0.1159,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
    },
    "clip": {
        **TINY_TOKENIZER.model_config(),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "projection_dim": 32,
        "max_position_embeddings": 77,
    },
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


def tiny_flux_dir() -> Path:
    """A random-init FLUX of the real architecture (about 0.2M parameters) in diffusers layout."""
    return materialise("tiny-flux", TINY_SPEC, _write_tiny_flux)


def _write_tiny_flux(root: Path) -> None:
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(TINY_SPEC["seed"])
    FluxTransformer2DModel(**TINY_SPEC["transformer"]).save_pretrained(root / "transformer")
    AutoencoderKL(**TINY_SPEC["vae"]).save_pretrained(root / "vae")
    CLIPTextModel(CLIPTextConfig(**TINY_SPEC["clip"])).save_pretrained(root / "text_encoder")
    T5EncoderModel(T5Config(**TINY_SPEC["t5"])).save_pretrained(root / "text_encoder_2")
    write_tiny_tokenizer(root / "tokenizer", 77)
    write_tiny_tokenizer(root / "tokenizer_2", 32, bos=False)
