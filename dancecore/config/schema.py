"""Run configuration: YAML loading, ``key.sub=value`` overrides and two-phase validation.

Phase one validates the run's structure (:class:`RunConfig`); phase two validates each named
component's options against that component's own ``Config``. Every error of both phases is
collected and reported together, each with its dotted YAML path (``rewards[0].weight``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dancecore import registry
from dancecore.config.yaml_io import apply_overrides as apply_overrides  # re-exported: the public config API
from dancecore.config.yaml_io import load_yaml_file as load_yaml_file
from dancecore.config.yaml_io import parse_yaml as parse_yaml
from dancecore.errors import ConfigError


class StrictModel(BaseModel):
    """Base of the run-structure models: unknown keys are errors, NaN/inf are not numbers."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ComponentSpec(BaseModel):
    """A component named by its plugin name; the other keys are that component's options."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    name: str = Field(description="Entry-point name of the plugin (see `dancecore plugins`).")

    @property
    def options(self) -> dict[str, Any]:
        """The component's own options (everything but the structural keys)."""
        return dict(self.model_extra or {})


class RewardSpec(ComponentSpec):
    """A reward plugin with its weight in the advantage sum."""

    weight: float = Field(1.0, description="Weight of this reward's group-normalised advantage.")
    label: str | None = Field(None, description="Name used in metrics (defaults to the plugin name).")

    @property
    def display_name(self) -> str:
        """The name used in metrics and logs."""
        return self.label or self.name


class PromptsConfig(StrictModel):
    """Where prompts come from: a file (plain text, one per line, or JSON lines) or an inline list."""

    path: Path | None = Field(
        None,
        description="Prompt file: .txt (one per line) or .jsonl ({prompt, image}); a relative path is looked up "
        "beside the config file first, then in the working directory.",
    )
    texts: list[str] | None = Field(None, description="Inline prompts, instead of a file.")
    shuffle: bool = Field(True, description="Shuffle the prompts every epoch (seeded).")

    @model_validator(mode="after")
    def _one_source(self) -> PromptsConfig:
        if (self.path is None) == (self.texts is None):
            raise ValueError("give exactly one of `path` or `texts`")
        if self.texts is not None and not self.texts:
            raise ValueError("`texts` is empty")
        return self


class DivergenceAlarmConfig(StrictModel):
    """The over-optimisation alarm: the training reward rises while a gold (evaluation) metric falls."""

    gold: str | None = Field(None, description="Evaluation reward to watch (default: the first evaluation reward).")
    window: int = Field(2, ge=1, description="Compare each evaluation with the one this many evaluations earlier.")
    margin: float = Field(0.05, gt=0, description="Alarm when the gold metric fell by more than this (absolute).")
    stop: bool = Field(False, description="Stop the run (with a checkpoint) when the alarm fires.")


class EvalConfig(StrictModel):
    """Held-out evaluation during training: deterministic (ODE) samples of fixed prompts and seeds,
    scored by their own rewards (the "gold" metrics; the training rewards by default)."""

    prompts: Path = Field(
        description="Held-out prompt file (.txt or .jsonl), disjoint from the training prompts; looked up like "
        "prompts.path."
    )
    every: int = Field(
        0, ge=0, description="Evaluate every this many iterations (0: only before training and at the end)."
    )
    at_start: bool = Field(True, description="Evaluate the base weights before the first iteration.")
    samples_per_prompt: int = Field(1, ge=1, description="Samples per prompt, each from its own fixed seed.")
    seed: int = Field(0, description="Seed of the evaluation noise (independent of the run seed).")
    batch_size: int = Field(8, ge=1, description="Samples per network call.")
    num_steps: int | None = Field(
        None, ge=1, description="Sampling steps of the evaluation (default: the sampler's; Flow-GRPO: 40 vs 10)."
    )
    rewards: list[RewardSpec] | None = Field(
        None, description="Rewards to evaluate with (default: the training rewards)."
    )
    use_ema: bool = Field(True, description="Evaluate the EMA weights when the run keeps an EMA (train.ema).")
    divergence_alarm: DivergenceAlarmConfig | None = Field(
        None, description="Warn (or stop) when the training reward rises while the gold metric falls."
    )


class EmaConfig(StrictModel):
    """An exponential moving average of the trained weights (fp32), kept in every checkpoint."""

    decay: float = Field(
        0.9,
        ge=0,
        lt=1,
        description="ema = decay * ema + (1 - decay) * weights (0.9 in Flow-GRPO); with `ramp`, its cap.",
    )
    every: int = Field(8, ge=1, description="Update the average every this many optimizer updates (8 in Flow-GRPO).")
    device: Literal["same", "cpu"] = Field(
        "same", description="Keep the average on the training device or in CPU memory."
    )
    ramp: float | None = Field(
        None,
        gt=0,
        description="Scheduled decay min(ramp (u - ramp_after), decay) at the u-th update, 0 before (DiffusionNFT: 0.001, cap 0.5).",
    )
    ramp_after: int = Field(
        0, ge=0, description="Updates with decay 0 before the ramp starts (DiffusionNFT's OCR recipe: 75)."
    )
    rollout: bool = Field(
        False,
        description="Sample rollouts with the average: DiffusionNFT's soft-updated old policy (one process only).",
    )


class TrainConfig(StrictModel):
    """The outer loop: iterations, batch sizes and the AdamW update."""

    iterations: int = Field(ge=1, description="Number of GRPO iterations.")
    prompts_per_iteration: int = Field(1, ge=1, description="Prompts per iteration, over all ranks.")
    micro_batch_size: int = Field(
        8, ge=1, description="Rows per network call, the same in rollout and training (so rho == 1 exactly)."
    )
    samples_per_update: int | None = Field(
        None, ge=1, description="Trajectories per optimizer step (gradient accumulation); default: all of them."
    )
    learning_rate: float = Field(1e-5, gt=0)
    lr_warmup_updates: int = Field(
        0, ge=0, description="Linear learning-rate warmup over this many optimizer updates (0: constant)."
    )
    lr_decay: Literal["constant", "cosine"] = Field(
        "constant",
        description="After warmup: 'constant' (the paper's setting) or 'cosine' from learning_rate down to "
        "learning_rate * lr_min_ratio at lr_decay_updates.",
    )
    lr_decay_updates: int | None = Field(
        None,
        ge=1,
        description="Optimizer updates at which the cosine decay ends (warmup included); default: train.iterations, "
        "which is one update per iteration (set it when samples_per_update splits an iteration).",
    )
    lr_min_ratio: float = Field(0.0, ge=0.0, le=1.0, description="The cosine decay's final fraction of learning_rate.")
    weight_decay: float = Field(1e-4, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, gt=0, description="Max gradient norm (0.01 was needed for FLUX on 8 GPUs).")
    mixed_precision: Literal["no", "bf16"] = Field("no", description="bf16 autocast for network calls.")
    device: str = Field(
        "auto", description="'auto' (cuda if available), 'cpu' or 'cuda[:N]' (checked against this machine's GPUs)."
    )
    checkpoint_every: int = Field(50, ge=1, description="Save a checkpoint every this many iterations.")
    keep_checkpoints: int = Field(3, ge=1, description="How many checkpoints to keep (oldest rotated out).")
    sample_every: int = Field(0, ge=0, description="Save a sample grid every K iterations (0: first/last only).")
    max_nonfinite_updates: int = Field(3, ge=1, description="Abort after this many non-finite updates in a row.")
    ema: EmaConfig | None = Field(None, description="Keep an EMA of the trained weights (used by eval when present).")
    num_threads: int | None = Field(None, ge=1, description="torch intra-op threads (CPU).")
    overlap_reward: bool = Field(
        False,
        description="Decode and score each micro-batch in a background thread as soon as it is rolled out, "
        "while the rest of the rollout goes on (for slow or remote rewards; the rewards must score each sample "
        "independently of its batch). docs/serving.md",
    )
    compile: bool = Field(
        False,
        description="torch.compile the policy's trainable network in place (names and checkpoints unchanged); "
        "the first iterations are slow while it compiles (about a minute for tiny FLUX on 2 CPU cores).",
    )

    @model_validator(mode="after")
    def _decay_horizon(self) -> TrainConfig:
        if self.lr_decay == "constant":
            return self
        if self.lr_decay_updates is None and self.samples_per_update is not None:
            raise ValueError(
                "lr_decay_updates must be set when samples_per_update splits an iteration into several updates"
            )
        if self.decay_updates <= self.lr_warmup_updates:
            raise ValueError(
                f"the cosine decay ends at update {self.decay_updates}, not after the warmup "
                f"(lr_warmup_updates {self.lr_warmup_updates})"
            )
        return self

    @property
    def decay_updates(self) -> int:
        """The update at which the cosine decay ends (``lr_decay_updates``, default one per iteration)."""
        return self.lr_decay_updates if self.lr_decay_updates is not None else self.iterations


class RewardFailureConfig(StrictModel):
    """What to do when a reward model raises, times out or returns non-finite or malformed scores."""

    policy: Literal["fail", "skip_group", "retry"] = "fail"
    retries: int = Field(2, ge=0, description="With policy 'retry': extra attempts before failing.")
    timeout_s: float | None = Field(None, gt=0, description="Per-call time limit in seconds.")


class DistributedConfig(StrictModel):
    """Multi-process training on DeepSpeed ZeRO (see docs/distributed.md)."""

    backend: Literal["none", "deepspeed"] = Field(
        "none",
        description="'deepspeed': train through DeepSpeed (one rank unless started with --nproc N or a launcher); "
        "--nproc N implies it.",
    )
    zero_stage: int = Field(
        2,
        ge=0,
        le=3,
        description="ZeRO stage: 0 replicates everything, 1 partitions optimizer states, 2 also gradients, "
        "3 also the weights.",
    )
    offload_optimizer: bool = Field(False, description="Keep optimizer states (and the step) in CPU memory (ZeRO 1-3).")
    sequence_parallel: int = Field(
        1,
        ge=1,
        description="Ranks that share one sample's tokens (DeepSpeed-Ulysses: attention by all-to-all over heads); "
        "must divide the number of ranks, the policy's attention heads and its video tokens. Video policies only "
        "(hunyuanvideo, skyreels-i2v, wan-t2v); see docs/distributed.md.",
    )
    offload_params: bool = Field(False, description="Keep partitioned weights in CPU memory (ZeRO 3 only).")
    deepspeed_config: dict[str, Any] | None = Field(
        None,
        description="Raw DeepSpeed config merged over the one dancecore generates; it may add keys, not contradict "
        "the generated ones (an error names the key).",
    )

    @model_validator(mode="after")
    def _offload_needs_partitions(self) -> DistributedConfig:
        if self.offload_params and self.zero_stage != 3:
            raise ValueError(f"offload_params needs zero_stage 3 (zero_stage is {self.zero_stage})")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage 1, 2 or 3 (zero_stage is 0)")
        return self


class LoggingConfig(StrictModel):
    """Where progress goes."""

    progress_bar: bool = True
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "dancecore"


class RunConfig(StrictModel):
    """A whole run, as written in YAML."""

    seed: int = Field(0, description="Run seed: every random draw derives from it, the iteration and the sample.")
    output_dir: Path = Field(description="Where checkpoints, metrics and samples go.")
    prompts: PromptsConfig
    policy: ComponentSpec
    sampler: ComponentSpec
    algorithm: ComponentSpec = Field(
        default_factory=lambda: ComponentSpec(name="grpo"),
        validation_alias=AliasChoices("algorithm", "optimizer"),
        description="The training algorithm (`grpo` by default); `optimizer` is its old name, still accepted.",
    )
    rewards: list[RewardSpec] = Field(min_length=1)
    train: TrainConfig
    reward_failure: RewardFailureConfig = Field(default_factory=lambda: RewardFailureConfig())
    eval: EvalConfig | None = Field(None, description="Periodic held-out evaluation (none by default).")
    distributed: DistributedConfig = Field(default_factory=lambda: DistributedConfig())
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @model_validator(mode="before")
    @classmethod
    def _one_algorithm_key(cls, data: Any) -> Any:
        if isinstance(data, dict) and "algorithm" in data and "optimizer" in data:
            raise ValueError("give `algorithm` (or its old name `optimizer`), not both")
        return data

    @field_validator("output_dir")
    @classmethod
    def _no_parent_escape(cls, value: Path) -> Path:
        if ".." in value.parts:
            raise ValueError("must not contain '..'")
        return value

    @model_validator(mode="after")
    def _ema_rollout_on_one_process(self) -> RunConfig:
        if self.train.ema is not None and self.train.ema.rollout and self.distributed.backend != "none":
            raise ValueError(
                "train.ema.rollout (sampling with the EMA) runs on one process only; set distributed.backend: none"
            )
        return self

    @model_validator(mode="after")
    def _unique_reward_names(self) -> RunConfig:
        names = [r.display_name for r in self.rewards]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"rewards named more than once: {duplicates}; give each a distinct `label`")
        return self


# ---------------------------------------------------------------------------------- validation


def dotted(loc: tuple[Any, ...]) -> str:
    """Format a pydantic error location as a dotted YAML path: ``rewards[0].weight``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "<root>"


def _format_errors(exc: ValidationError, prefix: str = "") -> list[str]:
    messages = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        path = dotted(loc)
        if prefix:
            path = prefix if path == "<root>" else f"{prefix}.{path}"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling)"
        messages.append(f"{path}: {msg}")
    return messages


@dataclass(frozen=True)
class ResolvedComponent:
    """A component spec with its class loaded and its options validated."""

    kind: str
    name: str
    cls: Any
    config: BaseModel


@dataclass(frozen=True)
class ResolvedRun:
    """A fully validated run: structure plus every component's own config."""

    config: RunConfig
    policy: ResolvedComponent
    sampler: ResolvedComponent
    algorithm: ResolvedComponent
    rewards: tuple[ResolvedComponent, ...]
    eval_rewards: tuple[ResolvedComponent, ...] = ()

    @property
    def optimizer(self) -> ResolvedComponent:
        """The old name of :attr:`algorithm`."""
        return self.algorithm


def _resolve_component(kind: str, spec: ComponentSpec, path: str, errors: list[str]) -> ResolvedComponent | None:
    try:
        cls = registry.load(kind, spec.name)
    except registry.PluginError as exc:
        errors.append(f"{path}.name: {exc}")
        return None
    try:
        options = cls.Config.model_validate(spec.options)
    except ValidationError as exc:
        errors.extend(_format_errors(exc, path))
        return None
    return ResolvedComponent(kind=kind, name=spec.name, cls=cls, config=options)


def validate(data: dict[str, Any], source: str | None = None, base: Path | None = None) -> ResolvedRun:
    """Validate a config dict in two phases; raise :class:`ConfigError` with every problem.

    ``base`` is the config file's directory: relative prompt-file paths are looked up there first,
    then in the working directory (:mod:`dancecore.config.checks`)."""
    from dancecore.config.checks import check_device, resolve_input_files

    try:
        config = RunConfig.model_validate(data)
    except ValidationError as exc:
        # Phase two still checks the component blocks that parsed, so one pass shows everything.
        raise ConfigError(_format_errors(exc) + _component_errors_from_raw(data), source) from None
    errors: list[str] = []
    policy = _resolve_component("policy", config.policy, "policy", errors)
    sampler = _resolve_component("sampler", config.sampler, "sampler", errors)
    algorithm = _resolve_component("algorithm", config.algorithm, algorithm_key(data), errors)
    rewards = [_resolve_component("reward", r, f"rewards[{i}]", errors) for i, r in enumerate(config.rewards)]
    eval_specs = config.eval.rewards if config.eval and config.eval.rewards else []
    eval_rewards = [_resolve_component("reward", r, f"eval.rewards[{i}]", errors) for i, r in enumerate(eval_specs)]
    config = resolve_input_files(config, base, errors)
    check_device(config.train.device, errors)
    if policy and sampler:
        wanted = getattr(policy.cls, "prediction_type", None)
        given = getattr(sampler.cls, "prediction_type", None)
        if wanted and given and wanted != given:
            errors.append(
                f"sampler.name: sampler {sampler.name!r} expects {given!r} predictions "
                f"but policy {policy.name!r} predicts {wanted!r}"
            )
    backend = getattr(policy.config, "attention_backend", None) if policy else None
    if backend in ("xformers", "flash") and config.train.device == "cpu":
        errors.append(f"policy.attention_backend: {backend!r} needs CUDA, but train.device is 'cpu'")
    if errors:
        raise ConfigError(errors, source)
    assert policy and sampler and algorithm and all(rewards) and all(eval_rewards)
    return ResolvedRun(
        config,
        policy,
        sampler,
        algorithm,
        tuple(r for r in rewards if r is not None),
        tuple(r for r in eval_rewards if r is not None),
    )


def algorithm_key(data: dict[str, Any]) -> str:
    """The YAML key the config names its algorithm under: ``algorithm``, or the old ``optimizer``."""
    return "optimizer" if "optimizer" in data and "algorithm" not in data else "algorithm"


def _component_errors_from_raw(data: dict[str, Any]) -> list[str]:
    """Phase-two errors for component blocks that are well-formed even though the run is not."""
    errors: list[str] = []
    blocks: list[tuple[str, str, Any]] = []
    for kind, key in (("policy", "policy"), ("sampler", "sampler"), ("algorithm", algorithm_key(data))):
        if isinstance(data.get(key), dict):
            blocks.append((kind, key, data[key]))
    if isinstance(data.get("rewards"), list):
        blocks.extend(("reward", f"rewards[{i}]", r) for i, r in enumerate(data["rewards"]) if isinstance(r, dict))
    for kind, path, block in blocks:
        spec_cls = RewardSpec if kind == "reward" else ComponentSpec
        try:
            spec = spec_cls.model_validate(block)
        except ValidationError:
            continue  # already reported by phase one
        _resolve_component(kind, spec, path, errors)
    return errors


def load_run(path: Path, overrides: list[str] | None = None) -> ResolvedRun:
    """Load, override and validate a config file."""
    data = load_yaml_file(path)
    apply_overrides(data, overrides or [])
    return validate(data, str(path), base=path.parent)
