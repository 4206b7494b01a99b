"""The ``sd3`` policy on a tiny random-init SD3.5 of the real architecture (CPU, seconds)."""

from __future__ import annotations

import pytest
import torch
from dancecore_sd3.policy import SD3Conditioning, SD3Policy, tiny_sd3_dir
from pydantic import ValidationError

from dancecore import Prompt, PromptBatch, WeightsNotFoundError, select_rows
from dancecore.testing import check_policy_plugin, deterministic_rollout

SIGMAS = torch.tensor([1.0, 0.6, 0.1])


@pytest.fixture(scope="module")
def policy() -> SD3Policy:
    torch.manual_seed(0)
    return SD3Policy(SD3Policy.Config(preset="tiny"))


@pytest.fixture()
def prompts() -> PromptBatch:
    return PromptBatch((Prompt("a red cube", 0), Prompt("a cat on a mat", 1), Prompt("", 2)))


def _noise(policy: SD3Policy, n: int, seed: int = 0) -> torch.Tensor:
    return policy.initial_noise(n, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("options", [{"preset": "tiny"}, {"preset": "tiny", "lora": {"rank": 2}}], ids=["full", "lora"])
def test_conforms_to_the_policy_contract(options, prompts):
    """Registry, flow prediction, seeded noise, deterministic encoding and prediction, rollout/replay
    log-prob identity (with CFG on), gradients, select_rows, decode."""
    assert isinstance(check_policy_plugin("sd3", options, prompts=prompts), SD3Policy)


def test_shapes_and_the_joint_sequence(policy, prompts):
    cond = policy.encode_prompts(prompts)
    assert isinstance(cond, SD3Conditioning)
    # 77 CLIP tokens (CLIP-L 8 + CLIP-G 16 features, zero-padded to T5's 32) then 16 T5 tokens.
    assert cond.prompt_embeds.shape == (3, 77 + 16, 32) and cond.negative_embeds.shape == (3, 93, 32)
    assert torch.all(cond.prompt_embeds[:, :77, 24:] == 0) and cond.prompt_embeds[:, 77:, 24:].abs().sum() > 0
    # pooled: CLIP-L's 8 projected features then CLIP-G's 16
    assert cond.pooled_embeds.shape == (3, 24) and cond.negative_pooled.shape == (3, 24)
    latents = _noise(policy, 3)
    assert latents.shape == (3, 16, 16, 16)
    assert policy.predict(latents, SIGMAS, cond).shape == latents.shape
    images = policy.decode(latents)
    assert images.shape == (3, 3, 32, 32) and images.min() >= 0 and images.max() <= 1


def test_negative_branch_is_the_empty_prompt(policy, prompts):
    cond = policy.encode_prompts(prompts)
    # (equal up to rounding: the negative prompt is encoded in a batch of its own)
    torch.testing.assert_close(cond.prompt_embeds[2], cond.negative_embeds[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(cond.pooled_embeds[2], cond.negative_pooled[0], rtol=0, atol=1e-6)
    assert not torch.equal(cond.prompt_embeds[0], cond.negative_embeds[0])


def test_cfg_combines_the_two_branches_told_sigma_times_1000(policy, prompts):
    cond = policy.encode_prompts(prompts)
    latents = _noise(policy, 3)

    def branch(embeds, pooled):
        return policy.module(
            hidden_states=latents,
            timestep=SIGMAS * 1000,
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            return_dict=False,
        )[0]

    with torch.no_grad():
        guided = policy.predict(latents, SIGMAS, cond)
        v_c = branch(cond.prompt_embeds, cond.pooled_embeds)
        v_u = branch(cond.negative_embeds, cond.negative_pooled)
    assert policy.config.guidance_scale == 4.5
    torch.testing.assert_close(guided, v_u + 4.5 * (v_c - v_u), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(guided, v_c, atol=1e-3)


def test_per_row_timesteps_and_wrong_shapes(policy, prompts):
    cond = policy.encode_prompts(prompts)
    latents = _noise(policy, 3)
    with torch.no_grad():
        batched = policy.predict(latents, SIGMAS, cond)
        single = policy.predict(latents[1:2], SIGMAS[1:2], select_rows(cond, torch.tensor([1])))
        torch.testing.assert_close(batched[1:2], single, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="timesteps"):
        policy.predict(latents, torch.tensor([1.0, 0.5]), cond)


def test_deterministic_rollout_equals_the_diffusers_pipeline(policy, prompts):
    """The ODE sampling of ``dancecore eval`` (flow-sde with eta = 0, shift 3, 6 steps) and diffusers'
    StableDiffusion3Pipeline (FlowMatchEulerDiscreteScheduler, shift 3, the same unshifted sigmas) from
    the same initial noise, with CFG 4.5 against the empty prompt: the same latents and pixels."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    steps, noise = 6, _noise(policy, 3, seed=5)
    ours = deterministic_rollout(policy, prompts, noise, sampler_options={"shift": 3.0}, num_steps=steps)
    pipe = StableDiffusion3Pipeline(
        transformer=policy.module,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=policy.vae,
        text_encoder=policy.clip_encoders[0],
        tokenizer=policy.tokenizers[0],
        text_encoder_2=policy.clip_encoders[1],
        tokenizer_2=policy.tokenizers[1],
        text_encoder_3=policy.t5,
        tokenizer_3=policy.tokenizers[2],
    )
    pipe.set_progress_bar_config(disable=True)
    run = {
        "prompt": prompts.texts,
        "negative_prompt": [""] * 3,
        "height": 32,
        "width": 32,
        "latents": noise.clone(),
        "guidance_scale": 4.5,
        "sigmas": torch.linspace(1.0, 0.0, steps + 1)[:-1].tolist(),  # the scheduler shifts them
        "max_sequence_length": 16,
    }
    latents = pipe(**run, output_type="latent").images
    pixels = pipe(**run, output_type="pt").images
    torch.testing.assert_close(pipe.scheduler.sigmas, ours.sigmas, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.latents, latents, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.pixels, pixels, rtol=0, atol=1e-5)
    assert latents.std() > 0.1  # a real trajectory, not zeros


def test_loads_a_local_diffusers_directory(policy, prompts):
    from_dir = SD3Policy(SD3Policy.Config(pretrained=str(tiny_sd3_dir()), resolution=32, max_sequence_length=16))
    latents = _noise(policy, 3)
    with torch.no_grad():
        assert torch.equal(
            from_dir.predict(latents, SIGMAS, from_dir.encode_prompts(prompts)),
            policy.predict(latents, SIGMAS, policy.encode_prompts(prompts)),
        )


def test_lora_with_gradient_checkpointing_trains_only_the_adapter(policy, prompts):
    lora = SD3Policy(SD3Policy.Config(preset="tiny", lora={"rank": 2}, gradient_checkpointing=True))
    assert lora.module.is_gradient_checkpointing
    names = [n for n, p in lora.module.named_parameters() if p.requires_grad]
    assert names and all("lora" in n for n in names)
    cond = lora.encode_prompts(prompts)
    latents = _noise(lora, 3)
    lora.predict(latents, SIGMAS, cond).square().mean().backward()
    assert all(p.grad is not None for p in lora.trainable_parameters())


def test_gradient_checkpointing_gives_the_same_gradients(policy, prompts):
    ckpt = SD3Policy(SD3Policy.Config(preset="tiny", gradient_checkpointing=True))
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


def test_guidance_one_runs_only_the_conditional_branch(prompts):
    plain = SD3Policy(SD3Policy.Config(preset="tiny", guidance_scale=1.0))
    cond = plain.encode_prompts(prompts)
    latents = _noise(plain, 3)
    with torch.no_grad():
        expected = plain.module(
            hidden_states=latents,
            timestep=SIGMAS * 1000,
            encoder_hidden_states=cond.prompt_embeds,
            pooled_projections=cond.pooled_embeds,
            return_dict=False,
        )[0]
        assert torch.equal(plain.predict(latents, SIGMAS, cond), expected)


def test_missing_weights_name_the_path(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="no-such-sd3"):
        SD3Policy(SD3Policy.Config(pretrained=str(tmp_path / "no-such-sd3")))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "exactly one of"),
        ({"preset": "tiny", "pretrained": "stabilityai/stable-diffusion-3.5-medium"}, "exactly one of"),
        ({"preset": "tiny", "resolution": 500}, "multiple of 16.*try 496"),
        ({"preset": "tiny", "guidance_scale": 0.5}, "greater than or equal"),
        ({"preset": "tiny", "guidance": 4.5}, "Extra inputs"),
    ],
)
def test_invalid_configs_are_rejected(options, message):
    with pytest.raises(ValidationError, match=message):
        SD3Policy.Config.model_validate(options)
