"""Writing generated videos to disk: MP4 when an encoder is installed, animated WebP/GIF otherwise,
and a contact sheet (PNG) of the frames.

A video here is one tensor of shape (F, 3, H, W) with values in [0, 1]. MP4 needs PyAV
(``pip install av``) or imageio-ffmpeg (``pip install imageio-ffmpeg``); both ship their own
FFmpeg. Without either, :func:`write_video` falls back to an animated WebP through Pillow, so
writing a sample never fails for want of an optional package.
"""

from __future__ import annotations

import importlib.util
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from PIL import Image

#: Formats :func:`write_video` can produce, by file suffix.
FORMATS = ("mp4", "webp", "gif")


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """(F, 3, H, W) in [0, 1] -> (F, H, W, 3) uint8, rounding to the nearest level."""
    if video.ndim != 4 or video.shape[1] != 3:
        raise ValueError(f"expected one video of shape (F, 3, H, W), got {tuple(video.shape)}")
    pixels = (video.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return np.ascontiguousarray(pixels.permute(0, 2, 3, 1).cpu().numpy())


def mp4_backend() -> str | None:
    """The installed MP4 encoder: ``"av"`` (PyAV), ``"imageio-ffmpeg"``, or None."""
    if importlib.util.find_spec("av") is not None:
        return "av"
    if importlib.util.find_spec("imageio_ffmpeg") is not None:
        return "imageio-ffmpeg"
    return None


def _even(frames: np.ndarray) -> np.ndarray:
    """Pad H and W to even sizes by repeating the last row/column: H.264 in yuv420p needs them."""
    _, h, w, _ = frames.shape
    return np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def _write_mp4_av(frames: np.ndarray, path: Path, fps: float, crf: int) -> None:
    import av

    frames = _even(frames)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf)}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():  # flush the encoder
            container.mux(packet)


def _write_mp4_imageio(frames: np.ndarray, path: Path, fps: float, crf: int) -> None:
    import imageio_ffmpeg

    frames = _even(frames)
    writer = imageio_ffmpeg.write_frames(
        str(path),
        (frames.shape[2], frames.shape[1]),
        fps=fps,
        codec="libx264",
        pix_fmt_out="yuv420p",
        macro_block_size=1,
        output_params=["-crf", str(crf)],
    )
    writer.send(None)  # start the generator
    for frame in frames:
        writer.send(frame)
    writer.close()


def _write_animated(frames: np.ndarray, path: Path, fps: float, fmt: str) -> None:
    images = [Image.fromarray(frame) for frame in frames]
    duration_ms = max(1, round(1000.0 / fps))
    extra = {"lossless": True} if fmt == "webp" else {}
    images[0].save(
        path, format=fmt.upper(), save_all=True, append_images=images[1:], duration=duration_ms, loop=0, **extra
    )


def write_video(video: torch.Tensor, path: str | Path, fps: float = 8.0, *, crf: int = 18) -> Path:
    """Write one video (F, 3, H, W) in [0, 1] and return the path actually written.

    The suffix of ``path`` picks the format: ``.mp4``, ``.webp`` or ``.gif``. An ``.mp4`` path is
    written as ``.webp`` beside it (same stem) when no MP4 encoder is installed; see
    :func:`mp4_backend`. ``crf`` is the H.264 quality (lower is better; 18 is visually lossless).
    """
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        raise ValueError(f"cannot write video to {path}: suffix must be one of {', '.join('.' + f for f in FORMATS)}")
    frames = to_uint8_frames(video)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "mp4":
        backend = mp4_backend()
        if backend == "av":
            _write_mp4_av(frames, path, fps, crf)
            return path
        if backend == "imageio-ffmpeg":
            _write_mp4_imageio(frames, path, fps, crf)
            return path
        path, fmt = path.with_suffix(".webp"), "webp"
    _write_animated(frames, path, fps, fmt)
    return path


def contact_sheet(video: torch.Tensor, columns: int | None = None, max_frames: int | None = 16) -> Image.Image:
    """Frames of one video (F, 3, H, W) in [0, 1] tiled left to right, top to bottom.

    With more than ``max_frames`` frames, ``max_frames`` evenly spaced ones (first and last
    included) are shown. ``columns`` defaults to a near-square layout.
    """
    frames = to_uint8_frames(video)
    if max_frames is not None and frames.shape[0] > max_frames:
        keep = np.linspace(0, frames.shape[0] - 1, max_frames).round().astype(int)
        frames = frames[keep]
    n, h, w, _ = frames.shape
    columns = min(columns or math.ceil(math.sqrt(n)), n)
    rows = math.ceil(n / columns)
    canvas = np.zeros((rows * h, columns * w, 3), dtype=np.uint8)
    for i, frame in enumerate(frames):
        r, c = divmod(i, columns)
        canvas[r * h : (r + 1) * h, c * w : (c + 1) * w] = frame
    return Image.fromarray(canvas)


def save_contact_sheet(
    video: torch.Tensor, path: str | Path, columns: int | None = None, max_frames: int | None = 16
) -> Path:
    """Write :func:`contact_sheet` as PNG and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    contact_sheet(video, columns, max_frames).save(path, format="PNG")
    return path
