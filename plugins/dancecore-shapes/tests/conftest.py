"""Shared helpers: single-threaded torch and the image perturbations of the robustness tests."""

from __future__ import annotations

import io
import os

import numpy as np
import torch
from PIL import Image

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of an (H, W, 3) image, edges replicated."""
    radius = int(np.ceil(3 * sigma))
    x = np.arange(-radius, radius + 1)
    kernel = np.exp(-(x**2) / (2 * sigma**2))
    kernel /= kernel.sum()
    padded = np.pad(image, ((radius, radius), (radius, radius), (0, 0)), mode="edge")
    h, w, _ = image.shape
    rows = sum(k * padded[i : i + h, :, :] for i, k in enumerate(kernel))
    return sum(k * rows[:, i : i + w, :] for i, k in enumerate(kernel))


def add_noise(image: np.ndarray, std: float, seed: int) -> np.ndarray:
    """Additive Gaussian noise, clipped back to [0, 1]."""
    return np.clip(image + np.random.default_rng(seed).normal(0.0, std, image.shape), 0.0, 1.0)


def jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    """A JPEG round trip (Pillow defaults: 4:2:0 chroma subsampling)."""
    buffer = io.BytesIO()
    Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8)).save(buffer, "JPEG", quality=quality)
    return np.asarray(Image.open(buffer), dtype=np.float64) / 255.0
