"""The ``qwen-image`` policy on a tiny random-init Qwen-Image of the real architecture (CPU, seconds)."""

from __future__ import annotations

import math

import pytest
import torch
from dancecore_qwen_image.policy import (
    PROMPT_TEMPLATE,
    TEMPLATE_DROP,
    QwenImageConditioning,
    QwenImagePolicy,
    pack_latents,
    tiny_qwen_image_dir,
    unpack_latents,
)
from pydantic import ValidationError

from dancecore import Prompt, PromptBatch, WeightsNotFoundError, select_rows
from dancecore.testing import check_policy_plugin, deterministic_rollout

SIGMAS = torch.tensor([1.0, 0.6, 0.1])


@pytest.fixture(scope="module")
def policy() -> QwenImagePolicy:
    torch.manual_seed(0)
    return QwenImagePolicy(QwenImagePolicy.Config(preset="tiny"))


@pytest.fixture()
def prompts() -> PromptBatch:
    return PromptBatch((Prompt("a red cube", 0), Prompt("a cat sitting on a striped mat", 1), Prompt("", 2)))


def _noise(policy: QwenImagePolicy, n: int, seed: int = 0) -> torch.Tensor:
    return policy.initial_noise(n, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("options", [{"preset": "tiny"}, {"preset": "tiny", "lora": {"rank": 2}}], ids=["full", "lora"])
def test_conforms_to_the_policy_contract(options, prompts):
    """Registry, flow prediction, seeded noise, deterministic encoding and prediction, rollout/replay
    log-prob identity with true CFG, gradients, select_rows, decode."""
    assert isinstance(check_policy_plugin("qwen-image", options, prompts=prompts), QwenImagePolicy)


def test_pack_unpack_roundtrip():
    x = torch.randn(2, 16, 8, 8)
    assert pack_latents(x).shape == (2, 16, 64) and torch.equal(unpack_latents(pack_latents(x), 8), x)


def test_shapes_and_the_dropped_template(policy, prompts):
    cond = policy.encode_prompts(prompts)
    assert isinstance(cond, QwenImageConditioning)
    # the template's prefix is dropped: what is left is the prompt and the template's suffix
    suffix = len(policy.tokenizer(PROMPT_TEMPLATE.split("{}")[1], add_special_tokens=False).input_ids)
    lengths = [len(policy.tokenizer(t, add_special_tokens=False).input_ids) + suffix for t in prompts.texts]
    assert cond.prompt_mask.sum(1).tolist() == lengths and cond.prompt_embeds.shape == (3, max(lengths), 32)
    assert torch.all(cond.prompt_embeds[0, lengths[0] :] == 0)
    assert cond.negative_mask.shape == (3, lengths[2] + 1)  # ' ' is one token longer than ''
    latents = _noise(policy, 3)
    assert latents.shape == (3, 4, 64)  # 32 px -> 4 x 4 latent pixels -> 2 x 2 tokens of 4 x 16 channels
    assert policy.predict(latents, SIGMAS, cond).shape == latents.shape
    images = policy.decode(latents)
    assert images.shape == (3, 3, 32, 32) and images.min() >= 0 and images.max() <= 1


def test_true_cfg_is_rescaled_to_the_conditional_norm(policy, prompts):
    cond = policy.encode_prompts(prompts)
    latents = _noise(policy, 3)
    side = policy.latent_side // 2

    def branch(embeds, mask):
        return policy.module(
            hidden_states=latents,
            timestep=SIGMAS,  # the sigma itself: the transformer scales by 1000 inside
            encoder_hidden_states=embeds,
            encoder_hidden_states_mask=mask,
            img_shapes=[[(1, side, side)]] * 3,
            return_dict=False,
        )[0]

    with torch.no_grad():
        guided = policy.predict(latents, SIGMAS, cond)
        v_c, v_u = branch(cond.prompt_embeds, cond.prompt_mask), branch(cond.negative_embeds, None)
    combined = v_u + 4.0 * (v_c - v_u)
    expected = combined * v_c.norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(guided, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(guided.norm(dim=-1), v_c.norm(dim=-1), rtol=1e-5, atol=1e-6)
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
    """``dancecore eval``'s ODE sampling (flow-sde, eta 0, shift 3, 5 steps) and diffusers'
    QwenImagePipeline from the same noise, with true CFG 4 against ' ': the same latents and pixels.
    The pipeline's exponential time shift exp(mu) is the SD3 shift k when mu = ln k (set through its
    scheduler's base/max shift); its template and drop count are the policy's (34 for real weights)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    steps, noise = 5, _noise(policy, 3, seed=5)
    ours = deterministic_rollout(policy, prompts, noise, sampler_options={"shift": 3.0}, num_steps=steps)
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, time_shift_type="exponential", base_shift=math.log(3.0), max_shift=math.log(3.0)
    )
    pipe = QwenImagePipeline(
        scheduler=scheduler, vae=policy.vae, text_encoder=policy.text_encoder, tokenizer=policy.tokenizer,
        transformer=policy.module,
    )  # fmt: skip
    assert (pipe.prompt_template_encode, pipe.prompt_template_encode_start_idx) == (PROMPT_TEMPLATE, TEMPLATE_DROP)
    pipe.prompt_template_encode_start_idx = policy.template_drop  # the tiny byte-level tokenizer's prefix length
    pipe.set_progress_bar_config(disable=True)
    run = {
        "prompt": prompts.texts,
        "negative_prompt": [" "] * 3,
        "true_cfg_scale": 4.0,
        "height": 32,
        "width": 32,
        "latents": noise.clone(),
        "num_inference_steps": steps,
    }
    latents = pipe(**run, output_type="latent").images
    pixels = pipe(**run, output_type="pt").images
    torch.testing.assert_close(pipe.scheduler.sigmas, ours.sigmas, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.latents, latents, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.pixels, pixels, rtol=0, atol=1e-5)
    assert latents.std() > 0.1


def test_loads_a_local_diffusers_directory(policy, prompts):
    from_dir = QwenImagePolicy(
        QwenImagePolicy.Config(pretrained=str(tiny_qwen_image_dir()), resolution=32, template_drop=policy.template_drop)
    )
    latents = _noise(policy, 3)
    with torch.no_grad():
        assert torch.equal(
            from_dir.predict(latents, SIGMAS, from_dir.encode_prompts(prompts)),
            policy.predict(latents, SIGMAS, policy.encode_prompts(prompts)),
        )
    real = QwenImagePolicy(QwenImagePolicy.Config(pretrained=str(tiny_qwen_image_dir()), resolution=32))
    assert real.template_drop == TEMPLATE_DROP == 34  # a real checkpoint drops diffusers' 34 tokens


def test_lora_with_gradient_checkpointing_trains_only_the_adapter(policy, prompts):
    lora = QwenImagePolicy(QwenImagePolicy.Config(preset="tiny", lora={"rank": 2}, gradient_checkpointing=True))
    assert lora.module.is_gradient_checkpointing
    names = [n for n, p in lora.module.named_parameters() if p.requires_grad]
    assert names and all("lora" in n for n in names)
    lora.predict(_noise(lora, 3), SIGMAS, lora.encode_prompts(prompts)).square().mean().backward()
    assert all(p.grad is not None for p in lora.trainable_parameters())


def test_gradient_checkpointing_gives_the_same_gradients(policy, prompts):
    ckpt = QwenImagePolicy(QwenImagePolicy.Config(preset="tiny", gradient_checkpointing=True))
    cond = policy.encode_prompts(prompts)
    latents = _noise(policy, 3)
    grads = []
    for model in (policy, ckpt):
        model.module.zero_grad(set_to_none=True)
        model.predict(latents, SIGMAS, cond).square().mean().backward()
        grads.append([None if p.grad is None else p.grad.clone() for p in model.module.parameters()])
        model.module.zero_grad(set_to_none=True)
    assert sum(g is not None for g in grads[0]) > 0.9 * len(grads[0])
    for a, b in zip(*grads, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_missing_weights_name_the_path(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="no-such-qwen"):
        QwenImagePolicy(QwenImagePolicy.Config(pretrained=str(tmp_path / "no-such-qwen")))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "exactly one of"),
        ({"preset": "tiny", "pretrained": "Qwen/Qwen-Image"}, "exactly one of"),
        ({"preset": "tiny", "resolution": 500}, "multiple of 16.*try 496"),
        ({"preset": "tiny", "max_sequence_length": 2048}, "less than or equal"),
        ({"preset": "tiny", "true_cfg_scale": 4}, "Extra inputs"),
    ],
)
def test_invalid_configs_are_rejected(options, message):
    with pytest.raises(ValidationError, match=message):
        QwenImagePolicy.Config.model_validate(options)
