"""The ``hunyuanvideo`` policy on a tiny random-init HunyuanVideo of the real architecture (CPU)."""

from __future__ import annotations

import pytest
import torch
from dancecore_hunyuanvideo.common import count_template_prefix, tiny_checkpoint
from dancecore_hunyuanvideo.t2v import HunyuanVideoConditioning, HunyuanVideoPolicy
from pydantic import ValidationError

from dancecore import Prompt, PromptBatch, WeightsNotFoundError, select_rows
from dancecore.testing import check_attention_backends, check_policy_plugin


def _noise(policy, n: int, seed: int = 0) -> torch.Tensor:
    return policy.initial_noise(n, torch.Generator().manual_seed(seed))


SIGMAS = torch.tensor([1.0, 0.6, 0.1])


def test_conforms_to_the_policy_contract(prompts):
    """Registry, flow prediction for flow-sde (the paper's shift and eta), seeded noise, deterministic
    encoding and prediction, rollout/replay log-prob identity, gradients, select_rows, video decode."""
    policy = check_policy_plugin(
        "hunyuanvideo", {"preset": "tiny"}, sampler_options={"shift": 5.0, "eta": 0.25}, prompts=prompts
    )
    assert isinstance(policy, HunyuanVideoPolicy)


def test_shapes(t2v, prompts):
    cond = t2v.encode_prompts(prompts)
    assert isinstance(cond, HunyuanVideoConditioning)
    assert cond.prompt_embeds.shape == (3, 16, 32)
    assert cond.prompt_mask.shape == (3, 16)
    assert cond.pooled_embeds.shape == (3, 32)
    latents = _noise(t2v, 3)
    # 5 frames -> (5 - 1) / 4 + 1 = 2 latent frames; 32 x 48 pixels -> 4 x 6 latent pixels.
    assert latents.shape == (3, 4, 2, 4, 6) and latents.dtype == torch.float32
    velocity = t2v.predict(latents, SIGMAS, cond)
    assert velocity.shape == latents.shape
    videos = t2v.decode(latents)
    assert videos.shape == (3, 5, 3, 32, 48)
    assert videos.min() >= 0 and videos.max() <= 1


def test_num_frames_map_to_latent_frames():
    policy = HunyuanVideoPolicy(HunyuanVideoPolicy.Config(preset="tiny", num_frames=9, height=16, width=32))
    latents = _noise(policy, 1)
    assert latents.shape == (1, 4, 3, 2, 4)
    assert policy.decode(latents).shape == (1, 9, 3, 16, 32)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"preset": "tiny", "num_frames": 6}, "4k \\+ 1.*try 5 or 9"),
        ({"preset": "tiny", "num_frames": 52}, "try 49 or 53"),
        ({"preset": "tiny", "height": 40}, "multiple of 16"),
        ({"preset": "tiny", "width": 850}, "try 848 or 864"),
        ({}, "exactly one of"),
        ({"preset": "tiny", "pretrained": "hunyuanvideo-community/HunyuanVideo"}, "exactly one of"),
        ({"preset": "tiny", "guidance_scale": 6}, "Extra inputs"),
        ({"preset": "tiny", "guidance": -1}, "greater than or equal"),
    ],
)
def test_invalid_configs_are_rejected(options, message):
    with pytest.raises(ValidationError, match=message):
        HunyuanVideoPolicy.Config.model_validate(options)


def test_paper_defaults():
    config = HunyuanVideoPolicy.Config(pretrained="/weights/HunyuanVideo")
    assert config.guidance == 6.0
    from dancecore_hunyuanvideo.t2v import DEFAULTS

    assert (DEFAULTS["height"], DEFAULTS["width"], DEFAULTS["num_frames"]) == (480, 848, 53)


def test_template_is_cropped_at_the_prompt(t2v):
    backbone = t2v.backbone
    assert backbone.crop_start == count_template_prefix(backbone.tokenizer, backbone.template)
    ids = backbone.tokenizer(backbone.template.format("zebra")).input_ids
    after_crop = backbone.tokenizer.decode(ids[backbone.crop_start : backbone.crop_start + 5])
    assert after_crop == "zebra"


def test_prompts_reach_the_embeddings(t2v):
    cond = t2v.encode_prompts(PromptBatch((Prompt("a red cube", 0), Prompt("a blue cube", 1), Prompt("a red cube", 2))))
    assert torch.equal(cond.prompt_embeds[0], cond.prompt_embeds[2])
    assert not torch.equal(cond.prompt_embeds[0], cond.prompt_embeds[1])
    assert not torch.equal(cond.pooled_embeds[0], cond.pooled_embeds[1])


def test_sigma_is_told_to_the_network_on_the_1000_scale(t2v, prompts):
    cond = t2v.encode_prompts(prompts)
    latents = _noise(t2v, 3)
    with torch.no_grad():
        expected = t2v.module(
            hidden_states=latents,
            timestep=SIGMAS * 1000,
            encoder_hidden_states=cond.prompt_embeds,
            encoder_attention_mask=cond.prompt_mask.float(),
            pooled_projections=cond.pooled_embeds,
            guidance=torch.full((3,), 6000.0),
            return_dict=False,
        )[0]
        assert torch.equal(t2v.predict(latents, SIGMAS, cond), expected)


def test_per_row_timesteps(t2v, prompts):
    cond = t2v.encode_prompts(prompts)
    latents = _noise(t2v, 3)
    with torch.no_grad():
        batched = t2v.predict(latents, SIGMAS, cond)
        for row in range(3):
            rows = torch.tensor([row])
            single = t2v.predict(latents[row : row + 1], SIGMAS[row : row + 1], select_rows(cond, rows))
            torch.testing.assert_close(batched[row : row + 1], single, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(
            t2v.predict(latents, torch.tensor(0.6), cond), t2v.predict(latents, torch.full((3,), 0.6), cond)
        )


def test_wrong_timestep_shape_is_an_error(t2v, prompts):
    with pytest.raises(ValueError, match="timesteps"):
        t2v.predict(_noise(t2v, 3), torch.tensor([1.0, 0.5]), t2v.encode_prompts(prompts))


def test_guidance_embedding_is_used(prompts):
    other = HunyuanVideoPolicy(HunyuanVideoPolicy.Config(preset="tiny", guidance=1.0))
    default = HunyuanVideoPolicy(HunyuanVideoPolicy.Config(preset="tiny"))
    latents = _noise(default, 3)
    with torch.no_grad():
        a = default.predict(latents, SIGMAS, default.encode_prompts(prompts))
        b = other.predict(latents, SIGMAS, other.encode_prompts(prompts))
    assert not torch.allclose(a, b)


def test_gradient_reaches_every_transformer_weight(t2v, prompts):
    cond = t2v.encode_prompts(prompts)
    t2v.module.zero_grad(set_to_none=True)
    t2v.predict(_noise(t2v, 3), SIGMAS, cond).square().mean().backward()
    params = t2v.trainable_parameters()
    assert len(params) == len(list(t2v.module.parameters()))
    assert sum(float(p.grad.abs().sum()) for p in params if p.grad is not None) > 0
    t2v.module.zero_grad(set_to_none=True)


def test_lora_with_gradient_checkpointing_trains_only_the_adapter(t2v, prompts):
    lora = HunyuanVideoPolicy(HunyuanVideoPolicy.Config(preset="tiny", lora={"rank": 2}, gradient_checkpointing=True))
    names = [n for n, p in lora.module.named_parameters() if p.requires_grad]
    assert names and all("lora" in n for n in names)
    cond = lora.encode_prompts(prompts)
    latents = _noise(lora, 3)
    # LoRA starts as a zero update (B = 0): same prediction as the base model.
    with torch.no_grad():
        torch.testing.assert_close(lora.predict(latents, SIGMAS, cond), t2v.predict(latents, SIGMAS, cond))
    lora.predict(latents, SIGMAS, cond).mean().backward()
    assert all(p.grad is not None for p in lora.trainable_parameters())


def test_loads_a_local_diffusers_directory(t2v, prompts):
    from_dir = HunyuanVideoPolicy(
        HunyuanVideoPolicy.Config(
            pretrained=str(tiny_checkpoint(False)),
            max_sequence_length=16,
            height=32,
            width=48,
            num_frames=5,
            template_crop_start=t2v.backbone.crop_start,
        )
    )
    latents = _noise(t2v, 3)
    with torch.no_grad():
        assert torch.equal(
            from_dir.predict(latents, SIGMAS, from_dir.encode_prompts(prompts)),
            t2v.predict(latents, SIGMAS, t2v.encode_prompts(prompts)),
        )


def test_real_checkpoints_use_the_declared_template_crop():
    from dancecore_hunyuanvideo.common import hunyuan_prompt_template

    _, crop = hunyuan_prompt_template()
    assert crop == 95


def test_image_to_video_weights_are_refused(tmp_path):
    with pytest.raises(ValueError, match="in_channels=8.*needs in_channels=4"):
        HunyuanVideoPolicy(HunyuanVideoPolicy.Config(pretrained=str(tiny_checkpoint(True))))


def test_missing_weights_name_the_path(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="no-such-hunyuan"):
        HunyuanVideoPolicy(HunyuanVideoPolicy.Config(pretrained=str(tmp_path / "no-such-hunyuan")))


def test_memory_options_keep_results(t2v, prompts):
    """Offloaded text encoders give the same embeddings; a bf16 transformer stays close to fp32."""
    lean = HunyuanVideoPolicy(
        HunyuanVideoPolicy.Config(preset="tiny", offload_text_encoders=True, transformer_dtype="bfloat16")
    )
    assert lean.module.dtype == torch.bfloat16
    assert next(lean.backbone.text_encoder.parameters()).device.type == "cpu"
    cond = lean.encode_prompts(prompts)
    reference = t2v.encode_prompts(prompts)
    assert torch.equal(cond.prompt_embeds, reference.prompt_embeds)
    latents = _noise(t2v, 3)
    with torch.no_grad():
        v = lean.predict(latents, SIGMAS, cond)
        first = lean.predict(latents, SIGMAS, cond)
        torch.testing.assert_close(v.float(), t2v.predict(latents, SIGMAS, reference), rtol=0.1, atol=0.1)
    assert torch.equal(v, first)


def test_deterministic_rollout_equals_the_diffusers_pipeline(t2v, prompts):
    """``dancecore eval``'s ODE sampling (flow-sde, eta 0, shift 5, 4 steps) and diffusers'
    HunyuanVideoPipeline (shift-5 scheduler, the same unshifted sigmas, embedded guidance 6, the
    template cropped where the policy crops it) from the same noise: the same latents and videos."""
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline

    from dancecore.testing import deterministic_rollout

    backbone = t2v.backbone
    steps, noise = 4, _noise(t2v, 3, seed=5)
    ours = deterministic_rollout(t2v, prompts, noise, sampler_options={"shift": 5.0}, num_steps=steps)
    pipe = HunyuanVideoPipeline(
        text_encoder=backbone.text_encoder, tokenizer=backbone.tokenizer, transformer=t2v.module, vae=backbone.vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0), text_encoder_2=backbone.text_encoder_2,
        tokenizer_2=backbone.tokenizer_2,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    run = {
        "prompt": prompts.texts,
        "height": 32,
        "width": 48,
        "num_frames": 5,
        "latents": noise.clone(),
        "guidance_scale": 6.0,
        "sigmas": torch.linspace(1.0, 0.0, steps + 1)[:-1].tolist(),
        "prompt_template": {"template": backbone.template, "crop_start": backbone.crop_start},
        "max_sequence_length": backbone.max_sequence_length,
    }
    latents = pipe(**run, output_type="latent").frames
    videos = pipe(**run, output_type="pt").frames  # (B, F, 3, H, W) in [0, 1]
    torch.testing.assert_close(pipe.scheduler.sigmas, ours.sigmas, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.latents, latents, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.pixels, videos, rtol=0, atol=1e-5)
    assert latents.std() > 0.1


def test_sdpa_and_native_attention_train_alike(tmp_path):
    """Dispatcher blocks and the token refiner's classic layers both switch; rho == 1; the same metrics."""
    check_attention_backends("hunyuanvideo", {"preset": "tiny"}, tmp_path)
