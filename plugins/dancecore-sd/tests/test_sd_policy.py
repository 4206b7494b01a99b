"""The ``sd`` policy on a tiny random-init Stable Diffusion of the real architecture (CPU, seconds)."""

from __future__ import annotations

import pytest
import torch
from dancecore_sd.policy import SDConditioning, StableDiffusionPolicy, tiny_sd_dir
from pydantic import ValidationError

from dancecore import Prompt, PromptBatch, WeightsNotFoundError, select_rows
from dancecore.testing import check_attention_backends, check_policy_plugin


@pytest.fixture(scope="module")
def policy() -> StableDiffusionPolicy:
    return StableDiffusionPolicy(StableDiffusionPolicy.Config(preset="tiny"))


@pytest.fixture()
def prompts() -> PromptBatch:
    return PromptBatch((Prompt("a red cube", 0), Prompt("a cat on a mat", 1), Prompt("", 2)))


def _noise(policy: StableDiffusionPolicy, n: int, seed: int = 0) -> torch.Tensor:
    return policy.initial_noise(n, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("options", [{"preset": "tiny"}, {"preset": "tiny", "lora": {"rank": 2}}], ids=["full", "lora"])
def test_conforms_to_the_policy_contract(options, prompts):
    """Registry, epsilon prediction for ddim-sde, seeded noise, deterministic encoding and prediction,
    rollout/replay log-prob identity, gradients, select_rows, decode (with CFG on)."""
    assert isinstance(check_policy_plugin("sd", options, prompts=prompts), StableDiffusionPolicy)


def test_shapes(policy, prompts):
    cond = policy.encode_prompts(prompts)
    assert isinstance(cond, SDConditioning)
    assert cond.prompt_embeds.shape == (3, 77, 32)
    assert cond.negative_embeds.shape == (3, 77, 32)
    latents = _noise(policy, 3)
    assert latents.shape == (3, 4, 16, 16) and latents.dtype == torch.float32
    eps = policy.predict(latents, torch.tensor([981, 501, 21]), cond)
    assert eps.shape == latents.shape
    images = policy.decode(latents)
    assert images.shape == (3, 3, 32, 32)
    assert images.min() >= 0 and images.max() <= 1


def test_negative_embedding_is_the_empty_prompt(policy, prompts):
    cond = policy.encode_prompts(prompts)
    # The third prompt is empty: its conditional and unconditional embeddings coincide.
    torch.testing.assert_close(cond.prompt_embeds[2], cond.negative_embeds[0], rtol=0, atol=0)
    assert not torch.equal(cond.prompt_embeds[0], cond.negative_embeds[0])
    assert torch.equal(cond.negative_embeds[0], cond.negative_embeds[1])


def test_cfg_combines_separate_branches(policy, prompts):
    cond = policy.encode_prompts(prompts)
    latents = _noise(policy, 3)
    t = torch.tensor([981, 501, 21])
    with torch.no_grad():
        guided = policy.predict(latents, t, cond)
        eps_c = policy.module(latents, t, encoder_hidden_states=cond.prompt_embeds).sample
        eps_u = policy.module(latents, t, encoder_hidden_states=cond.negative_embeds).sample
    g = policy.config.guidance_scale
    assert g == 5.0
    torch.testing.assert_close(guided, eps_u + g * (eps_c - eps_u), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(guided, eps_c, atol=1e-4)


def test_per_row_timesteps(policy, prompts):
    cond = policy.encode_prompts(prompts)
    latents = _noise(policy, 3)
    t = torch.tensor([981, 501, 21])
    with torch.no_grad():
        batched = policy.predict(latents, t, cond)
        for row in range(3):
            rows = torch.tensor([row])
            single = policy.predict(latents[row : row + 1], t[row : row + 1], select_rows(cond, rows))
            torch.testing.assert_close(batched[row : row + 1], single, rtol=1e-4, atol=1e-5)
        # A scalar timestep means the same step for every row.
        torch.testing.assert_close(
            policy.predict(latents, torch.tensor(501), cond), policy.predict(latents, torch.full((3,), 501), cond)
        )


def test_select_rows_keeps_both_branches_aligned(policy, prompts):
    cond = policy.encode_prompts(prompts)
    picked = select_rows(cond, torch.tensor([2, 0, 0]))
    assert torch.equal(picked.prompt_embeds[0], cond.prompt_embeds[2])
    assert torch.equal(picked.prompt_embeds[2], cond.prompt_embeds[0])
    assert picked.negative_embeds.shape == (3, 77, 32)


def test_both_cfg_branches_carry_gradient(policy, prompts):
    cond = policy.encode_prompts(prompts)
    latents = _noise(policy, 3)
    t = torch.tensor([981, 501, 21])
    policy.module.zero_grad(set_to_none=True)
    policy.predict(latents, t, cond).square().mean().backward()
    grads = [p.grad for p in policy.trainable_parameters()]
    assert all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    policy.module.zero_grad(set_to_none=True)


def test_guidance_one_skips_the_unconditional_branch(prompts):
    plain = StableDiffusionPolicy(StableDiffusionPolicy.Config(preset="tiny", guidance_scale=1.0))
    cond = plain.encode_prompts(prompts)
    latents = _noise(plain, 3)
    t = torch.tensor([981, 501, 21])
    with torch.no_grad():
        expected = plain.module(latents, t, encoder_hidden_states=cond.prompt_embeds).sample
        torch.testing.assert_close(plain.predict(latents, t, cond), expected, rtol=1e-5, atol=1e-6)


def test_loads_a_local_diffusers_directory(policy, prompts):
    from_dir = StableDiffusionPolicy(StableDiffusionPolicy.Config(pretrained=str(tiny_sd_dir())))
    latents = _noise(policy, 3)
    t = torch.tensor([981, 501, 21])
    with torch.no_grad():
        assert torch.equal(
            from_dir.predict(latents, t, from_dir.encode_prompts(prompts)),
            policy.predict(latents, t, policy.encode_prompts(prompts)),
        )


def test_lora_trains_only_the_adapter():
    config = StableDiffusionPolicy.Config(preset="tiny", lora={"rank": 2}, gradient_checkpointing=True)
    lora = StableDiffusionPolicy(config)
    names = [n for n, p in lora.module.named_parameters() if p.requires_grad]
    assert names and all("lora" in n for n in names)
    assert len(lora.trainable_parameters()) == len(names)
    cond = lora.encode_prompts(PromptBatch((Prompt("x", 0),)))
    lora.predict(_noise(lora, 1), torch.tensor([501]), cond).mean().backward()
    assert all(p.grad is not None for p in lora.trainable_parameters())


def test_missing_weights_name_the_path(tmp_path):
    missing = tmp_path / "no-such-sd"
    with pytest.raises(WeightsNotFoundError, match="no-such-sd"):
        StableDiffusionPolicy(StableDiffusionPolicy.Config(pretrained=str(missing)))


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"preset": "tiny", "pretrained": "CompVis/stable-diffusion-v1-4"},
        {"preset": "tiny", "guidance": 5},
        {"preset": "tiny", "guidance_scale": 0.5},
    ],
)
def test_invalid_configs_are_rejected(options):
    with pytest.raises(ValidationError):
        StableDiffusionPolicy.Config.model_validate(options)


def test_wrong_timestep_shape_is_an_error(policy, prompts):
    cond = policy.encode_prompts(prompts)
    with pytest.raises(ValueError, match="timesteps"):
        policy.predict(_noise(policy, 3), torch.tensor([1, 2]), cond)


def test_deterministic_rollout_equals_the_diffusers_pipeline(policy, prompts):
    """``dancecore eval``'s sampling (ddim-sde with eta = 0, 6 steps) and diffusers'
    StableDiffusionPipeline with SD's DDIM scheduler (leading spacing, offset 1, final alpha
    alphas_cumprod[0]) from the same noise, CFG 5 against '': the same latents and pixels. Both decode
    the final DDIM sample (not the last step's x0_hat, which differs by a few % of the latent's scale)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from dancecore.testing import deterministic_rollout

    steps, noise = 6, _noise(policy, 3, seed=5)
    ours = deterministic_rollout(policy, prompts, noise, sampler="ddim-sde", num_steps=steps)
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=policy.vae, text_encoder=policy.text_encoder, tokenizer=policy.tokenizer, unet=policy.module,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    run = {
        "prompt": prompts.texts,
        "negative_prompt": [""] * 3,
        "height": 32,
        "width": 32,
        "latents": noise.clone(),
        "guidance_scale": 5.0,
        "num_inference_steps": steps,
        "eta": 0.0,
    }
    latents = pipe(**run, output_type="latent").images
    pixels = pipe(**run, output_type="pt").images
    # a random tiny UNet drives latents to |x| ~ 20: float32 rounding of the DDIM steps is relative
    torch.testing.assert_close(ours.latents, latents, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.pixels, pixels, rtol=0, atol=1e-5)
    assert latents.std() > 0.1


def test_sdpa_and_native_attention_train_alike(tmp_path):
    """The UNet's classic processors switch (SDPA vs its math kernel), rho == 1 under each, the same metrics."""
    check_attention_backends("sd", {"preset": "tiny"}, tmp_path)


def test_flash_attention_is_not_offered():
    with pytest.raises(ValidationError, match="not offered by this policy"):
        StableDiffusionPolicy.Config(preset="tiny", attention_backend="flash")
