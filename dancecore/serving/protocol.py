"""The reward-service wire format, version 1 (docs/serving.md).

A score request is ``POST /v1/rewards/<name>/score`` with one of two bodies:

- ``application/vnd.dancecore.reward.v1+safetensors``: a safetensors file holding one tensor,
  ``pixels`` (B, 3, H, W) or (B, F, 3, H, W) (float32/float16/bfloat16 in [0, 1], or uint8 in
  [0, 255]), whose ``__metadata__`` entry ``dancecore`` is the JSON ``{"schema": 1, "prompts": [...]}``.
  The pixels travel exactly, so remote scores equal local ones.
- ``application/json``: ``{"schema": 1, "prompts": [...], "images": [base64 PNG/WebP, ...]}``
  (or ``"videos": [[frame, ...], ...]``), 8-bit, for clients in any language.

The answer is JSON ``{"schema": 1, "reward": name, "scores": [float | null, ...]}`` (null: a
non-finite score); errors are JSON ``{"schema": 1, "error": "..."}`` with a 4xx/5xx status.
Nothing here unpickles: safetensors is a JSON header plus raw bytes, PNG/WebP are decoded by
Pillow restricted to those two formats.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

SCHEMA = 1
SAFETENSORS_TYPE = "application/vnd.dancecore.reward.v1+safetensors"
JSON_TYPE = "application/json"
PIXEL_DTYPES = {torch.float32, torch.float16, torch.bfloat16, torch.uint8}
#: Pillow refuses larger images (decompression bombs); 64 Mpixel is well above any generator's output.
MAX_IMAGE_PIXELS = 64 * 1024 * 1024


class ProtocolError(ValueError):
    """A request or answer that does not follow the wire format (the message says how)."""


@dataclass(frozen=True)
class ScoreRequest:
    """A decoded score request: pixels in [0, 1] (float, CPU; uint8 is converted to float32) and one prompt per sample."""

    pixels: torch.Tensor
    prompts: list[str]


def _check_prompts(prompts: Any, batch: int) -> list[str]:
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise ProtocolError("'prompts' must be a list of strings")
    if len(prompts) != batch:
        raise ProtocolError(f"{batch} samples but {len(prompts)} prompts")
    return prompts


def _check_schema(meta: Any) -> None:
    if not isinstance(meta, dict):
        raise ProtocolError("the request metadata must be a JSON object")
    if meta.get("schema") != SCHEMA:
        raise ProtocolError(f"schema {meta.get('schema')!r} is not supported (this server speaks schema {SCHEMA})")


def _check_pixels(pixels: torch.Tensor) -> torch.Tensor:
    if pixels.ndim not in (4, 5) or pixels.shape[-3] != 3 or pixels.shape[0] == 0:
        raise ProtocolError(f"pixels must be (B, 3, H, W) or (B, F, 3, H, W) with B >= 1, got {tuple(pixels.shape)}")
    if pixels.dtype not in PIXEL_DTYPES:
        raise ProtocolError(f"pixels of dtype {pixels.dtype} are not supported (float32, float16, bfloat16, uint8)")
    if pixels.dtype == torch.uint8:
        return pixels.float() / 255.0
    return pixels  # float32/16/bf16 as sent: the reward sees what it would see locally


# ------------------------------------------------------------------------------ safetensors


def encode_safetensors(pixels: torch.Tensor, prompts: Sequence[str]) -> bytes:
    """The safetensors body of a request (the pixels bit for bit)."""
    from safetensors.torch import save

    meta = json.dumps({"schema": SCHEMA, "prompts": list(prompts)})
    return save({"pixels": pixels.detach().cpu().contiguous()}, metadata={"dancecore": meta})


def _safetensors_metadata(body: bytes) -> dict[str, Any]:
    """The JSON header of a safetensors body, read by hand (8-byte length, then JSON)."""
    if len(body) < 8:
        raise ProtocolError("the body is too short to be safetensors")
    (size,) = struct.unpack("<Q", body[:8])
    if size > len(body) - 8:
        raise ProtocolError("not a safetensors payload (its header length exceeds the body)")
    try:
        header = json.loads(body[8 : 8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ProtocolError("not a safetensors payload (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise ProtocolError("not a safetensors payload (its header is not a JSON object)")
    return header


def decode_safetensors(body: bytes) -> ScoreRequest:
    """Parse a safetensors request body (raises :class:`ProtocolError`)."""
    from safetensors.torch import load

    header = _safetensors_metadata(body)
    names = sorted(k for k in header if k != "__metadata__")
    if names != ["pixels"]:
        raise ProtocolError(f"expected exactly one tensor named 'pixels', got {names}")
    meta_text = (header.get("__metadata__") or {}).get("dancecore")
    if not isinstance(meta_text, str):
        raise ProtocolError("the safetensors metadata has no 'dancecore' entry")
    try:
        meta = json.loads(meta_text)
    except json.JSONDecodeError:
        raise ProtocolError("the 'dancecore' metadata entry is not JSON") from None
    _check_schema(meta)
    try:
        pixels = load(body)["pixels"]
    except Exception as exc:  # the Rust parser's own errors (bad offsets, dtype, truncation)
        raise ProtocolError(f"invalid safetensors payload: {exc}") from None
    pixels = _check_pixels(pixels)
    return ScoreRequest(pixels, _check_prompts(meta.get("prompts"), pixels.shape[0]))


# ------------------------------------------------------------------------------- PNG / JSON


def _png(frame: torch.Tensor) -> str:
    array = (frame.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def encode_json(pixels: torch.Tensor, prompts: Sequence[str]) -> bytes:
    """The JSON body of a request, images as base64 PNG (8-bit: scores may differ slightly from local)."""
    body: dict[str, Any] = {"schema": SCHEMA, "prompts": list(prompts)}
    if pixels.ndim == 4:
        body["images"] = [_png(image) for image in pixels]
    else:
        body["videos"] = [[_png(frame) for frame in video] for video in pixels]
    return json.dumps(body).encode()


def decode_image(text: Any) -> torch.Tensor:
    """One base64 PNG or WebP image as (3, H, W) float32 in [0, 1] (no other format is opened)."""
    if not isinstance(text, str):
        raise ProtocolError("an image must be a base64 string")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError("an image is not valid base64") from None
    try:
        with Image.open(io.BytesIO(raw), formats=["PNG", "WEBP"]) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise ProtocolError(f"an image of {image.width}x{image.height} pixels is too large")
            array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    except ProtocolError:
        raise
    except Exception as exc:  # Pillow: unidentified or truncated image, decompression bomb
        raise ProtocolError(f"an image is not a readable PNG or WebP ({type(exc).__name__})") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255.0


def _stack(frames: list[torch.Tensor], what: str) -> torch.Tensor:
    if not frames:
        raise ProtocolError(f"'{what}' is empty")
    shapes = {tuple(f.shape) for f in frames}
    if len(shapes) != 1:
        raise ProtocolError(f"all {what} must have the same size, got {sorted(shapes)}")
    return torch.stack(frames)


def decode_json(body: bytes) -> ScoreRequest:
    """Parse a JSON request body with base64 PNG/WebP images or videos."""
    try:
        meta = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ProtocolError("the body is not JSON") from None
    _check_schema(meta)
    if ("images" in meta) == ("videos" in meta):
        raise ProtocolError("give exactly one of 'images' or 'videos'")
    if "images" in meta:
        if not isinstance(meta["images"], list):
            raise ProtocolError("'images' must be a list")
        pixels = _stack([decode_image(t) for t in meta["images"]], "images")
    else:
        videos = meta["videos"]
        if not isinstance(videos, list) or not all(isinstance(v, list) for v in videos):
            raise ProtocolError("'videos' must be a list of lists of frames")
        pixels = _stack([_stack([decode_image(t) for t in v], "frames") for v in videos], "videos")
    return ScoreRequest(pixels, _check_prompts(meta.get("prompts"), pixels.shape[0]))


def decode_request(content_type: str, body: bytes) -> ScoreRequest:
    """Parse a request body by its content type; anything else (pickle included) is refused unread."""
    kind = content_type.split(";")[0].strip().lower()
    if kind == SAFETENSORS_TYPE:
        return decode_safetensors(body)
    if kind == JSON_TYPE:
        return decode_json(body)
    raise ProtocolError(f"content type {kind or '(none)'!r} is not accepted (use {SAFETENSORS_TYPE} or {JSON_TYPE})")


# ---------------------------------------------------------------------------------- answers


def encode_scores(reward: str, scores: torch.Tensor) -> bytes:
    """The JSON answer: one number per sample, ``null`` for a non-finite one."""
    values = [float(v) if math.isfinite(v) else None for v in scores.detach().double().tolist()]
    return json.dumps({"schema": SCHEMA, "reward": reward, "scores": values}, allow_nan=False).encode()


def encode_error(message: str) -> bytes:
    """The JSON body of an error answer."""
    return json.dumps({"schema": SCHEMA, "error": message}).encode()


def decode_scores(body: bytes, batch: int) -> torch.Tensor:
    """Parse an answer into ``batch`` float32 scores (NaN where the server sent null); raises
    :class:`ProtocolError` on anything else (not JSON, another schema, a wrong count, non-numbers)."""
    try:
        answer = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ProtocolError(f"the answer is not JSON (starts with {body[:40]!r})") from None
    if not isinstance(answer, dict) or answer.get("schema") != SCHEMA:
        raise ProtocolError(f"the answer is not a schema-{SCHEMA} score record")
    scores = answer.get("scores")
    if not isinstance(scores, list):
        raise ProtocolError("the answer has no 'scores' list")
    if len(scores) != batch:
        raise ProtocolError(f"the answer has {len(scores)} scores for {batch} samples")
    if not all(s is None or (isinstance(s, int | float) and not isinstance(s, bool)) for s in scores):
        raise ProtocolError("the answer's scores are not all numbers (or null)")
    return torch.tensor([math.nan if s is None else float(s) for s in scores], dtype=torch.float64).float()


def error_text(body: bytes) -> str:
    """The server's error message from an error answer (or the start of the body)."""
    try:
        answer = json.loads(body)
        if isinstance(answer, dict) and isinstance(answer.get("error"), str):
            return str(answer["error"])
    except (UnicodeDecodeError, json.JSONDecodeError):
        pass
    return body[:200].decode("utf-8", "replace")
