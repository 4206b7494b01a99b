"""What the HunyuanVideo T2V and SkyReels I2V policies share: the options, loading the diffusers
checkpoint, prompt encoding, the transformer call, VAE encoding/decoding and the tiny preset.

Both backbones are diffusers' ``HunyuanVideoTransformer3DModel`` with ``AutoencoderKLHunyuanVideo``,
a Llama text encoder (``text_encoder``/``tokenizer``) and CLIP-L (``text_encoder_2``/``tokenizer_2``),
in the diffusers directory layout. Facts taken from diffusers' HunyuanVideo pipelines:

- the transformer's timestep is ``sigma * 1000`` (FlowMatchEulerDiscreteScheduler's timesteps),
  and the embedded guidance is ``guidance_scale * 1000``;
- Llama embeddings are the hidden states 3 from the end (2 layers skipped) of the prompt wrapped
  in the HunyuanVideo template, with the template's tokens cropped off; CLIP gives the pooled
  embedding;
- latents are (C, (F - 1) / 4 + 1, H / 8, W / 8) and are divided by the VAE's
  ``scaling_factor`` before decoding.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

import dancecore
from dancecore import (
    DTYPES,
    TINY_TOKENIZER,
    NetworkOptions,
    SequenceParallelGroup,
    encoder_attention,
    flow_match_scheduler,
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
#: The Llama hidden states used are this many layers from the end, plus one.
SKIPPED_LLAMA_LAYERS = 2
#: Timesteps and the guidance embedding are on the 0..1000 scale of the training scheduler.
TIMESTEP_SCALE = 1000.0


class HunyuanVideoOptions(NetworkOptions):
    """Options common to the HunyuanVideo-architecture policies (the size defaults depend on the
    preset and the backbone, so ``None`` means "the backbone's default")."""

    # The transformer masks the text padding in every attention call; diffusers' flash-attn 2 backend
    # refuses masks, so 'flash' is not offered.
    attention_backends = ("sdpa", "native", "xformers")

    pretrained: str | None = Field(None, description="Local diffusers directory or cached HF repo id.")
    preset: Literal["tiny"] | None = Field(None, description="'tiny': random-init model for tests and CPU.")
    transformer: str | None = Field(
        None,
        description="Transformer weights alone (a diffusers model directory or cached HF repo id), replacing "
        "`pretrained`'s transformer/ folder: SkyReels-V1 publishes only its transformer.",
    )
    height: int | None = Field(None, ge=PIXEL_MULTIPLE, description="Video height in pixels, a multiple of 16.")
    width: int | None = Field(None, ge=PIXEL_MULTIPLE, description="Video width in pixels, a multiple of 16.")
    num_frames: int | None = Field(None, ge=1, description="Frames per video, of the form 4k + 1 (53 in the paper).")
    max_sequence_length: int | None = Field(
        None, ge=4, description="Llama prompt tokens after the template (256 for the real model; tiny: 16)."
    )
    template_crop_start: int | None = Field(
        None,
        ge=0,
        description="Template tokens cropped from the Llama output: diffusers' 95 for the real tokenizer; "
        "counted from the tokenizer for the tiny preset.",
    )
    vae_tiling: bool = Field(True, description="Decode in overlapping spatial tiles (needed at 480p on one GPU).")
    transformer_dtype: Literal["float32", "bfloat16"] = Field(
        "float32",
        description="dtype the transformer is loaded in: float32 (fp32 master weights for full fine-tuning) or "
        "bfloat16 (half the memory; for LoRA, whose adapters stay fp32, or a DeepSpeed bf16 engine).",
    )
    offload_text_encoders: bool = Field(
        False,
        description="Keep the Llama and CLIP encoders (~15 GB in bf16) in CPU memory and move them to the "
        "device only while encoding prompts.",
    )

    @model_validator(mode="after")
    def _check_shapes(self) -> HunyuanVideoOptions:
        dancecore.check_one_weights_source(self.pretrained, self.preset)
        for name in ("height", "width"):
            dancecore.check_multiple(name, getattr(self, name), PIXEL_MULTIPLE)
        dancecore.check_frame_count("num_frames", self.num_frames, TEMPORAL_COMPRESSION)
        return self


@dataclass(frozen=True)
class VideoGeometry:
    """Pixel and latent sizes of the videos a policy generates."""

    height: int
    width: int
    num_frames: int
    latent_channels: int
    spatial_ratio: int
    temporal_ratio: int

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """(C, F', H', W') of one latent video."""
        return (
            self.latent_channels,
            (self.num_frames - 1) // self.temporal_ratio + 1,
            self.height // self.spatial_ratio,
            self.width // self.spatial_ratio,
        )


@dataclass(frozen=True)
class TextEmbeddings:
    """Encoded prompts: Llama sequence embeddings with their mask, and the pooled CLIP embedding."""

    embeds: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor


def hunyuan_prompt_template() -> tuple[str, int]:
    """HunyuanVideo's Llama prompt template and its token count to crop (diffusers' values)."""
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    return DEFAULT_PROMPT_TEMPLATE["template"], int(DEFAULT_PROMPT_TEMPLATE["crop_start"])


def count_template_prefix(tokenizer, template: str) -> int:
    """Tokens that precede the prompt in ``template`` (the text before ``{}``, plus BOS if added)."""
    prefix = template.split("{}")[0]
    count = len(tokenizer(prefix, add_special_tokens=False).input_ids)
    probe = tokenizer("a").input_ids
    adds_bos = tokenizer.bos_token_id is not None and probe[0] == tokenizer.bos_token_id
    return count + int(adds_bos)


class HunyuanVideoBackbone:
    """The loaded networks of one HunyuanVideo-architecture checkpoint and the operations both
    policies perform with them. The transformer (``module``) is the only trainable part."""

    def __init__(
        self,
        root: Path,
        options: HunyuanVideoOptions,
        device: torch.device,
        *,
        defaults: dict[str, int],
        image_conditioned: bool,
        transformer_root: Path | None = None,
        sequence_parallel: SequenceParallelGroup | None = None,
        what: str = "HunyuanVideo",
    ) -> None:
        from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoTransformer3DModel
        from transformers import AutoTokenizer, CLIPTextModel, LlamaModel

        self.device = device
        frozen = DTYPES[options.frozen_dtype]
        load = {"local_files_only": True}
        encoders = {**load, **encoder_attention(options.attention_backend)}
        self.tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer", **load)
        self.tokenizer_2 = AutoTokenizer.from_pretrained(root / "tokenizer_2", **load)
        self.text_encoder = LlamaModel.from_pretrained(root / "text_encoder", torch_dtype=frozen, **encoders)
        self.text_encoder_2 = CLIPTextModel.from_pretrained(root / "text_encoder_2", torch_dtype=frozen, **encoders)
        self.vae = AutoencoderKLHunyuanVideo.from_pretrained(root / "vae", torch_dtype=frozen, **load)
        transformer_dir = root / "transformer" if transformer_root is None else transformer_root
        transformer = HunyuanVideoTransformer3DModel.from_pretrained(
            transformer_dir, torch_dtype=DTYPES[options.transformer_dtype], **load
        )
        self.offload_text_encoders = options.offload_text_encoders
        text_device = torch.device("cpu") if self.offload_text_encoders else device
        for text_module in (self.text_encoder, self.text_encoder_2):
            text_module.requires_grad_(False).eval().to(text_device)
        self.vae.requires_grad_(False).eval().to(device)
        if options.vae_tiling:
            self.vae.enable_tiling()

        latent_channels = int(self.vae.config.latent_channels)
        expected_in = latent_channels * (2 if image_conditioned else 1)
        if transformer.config.in_channels != expected_in or transformer.config.out_channels != latent_channels:
            kind = "image-to-video (latent concat)" if image_conditioned else "text-to-video"
            raise ValueError(
                f"{transformer_dir}: in_channels={transformer.config.in_channels}, "
                f"out_channels={transformer.config.out_channels}, but a {kind} policy with a "
                f"{latent_channels}-channel VAE needs in_channels={expected_in}, out_channels={latent_channels}"
            )
        self.module = prepare_trainable(transformer, options).to(device)
        self.module.train()

        self.geometry = VideoGeometry(
            height=options.height or defaults["height"],
            width=options.width or defaults["width"],
            num_frames=options.num_frames or defaults["num_frames"],
            latent_channels=latent_channels,
            spatial_ratio=int(self.vae.config.spatial_compression_ratio),
            temporal_ratio=int(self.vae.config.temporal_compression_ratio),
        )
        if sequence_parallel_active(sequence_parallel):
            from dancecore_hunyuanvideo.sequence_parallel import enable_sequence_parallel

            assert sequence_parallel is not None
            enable_sequence_parallel(self.module, sequence_parallel, self.geometry.latent_shape, what)
        self.template, declared_crop = hunyuan_prompt_template()
        if options.template_crop_start is not None:
            self.crop_start = options.template_crop_start
        elif options.preset == "tiny":
            self.crop_start = count_template_prefix(self.tokenizer, self.template)
        else:
            self.crop_start = declared_crop
        self.max_sequence_length = options.max_sequence_length or defaults["max_sequence_length"]

    # --------------------------------------------------------------------------------- text

    def encode_text(self, texts: list[str]) -> TextEmbeddings:
        """Llama embeddings of the templated prompts (template cropped) and CLIP pooled embeddings."""
        if not self.offload_text_encoders:
            return self._encode_text(texts)
        self.text_encoder.to(self.device)
        self.text_encoder_2.to(self.device)
        try:
            return self._encode_text(texts)
        finally:
            self.text_encoder.to("cpu")
            self.text_encoder_2.to("cpu")

    @torch.no_grad()
    def _encode_text(self, texts: list[str]) -> TextEmbeddings:
        templated = [self.template.format(text) for text in texts]
        tokens = self.tokenizer(
            templated,
            max_length=self.max_sequence_length + self.crop_start,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        )
        ids = tokens.input_ids.to(self.device)
        mask = tokens.attention_mask.to(self.device)
        hidden = self.text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        embeds = hidden[-(SKIPPED_LLAMA_LAYERS + 1)][:, self.crop_start :]
        mask = mask[:, self.crop_start :]
        clip_ids = self.tokenizer_2(
            texts,
            padding="max_length",
            max_length=self.tokenizer_2.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        pooled = self.text_encoder_2(clip_ids, output_hidden_states=False).pooler_output
        return TextEmbeddings(embeds=embeds.float(), mask=mask.long(), pooled=pooled.float())

    # --------------------------------------------------------------------------- transformer

    def velocity(
        self,
        hidden_states: torch.Tensor,
        sigmas: torch.Tensor,
        embeds: torch.Tensor,
        mask: torch.Tensor,
        pooled: torch.Tensor,
        guidance: float,
    ) -> torch.Tensor:
        """One transformer call. ``sigmas`` are the flow noise levels in [0, 1] (a scalar or one per
        row); the network is told ``sigma * 1000`` as diffusers' pipelines do."""
        batch = hidden_states.shape[0]
        if sigmas.ndim > 1 or (sigmas.ndim == 1 and sigmas.shape[0] != batch):
            raise ValueError(
                f"timesteps must be a scalar or have one entry per row ({batch}), got {tuple(sigmas.shape)}"
            )
        sigmas = sigmas.to(self.device, torch.float32)
        timestep = (sigmas.expand(batch) if sigmas.ndim == 0 else sigmas) * TIMESTEP_SCALE
        dtype = self.module.dtype
        return self.module(
            hidden_states=hidden_states.to(self.device, dtype),
            timestep=timestep,
            encoder_hidden_states=embeds.to(self.device, dtype),
            encoder_attention_mask=mask.to(self.device, dtype),
            pooled_projections=pooled.to(self.device, dtype),
            guidance=torch.full((batch,), guidance * TIMESTEP_SCALE, device=self.device, dtype=torch.float32),
            return_dict=False,
        )[0]

    # ---------------------------------------------------------------------------------- VAE

    def initial_noise(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Standard-normal latents (n, C, F', H', W') on CPU in fp32."""
        return torch.randn((n, *self.geometry.latent_shape), generator=generator)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, F', H', W') -> videos (B, F, 3, H, W) in [0, 1], one sample at a time."""
        scale = float(self.vae.config.scaling_factor)
        videos = []
        for row in latents:
            z = row.unsqueeze(0).to(self.device, self.vae.dtype) / scale
            videos.append(self.vae.decode(z, return_dict=False)[0].float())
        pixels = torch.cat(videos).permute(0, 2, 1, 3, 4)  # (B, 3, F, H, W) -> (B, F, 3, H, W)
        return (pixels / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def first_frame_latents(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> the I2V condition (B, C, F', H', W'): the image's latent
        (the posterior mode, scaled) as the first latent frame, zeros after it."""
        scale = float(self.vae.config.scaling_factor)
        latents = []
        for image in images:
            x = image[None, :, None].to(self.device, self.vae.dtype)  # (1, 3, 1, H, W)
            latents.append(self.vae.encode(x).latent_dist.mode().float() * scale)
        first = torch.cat(latents)
        _, frames, _, _ = self.geometry.latent_shape
        padding = first.new_zeros(first.shape[0], first.shape[1], frames - 1, *first.shape[3:])
        return torch.cat([first, padding], dim=2)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """Every transformer weight, or only the LoRA weights."""
        return [p for p in self.module.parameters() if p.requires_grad]

    # ------------------------------------------------------------------------------- export

    def pipeline_components(self, sampler: Any, pipeline: str) -> dict[str, Any]:
        """The components of diffusers' HunyuanVideo pipelines: these modules and a flow-matching
        Euler scheduler taking the sampler's deterministic steps."""
        return {
            "text_encoder": self.text_encoder,
            "tokenizer": self.tokenizer,
            "transformer": self.module,
            "vae": self.vae,
            "scheduler": flow_match_scheduler(sampler, pipeline),
            "text_encoder_2": self.text_encoder_2,
            "tokenizer_2": self.tokenizer_2,
        }

    def pipeline_call(self, sampler: Any) -> dict[str, Any]:
        """The pipeline arguments of this geometry, prompt template and step count."""
        g = self.geometry
        return {
            "num_inference_steps": sampler.schedule().num_steps,
            "height": g.height,
            "width": g.width,
            "num_frames": g.num_frames,
            "max_sequence_length": self.max_sequence_length,
            "prompt_template": {"template": self.template, "crop_start": self.crop_start},
        }


def load_backbone(
    options: HunyuanVideoOptions,
    device: torch.device,
    *,
    what: str,
    defaults: dict[str, int],
    image_conditioned: bool,
    sequence_parallel: SequenceParallelGroup | None = None,
) -> HunyuanVideoBackbone:
    """Resolve the weights (tiny preset or a real checkpoint) and load them."""
    if options.preset == "tiny":
        root = tiny_checkpoint(image_conditioned)
    else:
        root = resolve_pretrained(options.pretrained or "", what)
    transformer_root = (
        None if options.transformer is None else resolve_pretrained(options.transformer, f"{what} transformer")
    )
    return HunyuanVideoBackbone(
        root,
        options,
        device,
        defaults=defaults,
        image_conditioned=image_conditioned,
        transformer_root=transformer_root,
        sequence_parallel=sequence_parallel,
        what=what,
    )


# ----------------------------------------------------------------------------------- tiny preset

TINY_SPEC = {
    "transformer": {
        "in_channels": 4,
        "out_channels": 4,
        "num_attention_heads": 2,
        "attention_head_dim": 8,
        "num_layers": 1,
        "num_single_layers": 1,
        "num_refiner_layers": 1,
        "patch_size": 2,
        "patch_size_t": 1,
        "text_embed_dim": 32,
        "pooled_projection_dim": 32,
        "rope_axes_dim": [2, 2, 4],
        "guidance_embeds": True,
    },
    "vae": {
        "latent_channels": 4,
        "block_out_channels": [8, 8, 8, 8],
        "layers_per_block": 1,
        "norm_num_groups": 4,
        "spatial_compression_ratio": 8,
        "temporal_compression_ratio": 4,
    },
    "llama": {
        **TINY_TOKENIZER.model_config(),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
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
    "seeding": "per-network",
}

#: Sizes the tiny preset generates by default (4 x 6 latent pixels, 2 latent frames).
TINY_DEFAULTS = {"height": 32, "width": 48, "num_frames": 5, "max_sequence_length": 16}


def tiny_checkpoint(image_conditioned: bool) -> Path:
    """A random-init HunyuanVideo (or, ``image_conditioned``, SkyReels-I2V with twice the input
    channels) of the real architecture, in diffusers layout; about 0.1M parameters."""
    spec = {**TINY_SPEC, "image_conditioned": image_conditioned}
    name = "tiny-skyreels-i2v" if image_conditioned else "tiny-hunyuanvideo"
    return materialise(name, spec, lambda root: _write_tiny(root, image_conditioned))


def _write_tiny(root: Path, image_conditioned: bool) -> None:
    from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoTransformer3DModel
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    # Each network is seeded on its own, so the T2V and I2V presets share the same VAE and text
    # encoders, as SkyReels-V1 shares HunyuanVideo's.
    seed = TINY_SPEC["seed"]
    transformer = dict(TINY_SPEC["transformer"])
    if image_conditioned:
        transformer["in_channels"] = 2 * transformer["in_channels"]
    torch.manual_seed(seed)
    HunyuanVideoTransformer3DModel(**transformer).save_pretrained(root / "transformer")
    torch.manual_seed(seed + 1)
    AutoencoderKLHunyuanVideo(**TINY_SPEC["vae"]).save_pretrained(root / "vae")
    torch.manual_seed(seed + 2)
    LlamaModel(LlamaConfig(**TINY_SPEC["llama"])).save_pretrained(root / "text_encoder")
    torch.manual_seed(seed + 3)
    CLIPTextModel(CLIPTextConfig(**TINY_SPEC["clip"])).save_pretrained(root / "text_encoder_2")
    write_tiny_tokenizer(root / "tokenizer", 1024)
    write_tiny_tokenizer(root / "tokenizer_2", 77)
