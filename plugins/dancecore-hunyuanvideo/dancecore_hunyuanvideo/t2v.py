"""HunyuanVideo text-to-video as a dancecore policy: rectified flow on 3D video latents with the
distilled guidance embedding (no classifier-free guidance).

Loads a real HunyuanVideo checkpoint in diffusers layout (``transformer/``, ``vae/``,
``text_encoder/`` (Llama), ``text_encoder_2/`` (CLIP-L), ``tokenizer/``, ``tokenizer_2/``) from a
local directory or the Hugging Face cache, offline. The ``tiny`` preset writes the same layout
with random-init networks of the same architecture and loads it through the same code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from pydantic import Field

from dancecore import BuildContext, DiffusersExport, MemoryPlanSpec, PromptBatch
from dancecore_hunyuanvideo.common import TINY_DEFAULTS, HunyuanVideoOptions, load_backbone
from dancecore_hunyuanvideo.plan import hunyuan_plan_spec

#: The paper's setting: 480p (480 x 848), 53 frames.
DEFAULTS = {"height": 480, "width": 848, "num_frames": 53, "max_sequence_length": 256}


@dataclass(frozen=True)
class HunyuanVideoConditioning:
    """Encoded prompts, one row each: Llama embeddings (B, L, D) with their mask (B, L) and the
    pooled CLIP embedding (B, D')."""

    batch_fields: ClassVar[tuple[str, ...]] = ("prompt_embeds", "prompt_mask", "pooled_embeds")
    prompt_embeds: torch.Tensor
    prompt_mask: torch.Tensor
    pooled_embeds: torch.Tensor


class HunyuanVideoPolicy:
    """HunyuanVideo (13B) through diffusers' ``HunyuanVideoTransformer3DModel``; embedded guidance."""

    class Config(HunyuanVideoOptions):
        """Options of the ``hunyuanvideo`` policy (sizes default to 480 x 848 x 53; tiny: 32 x 48 x 5)."""

        guidance: float = Field(6.0, ge=0, description="Value fed to the distilled guidance embedding.")

    prediction_type = "flow"
    #: the transformer splits its video tokens over ``distributed.sequence_parallel`` ranks
    supports_sequence_parallel = True

    def __init__(self, config: Config, context: BuildContext | None = None) -> None:
        context = context or BuildContext()
        self.config = config
        self.device = context.device
        defaults = TINY_DEFAULTS if config.preset == "tiny" else DEFAULTS
        self.backbone = load_backbone(
            config,
            self.device,
            what="HunyuanVideo",
            defaults=defaults,
            image_conditioned=False,
            sequence_parallel=context.sequence_parallel,
        )
        self.module = self.backbone.module
        self.geometry = self.backbone.geometry

    def encode_prompts(self, batch: PromptBatch) -> HunyuanVideoConditioning:
        """Llama and CLIP embeddings, one row per prompt."""
        text = self.backbone.encode_text(batch.texts)
        return HunyuanVideoConditioning(prompt_embeds=text.embeds, prompt_mask=text.mask, pooled_embeds=text.pooled)

    def initial_noise(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Gaussian latents (n, C, (F - 1) / 4 + 1, H / 8, W / 8)."""
        return self.backbone.initial_noise(n, generator)

    def predict(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: HunyuanVideoConditioning) -> torch.Tensor:
        """The transformer's velocity; ``timesteps`` are sigmas in [0, 1], one per row."""
        return self.backbone.velocity(
            latents, timesteps, cond.prompt_embeds, cond.prompt_mask, cond.pooled_embeds, self.config.guidance
        )

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Videos (B, F, 3, H, W) in [0, 1]."""
        return self.backbone.decode(latents)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """Every transformer weight, or only the LoRA weights."""
        return self.backbone.trainable_parameters()

    def diffusers_export(self, sampler: Any) -> DiffusersExport:
        """A ``HunyuanVideoPipeline`` of these modules taking ``dancecore eval``'s deterministic steps
        (the embedded guidance as ``guidance_scale``, no true CFG)."""
        from diffusers import HunyuanVideoPipeline

        pipeline = HunyuanVideoPipeline(**self.backbone.pipeline_components(sampler, "HunyuanVideoPipeline"))
        call = {**self.backbone.pipeline_call(sampler), "guidance_scale": self.config.guidance}
        return DiffusersExport(pipeline=pipeline, trained="transformer", call=call, task="text-to-video")

    @classmethod
    def memory_plan_spec(cls, config: Config) -> MemoryPlanSpec:
        """The networks on the meta device and one transformer call at the run's video size (``dancecore plan``)."""
        return hunyuan_plan_spec(config, DEFAULTS, image_conditioned=False, guidance=config.guidance, cfg=False)
