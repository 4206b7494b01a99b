"""Stable Diffusion v1.x as a dancecore policy: an epsilon-prediction UNet with classifier-free guidance.

Loads a real SD v1.x checkpoint (diffusers layout: unet/, vae/, text_encoder/, tokenizer/) from a
local directory or the Hugging Face cache, offline. The ``tiny`` preset writes the same layout with
a random-init model of the same architecture and loads it through the same code.

Guidance is applied inside :meth:`StableDiffusionPolicy.predict`: the conditional and the
unconditional branch run in one batch, both with gradient, so the rollout and the training pass
see exactly the same CFG-combined prediction (DanceGRPO trains SD this way).
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
    materialise,
    on_meta,
    prepare_trainable,
    resolve_pretrained,
    write_tiny_tokenizer,
)


@dataclass(frozen=True)
class SDConditioning:
    """Encoded prompts: CLIP text hidden states for each prompt and for the negative (empty) prompt.

    Both have one row per prompt, so :func:`dancecore.select_rows` slices them together.
    """

    batch_fields: ClassVar[tuple[str, ...]] = ("prompt_embeds", "negative_embeds")
    prompt_embeds: torch.Tensor
    negative_embeds: torch.Tensor


class StableDiffusionPolicy:
    """Stable Diffusion v1.x (e.g. CompVis/stable-diffusion-v1-4) through diffusers' UNet2DConditionModel."""

    class Config(NetworkOptions):
        """Options of the ``sd`` policy."""

        pretrained: str | None = Field(None, description="Local diffusers directory or cached HF repo id.")
        preset: Literal["tiny"] | None = Field(None, description="'tiny': random-init model for tests/CPU.")
        resolution: int | None = Field(None, ge=16, description="Image side in pixels (512 for SD v1.x; tiny: 32).")
        guidance_scale: float = Field(
            5.0, ge=1.0, description="Classifier-free guidance scale; 1.0 switches the unconditional branch off."
        )
        negative_prompt: str = Field("", description="Text of the unconditional branch (empty, as in SD).")

        # The UNet's classic attention processors have no flash-attn variant (SDPA uses flash kernels itself).
        attention_backends = ("sdpa", "native", "xformers")

        @model_validator(mode="after")
        def _one_source(self) -> StableDiffusionPolicy.Config:
            dancecore.check_one_weights_source(self.pretrained, self.preset)
            return self

    prediction_type = "epsilon"

    def __init__(self, config: Config, context: BuildContext | None = None) -> None:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import AutoTokenizer, CLIPTextModel

        context = context or BuildContext()
        self.config = config
        self.device = context.device
        root = (
            tiny_sd_dir()
            if config.preset == "tiny"
            else resolve_pretrained(config.pretrained or "", "Stable Diffusion")
        )
        frozen = DTYPES[config.frozen_dtype]
        load: dict[str, Any] = {"local_files_only": True}
        self.tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer", **load)
        self.text_encoder = CLIPTextModel.from_pretrained(
            root / "text_encoder", torch_dtype=frozen, **load, **encoder_attention(config.attention_backend)
        )
        self.vae = AutoencoderKL.from_pretrained(root / "vae", torch_dtype=frozen, **load)
        unet = UNet2DConditionModel.from_pretrained(root / "unet", torch_dtype=torch.float32, **load)
        for frozen_module in (self.text_encoder, self.vae):
            frozen_module.requires_grad_(False).eval().to(self.device)
        self.module = prepare_trainable(unet, config).to(self.device)
        self.module.train()

        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        resolution = config.resolution or (32 if config.preset == "tiny" else 512)
        self.latent_side = resolution // self.vae_scale
        self.resolution = self.latent_side * self.vae_scale
        self.latent_channels = int(unet.config.in_channels)

    # ------------------------------------------------------------------------------ protocol

    @torch.no_grad()
    def encode_prompts(self, batch: PromptBatch) -> SDConditioning:
        """CLIP last hidden states for every prompt and, repeated per row, for the negative prompt."""
        texts = batch.texts
        embeds = self._encode(texts)
        negative = self._encode([self.config.negative_prompt]).expand(len(texts), -1, -1).contiguous()
        return SDConditioning(prompt_embeds=embeds, negative_embeds=negative)

    def initial_noise(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Gaussian latents (n, 4, H/8, W/8); DDIM's initial noise sigma is 1."""
        return torch.randn((n, self.latent_channels, self.latent_side, self.latent_side), generator=generator)

    def predict(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: SDConditioning) -> torch.Tensor:
        """The CFG-combined noise prediction ``eps_u + g * (eps_c - eps_u)`` for integer timesteps."""
        x = latents.to(self.device)
        batch = x.shape[0]
        t = timesteps.to(self.device)
        t = t.expand(batch) if t.ndim == 0 else t
        if t.shape != (batch,):
            raise ValueError(f"timesteps must be a scalar or have shape ({batch},), got {tuple(t.shape)}")
        prompt_embeds = cond.prompt_embeds.to(self.device)
        if self.config.guidance_scale == 1.0:
            return self.module(x, t, encoder_hidden_states=prompt_embeds, return_dict=False)[0]
        # One batch [unconditional; conditional]: both branches carry gradient, as in the rollout.
        eps = self.module(
            torch.cat([x, x]),
            torch.cat([t, t]),
            encoder_hidden_states=torch.cat([cond.negative_embeds.to(self.device), prompt_embeds]),
            return_dict=False,
        )[0]
        eps_uncond, eps_cond = eps.chunk(2)
        return eps_uncond + self.config.guidance_scale * (eps_cond - eps_uncond)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Undo the VAE scaling factor, decode, map [-1, 1] to [0, 1]."""
        scaled = latents.to(self.device) / self.vae.config.scaling_factor
        images = self.vae.decode(scaled.to(self.vae.dtype), return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """Every UNet weight, or only the LoRA weights."""
        return [p for p in self.module.parameters() if p.requires_grad]

    # ------------------------------------------------------------------------------ export

    def diffusers_export(self, sampler: Any) -> DiffusersExport:
        """A ``StableDiffusionPipeline`` of this policy's modules with a DDIM scheduler of the
        sampler's timesteps and betas, configured as SD ships it (``set_alpha_to_one`` false):
        ``ddim-sde`` decodes the final DDIM sample, as the pipeline does. No safety checker (none
        was trained with)."""
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        c, schedule = sampler.config, sampler.schedule()
        scheduler = DDIMScheduler(
            num_train_timesteps=c.num_train_timesteps,
            beta_start=c.beta_start,
            beta_end=c.beta_end,
            beta_schedule=c.beta_schedule,
            steps_offset=c.steps_offset,
            timestep_spacing="leading",
            clip_sample=False,
            set_alpha_to_one=False,
        )
        scheduler.set_timesteps(schedule.num_steps)
        if not torch.equal(scheduler.timesteps.long(), schedule.timesteps.long().cpu()):
            raise ValueError(
                f"the sampler's timesteps {schedule.timesteps.tolist()} are not DDIMScheduler's "
                f"{scheduler.timesteps.tolist()}: this sampler cannot be exported to StableDiffusionPipeline"
            )
        pipeline = StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.module,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        call: dict[str, Any] = {
            "num_inference_steps": schedule.num_steps,
            "guidance_scale": self.config.guidance_scale,
            "eta": 0.0,
            "height": self.resolution,
            "width": self.resolution,
        }
        if self.config.negative_prompt:
            call["negative_prompt"] = self.config.negative_prompt
        return DiffusersExport(pipeline=pipeline, trained="unet", call=call)

    @classmethod
    def memory_plan_spec(cls, config: Config) -> MemoryPlanSpec:
        """UNet, VAE and CLIP on the meta device and one UNet call (both CFG branches in one batch,
        as :meth:`predict`) at the run's resolution (``dancecore plan``)."""
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        if config.preset == "tiny":
            configs = {"unet": TINY_SPEC["unet"], "vae": TINY_SPEC["vae"], "text_encoder": TINY_SPEC["clip"]}
            source = "the tiny preset"
        else:
            configs, source = architecture_configs(config.pretrained, ARCHITECTURE, ("unet", "vae", "text_encoder"))
        unet = on_meta(lambda: UNet2DConditionModel.from_config(configs["unet"]))
        module = prepare_trainable(unet, config)
        vae = on_meta(lambda: AutoencoderKL.from_config(configs["vae"]))
        clip = on_meta(lambda: CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])))
        side = (config.resolution or (32 if config.preset == "tiny" else 512)) // 2 ** (
            len(vae.config.block_out_channels) - 1
        )
        branches = 1 if config.guidance_scale == 1.0 else 2
        text = clip.config.max_position_embeddings
        uc = unet.config

        def call(network: torch.nn.Module, rows: int) -> torch.Tensor:
            p = next(network.parameters())
            n = branches * rows
            x = torch.randn(n, uc.in_channels, side, side, device=p.device, dtype=p.dtype)
            states = torch.randn(n, text, uc.cross_attention_dim, device=p.device, dtype=p.dtype)
            return network(x, torch.full((n,), 500, device=p.device), encoder_hidden_states=states, return_dict=False)[
                0
            ]

        scale = 2 ** (len(vae.config.block_out_channels) - 1)
        return MemoryPlanSpec(
            trained=module,
            frozen={
                "CLIP text encoder": (clip, DTYPES[config.frozen_dtype]),
                "VAE": (vae, DTYPES[config.frozen_dtype]),
            },
            call=call,
            shapes=f"{side * scale} x {side * scale} px: latents {uc.in_channels} x {side} x {side}, "
            f"{text} text tokens" + (", CFG (2 rows per sample)" if branches == 2 else ""),
            source=source,
        )

    # ------------------------------------------------------------------------------ helpers

    def _encode(self, texts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(
            texts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        return self.text_encoder(ids, return_dict=False)[0].float()


#: The published Stable Diffusion v1.4 architecture (used when the checkpoint is not on disk).
ARCHITECTURE = Path(__file__).parent / "architectures" / "sd-v1-4.json"

TINY_SPEC: dict[str, Any] = {
    "unet": {
        "sample_size": 16,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 1,
        "block_out_channels": [16, 32],
        "norm_num_groups": 8,
        "cross_attention_dim": 32,
        "attention_head_dim": 4,
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
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
        "scaling_factor": 0.18215,
        "sample_size": 32,
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
    "seed": 0,
}


def tiny_sd_dir() -> Path:
    """A random-init SD v1.x of the real architecture (about 0.2M parameters) in diffusers layout."""
    return materialise("tiny-sd", TINY_SPEC, _write_tiny_sd)


def _write_tiny_sd(root: Path) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(TINY_SPEC["seed"])
    UNet2DConditionModel(**TINY_SPEC["unet"]).save_pretrained(root / "unet")
    AutoencoderKL(**TINY_SPEC["vae"]).save_pretrained(root / "vae")
    CLIPTextModel(CLIPTextConfig(**TINY_SPEC["clip"])).save_pretrained(root / "text_encoder")
    write_tiny_tokenizer(root / "tokenizer", 77)
