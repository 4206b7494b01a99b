"""A HunyuanVideo policy's decoded output writes as an animated video (the writer is tested in the core)."""

from __future__ import annotations

import torch
from PIL import Image

from dancecore.testing import write_video


def test_policy_output_writes_as_video(t2v, tmp_path):
    videos = t2v.decode(t2v.initial_noise(1, torch.Generator().manual_seed(0)))
    path = write_video(videos[0], tmp_path / "sample.webp", fps=24)
    with Image.open(path) as image:
        assert image.n_frames == 5 and image.size == (48, 32)
