"""``dancecore plan`` for the HunyuanVideo-architecture policies: the networks on the meta device
and one transformer call at the run's video size (:class:`dancecore.PlannablePolicy`)."""

from __future__ import annotations

from pathlib import Path

import torch

from dancecore import DTYPES, MemoryPlanSpec, architecture_configs, on_meta, prepare_trainable
from dancecore_hunyuanvideo.common import TIMESTEP_SCALE, TINY_DEFAULTS, TINY_SPEC, HunyuanVideoOptions

#: The published HunyuanVideo architecture (used when the checkpoint is not on disk).
ARCHITECTURE = Path(__file__).parent / "architectures" / "hunyuanvideo.json"
PARTS = ("transformer", "vae", "text_encoder", "text_encoder_2")


def _configs(options: HunyuanVideoOptions, image_conditioned: bool) -> tuple[dict, str]:
    if options.preset == "tiny":
        configs = {"transformer": dict(TINY_SPEC["transformer"]), "vae": TINY_SPEC["vae"]}
        configs |= {"text_encoder": TINY_SPEC["llama"], "text_encoder_2": TINY_SPEC["clip"]}
        source = "the tiny preset"
    else:
        configs, source = architecture_configs(options.pretrained, ARCHITECTURE, PARTS)
        configs = {**configs, "transformer": dict(configs["transformer"])}
        if options.transformer is not None:
            source += f" (transformer {options.transformer!r}: the same architecture assumed)"
    if image_conditioned and configs["transformer"]["in_channels"] == configs["vae"]["latent_channels"]:
        configs["transformer"]["in_channels"] *= 2  # SkyReels-V1: the first frame's latents concatenated
    return configs, source


def hunyuan_plan_spec(
    options: HunyuanVideoOptions,
    defaults: dict[str, int],
    *,
    image_conditioned: bool,
    guidance: float,
    cfg: bool,
) -> MemoryPlanSpec:
    """The plan spec of a HunyuanVideo-architecture policy; ``cfg``: two differentiable branches per call."""
    from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoTransformer3DModel
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    configs, source = _configs(options, image_conditioned)
    transformer = on_meta(lambda: HunyuanVideoTransformer3DModel.from_config(configs["transformer"]))
    module = prepare_trainable(transformer, options)
    vae = on_meta(lambda: AutoencoderKLHunyuanVideo.from_config(configs["vae"]))
    llama = on_meta(lambda: LlamaModel(LlamaConfig(**configs["text_encoder"])))
    clip = on_meta(lambda: CLIPTextModel(CLIPTextConfig(**configs["text_encoder_2"])))
    sizes = TINY_DEFAULTS if options.preset == "tiny" else defaults
    height, width = options.height or sizes["height"], options.width or sizes["width"]
    frames = options.num_frames or sizes["num_frames"]
    text = options.max_sequence_length or sizes["max_sequence_length"]
    spatial, temporal = int(vae.config.spatial_compression_ratio), int(vae.config.temporal_compression_ratio)
    latent = ((frames - 1) // temporal + 1, height // spatial, width // spatial)
    tc = transformer.config
    tokens = latent[0] * (latent[1] // tc.patch_size) * (latent[2] // tc.patch_size) // tc.patch_size_t

    def call(network: torch.nn.Module, rows: int) -> torch.Tensor:
        p = next(network.parameters())

        def branch() -> torch.Tensor:
            return network(
                hidden_states=torch.randn(rows, tc.in_channels, *latent, device=p.device, dtype=p.dtype),
                timestep=torch.full((rows,), 500.0, device=p.device),
                encoder_hidden_states=torch.randn(rows, text, tc.text_embed_dim, device=p.device, dtype=p.dtype),
                encoder_attention_mask=torch.ones(rows, text, device=p.device, dtype=p.dtype),
                pooled_projections=torch.randn(rows, tc.pooled_projection_dim, device=p.device, dtype=p.dtype),
                guidance=torch.full((rows,), guidance * TIMESTEP_SCALE, device=p.device),
                return_dict=False,
            )[0]

        if not cfg:
            return branch()
        v_cond, v_uncond = branch(), branch()
        return v_uncond + 5.0 * (v_cond - v_uncond)

    frozen = DTYPES[options.frozen_dtype]
    offloaded = ("Llama text encoder", "CLIP text encoder") if options.offload_text_encoders else ()
    return MemoryPlanSpec(
        trained=module,
        frozen={"Llama text encoder": (llama, frozen), "CLIP text encoder": (clip, frozen), "VAE": (vae, frozen)},
        call=call,
        shapes=f"{height} x {width} px x {frames} frames: latents {latent}, {tokens:,} video + {text} text tokens"
        + (", CFG (2 branches)" if cfg else ""),
        source=source,
        offloaded=offloaded,
    )
