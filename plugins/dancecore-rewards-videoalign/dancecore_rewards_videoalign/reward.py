"""VideoAlign's VideoReward as a dancecore reward: visual quality (VQ), motion quality (MQ) and
text alignment (TA) of a generated video, from a Qwen2-VL vision-language model with a linear
reward head.

The architecture (Liu et al., "Improving Video Generation with Human Feedback", 2025): Qwen2-VL-2B
reads the sampled video frames and an evaluation prompt that contains three special tokens,
``<|VQ_reward|>``, ``<|MQ_reward|>`` and ``<|TA_reward|>``. A bias-free linear head maps the last
hidden state at each special token to a score (head output size 1: one score per token; size 3:
the token's own dimension is taken). Frames are sampled at 2 fps and resized to at most
448 x 448 pixels, in multiples of 28.

Checkpoint directory layout (what :func:`load_videoalign` reads, offline)::

    config.json, model.safetensors   Qwen2VLForConditionalGeneration (save_pretrained), embeddings
                                     already resized for the three special tokens
    tokenizer*, processor/video preprocessor configs, chat_template   (Qwen2VLProcessor.save_pretrained)
    reward_head.safetensors          {"weight": (output_dim, hidden_size)}
    videoalign.json                  {"special_tokens": {"VQ": ..., "MQ": ..., "TA": ...},
                                      "prompt_template": "... {text_prompt} ...",
                                      "normalisation": {"VQ": {"mean": m, "std": s}, ...}}   (optional)

The ``tiny`` preset writes the same layout with a random-init model and loads it back the same way.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator

from dancecore import BuildContext, ComponentConfig, WeightsNotFoundError, check_pixels, on_meta, resolve_pretrained

HEADS = ("VQ", "MQ", "TA")
Head = Literal["VQ", "MQ", "TA"]
#: VideoAlign's reward tokens, one per head.
REWARD_TOKENS = {"VQ": "<|VQ_reward|>", "MQ": "<|MQ_reward|>", "TA": "<|TA_reward|>"}

#: The published Qwen2-VL-2B architecture (used when the checkpoint is not on disk).
QWEN2_VL_2B = Path(__file__).parent / "architectures" / "qwen2-vl-2b.json"
#: Spatial multiple of Qwen2-VL frames: patch 14 times spatial merge 2.
PIXEL_FACTOR = 28
#: Qwen2-VL groups frames in pairs (temporal patch size 2).
FRAME_FACTOR = 2


class VideoAlignError(RuntimeError):
    """The VideoAlign checkpoint is unusable or scoring failed; never turned into a number."""


@dataclass(frozen=True)
class LoadedVideoAlign:
    """A loaded VideoReward: the VLM, its processor, the reward head and the checkpoint's metadata."""

    model: Any
    processor: Any
    head: torch.Tensor
    special_token_ids: dict[str, int]
    prompt_template: str
    normalisation: dict[str, tuple[float, float]]
    path: Path


_LOADED: dict[tuple[str, str, str], LoadedVideoAlign] = {}


def load_videoalign(path: Path, device: torch.device, dtype: torch.dtype) -> LoadedVideoAlign:
    """Load a checkpoint directory (see the module docstring); cached per (path, device, dtype) so
    that several reward entries using different heads share one model."""
    key = (str(Path(path).resolve()), str(device), str(dtype))
    if key not in _LOADED:
        _LOADED[key] = _load(Path(path), device, dtype)
    return _LOADED[key]


def _load(path: Path, device: torch.device, dtype: torch.dtype) -> LoadedVideoAlign:
    from safetensors.torch import load_file
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    missing = [
        name for name in ("config.json", "reward_head.safetensors", "videoalign.json") if not (path / name).is_file()
    ]
    if missing:
        raise VideoAlignError(
            f"VideoAlign checkpoint {path} lacks {', '.join(missing)} (see docs/rewards/videoalign.md)"
        )
    try:
        meta = json.loads((path / "videoalign.json").read_text(encoding="utf-8"))
        tokens = {head: meta["special_tokens"][head] for head in HEADS}
        template = meta["prompt_template"]
        normalisation = {
            head: (float(stats["mean"]), float(stats["std"])) for head, stats in meta.get("normalisation", {}).items()
        }
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise VideoAlignError(f"{path / 'videoalign.json'} is malformed: {type(exc).__name__}: {exc}") from None
    if "{text_prompt}" not in template or any(token not in template for token in tokens.values()):
        raise VideoAlignError(
            f"{path / 'videoalign.json'}: prompt_template must contain '{{text_prompt}}' and every special token"
        )
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    model = Qwen2VLForConditionalGeneration.from_pretrained(path, torch_dtype=dtype, local_files_only=True)
    model.requires_grad_(False).eval().to(device)
    head = load_file(str(path / "reward_head.safetensors"))["weight"].to(device, torch.float32)
    hidden = model.config.get_text_config().hidden_size
    if head.ndim != 2 or head.shape[1] != hidden or head.shape[0] not in (1, len(HEADS)):
        raise VideoAlignError(f"{path}: reward head has shape {tuple(head.shape)}, expected (1 or 3, {hidden})")
    vocab = processor.tokenizer.get_vocab()
    unknown = [token for token in tokens.values() if token not in vocab]
    if unknown:
        raise VideoAlignError(f"{path}: the tokenizer lacks the special tokens {unknown}")
    return LoadedVideoAlign(
        model=model,
        processor=processor,
        head=head,
        special_token_ids={h: int(vocab[t]) for h, t in tokens.items()},
        prompt_template=template,
        normalisation=normalisation,
        path=path,
    )


def frame_indices(num_frames: int, wanted: int) -> list[int]:
    """``wanted`` evenly spaced frame indices (first and last included) out of ``num_frames``."""
    if wanted == 1:
        return [0]
    return [round(i * (num_frames - 1) / (wanted - 1)) for i in range(wanted)]


def frames_to_sample(num_frames: int, video_fps: float, sample_fps: float, fixed: int | None) -> int:
    """How many frames the reward model sees: ``fixed``, or the video's duration times
    ``sample_fps``; at least 2 and a multiple of 2 (Qwen2-VL's temporal patch), at most the video's
    own count (rounded down to even; a 1-frame input is shown twice)."""
    count = fixed if fixed is not None else round(num_frames / video_fps * sample_fps)
    ceiling = max(FRAME_FACTOR, num_frames - num_frames % FRAME_FACTOR)
    count = min(max(count, FRAME_FACTOR), ceiling)
    return count - count % FRAME_FACTOR


class VideoAlignReward:
    """A weighted sum of VideoReward's VQ / MQ / TA scores of each video.

    Each head can first be standardised with the checkpoint's published statistics (``normalise``).
    """

    class Config(ComponentConfig):
        """Options of the ``videoalign`` reward."""

        pretrained: str | None = Field(None, description="Local checkpoint directory or cached HF repo id.")
        preset: Literal["tiny"] | None = Field(None, description="'tiny': random-init model for tests and CPU.")
        heads: dict[Head, float] = Field(
            default_factory=lambda: {"VQ": 1.0},
            description="Which scores count and their weights, e.g. {VQ: 1.0, MQ: 1.0}.",
        )
        normalise: bool = Field(False, description="Standardise each head with the checkpoint's mean/std first.")
        sample_fps: float = Field(2.0, gt=0, description="Frames per second shown to the model (VideoAlign: 2).")
        video_fps: float = Field(24.0, gt=0, description="Frame rate of the generated videos (HunyuanVideo: 24).")
        num_frames: int | None = Field(
            None, ge=1, description="Show exactly this many frames instead (rounded to even)."
        )
        max_pixels: int = Field(
            448 * 448, ge=PIXEL_FACTOR**2, description="Most pixels per frame (VideoAlign: 200704)."
        )
        min_pixels: int = Field(
            128 * 28 * 28, ge=PIXEL_FACTOR**2, description="Fewest pixels per frame (smaller frames are upscaled)."
        )
        batch_size: int = Field(4, ge=1, description="Videos per forward pass.")
        dtype: Literal["float32", "bfloat16"] | None = Field(
            None, description="Model dtype; default bfloat16 on GPU, float32 on CPU."
        )

        @field_validator("heads")
        @classmethod
        def _some_head(cls, heads: dict[str, float]) -> dict[str, float]:
            if not heads:
                raise ValueError(f"name at least one of {', '.join(HEADS)}")
            return heads

        @model_validator(mode="after")
        def _one_source(self) -> VideoAlignReward.Config:
            if (self.pretrained is None) == (self.preset is None):
                raise ValueError("give exactly one of `pretrained` (checkpoint directory) or `preset: tiny`")
            if self.min_pixels > self.max_pixels:
                raise ValueError(f"min_pixels ({self.min_pixels}) must be <= max_pixels ({self.max_pixels})")
            return self

    def __init__(self, config: Config, context: BuildContext | None = None) -> None:
        context = context or BuildContext()
        self.config = config
        self.device = context.device
        dtype_name = config.dtype or ("bfloat16" if self.device.type == "cuda" else "float32")
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
        if config.preset == "tiny":
            from dancecore_rewards_videoalign.tiny import tiny_videoalign_dir

            path = tiny_videoalign_dir()
        else:
            path = resolve_pretrained(config.pretrained or "", "VideoAlign")
        self.loaded = load_videoalign(path, self.device, dtype)
        if config.normalise:
            absent = [h for h in config.heads if h not in self.loaded.normalisation]
            if absent:
                raise VideoAlignError(f"normalise: true, but {path / 'videoalign.json'} has no statistics for {absent}")

    # ------------------------------------------------------------------------------- scoring
    @classmethod
    def memory_plan_modules(cls, config: Config) -> dict[str, tuple[torch.nn.Module, torch.dtype]]:
        """Qwen2-VL on the meta device (the checkpoint's config.json when it is on disk, else the
        published Qwen2-VL-2B architecture), in the GPU dtype (``dancecore plan``)."""
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

        source = QWEN2_VL_2B
        try:
            if config.preset == "tiny":
                from dancecore_rewards_videoalign.tiny import tiny_videoalign_dir

                source = tiny_videoalign_dir() / "config.json"
            elif (resolve_pretrained(config.pretrained or "", "VideoAlign") / "config.json").is_file():
                source = resolve_pretrained(config.pretrained or "", "VideoAlign") / "config.json"
        except WeightsNotFoundError:
            pass
        data = json.loads(source.read_text(encoding="utf-8"))
        data = {k: v for k, v in data.items() if not k.startswith("_")}
        model = on_meta(lambda: Qwen2VLForConditionalGeneration(Qwen2VLConfig(**data)))
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[config.dtype or "bfloat16"]
        return {"Qwen2-VL": (model, dtype)}

    def score(self, samples: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Weighted sum of the configured heads, one value per video (B,)."""
        heads = self.score_heads(samples, prompts)
        total = torch.zeros(heads.shape[0], dtype=torch.float32)
        for name, weight in self.config.heads.items():
            values = heads[:, HEADS.index(name)]
            if self.config.normalise:
                mean, std = self.loaded.normalisation[name]
                values = (values - mean) / std
            total += weight * values
        return total

    @torch.no_grad()
    def score_heads(self, samples: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Raw VQ, MQ, TA scores, shape (B, 3); raises :class:`VideoAlignError` on any failure."""
        check_pixels(samples, prompts)
        if samples.ndim == 4:  # images: a one-frame video
            samples = samples.unsqueeze(1)
        outputs = []
        for start in range(0, samples.shape[0], self.config.batch_size):
            stop = start + self.config.batch_size
            outputs.append(self._score_batch(samples[start:stop], list(prompts[start:stop])))
        scores = torch.cat(outputs)
        if not torch.isfinite(scores).all():
            bad = torch.nonzero(~torch.isfinite(scores).all(dim=1)).flatten().tolist()
            raise VideoAlignError(f"VideoAlign produced non-finite scores for samples {bad}")
        return scores

    def prepare_frames(self, video: torch.Tensor) -> torch.Tensor:
        """One video (F, 3, H, W) in [0, 1] -> the frames the model sees, (T, 3, h, w) uint8:
        evenly sampled, resized (bicubic, antialiased) to multiples of 28 within the pixel budget."""
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        c = self.config
        count = frames_to_sample(video.shape[0], c.video_fps, c.sample_fps, c.num_frames)
        frames = video[frame_indices(video.shape[0], count)] if video.shape[0] > 1 else video.expand(count, -1, -1, -1)
        height, width = smart_resize(
            frames.shape[2], frames.shape[3], factor=PIXEL_FACTOR, min_pixels=c.min_pixels, max_pixels=c.max_pixels
        )
        frames = frames.float().clamp(0, 1)
        if (height, width) != tuple(frames.shape[2:]):
            frames = F.interpolate(frames, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
        return (frames.clamp(0, 1) * 255).round().to(torch.uint8).cpu()

    def _messages(self, prompt: str) -> list[dict[str, Any]]:
        text = self.loaded.prompt_template.replace("{text_prompt}", prompt)
        return [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": text}]}]

    def _score_batch(self, videos: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        loaded = self.loaded
        processor = loaded.processor
        texts = [
            processor.apply_chat_template(self._messages(p), tokenize=False, add_generation_prompt=True)
            for p in prompts
        ]
        frames = [self.prepare_frames(v) for v in videos]
        video_kwargs: dict[str, Any] = {"do_resize": False, "do_sample_frames": False}
        if "cap_pixels_per_frame" in getattr(processor.video_processor.valid_kwargs, "__annotations__", {}):
            video_kwargs["cap_pixels_per_frame"] = False  # we resized already: nothing to cap
        try:
            batch = processor(text=texts, videos=frames, padding=True, return_tensors="pt", videos_kwargs=video_kwargs)
        except Exception as exc:
            raise VideoAlignError(f"VideoAlign preprocessing failed: {type(exc).__name__}: {exc}") from exc
        inputs = {k: v.to(self.device) for k, v in batch.items()}
        inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(loaded.model.dtype)
        hidden = loaded.model.model(**inputs, return_dict=True).last_hidden_state.float()
        return self._pool(inputs["input_ids"], hidden).cpu()

    def _pool(self, input_ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """The head at each special token: (B, 3) in VQ, MQ, TA order."""
        loaded = self.loaded
        columns = []
        for k, head in enumerate(HEADS):
            positions = input_ids == loaded.special_token_ids[head]
            counts = positions.sum(dim=1)
            if not bool((counts == 1).all()):
                raise VideoAlignError(
                    f"each evaluation prompt must hold exactly one {head} token; found {counts.tolist()} "
                    "(does a user prompt contain a special token, or was it truncated?)"
                )
            state = hidden[positions]  # (B, D), one row per sample in order
            logits = state @ loaded.head.T  # (B, 1) or (B, 3)
            columns.append(logits[:, 0] if logits.shape[1] == 1 else logits[:, k])
        return torch.stack(columns, dim=1)
