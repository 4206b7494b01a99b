"""The ``vlm-judge`` reward: a vision-language model asked for a score through the OpenAI-compatible
chat-completions API that vLLM, sglang and others serve (UnifiedReward, any Qwen-VL judge).

One chat request per sample: the image (a video: ``max_frames`` frames spread over it) as base64
data URLs, then the prompt template with the sample's caption. The answer must contain the score
in the form the template asks for (``answer_pattern``, default ``Score: <number>``) within
``score_range``; an answer without one, with two different ones or out of range is a failure
naming the URL, the sample and the answer; never a made-up number. Requests run ``concurrency``
at a time over pooled connections (the engine batches them); retries and the deadline work as the
``remote`` reward's.
"""

from __future__ import annotations

import base64
import io
import os
import re
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from pydantic import Field, field_validator

from dancecore.contracts.component import ComponentConfig
from dancecore.contracts.protocols import BuildContext
from dancecore.serving.client import RemoteRewardError, pooled_client, post_once, with_retries

DEFAULT_TEMPLATE = (
    'You are judging a generated image against its caption: "{prompt}". Rate how well the image matches '
    "the caption and how good it looks, on a scale from {low:g} (worst) to {high:g} (best). "
    "Answer with one line in the form `Score: <number>` and nothing else."
)


class JudgeError(RemoteRewardError):
    """A judge's answer that holds no usable score, or a failed request."""


class VLMJudgeConfig(ComponentConfig):
    """Options of the ``vlm-judge`` reward."""

    base_url: str = Field(description="OpenAI-compatible API root, e.g. http://127.0.0.1:8000/v1 (vLLM, sglang).")
    model: str = Field(description="Model name the server serves (its `--served-model-name`).")
    api_key_env: str | None = Field(
        "OPENAI_API_KEY", description="Environment variable holding the API key (sent as a bearer token when set)."
    )
    prompt_template: str = Field(
        DEFAULT_TEMPLATE, description="The question; {prompt} is the caption, {low} and {high} the score range."
    )
    system_prompt: str | None = Field(None, description="An optional system message.")
    answer_pattern: str = Field(
        r"score\s*[:=]\s*(-?\d+(?:\.\d+)?)",
        description="Regular expression (case-insensitive) whose first group is the score.",
    )
    score_range: tuple[float, float] = Field((1.0, 10.0), description="Scores outside [low, high] are failures.")
    normalize: bool = Field(False, description="Return (score - low) / (high - low) instead of the raw score.")
    image_format: Literal["png", "jpeg", "webp"] = Field("png", description="How images are encoded.")
    max_frames: int = Field(4, ge=1, description="Frames of a video sent to the judge (spread evenly).")
    max_tokens: int = Field(32, ge=1, description="Longest answer.")
    temperature: float = Field(0.0, ge=0, description="Sampling temperature (0: greedy, reproducible).")
    seed: int | None = Field(0, description="Seed sent with each request (engines that honour it).")
    concurrency: int = Field(8, ge=1, description="Requests in flight at once.")
    timeout_s: float = Field(300.0, gt=0, description="Time limit of one sample's request, retries included.")
    retries: int = Field(2, ge=0, le=10, description="Extra attempts after a connection error, timeout or 5xx.")
    backoff_s: float = Field(0.5, ge=0, description="First wait between attempts; doubled after each.")

    @field_validator("answer_pattern")
    @classmethod
    def _one_group(cls, pattern: str) -> str:
        try:
            compiled = re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"not a regular expression: {exc}") from None
        if compiled.groups < 1:
            raise ValueError("the pattern needs a group capturing the number")
        return pattern

    @field_validator("score_range")
    @classmethod
    def _ordered(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not value[0] < value[1]:
            raise ValueError("score_range must be (low, high) with low < high")
        return value


def data_url(frame: torch.Tensor, image_format: str) -> str:
    """A (3, H, W) frame in [0, 1] as a base64 data URL."""
    array = (frame.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format=image_format.upper())
    return f"data:image/{image_format};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


def parse_score(answer: str, pattern: str, low: float, high: float) -> float:
    """The score in a judge's answer; ValueError when there is none, two different ones, or it is out of range."""
    found = {float(m.group(1)) for m in re.finditer(pattern, answer, flags=re.IGNORECASE)}
    if not found:
        raise ValueError("no score in the answer")
    if len(found) > 1:
        raise ValueError(f"several different scores in the answer ({sorted(found)})")
    (value,) = found
    if not low <= value <= high:
        raise ValueError(f"score {value:g} is outside [{low:g}, {high:g}]")
    return value


class VLMJudge:
    """A vision-language model's score for each sample, asked through the chat-completions API."""

    Config = VLMJudgeConfig

    def __init__(self, config: VLMJudgeConfig, context: BuildContext | None = None) -> None:
        self.config = config
        self.endpoint = config.base_url.rstrip("/") + "/chat/completions"
        headers = {"content-type": "application/json"}
        key = os.environ.get(config.api_key_env) if config.api_key_env else None
        if key:
            headers["authorization"] = f"Bearer {key}"
        self.headers = headers
        self._lock = threading.Lock()
        self._http: Any = None

    @property
    def source(self) -> str:
        """Where the scores come from (named in failure messages)."""
        return f"{self.endpoint} ({self.config.model})"

    def _client(self) -> Any:
        with self._lock:
            if self._http is None:
                self._http = pooled_client(self.config.concurrency, self.headers)
            return self._http

    def messages(self, sample: torch.Tensor, prompt: str) -> list[dict[str, Any]]:
        """The chat messages for one (3, H, W) image or (F, 3, H, W) video."""
        c = self.config
        frames = sample.unsqueeze(0) if sample.ndim == 3 else sample
        picks = torch.linspace(0, frames.shape[0] - 1, min(c.max_frames, frames.shape[0])).round().long().unique()
        low, high = c.score_range
        text = c.prompt_template.format(prompt=prompt, low=low, high=high)
        content: list[dict[str, Any]] = [
            {"type": "image_url", "image_url": {"url": data_url(frames[int(i)], c.image_format)}} for i in picks
        ]
        content.append({"type": "text", "text": text})
        system = [{"role": "system", "content": c.system_prompt}] if c.system_prompt else []
        return [*system, {"role": "user", "content": content}]

    def _ask(self, index: int, sample: torch.Tensor, prompt: str) -> float:
        c = self.config
        body: dict[str, Any] = {
            "model": c.model,
            "messages": self.messages(sample, prompt),
            "max_tokens": c.max_tokens,
            "temperature": c.temperature,
        }
        if c.seed is not None:
            body["seed"] = c.seed

        def attempt(remaining: float) -> str:
            answer = post_once(self._client(), self.endpoint, remaining, json=body)
            if answer.status_code != 200:
                raise JudgeError(f"{self.endpoint}: refused the request ({answer.status_code}): {answer.text[:200]}")
            try:
                content = answer.json()["choices"][0]["message"]["content"]
            except (ValueError, KeyError, IndexError, TypeError):
                raise JudgeError(f"{self.endpoint}: not a chat completion: {answer.text[:200]!r}") from None
            if not isinstance(content, str):
                raise JudgeError(f"{self.endpoint}: the completion's content is not text: {content!r:.200}")
            return content

        text = with_retries(self.endpoint, attempt, c.timeout_s, c.retries, c.backoff_s)
        low, high = c.score_range
        try:
            value = parse_score(text, c.answer_pattern, low, high)
        except ValueError as exc:
            raise JudgeError(f"{self.source}: sample {index}: {exc}: {text[:200]!r}") from None
        return (value - low) / (high - low) if c.normalize else value

    def score(self, samples: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """The judge's score per sample (raises :class:`JudgeError` when any answer holds none)."""
        samples = samples.detach().cpu()
        with ThreadPoolExecutor(max_workers=self.config.concurrency, thread_name_prefix="vlm-judge") as pool:
            futures = [pool.submit(self._ask, i, samples[i], prompts[i]) for i in range(samples.shape[0])]
            try:
                values = [f.result() for f in futures]
            except BaseException:
                for future in futures:  # a failed sample fails the batch: do not ask about the rest
                    future.cancel()
                raise
        return torch.tensor(values, dtype=torch.float32)
