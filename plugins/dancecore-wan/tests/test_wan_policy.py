"""The ``wan-t2v`` policy on a tiny random-init Wan2.1 of the real architecture (CPU, seconds)."""

from __future__ import annotations

import pytest
import torch
from dancecore_wan.t2v import WanConditioning, WanT2VPolicy, clean_prompt, tiny_wan_dir
from pydantic import ValidationError

from dancecore import Prompt, PromptBatch, WeightsNotFoundError, select_rows
from dancecore.testing import check_policy_plugin, deterministic_rollout

SIGMAS = torch.tensor([1.0, 0.6, 0.1])
NEGATIVE = "blurry, static, worst quality"


@pytest.fixture(scope="module")
def policy() -> WanT2VPolicy:
    torch.manual_seed(0)
    return WanT2VPolicy(WanT2VPolicy.Config(preset="tiny", negative_prompt=NEGATIVE))


@pytest.fixture()
def prompts() -> PromptBatch:
    return PromptBatch((Prompt("a red cube", 0), Prompt("a cat  on a\nmat", 1), Prompt("", 2)))


def _noise(policy: WanT2VPolicy, n: int, seed: int = 0) -> torch.Tensor:
    return policy.initial_noise(n, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "options",
    [{"preset": "tiny"}, {"preset": "tiny", "lora": {"rank": 2}, "num_frames": 1}],
    ids=["video", "lora-one-frame"],
)
def test_conforms_to_the_policy_contract(options, prompts):
    """Registry, flow prediction, seeded noise, deterministic encoding and prediction, rollout/replay
    log-prob identity with CFG, gradients, select_rows, decode (videos; images with one frame)."""
    assert isinstance(check_policy_plugin("wan-t2v", options, prompts=prompts), WanT2VPolicy)


def test_shapes(policy, prompts):
    cond = policy.encode_prompts(prompts)
    assert isinstance(cond, WanConditioning)
    assert cond.prompt_embeds.shape == (3, 16, 32) and cond.negative_embeds.shape == (3, 16, 32)
    latents = _noise(policy, 3)
    assert latents.shape == (3, 16, 2, 4, 4)  # 5 frames -> 2 latent frames; 32 px -> 4 latent px
    assert policy.predict(latents, SIGMAS, cond).shape == latents.shape
    videos = policy.decode(latents)
    assert videos.shape == (3, 5, 3, 32, 32) and videos.min() >= 0 and videos.max() <= 1


def test_embeddings_past_the_prompt_are_zero(policy, prompts):
    cond = policy.encode_prompts(prompts)
    length = len(policy.tokenizer(clean_prompt("a red cube")).input_ids)
    assert cond.prompt_embeds[0, :length].abs().sum(-1).min() > 0
    assert torch.all(cond.prompt_embeds[0, length:] == 0)
    assert clean_prompt("a cat  on a\nmat &amp; dog") == "a cat on a mat & dog"


def test_cfg_against_the_negative_prompt(policy, prompts):
    cond = policy.encode_prompts(prompts)
    latents = _noise(policy, 3)

    def branch(embeds):
        return policy.module(
            hidden_states=latents, timestep=SIGMAS * 1000, encoder_hidden_states=embeds, return_dict=False
        )[0]

    with torch.no_grad():
        guided = policy.predict(latents, SIGMAS, cond)
        v_c, v_u = branch(cond.prompt_embeds), branch(cond.negative_embeds)
    assert policy.config.guidance_scale == 5.0
    torch.testing.assert_close(guided, v_u + 5.0 * (v_c - v_u), rtol=1e-4, atol=1e-5)
    empty = policy.encode_prompts(PromptBatch((Prompt("", 0),)))
    assert not torch.allclose(cond.negative_embeds[0], empty.prompt_embeds[0])  # the configured text, not ""


def test_per_row_timesteps_and_wrong_shapes(policy, prompts):
    cond = policy.encode_prompts(prompts)
    latents = _noise(policy, 3)
    with torch.no_grad():
        batched = policy.predict(latents, SIGMAS, cond)
        single = policy.predict(latents[2:], SIGMAS[2:], select_rows(cond, torch.tensor([2])))
        torch.testing.assert_close(batched[2:], single, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="timesteps"):
        policy.predict(latents, torch.tensor([1.0, 0.5]), cond)


def _pipeline(policy, shift: float, steps: int):
    """diffusers' WanPipeline on the policy's networks, with a flow-matching Euler scheduler told the
    unshifted sigmas linspace(1, 0, N + 1)[:-1] (WanPipeline passes only a step count)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    unshifted = torch.linspace(1.0, 0.0, steps + 1)[:-1].tolist()
    set_timesteps = scheduler.set_timesteps
    scheduler.set_timesteps = lambda n, device=None, **kw: set_timesteps(n, device=device, sigmas=unshifted)
    pipe = WanPipeline(tokenizer=policy.tokenizer, text_encoder=policy.text_encoder, vae=policy.vae,
                       transformer=policy.module, scheduler=scheduler)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("frames", [5, 1], ids=["video", "one-frame"])
def test_deterministic_rollout_equals_the_diffusers_pipeline(frames, prompts):
    """``dancecore eval``'s ODE sampling (flow-sde with eta = 0, shift 3, 5 steps) and diffusers'
    WanPipeline (the same sigmas) from the same initial noise, CFG 5 against the negative prompt:
    the same latents and pixels."""
    policy = WanT2VPolicy(WanT2VPolicy.Config(preset="tiny", negative_prompt=NEGATIVE, num_frames=frames))
    steps, noise = 5, _noise(policy, 3, seed=5)
    ours = deterministic_rollout(policy, prompts, noise, sampler_options={"shift": 3.0}, num_steps=steps)
    pipe = _pipeline(policy, 3.0, steps)
    run = {
        "prompt": prompts.texts,
        "negative_prompt": [NEGATIVE] * 3,
        "height": 32,
        "width": 32,
        "num_frames": frames,
        "latents": noise.clone(),
        "guidance_scale": 5.0,
        "num_inference_steps": steps,
        "max_sequence_length": 16,
    }
    latents = pipe(**run, output_type="latent").frames
    video = pipe(**run, output_type="pt").frames  # (B, F, 3, H, W) in [0, 1]
    torch.testing.assert_close(pipe.scheduler.sigmas, ours.sigmas, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.latents, latents, rtol=0, atol=1e-5)
    expected = video[:, 0] if frames == 1 else video
    assert ours.pixels.shape == expected.shape
    torch.testing.assert_close(ours.pixels, expected, rtol=0, atol=1e-5)
    assert latents.std() > 0.1


def test_one_frame_is_a_text_to_image_policy():
    image = WanT2VPolicy(WanT2VPolicy.Config(preset="tiny", num_frames=1, height=32, width=48))
    latents = _noise(image, 2)
    assert latents.shape == (2, 16, 1, 4, 6)
    assert image.decode(latents).shape == (2, 3, 32, 48)


def test_loads_a_local_diffusers_directory(policy, prompts):
    from_dir = WanT2VPolicy(
        WanT2VPolicy.Config(
            pretrained=str(tiny_wan_dir()),
            height=32,
            width=32,
            num_frames=5,
            max_sequence_length=16,
            negative_prompt=NEGATIVE,
        )
    )
    latents = _noise(policy, 3)
    with torch.no_grad():
        assert torch.equal(
            from_dir.predict(latents, SIGMAS, from_dir.encode_prompts(prompts)),
            policy.predict(latents, SIGMAS, policy.encode_prompts(prompts)),
        )


def test_lora_with_gradient_checkpointing_trains_only_the_adapter(policy, prompts):
    lora = WanT2VPolicy(WanT2VPolicy.Config(preset="tiny", lora={"rank": 2}, gradient_checkpointing=True))
    assert lora.module.is_gradient_checkpointing
    names = [n for n, p in lora.module.named_parameters() if p.requires_grad]
    assert names and all("lora" in n for n in names)
    cond = lora.encode_prompts(prompts)
    lora.predict(_noise(lora, 3), SIGMAS, cond).square().mean().backward()
    assert all(p.grad is not None for p in lora.trainable_parameters())


def test_gradient_checkpointing_gives_the_same_gradients(policy, prompts):
    ckpt = WanT2VPolicy(WanT2VPolicy.Config(preset="tiny", gradient_checkpointing=True, negative_prompt=NEGATIVE))
    cond = policy.encode_prompts(prompts)
    latents = _noise(policy, 3)
    grads = []
    for model in (policy, ckpt):
        model.module.zero_grad(set_to_none=True)
        model.predict(latents, SIGMAS, cond).square().mean().backward()
        grads.append([p.grad.clone() for p in model.module.parameters()])
        model.module.zero_grad(set_to_none=True)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_bf16_transformer_stays_close(policy, prompts):
    lean = WanT2VPolicy(WanT2VPolicy.Config(preset="tiny", transformer_dtype="bfloat16", negative_prompt=NEGATIVE))
    assert lean.module.dtype == torch.bfloat16
    cond, latents = policy.encode_prompts(prompts), _noise(policy, 3)
    with torch.no_grad():
        out = lean.predict(latents, SIGMAS, cond)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, policy.predict(latents, SIGMAS, cond), rtol=0.1, atol=0.1)


def test_missing_weights_name_the_path(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="no-such-wan"):
        WanT2VPolicy(WanT2VPolicy.Config(pretrained=str(tmp_path / "no-such-wan")))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "exactly one of"),
        ({"preset": "tiny", "pretrained": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"}, "exactly one of"),
        ({"preset": "tiny", "num_frames": 6}, "4k \\+ 1.*try 5 or 9"),
        ({"preset": "tiny", "height": 40}, "multiple of 16"),
        ({"preset": "tiny", "guidance_scale": 0.5}, "greater than or equal"),
        ({"preset": "tiny", "guidance": 5}, "Extra inputs"),
    ],
)
def test_invalid_configs_are_rejected(options, message):
    with pytest.raises(ValidationError, match=message):
        WanT2VPolicy.Config.model_validate(options)
