"""Conformance kits: call these from a plugin's own tests.

Each check builds the plugin as a run would, exercises the contract the trainer relies on, raises
``AssertionError`` with a message saying what the plugin got wrong, and returns the built
component for further plugin-specific checks. A check takes the plugin's registered name (then it
also checks the entry point) or, before the plugin is registered, its class.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from pydantic import ValidationError

from dancecore import registry
from dancecore.contracts.protocols import BuildContext, Policy, Sampler, WindowedSampler
from dancecore.contracts.records import Prompt, PromptBatch, Schedule, StepResult, select_rows
from dancecore.errors import PluginError
from dancecore.testing.helpers import build_component, prompt_batch

__all__ = ["check_policy_plugin", "check_sampler_plugin"]

#: The built-in sampler for each prediction type, and the tiny policy for each.
SAMPLER_FOR: dict[str, str] = {"flow": "flow-sde", "epsilon": "ddim-sde"}
TINY_POLICY_FOR: dict[str, str] = {"flow": "testing-tiny", "epsilon": "testing-tiny-eps"}

POLICY_MEMBERS = (
    "Config",
    "prediction_type",
    "module",
    "encode_prompts",
    "initial_noise",
    "predict",
    "decode",
    "trainable_parameters",
)
SAMPLER_MEMBERS = ("Config", "schedule", "step")


# ------------------------------------------------------------------------------------ shared


def _load(kind: str, plugin: str | type) -> tuple[str, Any]:
    """(label, class) of a registered plugin name (checking its entry point) or of a class."""
    if not isinstance(plugin, str):
        problems = registry.contract_problems(kind, plugin)
        assert not problems, f"{plugin.__name__}: not a valid {kind}: {'; '.join(problems)}"
        return plugin.__name__, plugin
    names = {p.name for p in registry.installed(kind)}
    assert plugin in names, f"{kind} {plugin!r} is not registered under the {registry.KINDS[kind]!r} entry-point group"
    try:
        return plugin, registry.load(kind, plugin)
    except PluginError as exc:
        raise AssertionError(f"{plugin}: {exc}") from exc


def _config(label: str, cls: Any, options: dict[str, Any] | None) -> Any:
    """Validate ``options``; check that an unknown key is rejected."""
    try:
        config = cls.Config.model_validate(options or {})
    except ValidationError as exc:
        raise AssertionError(f"{label}: Config rejected the options {options!r}: {exc}") from exc
    try:
        cls.Config.model_validate({**(options or {}), "surely_not_an_option": 1})
    except ValidationError:
        pass
    else:
        raise AssertionError(f"{label}: Config accepted an unknown key; set model_config extra='forbid'")
    return config


def _build(label: str, cls: Any, config: Any, context: BuildContext | None) -> Any:
    try:
        return cls(config, context or BuildContext())
    except Exception as exc:  # the plugin's own failure, reported as a conformance failure
        raise AssertionError(
            f"{label}: building it as cls(config, BuildContext()) failed: {type(exc).__name__}: {exc}"
        ) from exc


def _honours(label: str, component: Any, protocol: type, members: Sequence[str]) -> None:
    if not isinstance(component, protocol):
        missing = [m for m in members if not hasattr(component, m)]
        raise AssertionError(f"{label}: not a dancecore.{protocol.__name__}; missing {missing}")


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------ rewards


def _check_noise(label: str, policy: Any, n: int) -> torch.Tensor:
    first = policy.initial_noise(n, _generator(3))
    assert isinstance(first, torch.Tensor), f"{label}: initial_noise() returned {type(first).__name__}, not a tensor"
    assert first.shape[0] == n, f"{label}: initial_noise({n}, ...) returned {first.shape[0]} rows"
    assert first.dtype == torch.float32 and first.device.type == "cpu", (
        f"{label}: initial_noise() must be fp32 on the CPU, got {first.dtype} on {first.device}"
    )
    again = policy.initial_noise(n, _generator(3))
    assert torch.equal(first, again), (
        f"{label}: initial_noise() differs for the same generator seed (draw from `generator`)"
    )
    other = policy.initial_noise(n, _generator(4))
    assert not torch.equal(first, other), f"{label}: initial_noise() is the same for different generator seeds"
    return policy.initial_noise(n, _generator(0))


def _check_conditioning(label: str, cond: Any, again: Any, n: int) -> None:
    """A dataclass whose batched tensor fields lead with the batch dim; the same on a second encoding."""
    assert dataclasses.is_dataclass(cond) and not isinstance(cond, type), (
        f"{label}: encode_prompts() returned {type(cond).__name__}; it must return a dataclass (select_rows slices it)"
    )
    for field in dataclasses.fields(cond):
        a, b = getattr(cond, field.name), getattr(again, field.name)
        same = torch.equal(a, b) if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) else a == b
        assert same, (
            f"{label}: encode_prompts() is not deterministic (field {field.name!r} differs between two encodings)"
        )
    declared = getattr(cond, "batch_fields", None)
    for field in dataclasses.fields(cond):
        value = getattr(cond, field.name)
        batched = (
            field.name in declared if declared is not None else isinstance(value, torch.Tensor) and value.ndim >= 1
        )
        if batched and isinstance(value, torch.Tensor):
            assert value.shape[0] == n, (
                f"{label}: conditioning field {field.name!r} has {value.shape[0]} rows for {n} prompts; batched tensor "
                "fields lead with the batch dim (list the batched ones in `batch_fields` if some are shared)"
            )


def _eval_predictions(label: str, policy: Any, latents: torch.Tensor, t: torch.Tensor, cond: Any) -> None:
    """Deterministic in eval mode, finite, latent-shaped, and the same for rows picked by select_rows."""
    with torch.no_grad():
        first = policy.predict(latents, t, cond)
        again = policy.predict(latents.clone(), t.clone(), cond)
        assert isinstance(first, torch.Tensor) and first.shape == latents.shape, (
            f"{label}: predict() returned shape {tuple(getattr(first, 'shape', ()))} for latents {tuple(latents.shape)}"
        )
        assert bool(torch.isfinite(first).all()), f"{label}: predict() returned non-finite values"
        assert torch.equal(first, again), f"{label}: predict() is not deterministic in eval mode"
        rows = torch.arange(latents.shape[0] - 1, -1, -1)[: max(1, latents.shape[0] - 1)]
        try:
            picked = select_rows(cond, rows)
        except Exception as exc:
            raise AssertionError(
                f"{label}: select_rows() failed on the conditioning: {type(exc).__name__}: {exc}"
            ) from exc
        assert type(picked) is type(cond), f"{label}: select_rows() changed the conditioning's type"
        part = policy.predict(latents[rows], t[rows], picked)
    assert torch.allclose(part, first[rows], rtol=1e-4, atol=1e-4), (
        f"{label}: predictions for rows picked by select_rows differ from those rows of the full batch "
        f"(max difference {float((part - first[rows]).abs().max()):.3g}): tensor fields must lead with the batch dim"
    )


def _stochastic_mask(sampler: Any, num_steps: int) -> list[bool]:
    if isinstance(sampler, WindowedSampler):
        return [bool(v) for v in sampler.stochastic_steps(num_steps, 0).tolist()]
    return [True] * num_steps


def _rollout(
    policy: Any, sampler: Any, schedule: Schedule, cond: Any, start: torch.Tensor, mask: list[bool]
) -> tuple[list[torch.Tensor], list[torch.Tensor], StepResult]:
    """States before/after every step and the log-probs, as the trainer's rollout takes them."""
    n = start.shape[0]
    noise = _generator(11)
    states, log_probs = [start], []
    with torch.no_grad():
        for i in range(schedule.num_steps):
            pred = policy.predict(states[-1], schedule.timesteps[i].expand(n), cond)
            step = torch.randn(states[-1].shape, generator=noise).to(states[-1].device)
            out = sampler.step(schedule, i, states[-1], pred, noise=step, deterministic=not mask[i])
            states.append(out.next_latents)
            log_probs.append(out.log_prob)
    return states, log_probs, out


def _replay(
    label: str,
    policy: Any,
    sampler: Any,
    schedule: Schedule,
    cond: Any,
    states: list[torch.Tensor],
    log_probs: list[torch.Tensor],
    mask: list[bool],
) -> torch.Tensor:
    """Recompute every transition with gradient; returns the sum of the stochastic steps' log-probs."""
    n = states[0].shape[0]
    total = torch.zeros(())
    for i in range(schedule.num_steps):
        pred = policy.predict(states[i], schedule.timesteps[i].expand(n), cond)
        index = torch.full((n,), i)
        out = sampler.step(schedule, index, states[i], pred, next_latents=states[i + 1], deterministic=not mask[i])
        assert torch.equal(out.log_prob.detach(), log_probs[i]), (
            f"{label}: replaying step {i} with next_latents gives log-probs {out.log_prob.detach().tolist()}, "
            f"the rollout {log_probs[i].tolist()}: they must be bit-identical (same inputs, same batch shape)"
        )
        if mask[i]:
            total = total + out.log_prob.sum().cpu()
    return total


def _check_gradients(label: str, policy: Any, loss: torch.Tensor) -> None:
    module = policy.module
    assert isinstance(module, torch.nn.Module), f"{label}: `module` is {type(module).__name__}, not an nn.Module"
    trainable = list(policy.trainable_parameters())
    assert trainable, f"{label}: trainable_parameters() is empty: nothing would be trained"
    assert all(p.requires_grad for p in trainable), (
        f"{label}: trainable_parameters() lists a parameter that does not require grad"
    )
    wanted = {id(p) for p in module.parameters() if p.requires_grad}
    assert {id(p) for p in trainable} == wanted, (
        f"{label}: trainable_parameters() must be exactly the parameters of `module` that require grad "
        "(what the optimizer updates and checkpoints store)"
    )
    assert loss.requires_grad, f"{label}: the replayed log-probabilities carry no gradient (does predict() detach?)"
    loss.backward()
    try:
        reached = any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in trainable)
        assert reached, f"{label}: the gradient of the replayed log-probabilities reaches no trainable parameter"
        frozen = [name for name, p in module.named_parameters() if not p.requires_grad and p.grad is not None]
        assert not frozen, f"{label}: frozen parameters received gradients: {frozen[:3]}"
    finally:
        module.zero_grad(set_to_none=True)


def _check_deterministic_step(
    label: str, sampler: Any, schedule: Schedule, latents: torch.Tensor, pred: torch.Tensor
) -> None:
    a = sampler.step(
        schedule, 0, latents, pred, noise=torch.randn(latents.shape, generator=_generator(5)), deterministic=True
    )
    b = sampler.step(
        schedule, 0, latents, pred, noise=torch.randn(latents.shape, generator=_generator(6)), deterministic=True
    )
    zeros = torch.zeros(latents.shape[0], dtype=a.log_prob.dtype, device=a.log_prob.device)
    assert torch.equal(a.log_prob, zeros), (
        f"{label}: the deterministic step's log-prob is {a.log_prob.tolist()}, not exactly 0"
    )
    assert torch.equal(a.next_latents, b.next_latents), f"{label}: the deterministic step depends on the noise"


def _check_pixels(label: str, pixels: Any, n: int) -> None:
    assert isinstance(pixels, torch.Tensor), f"{label}: decode() returned {type(pixels).__name__}, not a tensor"
    shape = tuple(pixels.shape)
    assert pixels.ndim in (4, 5) and shape[0] == n and shape[-3] == 3, (
        f"{label}: decode() returned shape {shape}; expected ({n}, 3, H, W) images or ({n}, F, 3, H, W) videos"
    )
    assert pixels.is_floating_point() and bool(torch.isfinite(pixels).all()), (
        f"{label}: decode() returned non-finite or non-float pixels"
    )
    low, high = float(pixels.min()), float(pixels.max())
    assert 0.0 <= low and high <= 1.0, f"{label}: decode() returned pixels in [{low:.3g}, {high:.3g}], not in [0, 1]"


def check_policy_plugin(
    name: str | type,
    options: dict[str, Any] | None = None,
    *,
    sampler: str | None = None,
    sampler_options: dict[str, Any] | None = None,
    prompts: PromptBatch | Sequence[str | Prompt] | None = None,
    num_steps: int = 3,
    context: BuildContext | None = None,
) -> Any:
    """Check that the policy plugin ``name`` (a registered name, or a class) honours the ``Policy`` contract.

    It must: be registered under ``dancecore.policies``; have a pydantic ``Config`` with
    ``extra="forbid"`` that accepts ``options``; build as ``cls(config, context)`` into a
    ``dancecore.Policy`` whose ``prediction_type`` the sampler (``flow-sde`` for "flow",
    ``ddim-sde`` for "epsilon", unless ``sampler`` is given) expects; draw its initial noise (fp32,
    CPU) from the generator only; encode ``prompts`` deterministically into a dataclass whose
    batched tensor fields lead with the batch dim, so that rows picked by ``select_rows`` predict
    what those rows of the full batch do; predict deterministically in eval mode; give, for a
    rollout of ``num_steps`` steps, log-probs that the replay of the same transitions (with
    gradient, ``next_latents`` given) reproduces bit for bit; pass the gradient of those log-probs
    to a trainable parameter (and none to a frozen one), with ``trainable_parameters()`` exactly
    the parameters of ``module`` that require grad; report log-prob 0 for a deterministic step;
    and decode to pixels in [0, 1] of shape (B, 3, H, W) or (B, F, 3, H, W). Returns the policy.
    """
    label, cls = _load("policy", name)
    config = _config(label, cls, options)
    kind = getattr(cls, "prediction_type", None)
    sampler_name = sampler or SAMPLER_FOR.get(str(kind))
    assert sampler_name, f"{label}: prediction_type {kind!r} has no built-in sampler; pass sampler=..."
    the_sampler = build_component("sampler", sampler_name, sampler_options)
    expected = getattr(the_sampler, "prediction_type", None)
    assert expected in (None, kind), f"{label}: predicts {kind!r} but sampler {sampler_name!r} expects {expected!r}"
    policy = _build(label, cls, config, context)
    _honours(label, policy, Policy, POLICY_MEMBERS)
    batch = prompt_batch(prompts)
    n = len(batch)
    start = _check_noise(label, policy, n)
    cond = policy.encode_prompts(batch)
    _check_conditioning(label, cond, policy.encode_prompts(batch), n)
    schedule = the_sampler.schedule(num_steps)
    mixed_t = schedule.timesteps[torch.arange(n) % schedule.num_steps]
    module = policy.module
    was_training = module.training
    module.eval()
    try:
        _eval_predictions(label, policy, start, mixed_t, cond)
    finally:
        module.train(was_training)
    mask = _stochastic_mask(the_sampler, schedule.num_steps)
    states, log_probs, last = _rollout(policy, the_sampler, schedule, cond, start, mask)
    loss = _replay(label, policy, the_sampler, schedule, cond, states, log_probs, mask)
    _check_gradients(label, policy, loss)
    with torch.no_grad():
        pred = policy.predict(start, schedule.timesteps[0].expand(n), cond)
        _check_deterministic_step(label, the_sampler, schedule, start, pred)
        _check_pixels(label, policy.decode(last.x0_hat), n)
    return policy


# ------------------------------------------------------------------------------------ samplers


def _check_schedule(label: str, sampler: Any, num_steps: int) -> Schedule:
    schedule = sampler.schedule(num_steps)
    assert isinstance(schedule, Schedule), (
        f"{label}: schedule() returned {type(schedule).__name__}, not a dancecore.Schedule"
    )
    assert schedule.num_steps == num_steps, f"{label}: schedule({num_steps}) has {schedule.num_steps} steps"
    assert tuple(schedule.sigmas.shape) == (num_steps + 1,), (
        f"{label}: schedule({num_steps}).sigmas has shape {tuple(schedule.sigmas.shape)}, expected ({num_steps + 1},)"
    )
    assert isinstance(sampler.schedule(), Schedule), f"{label}: schedule() without num_steps failed"
    if isinstance(sampler, WindowedSampler):
        mask = sampler.stochastic_steps(num_steps, 0)
        assert mask.dtype == torch.bool and tuple(mask.shape) == (num_steps,), (
            f"{label}: stochastic_steps({num_steps}, 0) must be a bool tensor of shape ({num_steps},)"
        )
    return schedule


def _check_one_step(
    label: str, sampler: Any, schedule: Schedule, i: int, x: torch.Tensor, pred: torch.Tensor
) -> StepResult:
    """Sampling, scoring a given transition, and the shape of the result, for step ``i``."""
    n = x.shape[0]
    noise_a = torch.randn(x.shape, generator=_generator(100 + i))
    noise_b = torch.randn(x.shape, generator=_generator(200 + i))
    out = sampler.step(schedule, i, x, pred, noise=noise_a)
    assert isinstance(out, StepResult), f"{label}: step() returned {type(out).__name__}, not a dancecore.StepResult"
    assert out.next_latents.shape == x.shape and out.x0_hat.shape == x.shape, (
        f"{label}: step {i} changed the latents' shape"
    )
    assert tuple(out.log_prob.shape) == (n,), (
        f"{label}: step {i}'s log_prob has shape {tuple(out.log_prob.shape)}, expected ({n},)"
    )
    assert bool(torch.isfinite(out.log_prob).all()), (
        f"{label}: step {i}'s log_prob is not finite: {out.log_prob.tolist()}"
    )
    again = sampler.step(schedule, i, x, pred, noise=noise_a)
    assert torch.equal(out.next_latents, again.next_latents) and torch.equal(out.log_prob, again.log_prob), (
        f"{label}: step {i} is not a function of its inputs and noise"
    )
    other = sampler.step(schedule, i, x, pred, noise=noise_b)
    assert not torch.equal(out.next_latents, other.next_latents), f"{label}: step {i} ignores its noise"
    replay = sampler.step(schedule, torch.full((n,), i), x, pred, next_latents=out.next_latents)
    assert torch.equal(replay.log_prob, out.log_prob), (
        f"{label}: scoring step {i}'s transition (next_latents given, one index per row) gives log-probs "
        f"{replay.log_prob.tolist()}, sampling it {out.log_prob.tolist()}: they must be bit-identical"
    )
    far = sampler.step(schedule, torch.full((n,), i), x, pred, next_latents=out.next_latents + 1.0)
    assert bool((far.log_prob < replay.log_prob).all()), (
        f"{label}: step {i}'s log-prob does not fall when next_latents moves away from the sampled one"
    )
    return out


def _check_mixed_rows(
    label: str,
    sampler: Any,
    schedule: Schedule,
    states: list[torch.Tensor],
    preds: list[torch.Tensor],
    log_probs: list[torch.Tensor],
) -> None:
    """Training scores transitions of different steps in one batch: each row must match its rollout."""
    n, steps = states[0].shape[0], schedule.num_steps
    index = torch.arange(n) % steps
    rows = torch.arange(n)
    x = torch.stack([states[int(i)][r] for r, i in zip(rows, index, strict=True)])
    nxt = torch.stack([states[int(i) + 1][r] for r, i in zip(rows, index, strict=True)])
    pred = torch.stack([preds[int(i)][r] for r, i in zip(rows, index, strict=True)])
    expected = torch.stack([log_probs[int(i)][r] for r, i in zip(rows, index, strict=True)])
    out = sampler.step(schedule, index, x, pred, next_latents=nxt)
    assert torch.equal(out.log_prob, expected), (
        f"{label}: scoring a batch whose rows are at different steps gives log-probs {out.log_prob.tolist()}, "
        f"the rollout {expected.tolist()}: each row must equal its own step's"
    )


def _check_sampler_gradient(
    label: str, sampler: Any, schedule: Schedule, x: torch.Tensor, pred: torch.Tensor, nxt: torch.Tensor
) -> None:
    leaf = pred.detach().clone().requires_grad_(True)
    out = sampler.step(schedule, torch.full((x.shape[0],), 0), x, leaf, next_latents=nxt)
    assert out.log_prob.requires_grad, (
        f"{label}: the log-prob of a given transition carries no gradient to the model output"
    )
    out.log_prob.sum().backward()
    assert leaf.grad is not None and bool(leaf.grad.abs().sum() > 0), (
        f"{label}: the gradient of the log-prob does not reach the model output"
    )


def check_sampler_plugin(
    name: str | type,
    options: dict[str, Any] | None = None,
    *,
    policy: str | None = None,
    policy_options: dict[str, Any] | None = None,
    num_steps: int = 3,
) -> Any:
    """Check that the sampler plugin ``name`` (a registered name, or a class) honours the ``Sampler`` contract.

    It must: be registered under ``dancecore.samplers``; have a pydantic ``Config`` with
    ``extra="forbid"``; build into a ``dancecore.Sampler`` whose ``schedule(n)`` has n timesteps
    and n + 1 sigmas (and, for a ``WindowedSampler``, a bool mask of n stochastic steps); on the
    outputs of ``policy`` (``testing-tiny``, or ``testing-tiny-eps`` for an "epsilon" sampler):
    take each step as a function of its inputs and noise (and not ignore the noise), keeping the
    latents' shape, with one finite log-prob per row; score a given transition (``next_latents``,
    one index per row) with exactly the sampled log-prob, also when the rows of a batch are at
    different steps; give a lower log-prob to a transition further from the sampled one; pass a
    gradient to the model output; and take a deterministic step that ignores the noise with
    log-prob exactly 0. Returns the built sampler.
    """
    label, cls = _load("sampler", name)
    sampler = _build(label, cls, _config(label, cls, options), None)
    _honours(label, sampler, Sampler, SAMPLER_MEMBERS)
    schedule = _check_schedule(label, sampler, num_steps)
    kind = str(getattr(sampler, "prediction_type", "flow"))
    the_policy = build_component("policy", policy or TINY_POLICY_FOR.get(kind, "testing-tiny"), policy_options)
    batch = prompt_batch(None)
    n = len(batch)
    cond = the_policy.encode_prompts(batch)
    states = [the_policy.initial_noise(n, _generator(0))]
    preds: list[torch.Tensor] = []
    log_probs: list[torch.Tensor] = []
    with torch.no_grad():
        for i in range(schedule.num_steps):
            preds.append(the_policy.predict(states[-1], schedule.timesteps[i].expand(n), cond))
            out = _check_one_step(label, sampler, schedule, i, states[-1], preds[-1])
            states.append(out.next_latents)
            log_probs.append(out.log_prob)
        _check_mixed_rows(label, sampler, schedule, states, preds, log_probs)
        _check_deterministic_step(label, sampler, schedule, states[0], preds[0])
    _check_sampler_gradient(label, sampler, schedule, states[0], preds[0], states[1])
    return sampler
