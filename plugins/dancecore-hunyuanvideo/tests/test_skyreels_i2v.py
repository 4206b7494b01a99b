"""The ``skyreels-i2v`` policy on a tiny random-init SkyReels-V1 (HunyuanVideo with 2x input channels)."""

from __future__ import annotations

import pytest
import torch
from dancecore_hunyuanvideo.skyreels_i2v import (
    PromptImageError,
    SkyReelsConditioning,
    SkyReelsI2VPolicy,
    load_first_frame,
)
from pydantic import ValidationError

from dancecore import Prompt, PromptBatch, select_rows
from dancecore.testing import check_attention_backends, check_policy_plugin

SIGMAS = torch.tensor([1.0, 0.6, 0.1])


def _noise(policy, n: int, seed: int = 0) -> torch.Tensor:
    return policy.initial_noise(n, torch.Generator().manual_seed(seed))


def _branches(policy, latents, cond):
    """The conditional and unconditional velocities, computed by hand from the backbone."""
    x = torch.cat([latents, cond.image_latents], dim=1)
    g = policy.config.embedded_guidance
    b = latents.shape[0]
    v_c = policy.backbone.velocity(x, SIGMAS, cond.prompt_embeds, cond.prompt_mask, cond.pooled_embeds, g)
    v_u = policy.backbone.velocity(
        x,
        SIGMAS,
        cond.negative_embeds.expand(b, -1, -1),
        cond.negative_mask.expand(b, -1),
        cond.negative_pooled.expand(b, -1),
        g,
    )
    return v_c, v_u


def test_conforms_to_the_policy_contract(image_prompts):
    """Registry, flow prediction for flow-sde (SkyReels' shift), seeded noise, deterministic encoding
    (of the first frames too) and prediction with CFG, rollout/replay log-prob identity, gradients,
    select_rows with the shared negative branch, video decode."""
    policy = check_policy_plugin(
        "skyreels-i2v", {"preset": "tiny"}, sampler_options={"shift": 7.0}, prompts=image_prompts
    )
    assert isinstance(policy, SkyReelsI2VPolicy)
    assert policy.config.cfg_scale == 5.0


def test_shapes(i2v, image_prompts):
    cond = i2v.encode_prompts(image_prompts)
    assert isinstance(cond, SkyReelsConditioning)
    assert cond.prompt_embeds.shape == (3, 16, 32)
    assert cond.image_latents.shape == (3, 4, 2, 4, 6)
    assert cond.negative_embeds.shape == (1, 16, 32)
    assert i2v.module.config.in_channels == 2 * cond.image_latents.shape[1]
    latents = _noise(i2v, 3)
    assert latents.shape == (3, 4, 2, 4, 6)
    assert i2v.predict(latents, SIGMAS, cond).shape == latents.shape
    videos = i2v.decode(latents)
    assert videos.shape == (3, 5, 3, 32, 48)
    assert videos.min() >= 0 and videos.max() <= 1


def test_image_latents_are_the_first_frame_then_zeros(i2v, image_prompts):
    cond = i2v.encode_prompts(image_prompts)
    assert torch.count_nonzero(cond.image_latents[:, :, 1:]) == 0
    assert torch.count_nonzero(cond.image_latents[:, :, 0]) > 0
    # Frame 0 is the scaled posterior mode of the VAE on the (cropped, resized) image.
    vae = i2v.backbone.vae
    pixels = load_first_frame(image_prompts.prompts[1], 32, 48)
    with torch.no_grad():
        expected = vae.encode(pixels[None, :, None]).latent_dist.mode() * vae.config.scaling_factor
    torch.testing.assert_close(cond.image_latents[1:2, :, :1], expected)


def test_first_frame_is_cropped_to_the_video_aspect(tmp_path):
    # A 40 x 120 picture: left third red, middle green, right third blue. A 32 x 32 video keeps the middle.
    import numpy as np
    from PIL import Image

    array = np.zeros((40, 120, 3), dtype=np.uint8)
    array[:, :40, 0] = array[:, 40:80, 1] = array[:, 80:, 2] = 255
    Image.fromarray(array).save(tmp_path / "rgb.png")
    pixels = load_first_frame(Prompt("x", 0, str(tmp_path / "rgb.png")), 32, 32)
    assert pixels.shape == (3, 32, 32)
    assert pixels.min() >= -1 and pixels.max() <= 1
    channel_means = pixels.mean(dim=(1, 2))
    assert int(channel_means.argmax()) == 1 and channel_means[1] > 0.9


def test_different_images_give_different_predictions(i2v, image_prompts):
    cond = i2v.encode_prompts(image_prompts)
    same_text = PromptBatch((image_prompts.prompts[0], Prompt("a red cube", 0, image_prompts.prompts[1].image)))
    other = i2v.encode_prompts(same_text)
    assert torch.equal(other.prompt_embeds[0], other.prompt_embeds[1])
    assert not torch.equal(other.image_latents[0], other.image_latents[1])
    latents = _noise(i2v, 1).expand(2, -1, -1, -1, -1)
    with torch.no_grad():
        v = i2v.predict(latents, SIGMAS[:2], other)
    assert not torch.allclose(v[0], v[1])
    assert cond.image_latents.shape[0] == 3


def test_cfg_is_applied_inside_predict(i2v, image_prompts):
    cond = i2v.encode_prompts(image_prompts)
    latents = _noise(i2v, 3)
    with torch.no_grad():
        guided = i2v.predict(latents, SIGMAS, cond)
        v_c, v_u = _branches(i2v, latents, cond)
    assert torch.equal(guided, v_u + 5.0 * (v_c - v_u))
    assert not torch.allclose(guided, v_c, atol=1e-4)


def test_negative_branch_is_the_empty_prompt(i2v, image_prompts):
    cond = i2v.encode_prompts(image_prompts)
    # The third prompt is empty: its conditional embeddings are the negative ones.
    assert torch.equal(cond.prompt_embeds[2], cond.negative_embeds[0])
    assert torch.equal(cond.pooled_embeds[2], cond.negative_pooled[0])
    with torch.no_grad():
        v_c, v_u = _branches(i2v, _noise(i2v, 3), cond)
    assert torch.equal(v_c[2], v_u[2])


def test_both_cfg_branches_carry_gradient(i2v, image_prompts):
    cond = i2v.encode_prompts(image_prompts)
    latents = _noise(i2v, 3)
    params = i2v.trainable_parameters()

    i2v.module.zero_grad(set_to_none=True)
    i2v.predict(latents, SIGMAS, cond).square().mean().backward()
    through_predict = [p.grad.clone() for p in params]

    i2v.module.zero_grad(set_to_none=True)
    v_c, v_u = _branches(i2v, latents, cond)
    (v_u + 5.0 * (v_c - v_u)).square().mean().backward()
    by_hand = [p.grad.clone() for p in params]

    i2v.module.zero_grad(set_to_none=True)
    v_c, v_u = _branches(i2v, latents, cond)
    (v_u.detach() + 5.0 * (v_c - v_u.detach())).square().mean().backward()
    conditional_only = [p.grad.clone() for p in params]
    i2v.module.zero_grad(set_to_none=True)

    for a, b in zip(through_predict, by_hand, strict=True):
        torch.testing.assert_close(a, b)
    # Were the unconditional branch detached, the gradient would differ.
    assert any(not torch.allclose(a, c) for a, c in zip(through_predict, conditional_only, strict=True))


def test_select_rows_slices_images_and_keeps_the_shared_negative(i2v, image_prompts):
    cond = i2v.encode_prompts(image_prompts)
    picked = select_rows(cond, torch.tensor([1, 1, 0, 2]))
    assert picked.image_latents.shape[0] == 4
    assert torch.equal(picked.image_latents[2], cond.image_latents[0])
    assert picked.negative_embeds.shape[0] == 1
    with torch.no_grad():
        v = i2v.predict(_noise(i2v, 4), torch.tensor([1.0, 0.6, 0.1, 0.1]), picked)
    assert v.shape == (4, 4, 2, 4, 6)


def test_cfg_scale_one_is_the_conditional_branch(image_prompts):
    plain = SkyReelsI2VPolicy(SkyReelsI2VPolicy.Config(preset="tiny", cfg_scale=1.0))
    cond = plain.encode_prompts(image_prompts)
    latents = _noise(plain, 3)
    with torch.no_grad():
        v_c, _ = _branches(plain, latents, cond)
        assert torch.equal(plain.predict(latents, SIGMAS, cond), v_c)


# ------------------------------------------------------------------------------------ images


def test_missing_image_names_prompt_and_path(i2v, tmp_path):
    missing = tmp_path / "nowhere" / "frame.png"
    batch = PromptBatch((Prompt("a dog runs", 7, str(missing)),))
    with pytest.raises(PromptImageError, match=r"prompt 7 \('a dog runs'\).*nowhere/frame.png.*FileNotFoundError"):
        i2v.encode_prompts(batch)


def test_unreadable_image_names_prompt_and_path(i2v, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a picture")
    with pytest.raises(PromptImageError, match=r"prompt 3 .*broken.png"):
        i2v.encode_prompts(PromptBatch((Prompt("x", 3, str(broken)),)))


def test_prompt_without_image_is_an_error(i2v):
    with pytest.raises(PromptImageError, match="prompt 0 .*has no image"):
        i2v.encode_prompts(PromptBatch((Prompt("text only", 0),)))


def test_every_bad_image_is_reported_at_once(i2v, tmp_path, make_image):
    good = make_image(tmp_path / "good.png", 32, 48, 0)
    batch = PromptBatch(
        (
            Prompt("a", 0, good),
            Prompt("b", 1, str(tmp_path / "gone1.png")),
            Prompt("c", 2, None),
            Prompt("d", 3, str(tmp_path / "gone2.png")),
        )
    )
    with pytest.raises(PromptImageError) as info:
        i2v.encode_prompts(batch)
    message = str(info.value)
    assert "prompt 1" in message and "gone1.png" in message
    assert "prompt 2" in message and "prompt 3" in message and "gone2.png" in message
    assert "prompt 0" not in message


def test_paper_defaults():
    from dancecore_hunyuanvideo.skyreels_i2v import DEFAULTS

    assert (DEFAULTS["height"], DEFAULTS["width"], DEFAULTS["num_frames"]) == (400, 640, 53)
    with pytest.raises(ValidationError):
        SkyReelsI2VPolicy.Config(preset="tiny", cfg_scale=0.5)


def test_text_to_video_weights_are_refused():
    from dancecore_hunyuanvideo.common import tiny_checkpoint

    with pytest.raises(ValueError, match="in_channels=4.*needs in_channels=8"):
        SkyReelsI2VPolicy(SkyReelsI2VPolicy.Config(pretrained=str(tiny_checkpoint(False))))


def test_transformer_can_come_from_its_own_directory(i2v, image_prompts):
    """SkyReels-V1 ships only a transformer: VAE and text encoders come from a HunyuanVideo directory."""
    from dancecore_hunyuanvideo.common import tiny_checkpoint

    mixed = SkyReelsI2VPolicy(
        SkyReelsI2VPolicy.Config(
            pretrained=str(tiny_checkpoint(False)),
            transformer=str(tiny_checkpoint(True) / "transformer"),
            max_sequence_length=16,
            height=32,
            width=48,
            num_frames=5,
            template_crop_start=i2v.backbone.crop_start,
        )
    )
    latents = _noise(i2v, 3)
    with torch.no_grad():
        assert torch.equal(
            mixed.predict(latents, SIGMAS, mixed.encode_prompts(image_prompts)),
            i2v.predict(latents, SIGMAS, i2v.encode_prompts(image_prompts)),
        )


def test_deterministic_rollout_equals_the_diffusers_pipeline(i2v, tmp_path, make_image, monkeypatch):
    """``dancecore eval``'s ODE sampling (flow-sde, eta 0, shift 7, 4 steps) and diffusers'
    HunyuanSkyreelsImageToVideoPipeline (shift-7 scheduler, the same unshifted sigmas, true CFG 5
    against '', embedded guidance 1) from the same noise and first frames (already at the video's
    size): the same latents and videos. One deliberate difference is pinned: the pipeline samples the
    first frame's VAE posterior, the policy takes its mode (deterministic conditioning), so the test
    has the pipeline take the mode too."""
    import diffusers.pipelines.hunyuan_video.pipeline_hunyuan_skyreels_image2video as skyreels
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanSkyreelsImageToVideoPipeline
    from PIL import Image

    from dancecore.testing import deterministic_rollout

    monkeypatch.setattr(skyreels, "retrieve_latents", lambda output, generator=None: output.latent_dist.mode())
    g = i2v.geometry
    paths = [make_image(tmp_path / f"{i}.png", g.height, g.width, i) for i in range(2)]
    prompts = PromptBatch((Prompt("a red cube", 0, paths[0]), Prompt("a cat on a mat", 1, paths[1])))
    backbone = i2v.backbone
    steps, noise = 4, _noise(i2v, 2, seed=5)
    ours = deterministic_rollout(i2v, prompts, noise, sampler_options={"shift": 7.0}, num_steps=steps)
    pipe = HunyuanSkyreelsImageToVideoPipeline(
        text_encoder=backbone.text_encoder, tokenizer=backbone.tokenizer, transformer=i2v.module, vae=backbone.vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=backbone.text_encoder_2,
        tokenizer_2=backbone.tokenizer_2,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    videos, latents = [], []
    for prompt, row in zip(prompts.prompts, noise, strict=True):  # the pipeline takes one image per call
        run = {
            "image": Image.open(prompt.image).convert("RGB"),
            "prompt": prompt.text,
            "negative_prompt": "",
            "height": g.height,
            "width": g.width,
            "num_frames": g.num_frames,
            "latents": row[None].clone(),
            "true_cfg_scale": 5.0,
            "guidance_scale": 1.0,
            "sigmas": torch.linspace(1.0, 0.0, steps + 1)[:-1].tolist(),
            "prompt_template": {"template": backbone.template, "crop_start": backbone.crop_start},
            "max_sequence_length": backbone.max_sequence_length,
        }
        latents.append(pipe(**run, output_type="latent").frames)
        videos.append(pipe(**run, output_type="pt").frames)
    torch.testing.assert_close(pipe.scheduler.sigmas, ours.sigmas, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.latents, torch.cat(latents), rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.pixels, torch.cat(videos), rtol=0, atol=1e-5)


def test_sdpa_and_native_attention_train_alike(tmp_path, make_image):
    """SkyReels (CFG, image latents concatenated) trains alike under both kernels, with rho == 1."""
    lines = [f'{{"prompt": "a red cube", "image": "{make_image(tmp_path / "a.png", 32, 48, 0)}"}}']
    (tmp_path / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    check_attention_backends(
        "skyreels-i2v", {"preset": "tiny"}, tmp_path, prompts={"path": str(tmp_path / "prompts.jsonl")}
    )
