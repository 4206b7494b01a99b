"""The shipped pretrained ``shapes-flux`` model (entry point ``dancecore.weights: shapes-flux``).

A small FLUX.1 of the real architecture (diffusers ``FluxTransformer2DModel``, ``AutoencoderKL``,
``CLIPTextModel``, ``T5EncoderModel`` and word-level tokenizers) pretrained on the shapes world by
:mod:`dancecore_shapes.pretrain` from the training prompts only. Load it with the ``flux`` policy:
``policy: {name: flux, pretrained: plugin:shapes-flux, resolution: 32, max_sequence_length: 16}``
(or ``pretrained: <the path flux_dir() returns>``). How it was built and its scores: docs/shapes.md.
"""

from __future__ import annotations

from pathlib import Path

_PARTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")


def flux_dir() -> Path:
    """The diffusers directory of the shipped model, inside the installed package."""
    root = Path(__file__).resolve().parent / "pretrained" / "flux"
    missing = [part for part in _PARTS if not (root / part).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"shapes-flux weights incomplete at {root} (missing {', '.join(missing)}); "
            "rebuild them with `python -m dancecore_shapes.pretrain --out` that directory"
        )
    return root
