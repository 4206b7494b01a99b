"""The export kit: a policy plugin's ``dancecore export`` reproduces ``dancecore eval`` in diffusers.

Example, in a policy package's tests::

    from dancecore.testing import check_diffusers_export

    def test_export_reproduces_eval(tmp_path):
        check_diffusers_export({"name": "my-policy", "preset": "tiny"}, {"name": "flow-sde", "num_steps": 4}, tmp_path)

It trains the tiny model for one iteration (a large learning rate, so the weights move), exports
the latest checkpoint, loads the export with the pipeline class named in its ``model_index.json``
(``from_pretrained``), samples with ``dancecore eval``'s initial noise and the export's
``call`` arguments, and compares pixels with ``dancecore eval``'s. For a LoRA policy it also loads
the adapter-only export into the base pipeline with ``load_lora_weights`` and compares it with the
merged export.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dancecore.contracts.records import Prompt
from dancecore.testing.helpers import DEFAULT_PROMPTS

#: Largest pixel difference (pixels in [0, 1]) allowed between an export and ``dancecore eval``:
#: the same float32 operations, up to the timestep being passed as ``sigma * 1000 / 1000``.
PIXEL_TOLERANCE = 1e-4


@dataclass(frozen=True)
class ExportCheck:
    """What the kit measured (max absolute pixel differences)."""

    export_vs_eval: float
    base_vs_trained: float
    adapter_vs_merged: float | None


def _run_data(
    policy: dict[str, Any], sampler: dict[str, Any], output_dir: Path, prompts: Path | None
) -> dict[str, Any]:
    return {
        "seed": 0,
        "output_dir": str(output_dir),
        "prompts": {"texts": list(DEFAULT_PROMPTS[:2])} if prompts is None else {"path": str(prompts)},
        "policy": policy,
        "sampler": sampler,
        "optimizer": {"name": "grpo", "group_size": 2, "clip_range": 1.0, "timestep_fraction": 1.0},
        "rewards": [{"name": "brightness"}],
        "train": {"iterations": 1, "prompts_per_iteration": 1, "micro_batch_size": 2, "learning_rate": 0.05,
                  "grad_clip": 100.0, "weight_decay": 0.0, "num_threads": 1, "device": "cpu"},
        "logging": {"progress_bar": False, "tensorboard": False},
    }  # fmt: skip


def _eval_pixels(run: Any, checkpoint: str, prompts: list[Prompt]) -> tuple[torch.Tensor, torch.Tensor]:
    """``dancecore eval``'s samples (seed 0, one per prompt) and their initial noise."""
    from dancecore.contracts.protocols import BuildContext
    from dancecore.evaluate import load_policy
    from dancecore.functional.seeding import generator
    from dancecore.training.evaluation import ode_samples

    context = BuildContext(seed=0)
    policy = load_policy(run, checkpoint, context).policy
    sampler = run.sampler.cls(run.sampler.config, context)
    _, pixels = ode_samples(policy, sampler, prompts, samples_per_prompt=1, seed=0, batch_size=8, device=context.device)
    noise = torch.cat([policy.initial_noise(1, generator(0, "eval", p.index, 0)) for p in prompts])
    return noise, pixels


def _pipeline_pixels(pipeline: Any, prompts: list[Prompt], noise: torch.Tensor, call: dict[str, Any]) -> torch.Tensor:
    """One pipeline call per prompt (an image-to-video prompt passes its first frame as ``image``)."""
    from PIL import Image

    out = []
    for prompt, latents in zip(prompts, noise, strict=True):
        image = {"image": Image.open(prompt.image).convert("RGB")} if prompt.image else {}
        result = pipeline(
            prompt=prompt.text, latents=latents[None].clone(), output_type="pt", return_dict=False, **image, **call
        )
        out.append(result[0].float().cpu())
    return torch.cat(out)


def _load(directory: Path) -> Any:
    import diffusers

    name = json.loads((directory / "model_index.json").read_text())["_class_name"]
    pipeline = getattr(diffusers, name).from_pretrained(str(directory), local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def check_diffusers_export(
    policy: dict[str, Any],
    sampler: dict[str, Any],
    tmp_path: Path,
    *,
    prompts: Path | None = None,
    tolerance: float = PIXEL_TOLERANCE,
) -> ExportCheck:
    """Train one iteration, export, and check the export against ``dancecore eval`` (module
    docstring); raises ``AssertionError`` naming what differs. Returns the measured differences.

    ``prompts``: a prompt file (its first two prompts are compared; JSON lines with ``image`` for
    image-to-video policies, each image already at the video's size); default: two captions."""
    from dancecore.config.schema import validate
    from dancecore.export import export_run
    from dancecore.training.trainer import Trainer

    torch.set_num_threads(1)
    run = validate(_run_data(policy, sampler, tmp_path / "run", prompts))
    Trainer(run).train()
    lora = policy.get("lora") is not None
    export_run(run, "latest", tmp_path / "export", lora="merge" if lora else "default")
    exported = _load(tmp_path / "export")
    call = _call_arguments(tmp_path / "export")
    compared = _compared_prompts(prompts)
    noise, trained = _eval_pixels(run, "latest", compared)
    _, base = _eval_pixels(run, "base", compared)
    export_vs_eval = float((_pipeline_pixels(exported, compared, noise, call) - trained).abs().max())
    assert export_vs_eval <= tolerance, f"the export's pixels differ from dancecore eval's by {export_vs_eval:.2e}"
    base_vs_trained = float((trained - base).abs().max())
    assert base_vs_trained > 10 * tolerance, f"training changed the samples by only {base_vs_trained:.2e}"
    adapter_vs_merged = None
    if lora:
        export_run(run, "latest", tmp_path / "adapter", lora="only")
        assert (tmp_path / "adapter" / "pytorch_lora_weights.safetensors").is_file()
        export_run(run, "base", tmp_path / "base", lora="merge")  # the base weights as a diffusers pipeline
        pipeline = _load(tmp_path / "base")
        pipeline.load_lora_weights(str(tmp_path / "adapter"))
        adapter = _pipeline_pixels(pipeline, compared, noise, call)
        adapter_vs_merged = float((adapter - trained).abs().max())
        assert adapter_vs_merged <= tolerance, (
            f"base + load_lora_weights differs from the merged export by {adapter_vs_merged:.2e}"
        )
    return ExportCheck(export_vs_eval, base_vs_trained, adapter_vs_merged)


def _compared_prompts(prompts: Path | None) -> list[Prompt]:
    if prompts is None:
        return [Prompt(text, i) for i, text in enumerate(DEFAULT_PROMPTS[:2])]
    from dancecore.training.prompts import read_prompt_file

    return read_prompt_file(prompts)[:2]


def _call_arguments(directory: Path) -> dict[str, Any]:
    """The ``pipeline(...)`` arguments the export recorded (the model card shows the same)."""
    call: dict[str, Any] = json.loads((directory / "dancecore_export.json").read_text())["call"]
    card = (directory / "README.md").read_text()
    shown = ", ".join(f"{k}={v!r}" for k, v in call.items())
    assert shown in card, f"the model card does not show the call arguments {shown}"
    return call
