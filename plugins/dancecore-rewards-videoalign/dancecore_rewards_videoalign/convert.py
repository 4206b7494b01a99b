"""Convert a VideoReward state dict into the checkpoint directory the ``videoalign`` reward loads.

VideoAlign's reward model is Qwen2-VL-2B-Instruct with three added special tokens (embeddings
resized accordingly) and a bias-free linear head ``rm_head``; its weights are distributed as one
state dict of the whole model (Qwen2-VL keys plus ``rm_head.weight``). Conversion needs that state
dict, the base model's directory (for its config and processor) and the evaluation prompt template
the reward model was trained with (a text file containing ``{text_prompt}`` and the three tokens)::

    python -m dancecore_rewards_videoalign.convert --state-dict reward_model.pt \\
        --base Qwen/Qwen2-VL-2B-Instruct --template prompt.txt --out checkpoints/videoalign

Everything is read offline (``--base`` may be a cached Hugging Face repo id). The result is
loaded back once to check that every weight found its place.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dancecore import resolve_pretrained
from dancecore_rewards_videoalign.reward import REWARD_TOKENS, VideoAlignError

#: VideoAlign's published mean and standard deviation of its raw scores.
PUBLISHED_NORMALISATION = {"VQ": (3.6757, 2.2476), "MQ": (1.1646, 1.3811), "TA": (2.8105, 2.5121)}


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise VideoAlignError(f"{path}: expected a state dict of tensors")
    # Weights saved from a DistributedDataParallel wrapper carry a `module.` prefix.
    return {k.removeprefix("module."): v for k, v in state.items()}


def convert(state_dict: Path, base: str, template: Path, out: Path) -> Path:
    """Write ``out`` in the layout of :func:`dancecore_rewards_videoalign.reward.load_videoalign`."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoProcessor, Qwen2VLForConditionalGeneration

    base_dir = resolve_pretrained(base, "Qwen2-VL base model")
    prompt_template = template.read_text(encoding="utf-8")
    if "{text_prompt}" not in prompt_template or any(t not in prompt_template for t in REWARD_TOKENS.values()):
        raise VideoAlignError(
            f"{template}: the template must contain '{{text_prompt}}' and {list(REWARD_TOKENS.values())}"
        )
    state = _read_state_dict(state_dict)
    head = state.pop("rm_head.weight", None)
    if head is None:
        raise VideoAlignError(f"{state_dict}: no 'rm_head.weight' (is this a VideoReward state dict?)")
    embed_key = next((k for k in state if k.endswith("embed_tokens.weight")), None)
    if embed_key is None:
        raise VideoAlignError(f"{state_dict}: no token embedding found")

    processor = AutoProcessor.from_pretrained(base_dir, local_files_only=True)
    processor.tokenizer.add_special_tokens({"additional_special_tokens": list(REWARD_TOKENS.values())})
    rows = int(state[embed_key].shape[0])
    if len(processor.tokenizer) > rows:
        raise VideoAlignError(f"the tokenizer has {len(processor.tokenizer)} tokens but the embedding only {rows} rows")
    config = AutoConfig.from_pretrained(base_dir, local_files_only=True)
    config.get_text_config().vocab_size = rows

    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    processor.save_pretrained(out)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    save_file({"weight": head.float().contiguous()}, str(out / "reward_head.safetensors"))
    meta = {
        "special_tokens": REWARD_TOKENS,
        "prompt_template": prompt_template,
        "normalisation": {h: {"mean": m, "std": s} for h, (m, s) in PUBLISHED_NORMALISATION.items()},
    }
    (out / "videoalign.json").write_text(json.dumps(meta, indent=2))

    _, info = Qwen2VLForConditionalGeneration.from_pretrained(out, local_files_only=True, output_loading_info=True)
    missing = sorted(k for k in info["missing_keys"] if not k.startswith("lm_head"))  # the LM head may be tied
    if missing or info["unexpected_keys"] or info["mismatched_keys"]:
        raise VideoAlignError(
            f"converted weights do not match the architecture: missing {missing[:5]}, "
            f"unexpected {sorted(info['unexpected_keys'])[:5]}, mismatched {list(info['mismatched_keys'])[:5]}"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state-dict", type=Path, required=True, help="VideoReward weights (.pt/.pth/.safetensors)")
    parser.add_argument("--base", required=True, help="Qwen2-VL-2B-Instruct directory or cached repo id")
    parser.add_argument("--template", type=Path, required=True, help="evaluation prompt template (text file)")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    args = parser.parse_args(argv)
    print(f"wrote {convert(args.state_dict, args.base, args.template, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
