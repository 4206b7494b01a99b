"""GenEval's colour classifier: zero-shot CLIP (ViT-L/14) on each object's masked crop.

As GenEval does it: the image is composited over a uniform grey (``#999999``) outside the object's
mask, cropped to the object's box, and given CLIP's transform (bicubic resize of the short side to
224, centre crop, CLIP normalisation). The class weights of colour c for a class name are the mean
of the normalised text embeddings of "a photo of a {c} {name}", "a photo of a {c}-colored {name}"
and "a photo of a {c} object", normalised again (clip_benchmark's zero-shot classifier); the colour
is the arg-max of the cosine similarity. Built on the ``clip-score`` plugin's ``CLIPEmbedder``
(transformers' ``CLIPModel``; GenEval's open_clip ``ViT-L-14``/``openai`` is the same network as
``openai/clip-vit-large-patch14``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from dancecore_rewards_clip.reward import CLIPEmbedder

from dancecore_rewards_geneval.prompts import COLORS
from dancecore_rewards_geneval.rules import Detection

GREY = 0x99 / 255
TEMPLATES = ("a photo of a {c} {name}", "a photo of a {c}-colored {name}", "a photo of a {c} object")


class ColorClassifier:
    """Zero-shot colours of detected objects in one image at a time (weights cached per class name)."""

    def __init__(self, embedder: CLIPEmbedder) -> None:
        self.embedder = embedder
        self._weights: dict[str, torch.Tensor] = {}

    def class_weights(self, name: str) -> torch.Tensor:
        """(len(COLORS), D) normalised zero-shot weights for objects called ``name``."""
        if name not in self._weights:
            texts = [t.format(c=c, name=name) for c in COLORS for t in TEMPLATES]
            features = self.embedder.text_features(texts).view(len(COLORS), len(TEMPLATES), -1)
            self._weights[name] = torch.nn.functional.normalize(features.mean(dim=1), dim=-1)
        return self._weights[name]

    @staticmethod
    def crop(image: torch.Tensor, det: Detection) -> torch.Tensor:
        """``image`` (3, H, W) composited over grey outside ``det``'s mask, cropped to its box
        (rounded to whole pixels as PIL does); the whole composite if the box is empty."""
        if det.mask is not None:
            mask = torch.as_tensor(det.mask, device=image.device).bool()
            if mask.shape != image.shape[-2:]:
                raise ValueError(f"mask of shape {tuple(mask.shape)} for an image of {tuple(image.shape[-2:])}")
            image = torch.where(mask, image, torch.full_like(image, GREY))
        x0, y0, x1, y1 = (round(v) for v in det.box)
        x0, y0 = max(x0, 0), max(y0, 0)
        if x1 <= x0 or y1 <= y0:
            return image
        return image[:, y0:y1, x0:x1]

    @torch.no_grad()
    def __call__(self, image: torch.Tensor, name: str, objects: Sequence[Detection]) -> list[str]:
        """One colour name per object of class ``name`` in ``image`` (3, H, W) in [0, 1]."""
        if not objects:
            return []
        embedder = self.embedder
        crops = [embedder.preprocess(self.crop(image.to(embedder.device), d)[None]) for d in objects]
        pixels = torch.cat(crops).to(embedder.model.dtype)
        pooled = embedder.model.vision_model(pixel_values=pixels).pooler_output
        features = torch.nn.functional.normalize(embedder.model.visual_projection(pooled).float(), dim=-1)
        best = (features @ self.class_weights(name).T).argmax(dim=1)
        return [COLORS[int(i)] for i in best]
