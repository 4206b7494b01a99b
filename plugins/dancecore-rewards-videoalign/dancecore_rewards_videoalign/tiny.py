"""The ``tiny`` VideoAlign preset: a random-init Qwen2-VL of the real architecture (about 60k
parameters) with a byte-level tokenizer, the three reward tokens and a reward head, written in the
checkpoint layout :func:`dancecore_rewards_videoalign.reward.load_videoalign` reads."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dancecore import materialise
from dancecore_rewards_videoalign.reward import REWARD_TOKENS

#: Qwen2-VL's chat and vision tokens, then VideoAlign's reward tokens.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<|VQ_reward|>",
    "<|MQ_reward|>",
    "<|TA_reward|>",
)

#: A short evaluation prompt for the tiny model. A real checkpoint ships the template it was
#: trained with in its videoalign.json.
TINY_TEMPLATE = (
    "Rate the generated video. Visual quality: <|VQ_reward|>\n"
    "Motion quality: <|MQ_reward|>\n"
    "Text prompt: {text_prompt}\nText alignment: <|TA_reward|>"
)

#: A ChatML template in the shape of Qwen2-VL-Instruct's (user turn with a video, then the text).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TINY_SPEC = {
    "text": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
    },
    "vision": {
        "depth": 1,
        "embed_dim": 16,
        "hidden_size": 32,
        "num_heads": 2,
        "mlp_ratio": 2,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    },
    "head_outputs": 1,
    # VideoAlign's published statistics of its raw scores (used when `normalise: true`).
    "normalisation": {"VQ": [3.6757, 2.2476], "MQ": [1.1646, 1.3811], "TA": [2.8105, 2.5121]},
    "template": TINY_TEMPLATE,
    "seed": 0,
}


def tiny_videoalign_dir() -> Path:
    """Materialise (once) and return the tiny VideoAlign checkpoint directory."""
    return materialise("tiny-videoalign", TINY_SPEC, write_tiny_videoalign)


def write_tiny_processor(root: Path, special_tokens: tuple[str, ...] = SPECIAL_TOKENS):
    """A Qwen2VLProcessor with a byte-level tokenizer holding ``special_tokens`` (by default
    Qwen2-VL's and VideoAlign's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast, Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    vocab = {token: i for i, token in enumerate(sorted(ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(special_tokens))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=32768,
        padding_side="right",
    )
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(root)
    return processor


def write_tiny_videoalign(root: Path) -> None:
    """Write processor, Qwen2-VL weights, reward head and videoalign.json into ``root``."""
    from safetensors.torch import save_file
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(TINY_SPEC["seed"])
    processor = write_tiny_processor(root)
    ids = {token: processor.tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    text = {
        **TINY_SPEC["text"],
        "vocab_size": len(processor.tokenizer),
        "pad_token_id": ids["<|endoftext|>"],
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
    }
    config = Qwen2VLConfig(
        text_config=text,
        vision_config=TINY_SPEC["vision"],
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    Qwen2VLForConditionalGeneration(config).save_pretrained(root)
    head = torch.randn(TINY_SPEC["head_outputs"], text["hidden_size"]) / text["hidden_size"] ** 0.5
    save_file({"weight": head.contiguous()}, str(root / "reward_head.safetensors"))
    meta = {
        "special_tokens": REWARD_TOKENS,
        "prompt_template": TINY_SPEC["template"],
        "normalisation": {h: {"mean": m, "std": s} for h, (m, s) in TINY_SPEC["normalisation"].items()},
    }
    (root / "videoalign.json").write_text(json.dumps(meta, indent=2))
