"""Multi-process training on DeepSpeed ZeRO (stages 0-3); the only module that imports deepspeed.

The GRPO semantics across ranks are the trainer's and do not change here:

- each rank takes a disjoint share of every iteration's prompts, and a prompt's whole group is
  sampled, scored and normalised on that one rank (group advantages need no communication);
- all noise comes from (seed, iteration, global sample id), so any world size draws the same samples;
- each rank accumulates ``loss / (its samples x steps)`` and DeepSpeed *averages* gradients over
  ranks: N ranks with B/N samples each take the same step as one process with B;
- metrics are averaged over ranks before rank 0 logs them; only rank 0 writes files.
- with ``distributed.sequence_parallel: N`` the N ranks of a group hold the same samples (one
  data-parallel rank); the policy's collectives make each rank's gradient a share whose group sum
  is N times the group's gradient, so the same average over all ranks is the mean over groups
  (docs/distributed.md, section 8).

:class:`DeepSpeedEngine` adapts a DeepSpeed engine to the :class:`~dancecore.training.engine.TrainEngine`
protocol. Checkpoints hold the gathered fp32 weights and the full AdamW moments in the same
safetensors + JSON layout as :class:`~dancecore.training.engine.LocalEngine` (DeepSpeed's own
``save_checkpoint`` pickles, so it is not used): a run resumes on any number of ranks, or on none.
See docs/distributed.md.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator
from typing import Any

import torch

from dancecore.checkpoint import flatten_optimizer_state, portable_param_group, unflatten_optimizer_state
from dancecore.config.schema import RunConfig
from dancecore.distributed.config import _deepspeed, deepspeed_config
from dancecore.errors import ReplicaDivergence
from dancecore.training.engine import trainable_named_parameters

# ------------------------------------------------------------------------------------ the engine


def _route_calls_through(module: torch.nn.Module, wrapper: Any) -> type:
    """Make ``module(...)``, as a policy calls it, run through the DeepSpeed engine's forward.

    DeepSpeed has to see every forward: it registers the hooks that prepare the backward (ZeRO-3
    computes wrong gradients when several backward passes accumulate without them). Policies call
    their own ``module``, so the module's class is swapped for a subclass whose ``__call__`` goes
    through the engine, which in turn calls the module again (that inner call runs normally).
    Returns the original class, to restore with :func:`_restore_calls`.
    """
    base = type(module)
    inside = {"depth": 0}

    def __call__(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if inside["depth"]:
            return base.__call__(self, *args, **kwargs)
        inside["depth"] += 1
        try:
            if torch.is_grad_enabled():
                wrapper.last_call = (args, kwargs)
            return wrapper.ds(*args, **kwargs)
        finally:
            inside["depth"] -= 1

    routed = type(base.__name__, (base,), {"__call__": __call__, "__module__": base.__module__})
    routed.__qualname__ = base.__qualname__
    module.__class__ = routed
    return base


def _restore_calls(module: torch.nn.Module, base: type) -> None:
    module.__class__ = base


class DeepSpeedEngine:
    """The :class:`~dancecore.training.engine.TrainEngine` protocol on a DeepSpeed ZeRO engine.

    - ``step`` returns the pre-clip global gradient norm; a non-finite norm on any rank makes
      every rank skip the update (DeepSpeed's overflow check on ZeRO 1-3 and bf16; a step
      pre-hook on the plain stage-0 AdamW).
    - ``model_state`` gathers the full fp32 (master) weights on every rank; ``optimizer_state``
      the full AdamW moments, under the same names as :class:`~dancecore.training.engine.LocalEngine`.
    - ``load_state`` scatters full weights and moments into whatever partitioning this world
      size uses, so checkpoints move between world sizes (and to and from ``LocalEngine``).
    """

    def __init__(self, module: torch.nn.Module, cfg: RunConfig, ds_config: dict[str, Any] | None = None) -> None:
        deepspeed = _deepspeed()

        self.module = module
        self.params = trainable_named_parameters(module)
        if not self.params:
            raise ValueError("the policy has no trainable parameter")
        self.shapes = {name: tuple(p.shape) for name, p in self.params.items()}
        config = copy.deepcopy(ds_config if ds_config is not None else deepspeed_config(cfg))
        self.stage = int(config["zero_optimization"]["stage"])
        self.bf16 = bool(config.get("bf16", {}).get("enabled", False))
        self.grad_clip = float(config.get("gradient_clipping", 0.0))
        # Stage 0 without bf16 steps a plain torch AdamW that neither reports the norm nor skips
        # non-finite updates: clip (and skip) in a step pre-hook instead.
        self.plain_optimizer = self.stage == 0 and not self.bf16
        if self.plain_optimizer:
            config["gradient_clipping"] = 0.0
        self.ds, _, _, _ = deepspeed.initialize(
            model=module, model_parameters=list(self.params.values()), config=config
        )
        self.optimizer = self._basic_optimizer()  # its param_groups carry the live learning rate
        self.hyper = {key: self.optimizer.param_groups[0][key] for key in ("lr", "betas", "eps", "weight_decay")}
        self._last_norm = math.nan
        if self.plain_optimizer:
            self.optimizer.register_step_pre_hook(self._clip_or_skip)
        self.rank = torch.distributed.get_rank()
        self.world_size = torch.distributed.get_world_size()
        self.device = torch.device(f"cuda:{torch.cuda.current_device()}") if self._on_cuda() else torch.device("cpu")
        self.pending_backward = False
        self.last_call: tuple[tuple[Any, ...], dict[str, Any]] | None = None
        self._base_class = _route_calls_through(module, self)

    def _on_cuda(self) -> bool:
        return torch.distributed.get_backend() == "nccl"

    def _basic_optimizer(self) -> torch.optim.Optimizer:
        """The torch AdamW underneath DeepSpeed's wrappers (it holds the fp32 partitions' state)."""
        opt: Any = self.ds.optimizer
        while not isinstance(opt, torch.optim.Optimizer):
            opt = opt.optimizer
        return opt

    def close(self) -> None:
        """Give the module its own class back and release DeepSpeed's hooks."""
        _restore_calls(self.module, self._base_class)
        destroy = getattr(self.ds, "destroy", None)
        if callable(destroy):
            destroy()

    # ------------------------------------------------------------------------------ updates

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate gradients (ZeRO 2/3 reduce them across ranks during the backward pass)."""
        self.ds.backward(loss)
        self.pending_backward = True

    def _clip_or_skip(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Stage-0 pre-hook, on gradients already averaged over ranks: clip, or drop them all
        (so AdamW skips every parameter) when the norm is not finite."""
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norm = float(torch.nn.utils.clip_grad_norm_(params, self.grad_clip)) if params else 0.0
        self._last_norm = norm
        if not math.isfinite(norm):
            for p in params:
                p.grad = None

    def step(self) -> float:
        """Average gradients over ranks, clip, step AdamW; returns the pre-clip norm (the same
        on every rank). A non-finite norm skips the update everywhere."""
        self._last_norm = math.nan
        self.ds.step()
        self.pending_backward = False
        self.last_call = None
        if self.plain_optimizer:
            return self._last_norm
        norm = self.ds.get_global_grad_norm()
        return float(norm) if norm is not None else math.nan

    def zero_grad(self) -> None:
        """Drop accumulated gradients on every rank (all ranks call it together).

        ZeRO-2 keeps reduced gradients in internal partitions that no public call clears, so the
        pending update is discarded the way DeepSpeed discards an overflowing one: one more
        backward pass of a NaN-scaled output poisons the gradients and ``step`` skips the update.
        """
        if self.pending_backward and self.last_call is not None:
            args, kwargs = self.last_call
            with self._autocast():
                out = self.module(*args, **kwargs)  # routed through DeepSpeed's forward
            first = _first_float_tensor(out)
            if first is not None and first.requires_grad:
                self.ds.backward(first.float().sum() * math.nan)
                self.ds.step()  # overflow: skipped on every rank, DeepSpeed clears its buffers
        self.ds.zero_grad()
        self.ds.optimizer.zero_grad(set_to_none=True)
        self.pending_backward = False
        self.last_call = None

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.bf16:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ------------------------------------------------------------------------ collectives

    def all_reduce_mean(self, values: list[float]) -> list[float]:
        """Mean of each value over ranks (NaN stays NaN)."""
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(tensor)
        return [float(v) / self.world_size for v in tensor.cpu()]

    def any_rank(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any rank."""
        tensor = torch.tensor([1.0 if flag else 0.0], device=self.device)
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
        return bool(tensor.item() > 0)

    def barrier(self) -> None:
        """Wait for every rank."""
        torch.distributed.barrier()

    def gather_object(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` in rank order on rank 0 (None elsewhere)."""
        found: list[Any] | None = [None] * self.world_size if self.rank == 0 else None
        torch.distributed.gather_object(obj, found, dst=0)
        return found

    # ---------------------------------------------------------------------------- state

    @contextlib.contextmanager
    def _gathered(self, modifier_rank: int | None = None) -> Iterator[None]:
        """Full module weights for the block under ZeRO-3 (written back from ``modifier_rank``)."""
        if self.stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.params.values()), modifier_rank=modifier_rank):
                yield
        else:
            yield

    def model_state(self) -> dict[str, torch.Tensor]:
        """Full fp32 weights (DeepSpeed's master copy), on CPU, on every rank. Collective.

        Also checks that ranks holding replicated weights (ZeRO 0-2) hold identical ones.
        """
        self.check_replicas()
        if self.plain_optimizer:
            return {name: p.detach().cpu().clone() for name, p in self.params.items()}
        from deepspeed.utils import safe_get_full_fp32_param

        return {
            name: safe_get_full_fp32_param(p).detach().reshape(self.shapes[name]).cpu().float().clone()
            for name, p in self.params.items()
        }

    def check_replicas(self) -> None:
        """Raise :class:`ReplicaDivergence` if ranks' module weights differ (ZeRO 0-2, where every
        rank holds a full copy; under ZeRO-3 each weight exists once, partitioned). Collective."""
        if self.stage == 3 or self.world_size == 1:
            return
        sums = torch.stack(
            [torch.stack([p.detach().double().sum(), p.detach().double().square().sum()]) for p in self.params.values()]
        ).to(self.device)
        low, high = sums.clone(), sums.clone()
        torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN)
        torch.distributed.all_reduce(high, op=torch.distributed.ReduceOp.MAX)
        differs = (high - low).abs().amax(dim=1) > 0
        if bool(differs.any()):
            names = [n for n, d in zip(self.params, differs.tolist(), strict=True) if d]
            raise ReplicaDivergence(
                f"ranks hold different weights for {len(names)} parameter(s), e.g. {names[:3]}: "
                "gradients were not synchronised"
            )

    def _flat_params(self) -> list[torch.Tensor]:
        """The fp32 tensors the basic AdamW steps (flat partitions under ZeRO). ZeRO-3 hands them
        to the optimizer only while it steps, so they are read from its own list then."""
        flat = [p for group in self.optimizer.param_groups for p in group["params"]]
        return flat or list(getattr(self.ds.optimizer, "fp32_partitioned_groups_flat", []))

    def _flat_states(self) -> list[dict[str, Any]]:
        return [self.optimizer.state[p] for p in self._flat_params() if self.optimizer.state.get(p)]

    def _optimizer_meta(self) -> dict[str, Any]:
        """``param_groups`` as :class:`~dancecore.training.engine.LocalEngine` writes them: one group of
        the trainable parameters in order, the torch AdamW defaults plus the live hyper-parameters."""
        template = torch.optim.AdamW([torch.zeros(1)], **self.hyper).state_dict()["param_groups"][0]
        live = self.optimizer.param_groups[0]
        group = portable_param_group({key: live.get(key, value) for key, value in template.items() if key != "params"})
        group["betas"] = list(group["betas"])
        group["params"] = list(range(len(self.params)))
        return {"param_groups": [group], "scalars": {}}

    def optimizer_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Full AdamW moments by parameter index (``"3.exp_avg"``, ``"3.exp_avg_sq"``,
        ``"3.step"``) and JSON metadata, on every rank. Collective."""
        if self.plain_optimizer:
            flat, meta = flatten_optimizer_state(self.optimizer.state_dict())
            return {k: v.detach().cpu().clone() for k, v in flat.items()}, meta
        states = self._flat_states()
        tensors: dict[str, torch.Tensor] = {}
        if states:  # nothing before the first applied update
            from deepspeed.utils import safe_get_full_optimizer_state

            step = states[0]["step"]
            for index, (name, p) in enumerate(self.params.items()):
                for key in ("exp_avg", "exp_avg_sq"):
                    full = safe_get_full_optimizer_state(p, key)
                    tensors[f"{index}.{key}"] = full.detach().reshape(self.shapes[name]).cpu().float().clone()
                tensors[f"{index}.step"] = step.detach().cpu().clone()
        return tensors, self._optimizer_meta()

    def load_state(
        self, model: dict[str, torch.Tensor], optimizer: dict[str, torch.Tensor], meta: dict[str, Any]
    ) -> None:
        """Scatter full weights and AdamW state into this engine's partitions (every rank reads
        the same checkpoint). Collective."""
        missing = sorted(set(self.params) - set(model))
        unexpected = sorted(set(model) - set(self.params))
        if missing or unexpected:
            raise ValueError(
                f"checkpoint weights do not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        for name, shape in self.shapes.items():
            if tuple(model[name].shape) != shape:
                raise ValueError(f"checkpoint weight {name} has shape {tuple(model[name].shape)}, model {shape}")
        self._load_weights(model)
        groups = meta["param_groups"]
        for group in self.optimizer.param_groups:
            for key in ("lr", "betas", "eps", "weight_decay"):
                if key in groups[0]:
                    group[key] = tuple(groups[0][key]) if key == "betas" else groups[0][key]
        self.hyper = {key: self.optimizer.param_groups[0][key] for key in ("lr", "betas", "eps", "weight_decay")}
        if self.plain_optimizer:
            self.optimizer.load_state_dict(unflatten_optimizer_state(optimizer, meta, self.optimizer.param_groups))
        elif optimizer:
            self._load_moments(optimizer)

    def _load_weights(self, model: dict[str, torch.Tensor]) -> None:
        with torch.no_grad(), self._gathered(modifier_rank=0):
            for name, p in self.params.items():
                p.data.copy_(model[name].reshape(p.shape).to(p.device, p.dtype))
        if not self.plain_optimizer:
            for name, p in self.params.items():
                self._set_full(p, model[name])

    def _load_moments(self, optimizer: dict[str, torch.Tensor]) -> None:
        steps = [v for k, v in optimizer.items() if k.endswith(".step")]
        step = steps[0] if steps else torch.tensor(0.0)
        # torch AdamW creates its state at its first step; create it now (zeros), scatter the full
        # moments into it below, and (ZeRO 1/2, bf16) link DeepSpeed's per-parameter views to it.
        on_device = bool(
            self.optimizer.param_groups[0].get("fused") or self.optimizer.param_groups[0].get("capturable")
        )
        for flat in self._flat_params():
            self.optimizer.state[flat] = {
                "step": step.detach().clone().float().to(flat.device if on_device else "cpu"),
                "exp_avg": torch.zeros_like(flat),
                "exp_avg_sq": torch.zeros_like(flat),
            }
        link = getattr(self.ds.optimizer, "_lazy_init_hp_params_optimizer_state", None)
        if callable(link):
            if hasattr(self.ds.optimizer, "_hp_optimizer_states_linked"):
                self.ds.optimizer._hp_optimizer_states_linked = False
            link()
        for index, (name, p) in enumerate(self.params.items()):
            for key in ("exp_avg", "exp_avg_sq"):
                value = optimizer.get(f"{index}.{key}")
                if value is None:
                    value = torch.zeros(self.shapes[name])
                self._set_full(p, value, key)

    def _set_full(self, p: torch.nn.Parameter, value: torch.Tensor, key: str | None = None) -> None:
        """Set the fp32 master weight (``key`` None) or an AdamW moment of ``p`` from its full
        value. Under ZeRO-3 each rank writes its own partition (DeepSpeed's full-value setter
        fails on the last rank when a tensor does not split evenly)."""
        from deepspeed.utils import (
            safe_set_full_fp32_param,
            safe_set_full_optimizer_state,
            safe_set_local_fp32_param,
            safe_set_local_optimizer_state,
        )

        value = value.to(self.device, torch.float32)
        if self.stage != 3:
            if key is None:
                safe_set_full_fp32_param(p, value)
            else:
                safe_set_full_optimizer_state(p, value, key)
            return
        size = p.ds_tensor.numel()  # type: ignore[attr-defined]  # ZeRO-3 adds it
        flat = torch.cat([value.flatten(), value.new_zeros(size * self.world_size - value.numel())])
        local = flat[self.rank * size : (self.rank + 1) * size]
        if key is None:
            safe_set_local_fp32_param(p, local)
        else:
            safe_set_local_optimizer_state(p, local, key)


def _first_float_tensor(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out if out.is_floating_point() else None
    if isinstance(out, list | tuple):
        for item in out:
            found = _first_float_tensor(item)
            if found is not None:
                return found
    if isinstance(out, dict):
        return _first_float_tensor(list(out.values()))
    sample = getattr(out, "sample", None)
    return sample if isinstance(sample, torch.Tensor) else None
