"""``dancecore.outputs.video``: MP4 when an encoder is installed, animated WebP/GIF otherwise, contact sheets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dancecore.outputs import video as video_io


def _video(frames: int = 5, height: int = 24, width: int = 40) -> torch.Tensor:
    """Frames whose brightness ramps up, so frame order is visible."""
    ramp = torch.linspace(0.0, 1.0, frames).view(frames, 1, 1, 1)
    pattern = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(0))
    return (0.5 * ramp + 0.5 * pattern).clamp(0, 1)


def test_uint8_frames_round_and_reorder():
    v = torch.zeros(2, 3, 4, 5)
    v[1, 0] = 1.0
    v[0, 2, 1, 1] = 0.5
    frames = video_io.to_uint8_frames(v)
    assert frames.shape == (2, 4, 5, 3) and frames.dtype == np.uint8
    assert frames[1, :, :, 0].min() == 255 and frames[0, 1, 1, 2] == 128


def test_rejects_batches_and_bad_suffixes(tmp_path):
    with pytest.raises(ValueError, match=r"\(F, 3, H, W\)"):
        video_io.write_video(torch.rand(2, 5, 3, 8, 8), tmp_path / "x.mp4")
    with pytest.raises(ValueError, match="suffix"):
        video_io.write_video(_video(), tmp_path / "x.avi")
    with pytest.raises(ValueError, match="fps"):
        video_io.write_video(_video(), tmp_path / "x.gif", fps=0)


def test_webp_keeps_every_frame_exactly(tmp_path):
    v = _video()
    path = video_io.write_video(v, tmp_path / "clip.webp", fps=10)
    assert path == tmp_path / "clip.webp"
    with Image.open(path) as image:
        assert image.n_frames == 5 and image.size == (40, 24)
        decoded = []
        for i in range(image.n_frames):
            image.seek(i)
            decoded.append(np.asarray(image.convert("RGB")))
    np.testing.assert_array_equal(np.stack(decoded), video_io.to_uint8_frames(v))


def test_gif(tmp_path):
    path = video_io.write_video(_video(frames=3), tmp_path / "clip.gif", fps=4)
    with Image.open(path) as image:
        assert image.n_frames == 3
        assert image.info["duration"] == 250


def test_mp4_falls_back_to_webp_without_an_encoder(tmp_path, monkeypatch):
    monkeypatch.setattr(video_io, "mp4_backend", lambda: None)
    path = video_io.write_video(_video(), tmp_path / "clip.mp4")
    assert path == tmp_path / "clip.webp" and path.is_file()
    assert not (tmp_path / "clip.mp4").exists()


@pytest.mark.skipif(video_io.mp4_backend() != "av", reason="PyAV not installed (pip install av)")
def test_mp4_with_pyav_decodes_back(tmp_path):
    import av

    v = _video(frames=9, height=25, width=39)  # odd sizes are padded to even for yuv420p
    path = video_io.write_video(v, tmp_path / "clip.mp4", fps=12)
    assert path.suffix == ".mp4"
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        assert stream.average_rate == 12
    assert len(frames) == 9 and frames[0].shape == (26, 40, 3)
    # Lossy, but close: mean brightness of each frame follows the ramp.
    means = [f[:25, :39].mean() for f in frames]
    assert means == sorted(means)
    np.testing.assert_allclose(means, video_io.to_uint8_frames(v).mean(axis=(1, 2, 3)), atol=6)


def test_contact_sheet_layout(tmp_path):
    v = _video(frames=5, height=8, width=10)
    sheet = video_io.contact_sheet(v)
    assert sheet.size == (3 * 10, 2 * 8)  # 5 frames -> 3 columns x 2 rows
    pixels = np.asarray(sheet)
    frames = video_io.to_uint8_frames(v)
    np.testing.assert_array_equal(pixels[8:16, 10:20], frames[4])  # frame 4: row 1, column 1
    assert pixels[8:16, 20:30].max() == 0  # the unused cell stays black
    path = video_io.save_contact_sheet(v, tmp_path / "sheet.png", columns=5)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (50, 8)


def test_contact_sheet_subsamples_long_videos():
    v = _video(frames=53, height=4, width=4)
    sheet = np.asarray(video_io.contact_sheet(v, columns=4, max_frames=8))
    assert sheet.shape == (2 * 4, 4 * 4, 3)
    frames = video_io.to_uint8_frames(v)
    np.testing.assert_array_equal(sheet[:4, :4], frames[0])
    np.testing.assert_array_equal(sheet[4:, 12:], frames[52])
