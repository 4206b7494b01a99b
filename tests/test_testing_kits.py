"""The conformance kits in ``dancecore.testing``: they pass on the built-ins and the torch-only tiny
policies, and fail, saying what is wrong, on deliberately broken components."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from typing import Any

import pytest
import torch
from pydantic import ConfigDict, model_validator

import dancecore.testing as kit
from dancecore import BuildContext, Policy, Prompt, PromptBatch, StepResult, select_rows
from dancecore.testing import (
    TinyConditioning,
    TinyEpsilonPolicy,
    TinyFlowPolicy,
    check_policy_plugin,
    check_sampler_plugin,
    load_plugin,
)

FlowSDE = load_plugin("sampler", "flow-sde")
PROMPTS = PromptBatch((Prompt("a red cube", 0), Prompt("a blue sphere", 1), Prompt("", 2)))


# ------------------------------------------------------------------------------ the package


def test_every_exported_name_resolves_and_the_old_names_stay() -> None:
    old = {
        "build_component",
        "check_reward_plugin",
        "contract_problems",
        "group_advantages",
        "load_plugin",
        "load_run",
        "read_prompt_file",
        "sample_images",
        "trainable_steps",
        "validate",
        "write_video",
    }
    assert old <= set(kit.__all__)
    assert all(getattr(kit, name) is not None for name in kit.__all__)


def test_importing_the_kit_imports_no_model_library() -> None:
    code = "import sys, dancecore.testing; print(sorted(m for m in ('diffusers', 'transformers', 'peft') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_tiny_policies_are_registered() -> None:
    assert load_plugin("policy", "testing-tiny") is TinyFlowPolicy
    assert load_plugin("policy", "testing-tiny-eps") is TinyEpsilonPolicy
    assert (TinyFlowPolicy.prediction_type, TinyEpsilonPolicy.prediction_type) == ("flow", "epsilon")


# ------------------------------------------------------------------------------ the tiny policy


def _tiny(**options: Any) -> TinyFlowPolicy:
    return TinyFlowPolicy(TinyFlowPolicy.Config(**options), BuildContext())


def test_tiny_policy_is_a_function_of_its_seed() -> None:
    a, b, c = _tiny(), _tiny(), _tiny(seed=1)
    for (name, x), (_, y), (_, z) in zip(
        a.module.state_dict().items(), b.module.state_dict().items(), c.module.state_dict().items(), strict=True
    ):
        assert torch.equal(x, y), name
        assert name.endswith("bias") or not torch.equal(x, z), name
    assert torch.equal(a.projection, b.projection) and not torch.equal(a.projection, c.projection)


def test_tiny_policy_shapes_and_prompt_embedding() -> None:
    policy = _tiny(image_size=32)
    assert isinstance(policy, Policy)
    cond = policy.encode_prompts(PROMPTS)
    assert isinstance(cond, TinyConditioning) and cond.prompt_embeds.shape == (3, 16)
    assert torch.equal(cond.prompt_embeds[2], torch.zeros(16))  # the empty prompt
    again = policy.encode_prompts(PromptBatch((Prompt("A  red cube", 0),)))
    assert torch.equal(again.prompt_embeds[0], cond.prompt_embeds[0])  # words, lower-cased
    noise = policy.initial_noise(3, torch.Generator().manual_seed(0))
    assert noise.shape == (3, 4, 8, 8) and noise.dtype == torch.float32
    with torch.no_grad():
        out = policy.predict(noise, torch.tensor([1.0, 0.5, 0.1]), cond)
    assert out.shape == noise.shape
    assert not torch.allclose(
        out[0], policy.predict(noise[:1], torch.tensor([1.0]), select_rows(cond, torch.tensor([1])))[0]
    )
    pixels = policy.decode(noise)
    assert pixels.shape == (3, 3, 32, 32) and 0 <= float(pixels.min()) and float(pixels.max()) <= 1
    with pytest.raises(ValueError, match="timesteps"):
        policy.predict(noise, torch.tensor([1.0, 0.5]), cond)


def test_tiny_policy_options() -> None:
    head = _tiny(trainable="output", hidden=8)
    assert [n for n, p in head.module.named_parameters() if p.requires_grad] == ["conv_out.weight", "conv_out.bias"]
    with pytest.raises(ValueError, match="multiple of latent_size"):
        TinyFlowPolicy.Config(image_size=20)
    with pytest.raises(ValueError, match="Extra inputs"):
        TinyFlowPolicy.Config(preset="tiny")


# ------------------------------------------------------------------------------ kits pass


@pytest.mark.parametrize(
    ("name", "options"),
    [("testing-tiny", None), ("testing-tiny-eps", None), ("testing-tiny", {"trainable": "output", "image_size": 32})],
)
def test_policy_kit_passes_on_the_tiny_policies(name: str, options: dict[str, Any] | None) -> None:
    policy = check_policy_plugin(name, options)
    assert isinstance(policy, TinyFlowPolicy)


def test_policy_kit_takes_a_class_a_sampler_and_prompts() -> None:
    policy = check_policy_plugin(
        TinyFlowPolicy,
        {"seed": 2},
        sampler_options={"sde_window": 2, "num_steps": 4},
        prompts=["one", "two"],
        num_steps=4,
    )
    assert policy.config.seed == 2


@pytest.mark.parametrize(("name", "options"), [("flow-sde", None), ("flow-sde", {"sde_window": 2}), ("ddim-sde", None)])
def test_sampler_kit_passes_on_the_builtins(name: str, options: dict[str, Any] | None) -> None:
    sampler = check_sampler_plugin(name, options, num_steps=4)
    assert sampler.prediction_type in ("flow", "epsilon")


def test_sampler_kit_on_a_given_policy() -> None:
    check_sampler_plugin("flow-sde", {"eta": 0.7}, policy="testing-tiny", policy_options={"hidden": 4})


# ------------------------------------------------------------------------------ broken policies


class NoiseIgnoresTheGenerator(TinyFlowPolicy):
    def initial_noise(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randn((n, *self.latent_shape))


class ConstantNoise(TinyFlowPolicy):
    def initial_noise(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.ones((n, *self.latent_shape))


class AllFrozen(TinyFlowPolicy):
    def __init__(self, config: Any, context: Any = None) -> None:
        super().__init__(config, context)
        self.module.requires_grad_(False)


class ListsFrozenWeights(TinyFlowPolicy):
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.module.parameters())


class DetachedPrediction(TinyFlowPolicy):
    def predict(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: Any) -> torch.Tensor:
        return super().predict(latents, timesteps, cond).detach()


class TrainingDiffersFromRollout(TinyFlowPolicy):
    def predict(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: Any) -> torch.Tensor:
        out = super().predict(latents, timesteps, cond)
        return out + 1e-3 if torch.is_grad_enabled() else out


class NoisyInEvalMode(TinyFlowPolicy):
    def predict(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: Any) -> torch.Tensor:
        out = super().predict(latents, timesteps, cond)
        return out + 1e-3 * torch.randn_like(out)


class PixelsOutOfRange(TinyFlowPolicy):
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return super().decode(latents) * 2 - 1


class DictConditioning(TinyFlowPolicy):
    def encode_prompts(self, batch: PromptBatch) -> Any:
        return {"prompt_embeds": super().encode_prompts(batch).prompt_embeds}

    def predict(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: Any) -> torch.Tensor:
        return super().predict(latents, timesteps, TinyConditioning(cond["prompt_embeds"]))


@dataclasses.dataclass(frozen=True)
class FeaturesFirst:
    prompt_embeds_t: torch.Tensor  # (embed_dim, B): the batch is not the leading dim


class BatchNotLeading(TinyFlowPolicy):
    def encode_prompts(self, batch: PromptBatch) -> Any:
        return FeaturesFirst(super().encode_prompts(batch).prompt_embeds.T.contiguous())

    def predict(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: Any) -> torch.Tensor:
        return super().predict(latents, timesteps, TinyConditioning(cond.prompt_embeds_t.T))


class RandomEncoding(TinyFlowPolicy):
    def encode_prompts(self, batch: PromptBatch) -> Any:
        embeds = super().encode_prompts(batch).prompt_embeds
        return TinyConditioning(embeds + torch.randn_like(embeds))


class LenientPolicy(TinyFlowPolicy):
    class Config(TinyFlowPolicy.Config):
        model_config = ConfigDict(extra="allow")


class DropsUnknownKeys(TinyFlowPolicy):
    class Config(TinyFlowPolicy.Config):
        @model_validator(mode="before")
        @classmethod
        def _drop(cls, data: Any) -> Any:
            return {k: v for k, v in data.items() if k in TinyFlowPolicy.Config.model_fields}


class NoDecode:
    Config = TinyFlowPolicy.Config
    prediction_type = "flow"

    def encode_prompts(self, batch: PromptBatch) -> Any: ...
    def initial_noise(self, n: int, generator: torch.Generator) -> Any: ...
    def predict(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: Any) -> Any: ...
    def trainable_parameters(self) -> Any: ...


@pytest.mark.parametrize(
    ("broken", "message"),
    [
        (NoiseIgnoresTheGenerator, "initial_noise.*differs for the same generator seed"),
        (ConstantNoise, "initial_noise.*same for different generator seeds"),
        (AllFrozen, r"trainable_parameters\(\) is empty"),
        (ListsFrozenWeights, "lists a parameter that does not require grad"),
        (DetachedPrediction, "carry no gradient"),
        (TrainingDiffersFromRollout, "replaying step 0 .*bit-identical"),
        (NoisyInEvalMode, "not deterministic in eval mode"),
        (PixelsOutOfRange, r"not in \[0, 1\]"),
        (DictConditioning, "must return a dataclass"),
        (BatchNotLeading, "'prompt_embeds_t' has 16 rows for 3 prompts"),
        (RandomEncoding, "encode_prompts.*not deterministic"),
        (LenientPolicy, "extra=.forbid."),
        (DropsUnknownKeys, "Config accepted an unknown key"),
        (NoDecode, "no `decode` method"),
    ],
)
def test_policy_kit_fails_on_a_broken_policy(broken: type, message: str) -> None:
    with pytest.raises(AssertionError, match=message):
        check_policy_plugin(broken, {"trainable": "output"} if broken is ListsFrozenWeights else None, prompts=PROMPTS)


def test_policy_kit_fails_on_an_unregistered_name_and_rejected_options() -> None:
    with pytest.raises(AssertionError, match="'no-such-policy' is not registered under the 'dancecore.policies'"):
        check_policy_plugin("no-such-policy")
    with pytest.raises(AssertionError, match="Config rejected the options"):
        check_policy_plugin("testing-tiny", {"hidden": 0})
    with pytest.raises(AssertionError, match="predicts 'flow' but sampler 'ddim-sde' expects 'epsilon'"):
        check_policy_plugin("testing-tiny", sampler="ddim-sde")


# ------------------------------------------------------------------------------ broken samplers


class ReplayDiffers(FlowSDE):
    def step(
        self, schedule: Any, index: Any, latents: torch.Tensor, model_output: torch.Tensor, **kw: Any
    ) -> StepResult:
        out = super().step(schedule, index, latents, model_output, **kw)
        if kw.get("next_latents") is None:
            return out
        return dataclasses.replace(out, log_prob=out.log_prob + 1e-6)


class DeterministicStepHasLogProb(FlowSDE):
    def step(
        self, schedule: Any, index: Any, latents: torch.Tensor, model_output: torch.Tensor, **kw: Any
    ) -> StepResult:
        out = super().step(schedule, index, latents, model_output, **kw)
        return dataclasses.replace(out, log_prob=out.log_prob + 1.0) if kw.get("deterministic") else out


class IgnoresItsNoise(FlowSDE):
    def step(
        self, schedule: Any, index: Any, latents: torch.Tensor, model_output: torch.Tensor, **kw: Any
    ) -> StepResult:
        if kw.get("noise") is not None:
            kw["noise"] = torch.zeros_like(kw["noise"])
        return super().step(schedule, index, latents, model_output, **kw)


class OneStepPerBatch(FlowSDE):
    def step(
        self, schedule: Any, index: Any, latents: torch.Tensor, model_output: torch.Tensor, **kw: Any
    ) -> StepResult:
        if isinstance(index, torch.Tensor):
            index = int(index[0])  # wrong: training batches mix steps
        return super().step(schedule, index, latents, model_output, **kw)


class DetachedLogProb(FlowSDE):
    def step(
        self, schedule: Any, index: Any, latents: torch.Tensor, model_output: torch.Tensor, **kw: Any
    ) -> StepResult:
        out = super().step(schedule, index, latents, model_output, **kw)
        return dataclasses.replace(out, log_prob=out.log_prob.detach())


class FlatLogProb(FlowSDE):
    def step(
        self, schedule: Any, index: Any, latents: torch.Tensor, model_output: torch.Tensor, **kw: Any
    ) -> StepResult:
        out = super().step(schedule, index, latents, model_output, **kw)
        return dataclasses.replace(out, log_prob=torch.zeros_like(out.log_prob))


class WrongScheduleLength(FlowSDE):
    def schedule(self, num_steps: int | None = None) -> Any:
        full = super().schedule(num_steps)
        return dataclasses.replace(full, sigmas=full.sigmas[:-1])


class LenientSampler(FlowSDE):
    class Config(FlowSDE.Config):
        model_config = ConfigDict(extra="allow")


class NoStep:
    Config = FlowSDE.Config

    def schedule(self, num_steps: int | None = None) -> Any: ...


@pytest.mark.parametrize(
    ("broken", "message"),
    [
        (ReplayDiffers, "scoring step 0's transition .*bit-identical"),
        (DeterministicStepHasLogProb, "deterministic step's log-prob .* not exactly 0"),
        (IgnoresItsNoise, "step 0 ignores its noise"),
        (OneStepPerBatch, "rows are at different steps"),
        (DetachedLogProb, "carries no gradient"),
        (FlatLogProb, "does not fall when next_latents moves away"),
        (WrongScheduleLength, r"sigmas has shape \(3,\), expected \(4,\)"),
        (LenientSampler, "extra=.forbid."),
        (NoStep, "no `step` method"),
    ],
)
def test_sampler_kit_fails_on_a_broken_sampler(broken: type, message: str) -> None:
    with pytest.raises(AssertionError, match=message):
        check_sampler_plugin(broken)


def test_policy_kit_catches_a_sampler_whose_replay_differs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The policy kit scores the rollout through its sampler: a replay that differs fails it too."""
    import dancecore.testing.kits as kits

    original = kits.build_component

    def build(kind: str, name: str, options: Any = None, context: Any = None) -> Any:
        if kind == "sampler":
            return ReplayDiffers(ReplayDiffers.Config.model_validate(options or {}), context)
        return original(kind, name, options, context)

    monkeypatch.setattr(kits, "build_component", build)
    with pytest.raises(AssertionError, match="replaying step 0 .*bit-identical"):
        check_policy_plugin("testing-tiny")


def test_recipe_overrides_reads_the_header_command(tmp_path):
    from pathlib import Path

    from dancecore.testing import recipe_overrides

    root = Path(__file__).resolve().parents[1]
    overrides = recipe_overrides(root / "configs" / "flux" / "hps.yaml")
    assert "policy.preset=tiny" in overrides and "output_dir=outputs/flux-tiny" in overrides
    other = tmp_path / "other.yaml"
    other.write_text("# dancecore train configs/flux/hps.yaml a=1\nseed: 0\n")
    with pytest.raises(AssertionError, match="not this recipe"):
        recipe_overrides(other)
