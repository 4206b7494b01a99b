"""The model card (``README.md``) of an exported model: what it was trained from and with, how it
did, and how to load it (Hugging Face's card layout: YAML front matter, then Markdown)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dancecore import __version__
from dancecore.config.schema import ResolvedRun
from dancecore.outputs.images import MetricsLog, reward_summary
from dancecore.outputs.report import load_eval_history

#: Files of the run's output directory the card shows, copied next to it.
CURVE = "reward_curve.png"


@dataclass(frozen=True)
class CardFacts:
    """What the export knows about the model it wrote."""

    pipeline_class: str
    task: str
    weights: str
    iteration: int | None
    form: str  # "full pipeline", "full pipeline (LoRA merged)", "LoRA adapter"
    dtype: str
    call: dict[str, Any]


def base_model(run: ResolvedRun) -> str:
    """The base weights the run started from, as the policy config names them."""
    options = run.policy.config.model_dump()
    if options.get("pretrained"):
        return str(options["pretrained"])
    if options.get("preset"):
        return f"dancecore {run.policy.name} preset {options['preset']!r} (random initialisation, for tests)"
    return f"dancecore policy {run.policy.name}"


def _front_matter(run: ResolvedRun, facts: CardFacts) -> str:
    base = run.policy.config.model_dump().get("pretrained")
    tags = ["dancecore", "grpo", "reinforcement-learning", run.policy.name] + (["lora"] if "LoRA" in facts.form else [])
    data: dict[str, Any] = {"library_name": "diffusers", "pipeline_tag": facts.task, "tags": tags}
    if base and not Path(str(base)).is_absolute():
        data["base_model"] = str(base)  # a hub repo id; a local path means nothing to readers
    return "---\n" + yaml.safe_dump(data, sort_keys=False) + "---\n"


def _usage(facts: CardFacts, directory: str) -> str:
    arguments = ", ".join(f"{k}={v!r}" for k, v in facts.call.items())
    if facts.form == "LoRA adapter":
        load = f'pipe = {facts.pipeline_class}.from_pretrained("<base model>")\npipe.load_lora_weights("{directory}")'
    else:
        load = f'pipe = {facts.pipeline_class}.from_pretrained("{directory}")'
    result = (
        'video = pipe("a prompt", {}).frames[0]' if "video" in facts.task else 'image = pipe("a prompt", {}).images[0]'
    )
    return (
        f"```python\nfrom diffusers import {facts.pipeline_class}\n\n{load}\n" + result.format(arguments) + "\n```\n"
        "These arguments take `dancecore eval`'s deterministic steps; with the same initial noise "
        "(`latents=`) they give its pixels."
    )


def _rewards_table(run: ResolvedRun) -> list[str]:
    rows = ["| reward | weight | options |", "|---|---|---|"]
    for spec in run.config.rewards:
        options = json.dumps(spec.options, sort_keys=True) if spec.options else ""
        rows.append(f"| {spec.display_name} (`{spec.name}`) | {spec.weight:g} | {options} |")
    return rows


def _eval_table(output_dir: Path) -> list[str]:
    history = load_eval_history(output_dir)
    keys = sorted({k for h in history for k in h if k.startswith("eval/") and k.count("/") == 1})
    if not history or not keys:
        return []
    rows = [
        "## Held-out evaluation",
        "",
        "| iteration | " + " | ".join(k.removeprefix("eval/") for k in keys) + " |",
        "|---" * (len(keys) + 1) + "|",
    ]
    for h in history:
        rows.append(f"| {h['iteration']} | " + " | ".join(f"{h[k]:.4f}" if k in h else "" for k in keys) + " |")
    return [*rows, ""]


def write_card(directory: Path, run: ResolvedRun, facts: CardFacts, shown_as: str) -> Path:
    """Write ``README.md`` (and a copy of the run's reward curve) into ``directory``."""
    out = run.config.output_dir
    summary = reward_summary(MetricsLog(out / "metrics.jsonl").read()) if (out / "metrics.jsonl").is_file() else None
    lines = [
        _front_matter(run, facts),
        f"# {run.policy.name} fine-tuned with GRPO (dancecore {__version__})",
        "",
        f"- base model: {base_model(run)}",
        f"- weights: {facts.weights}" + (f" (iteration {facts.iteration})" if facts.iteration is not None else ""),
        f"- form: {facts.form}, {facts.dtype}; diffusers `{facts.pipeline_class}`",
        f"- policy `{run.policy.name}`, sampler `{run.sampler.name}`, algorithm `{run.algorithm.name}`",
        "",
        "## Usage",
        "",
        _usage(facts, shown_as),
        "",
        "## Rewards",
        "",
        *_rewards_table(run),
        "",
    ]
    if summary or (out / CURVE).is_file():
        lines += ["## Training reward", ""]
        if summary:
            lines += [summary, ""]
        if (out / CURVE).is_file():
            shutil.copyfile(out / CURVE, directory / CURVE)
            lines += [f"![reward curve]({CURVE})", ""]
    lines += _eval_table(out)
    config = yaml.safe_dump(json.loads(run.config.model_dump_json()), sort_keys=False)
    lines += ["## Training config", "", "```yaml", config.rstrip(), "```", ""]
    path = directory / "README.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
