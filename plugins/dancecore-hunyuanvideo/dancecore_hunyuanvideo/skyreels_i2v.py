"""SkyReels-V1 image-to-video as a dancecore policy.

SkyReels-V1-Hunyuan-I2V is the HunyuanVideo architecture with 32 input channels: the 16-channel
noisy latents concatenated on the channel axis with the first frame's image latents (the VAE
latent of the image in latent frame 0, zeros in the other frames), as diffusers'
``HunyuanSkyreelsImageToVideoPipeline`` builds them. It is not guidance-distilled: classifier-free
guidance (scale 5 in DanceGRPO) against an empty prompt is applied inside :meth:`predict`, with
both branches under autograd, so the rollout and the training log-probabilities are computed from
the same combined prediction.

The first frame comes from the prompt dataset (``image`` in a JSON-lines prompt file).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from pydantic import Field

from dancecore import BuildContext, DiffusersExport, MemoryPlanSpec, Prompt, PromptBatch, PromptFileError
from dancecore_hunyuanvideo.common import TINY_DEFAULTS, HunyuanVideoOptions, load_backbone
from dancecore_hunyuanvideo.plan import hunyuan_plan_spec

#: DanceGRPO's SkyReels setting: 400 x 640, 53 frames.
DEFAULTS = {"height": 400, "width": 640, "num_frames": 53, "max_sequence_length": 256}


class PromptImageError(PromptFileError):
    """A prompt's first-frame image is missing or unreadable; the message names every such prompt.

    A :class:`~dancecore.PromptFileError`, so the CLI reports it as bad input (exit code 2)."""


@dataclass(frozen=True)
class SkyReelsConditioning:
    """Encoded prompts and first frames, one row each, plus the empty-prompt (negative) embeddings
    shared by every row (leading dimension 1, not sliced by :func:`dancecore.select_rows`)."""

    batch_fields: ClassVar[tuple[str, ...]] = ("prompt_embeds", "prompt_mask", "pooled_embeds", "image_latents")
    prompt_embeds: torch.Tensor
    prompt_mask: torch.Tensor
    pooled_embeds: torch.Tensor
    image_latents: torch.Tensor
    negative_embeds: torch.Tensor
    negative_mask: torch.Tensor
    negative_pooled: torch.Tensor


def load_first_frame(prompt: Prompt, height: int, width: int) -> torch.Tensor:
    """Read ``prompt.image`` as RGB, centre-crop it to the video's aspect ratio, resize it to
    ``height`` x ``width`` and return (3, H, W) in [-1, 1]. Raises :class:`PromptImageError`."""
    where = f"prompt {prompt.index} ({prompt.text[:60]!r})"
    if prompt.image is None:
        raise PromptImageError(f"{where} has no image; the skyreels-i2v policy needs an 'image' path per prompt")
    try:
        with Image.open(prompt.image) as handle:
            image = handle.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise PromptImageError(f"{where}: cannot read image {prompt.image}: {type(exc).__name__}: {exc}") from None
    src_w, src_h = image.size
    scale = max(width / src_w, height / src_h)
    crop_w, crop_h = round(width / scale), round(height / scale)
    left, top = (src_w - crop_w) // 2, (src_h - crop_h) // 2
    image = image.crop((left, top, left + crop_w, top + crop_h)).resize((width, height), Image.Resampling.LANCZOS)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1)
    return pixels / 127.5 - 1.0


class SkyReelsI2VPolicy:
    """SkyReels-V1 I2V (32-channel HunyuanVideo transformer) with classifier-free guidance in predict.

    The first frame's VAE latent is concatenated to the noisy latents on the channel axis.
    """

    class Config(HunyuanVideoOptions):
        """Options of the ``skyreels-i2v`` policy (sizes default to 400 x 640 x 53; tiny: 32 x 48 x 5)."""

        cfg_scale: float = Field(5.0, ge=1, description="Classifier-free guidance scale (1 switches CFG off).")
        negative_prompt: str = Field("", description="Prompt of the unconditional branch (empty in DanceGRPO).")
        embedded_guidance: float = Field(1.0, ge=0, description="Value fed to the guidance embedding, if any.")

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
            what="SkyReels-V1 I2V",
            defaults=defaults,
            image_conditioned=True,
            sequence_parallel=context.sequence_parallel,
        )
        self.module = self.backbone.module
        self.geometry = self.backbone.geometry
        self._negative = self.backbone.encode_text([config.negative_prompt])

    def encode_prompts(self, batch: PromptBatch) -> SkyReelsConditioning:
        """Text embeddings and first-frame latents, one row per prompt.

        Every prompt's image is checked before any is encoded, and one error names all the bad ones.
        """
        g = self.geometry
        images, problems = [], []
        for prompt in batch.prompts:
            try:
                images.append(load_first_frame(prompt, g.height, g.width))
            except PromptImageError as exc:
                problems.append(str(exc))
        if problems:
            raise PromptImageError("; ".join(problems))
        text = self.backbone.encode_text(batch.texts)
        return SkyReelsConditioning(
            prompt_embeds=text.embeds,
            prompt_mask=text.mask,
            pooled_embeds=text.pooled,
            image_latents=self.backbone.first_frame_latents(torch.stack(images)),
            negative_embeds=self._negative.embeds,
            negative_mask=self._negative.mask,
            negative_pooled=self._negative.pooled,
        )

    def initial_noise(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Gaussian latents (n, C, (F - 1) / 4 + 1, H / 8, W / 8) (the image channels are added in
        :meth:`predict`)."""
        return self.backbone.initial_noise(n, generator)

    def predict(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: SkyReelsConditioning) -> torch.Tensor:
        """CFG-combined velocity ``v_uncond + s * (v_cond - v_uncond)``, both branches differentiable."""
        model_input = torch.cat([latents, cond.image_latents.to(latents.device, latents.dtype)], dim=1)
        guidance = self.config.embedded_guidance
        v_cond = self.backbone.velocity(
            model_input, timesteps, cond.prompt_embeds, cond.prompt_mask, cond.pooled_embeds, guidance
        )
        if self.config.cfg_scale == 1.0:
            return v_cond
        batch = latents.shape[0]
        v_uncond = self.backbone.velocity(
            model_input,
            timesteps,
            cond.negative_embeds.expand(batch, -1, -1),
            cond.negative_mask.expand(batch, -1),
            cond.negative_pooled.expand(batch, -1),
            guidance,
        )
        return v_uncond + self.config.cfg_scale * (v_cond - v_uncond)

    @classmethod
    def memory_plan_spec(cls, config: Config) -> MemoryPlanSpec:
        """The networks on the meta device and one CFG transformer call (both branches) at the run's
        video size (``dancecore plan``)."""
        return hunyuan_plan_spec(
            config, DEFAULTS, image_conditioned=True, guidance=config.embedded_guidance, cfg=config.cfg_scale != 1.0
        )

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Videos (B, F, 3, H, W) in [0, 1]."""
        return self.backbone.decode(latents)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """Every transformer weight, or only the LoRA weights."""
        return self.backbone.trainable_parameters()

    def diffusers_export(self, sampler: Any) -> DiffusersExport:
        """A ``HunyuanSkyreelsImageToVideoPipeline`` of these modules taking ``dancecore eval``'s
        deterministic steps, with the same true CFG against the negative prompt. One difference
        stays: diffusers conditions on a sample of the VAE posterior of the first frame, dancecore
        on its mode (deterministic); the pipeline's ``image`` must be the prompt's first frame at
        the video's size (this policy centre-crops and resizes it, diffusers only resizes)."""
        from diffusers import HunyuanSkyreelsImageToVideoPipeline

        name = "HunyuanSkyreelsImageToVideoPipeline"
        pipeline = HunyuanSkyreelsImageToVideoPipeline(**self.backbone.pipeline_components(sampler, name))
        call = {
            **self.backbone.pipeline_call(sampler),
            "guidance_scale": self.config.embedded_guidance,
            "true_cfg_scale": self.config.cfg_scale,
            "negative_prompt": self.config.negative_prompt,
        }
        return DiffusersExport(pipeline=pipeline, trained="transformer", call=call, task="image-to-video")
