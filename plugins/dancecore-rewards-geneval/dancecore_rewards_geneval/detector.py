"""GenEval's detector on transformers: Mask2Former (Swin-S, COCO instance segmentation).

GenEval runs mmdetection's ``mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco``; transformers ships
the same architecture trained on the same data as ``facebook/mask2former-swin-small-coco-instance``.
What mmdetection does around the network is reproduced here on tensors:

- input: resized keeping the aspect ratio so that it fits 1333 x 800 (short side 800 for square
  images; bilinear), normalised with the ImageNet mean and std (in 0-255 units: 123.675, 116.28,
  103.53 and 58.395, 57.12, 57.375), zero-padded to a multiple of 32;
- output (mmdetection's ``MaskFormerFusionHead`` instance post-processing): class probabilities
  are the softmax over the 80 classes plus "no object", without the last; the 100 best
  (query, class) pairs over all queries and classes are the instances; the mask logits are
  upsampled (bilinear) to the padded input, cropped to the resized image and upsampled to the
  original size; a pixel belongs to the mask where its logit is above 0 (probability 0.5); the
  instance's score is its class probability times the mean mask probability inside its mask; its
  box is the mask's extent ``(x_min, y_min, x_max + 1, y_max + 1)``.

Labels map by index to GenEval's class names (:data:`~.prompts.CLASS_NAMES`, the COCO order).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from dancecore import DTYPES, WeightsNotFoundError, materialise
from dancecore_rewards_geneval.prompts import CLASS_NAMES
from dancecore_rewards_geneval.rules import Detection

IMAGENET_MEAN = (123.675 / 255, 116.28 / 255, 103.53 / 255)
IMAGENET_STD = (58.395 / 255, 57.12 / 255, 57.375 / 255)
SCALE = (1333, 800)  # mmdetection's test scale: long side at most 1333, short side at most 800
PAD_DIVISOR = 32
TOP_K = 100  # instances per image (mmdetection's max_per_image)


def resized_size(height: int, width: int, scale: tuple[int, int] = SCALE) -> tuple[int, int]:
    """mmcv's keep-ratio rescale: the largest factor that fits ``scale`` (long, short), rounded half up."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


class InstanceSegmenter:
    """A transformers ``Mask2FormerForUniversalSegmentation`` turned into GenEval's detections."""

    def __init__(
        self, model_dir: Path, device: torch.device, dtype: str = "float32", scale: tuple[int, int] = SCALE
    ) -> None:
        from transformers import AutoConfig, Mask2FormerForUniversalSegmentation

        kind = AutoConfig.from_pretrained(model_dir, local_files_only=True).model_type
        if kind != "mask2former":
            raise WeightsNotFoundError(f"{model_dir} holds a {kind!r} model, not Mask2Former (GenEval's detector)")
        model, info = Mask2FormerForUniversalSegmentation.from_pretrained(
            model_dir, local_files_only=True, torch_dtype=DTYPES[dtype], output_loading_info=True
        )
        if info["missing_keys"]:
            missing = sorted(info["missing_keys"])
            raise WeightsNotFoundError(f"Mask2Former at {model_dir} lacks {len(missing)} weights, e.g. {missing[:3]}")
        if model.config.num_labels != len(CLASS_NAMES):
            raise WeightsNotFoundError(
                f"Mask2Former at {model_dir} has {model.config.num_labels} labels; GenEval needs a COCO instance "
                f"model with {len(CLASS_NAMES)} (e.g. facebook/mask2former-swin-small-coco-instance)"
            )
        self.model = model.to(device).eval().requires_grad_(False)
        self.device = device
        self.scale = scale

    def preprocess(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, 3, H, W) pixels in [0, 1] -> normalised, padded network input and the resized size."""
        size = resized_size(images.shape[-2], images.shape[-1], self.scale)
        x = torch.nn.functional.interpolate(images.float(), size=size, mode="bilinear", align_corners=False)
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        x = (x - mean) / std
        pad_h, pad_w = (-size[0]) % PAD_DIVISOR, (-size[1]) % PAD_DIVISOR
        return torch.nn.functional.pad(x, (0, pad_w, 0, pad_h)), size

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> list[list[Detection]]:
        """Every instance of each image (:data:`TOP_K` at most, unthresholded), with masks and boxes
        at the image's resolution."""
        height, width = images.shape[-2:]
        pixels, size = self.preprocess(images.to(self.device))
        out = self.model(pixel_values=pixels.to(self.model.dtype))
        masks = torch.nn.functional.interpolate(
            out.masks_queries_logits.float(), size=pixels.shape[-2:], mode="bilinear", align_corners=False
        )[..., : size[0], : size[1]]
        masks = torch.nn.functional.interpolate(masks, size=(height, width), mode="bilinear", align_corners=False)
        return [instances(logits, mask) for logits, mask in zip(out.class_queries_logits.float(), masks, strict=True)]


def instances(class_logits: torch.Tensor, mask_logits: torch.Tensor, top_k: int = TOP_K) -> list[Detection]:
    """mmdetection's instance post-processing of one image: ``class_logits`` (Q, C + 1),
    ``mask_logits`` (Q, H, W) at the image's resolution -> the ``top_k`` best (query, class) pairs."""
    probs = class_logits.softmax(dim=-1)[:, :-1]  # (Q, C): "no object" dropped
    classes = probs.shape[1]
    scores, flat = probs.flatten().topk(min(top_k, probs.numel()))
    queries, labels = flat // classes, flat % classes
    binary = mask_logits[queries] > 0  # (K, H, W)
    inside = binary.flatten(1).float()
    mask_score = (mask_logits[queries].sigmoid().flatten(1) * inside).sum(1) / (inside.sum(1) + 1e-6)
    det_scores = (scores * mask_score).cpu().numpy()
    binary_np = binary.cpu().numpy()
    found = []
    for k in range(len(det_scores)):
        found.append(Detection(CLASS_NAMES[int(labels[k])], float(det_scores[k]), mask_box(binary_np[k]), binary_np[k]))
    return found


def mask_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    """The box of a binary mask as mmdetection's ``mask2bbox``: ``(x_min, y_min, x_max + 1, y_max + 1)``;
    all zeros for an empty mask."""
    cols, rows = np.flatnonzero(mask.any(axis=0)), np.flatnonzero(mask.any(axis=1))
    if not len(cols) or not len(rows):
        return (0.0, 0.0, 0.0, 0.0)
    return (float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1))


TINY_MASK2FORMER_SPEC: dict[str, Any] = {
    "backbone": {
        "image_size": 64,
        "patch_size": 4,
        "embed_dim": 32,
        "depths": [1, 1, 1, 1],
        "num_heads": [1, 1, 2, 2],
        "window_size": 4,
        "out_features": ["stage1", "stage2", "stage3", "stage4"],
    },
    "num_queries": 12,
    "hidden_dim": 32,
    "mask_feature_size": 32,
    "feature_size": 32,
    "encoder_feedforward_dim": 32,
    "dim_feedforward": 32,
    "encoder_layers": 1,
    "decoder_layers": 2,
    "num_attention_heads": 2,
    "seed": 0,
}
TINY_SCALE = (96, 64)
"""Test scale of the tiny preset (long side at most 96, short side at most 64)."""


def write_tiny_mask2former(root: Path, spec: dict[str, Any] = TINY_MASK2FORMER_SPEC) -> None:
    """A random-init ``Mask2FormerForUniversalSegmentation`` with a tiny Swin backbone and GenEval's
    80 labels, saved with ``save_pretrained``."""
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig

    torch.manual_seed(spec["seed"])
    options = {k: v for k, v in spec.items() if k not in ("backbone", "seed")}
    config = Mask2FormerConfig(
        backbone_config=SwinConfig(**spec["backbone"]),
        num_labels=len(CLASS_NAMES),
        id2label=dict(enumerate(CLASS_NAMES)),
        label2id={name: i for i, name in enumerate(CLASS_NAMES)},
        **options,
    )
    Mask2FormerForUniversalSegmentation(config).save_pretrained(root)


def tiny_mask2former_dir() -> Path:
    """The tiny preset's Mask2Former directory (built once, cached)."""
    return materialise("tiny-mask2former", TINY_MASK2FORMER_SPEC, write_tiny_mask2former)
