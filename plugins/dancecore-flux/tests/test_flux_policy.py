"""The FLUX policy on a tiny random-init FLUX of the real architecture."""

from __future__ import annotations

import pytest
import torch
from dancecore_flux.policy import FluxPolicy, pack_latents, tiny_flux_dir, unpack_latents

from dancecore import Prompt, PromptBatch, WeightsNotFoundError
from dancecore.testing import check_attention_backends, check_policy_plugin

PROMPTS = PromptBatch((Prompt("a red cube", 0), Prompt("a very long prompt " * 10, 1)))


@pytest.fixture(scope="module")
def policy() -> FluxPolicy:
    return FluxPolicy(FluxPolicy.Config(preset="tiny"))


@pytest.mark.parametrize(
    "options", [{"preset": "tiny"}, {"preset": "tiny", "lora": {"rank": 2, "alpha": 2}}], ids=["full", "lora"]
)
def test_conforms_to_the_policy_contract(options):
    """Registry, config, seeded noise, rollout/replay log-prob identity, gradients, select_rows, decode."""
    assert isinstance(check_policy_plugin("flux", options, prompts=PROMPTS), FluxPolicy)


def test_pack_unpack_roundtrip():
    x = torch.randn(2, 4, 8, 8)
    packed = pack_latents(x)
    assert packed.shape == (2, 16, 16)
    assert torch.equal(unpack_latents(packed, 8), x)


def test_shapes_and_value_ranges(policy):
    cond = policy.encode_prompts(PROMPTS)
    assert cond.prompt_embeds.shape == (2, 32, 32) and cond.pooled_embeds.shape == (2, 32)
    noise = policy.initial_noise(2, torch.Generator().manual_seed(0))
    assert noise.shape == (2, 64, 16)
    velocity = policy.predict(noise, torch.tensor([1.0, 0.5]), cond)
    assert velocity.shape == noise.shape and torch.isfinite(velocity).all()
    pixels = policy.decode(noise)
    assert pixels.shape == (2, 3, 32, 32) and pixels.min() >= 0 and pixels.max() <= 1


def test_prompt_changes_the_prediction(policy):
    cond = policy.encode_prompts(PROMPTS)
    noise = policy.initial_noise(1, torch.Generator().manual_seed(2)).expand(2, -1, -1)
    with torch.no_grad():
        out = policy.predict(noise, torch.tensor([0.5, 0.5]), cond)
    assert not torch.allclose(out[0], out[1])


def test_loads_the_same_weights_from_a_local_directory(policy):
    from_path = FluxPolicy(FluxPolicy.Config(pretrained=str(tiny_flux_dir()), resolution=32, max_sequence_length=32))
    for (name, a), (_, b) in zip(
        policy.module.state_dict().items(), from_path.module.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_full_finetuning_trains_every_weight(policy):
    trainable = policy.trainable_parameters()
    assert len(trainable) == len(list(policy.module.parameters()))


def test_lora_trains_only_adapters():
    lora = FluxPolicy(FluxPolicy.Config(preset="tiny", lora={"rank": 2, "alpha": 2}))
    names = [n for n, p in lora.module.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    cond = lora.encode_prompts(PROMPTS)
    noise = lora.initial_noise(2, torch.Generator().manual_seed(3))
    lora.predict(noise, torch.tensor([0.5, 0.5]), cond).square().mean().backward()
    assert all(p.grad is not None for p in lora.trainable_parameters())


def test_gradient_checkpointing_gives_the_same_gradients(policy):
    ckpt = FluxPolicy(FluxPolicy.Config(preset="tiny", gradient_checkpointing=True))
    assert ckpt.module.is_gradient_checkpointing
    cond = policy.encode_prompts(PROMPTS)
    noise = policy.initial_noise(2, torch.Generator().manual_seed(4))
    grads = []
    for model in (policy, ckpt):
        model.module.zero_grad()
        model.predict(noise, torch.tensor([0.7, 0.2]), cond).square().mean().backward()
        grads.append([p.grad.clone() for p in model.module.parameters()])
        model.module.zero_grad()
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_missing_weights_name_the_path(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="no-flux-here"):
        FluxPolicy(FluxPolicy.Config(pretrained=str(tmp_path / "no-flux-here")))


def test_config_needs_exactly_one_source():
    with pytest.raises(ValueError, match="exactly one"):
        FluxPolicy.Config()
    with pytest.raises(ValueError, match="exactly one"):
        FluxPolicy.Config(preset="tiny", pretrained="x")


def test_deterministic_rollout_equals_the_diffusers_pipeline(policy):
    """``dancecore eval``'s ODE sampling (flow-sde, eta 0, shift 3, 5 steps) and diffusers' FluxPipeline
    from the same packed noise, guidance embedding 3.5: the same latents and pixels. FluxPipeline's
    exponential time shift exp(mu) is the SD3 shift k when mu = ln k (set through the scheduler's
    base/max shift); its default sigmas linspace(1, 1/N, N) are flow-sde's before the shift."""
    import math

    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from dancecore.testing import deterministic_rollout

    steps, noise = 5, policy.initial_noise(2, torch.Generator().manual_seed(5))
    ours = deterministic_rollout(policy, PROMPTS, noise, sampler_options={"shift": 3.0}, num_steps=steps)
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, time_shift_type="exponential", base_shift=math.log(3.0), max_shift=math.log(3.0)
    )
    pipe = FluxPipeline(
        scheduler=scheduler, vae=policy.vae, text_encoder=policy.text_encoder, tokenizer=policy.tokenizer,
        text_encoder_2=policy.text_encoder_2, tokenizer_2=policy.tokenizer_2, transformer=policy.module,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    run = {
        "prompt": PROMPTS.texts,
        "height": 32,
        "width": 32,
        "latents": noise.clone(),
        "guidance_scale": 3.5,
        "num_inference_steps": steps,
        "max_sequence_length": 32,
    }
    latents = pipe(**run, output_type="latent").images
    pixels = pipe(**run, output_type="pt").images
    torch.testing.assert_close(pipe.scheduler.sigmas, ours.sigmas, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.latents, latents, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.pixels, pixels, rtol=0, atol=1e-5)
    assert latents.std() > 0.1


def test_sdpa_and_native_attention_train_alike(tmp_path):
    """Both kernels run where asked (dispatcher backends on every FLUX attention, eager CLIP/T5), rho == 1
    under each, one forward within 1e-4, and two tiny GRPO iterations with the same metrics."""
    check_attention_backends("flux", {"preset": "tiny"}, tmp_path)
    policy = FluxPolicy(FluxPolicy.Config(preset="tiny", attention_backend="native"))
    assert policy.text_encoder.config._attn_implementation == "eager"
