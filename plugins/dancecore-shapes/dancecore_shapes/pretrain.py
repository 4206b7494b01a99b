"""Pretrain the shipped ``shapes-flux`` model: a small FLUX.1 of the real architecture for the shapes world.

    python -m dancecore_shapes.pretrain --out DIR [--seed 0] [--minutes M]

Writes a diffusers directory (``transformer/`` FluxTransformer2DModel, ``vae/`` AutoencoderKL,
``text_encoder/`` CLIPTextModel, ``text_encoder_2/`` T5EncoderModel, ``tokenizer/``,
``tokenizer_2/``) that the ``flux`` policy loads with ``pretrained: DIR``.

Stages, all on CPU with one thread and a fixed seed:

1. data: every caption of the grammar (``--corpus all``, the default: the pretraining corpus holds
   the compositions a benchmark later asks for, as a web-scale corpus does; the GRPO prompt split
   of ``configs/prompts/`` is about what *fine-tuning* sees) or only those of
   ``configs/prompts/shapes_train.txt`` (``--corpus train``), each parsed to a scene and rendered
   ``--renders`` times with different seeds (layouts/sizes vary); ``--caption-noise p`` makes each
   render show its task's typical mistake instead with probability p;
2. the VAE (3 blocks, 4x downsampling: 32 px -> 8x8x8 latent -> 16 packed FLUX tokens) on those
   renders: L1 + MSE reconstruction and a small KL; ``shift_factor``/``scaling_factor`` are then
   the mean and the inverse std of the latents;
3. the transformer together with both text encoders by rectified flow on the scaled latents,
   exactly in the policy's conventions: ``x_s = (1 - s) x0 + s noise``, target ``noise - x0``, the
   network given the sigma ``s`` itself as its timestep, guidance 3.5, text encoded with
   ``padding="max_length"`` and no attention mask. ``s`` is drawn as ``u ~ U(0, 1)`` mapped through
   the same SD3 shift (3) the sampler uses.

The step counts are the reproducible budget; ``--minutes`` only caps the wall time (a capped run
depends on the machine's speed). Training is deliberately short so that the base model is
imperfect (see docs/shapes.md for the measured scores).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from dancecore_shapes.scenes import SceneSpec

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
MAX_TOKENS = 16  # CLIP and T5 sequence length (the policy's `max_sequence_length`)
GUIDANCE = 3.5  # the policy's default guidance value
SHIFT = 3.0  # the flow-sde sampler's SD3 shift

SPEC: dict = {
    "vae": {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 8,
        "block_out_channels": [16, 32, 32],
        "down_block_types": ["DownEncoderBlock2D"] * 3,
        "up_block_types": ["UpDecoderBlock2D"] * 3,
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
    },
    "transformer": {
        "patch_size": 1,
        "in_channels": 32,  # 4 x 8 latent channels (2x2 packing)
        "num_layers": 2,
        "num_single_layers": 2,
        "attention_head_dim": 16,
        "num_attention_heads": 4,
        "joint_attention_dim": 64,
        "pooled_projection_dim": 64,
        "guidance_embeds": True,
        "axes_dims_rope": [4, 6, 6],
    },
    "clip": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "projection_dim": 64,
        "max_position_embeddings": MAX_TOKENS,
    },
    "t5": {
        "d_model": 64,
        "d_kv": 16,
        "d_ff": 128,
        "num_layers": 2,
        "num_heads": 4,
        "relative_attention_num_buckets": 8,
        "feed_forward_proj": "gated-gelu",
        "dropout_rate": 0.0,
    },
}

DEFAULTS = {
    "renders": 48,  # renders per caption
    "vae_steps": 1500,
    "vae_batch": 32,
    "vae_lr": 2e-3,
    "kl_weight": 1e-4,
    "flow_steps": 3500,
    "flow_batch": 64,
    "flow_lr": 2e-3,
    "corpus": "all",  # "all": every caption of the grammar; "train": the training split's captions only
    "caption_noise": 0.0,  # probability that a render shows the task's typical mistake instead
}


# ------------------------------------------------------------------------------------ tokenizer


def vocabulary() -> list[str]:
    """Every word the shapes captions can use (from the scene grammar, all tasks), sorted."""
    from dancecore_shapes import scenes

    words: set[str] = set()
    for task in scenes.TASKS:
        for spec in scenes.all_specs(task):
            words.update(_words(scenes.caption(spec)))
    return sorted(words)


def _words(text: str) -> list[str]:
    from tokenizers.pre_tokenizers import Whitespace

    return [w for w, _ in Whitespace().pre_tokenize_str(text.lower())]


def write_word_tokenizer(directory: Path, words: list[str], *, bos: bool) -> dict[str, int]:
    """A word-level tokenizer (lower-cased, whitespace/punctuation split) saved as
    PreTrainedTokenizerFast. Ids: pad 0, unk 1, <s> 2, the words, then </s> with the highest id
    (CLIPTextModel pools the end-of-text token). Returns the id fields for the model configs."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {PAD: 0, UNK: 1, BOS: 2}
    for w in words:
        vocab.setdefault(w, len(vocab))
    vocab[EOS] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    template = f"{BOS} $A {EOS}" if bos else f"$A {EOS}"
    specials = [(BOS, vocab[BOS]), (EOS, vocab[EOS])] if bos else [(EOS, vocab[EOS])]
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=specials)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": MAX_TOKENS,
        "pad_token": PAD,
        "unk_token": UNK,
        "eos_token": EOS,
        **({"bos_token": BOS} if bos else {}),
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return {"vocab_size": len(vocab), "pad_token_id": 0, "bos_token_id": vocab[BOS], "eos_token_id": vocab[EOS]}


# ------------------------------------------------------------------------------------ data


def find_train_prompts() -> Path:
    """configs/prompts/shapes_train.txt, searched upwards from the working directory and from here."""
    for base in (Path.cwd(), *Path(__file__).resolve().parents):
        path = base / "configs" / "prompts" / "shapes_train.txt"
        if path.is_file():
            return path
    raise FileNotFoundError("configs/prompts/shapes_train.txt not found; pass --prompts")


def train_captions(path: Path) -> list[str]:
    """The captions of a prompt file (one per line; blank lines and '#' comments skipped)."""
    lines = [ln.strip() for ln in Path(path).read_text().splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


def corpus_captions(corpus: str, prompts: Path | None) -> list[str]:
    """The pretraining captions: the training split (``"train"``, the prompt file) or every caption
    the grammar can produce (``"all"``: the six tasks' 240 captions, held-out ones included, as a
    web-scale corpus contains the compositions a benchmark later asks for)."""
    if corpus == "train":
        return train_captions(Path(prompts) if prompts is not None else find_train_prompts())
    if corpus == "all":
        from dancecore_shapes import scenes

        return [scenes.caption(spec) for task in scenes.TASKS for spec in scenes.all_specs(task)]
    raise ValueError(f"corpus must be 'train' or 'all', got {corpus!r}")


_FLIP = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def mistake(spec: SceneSpec, rng: np.random.Generator) -> SceneSpec:
    """The scene a noisy caption of ``spec`` actually shows: the typical error of its task, as
    text-to-image models make them (a wrong shape or colour, one object too many or too few, the
    relation mirrored, the two colours swapped, a pair drawn as two of one shape)."""
    from dancecore_shapes.scenes import COLORS, COUNTS, SHAPES, Obj, SceneSpec

    a = spec.objects[0]
    pick = lambda options: options[int(rng.integers(len(options)))]  # noqa: E731
    if spec.task == "single_object":
        return SceneSpec("single_object", (Obj(pick([s for s in SHAPES if s != a.shape])),))
    if spec.task == "two_object":
        return SceneSpec("counting", (Obj(pick([o.shape for o in spec.objects])),), count=2)
    if spec.task == "counting":
        near = [n for n in COUNTS if abs(n - spec.count) == 1]
        return SceneSpec("counting", (a,), count=pick(near))
    if spec.task == "colors":
        return SceneSpec("colors", (Obj(a.shape, pick([c for c in COLORS if c != a.color])),))
    if spec.task == "position":
        return SceneSpec("position", spec.objects, relation=_FLIP[spec.relation])
    b = spec.objects[1]  # color_attr: each colour on the other shape
    return SceneSpec("color_attr", (Obj(a.shape, b.color), Obj(b.shape, a.color)))


def render_dataset(
    captions: list[str], renders: int, seed: int, caption_noise: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [-1, 1] (N, 3, 32, 32) and the caption index of each. With ``caption_noise`` p,
    each render independently shows :func:`mistake` of its caption with probability p."""
    from dancecore_shapes import scenes

    images, index = [], []
    noise_rng = np.random.default_rng(seed + 7)
    for c, text in enumerate(captions):
        spec = scenes.parse_caption(text)
        for r in range(renders):
            shown = mistake(spec, noise_rng) if noise_rng.random() < caption_noise else spec
            images.append(scenes.render(shown, size=32, seed=seed * 1_000_003 + c * 1009 + r))
            index.append(c)
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() * 2 - 1
    return pixels.contiguous(), torch.tensor(index)


# ------------------------------------------------------------------------------------ models


def pack(latents: torch.Tensor) -> torch.Tensor:
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def image_ids(latent_side: int) -> torch.Tensor:
    side = latent_side // 2
    ids = torch.zeros(side, side, 3)
    ids[..., 1] += torch.arange(side)[:, None]
    ids[..., 2] += torch.arange(side)[None, :]
    return ids.reshape(side * side, 3)


class TextEncoders:
    """Tokenise and encode exactly as FluxPolicy.encode_prompts does (with gradients here)."""

    def __init__(self, root: Path, clip, t5) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
        self.tokenizer_2 = AutoTokenizer.from_pretrained(root / "tokenizer_2", local_files_only=True)
        self.clip, self.t5 = clip, t5

    def ids(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        kw = {"padding": "max_length", "truncation": True, "return_tensors": "pt"}
        clip_ids = self.tokenizer(texts, max_length=self.tokenizer.model_max_length, **kw).input_ids
        t5_ids = self.tokenizer_2(texts, max_length=MAX_TOKENS, **kw).input_ids
        return clip_ids, t5_ids

    def __call__(self, clip_ids: torch.Tensor, t5_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.clip(clip_ids, output_hidden_states=False).pooler_output
        embeds = self.t5(t5_ids, output_hidden_states=False)[0]
        return embeds, pooled


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------------------------ stages


def train_vae(
    vae, pixels: torch.Tensor, steps: int, batch: int, lr: float, kl_weight: float, gen, deadline: float, log
):
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / 50) * (0.5 * (1 + math.cos(math.pi * i / steps)))
    )
    vae.train()
    for step in range(steps):
        idx = torch.randint(0, pixels.shape[0], (batch,), generator=gen)
        x = pixels[idx]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        rec_loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x)
        kl = 0.5 * (posterior.mean.square() + posterior.var - 1.0 - posterior.logvar).mean()
        loss = rec_loss + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step}/{steps} rec {rec_loss.item():.4f} kl {kl.item():.3f}")
        if time.monotonic() > deadline:
            log(f"vae: time cap reached at step {step}")
            break
    vae.eval()


@torch.no_grad()
def encode_all(vae, pixels: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for i in range(0, pixels.shape[0], batch):
        post = vae.encode(pixels[i : i + batch]).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


def train_flow(
    transformer,
    text: TextEncoders,
    latents,
    lat_std,
    index,
    captions,
    steps,
    batch,
    lr,
    gen,
    deadline,
    log,
    on_step=None,
):
    params = [*transformer.parameters(), *text.clip.parameters(), *text.t5.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / 100) * (0.5 * (1 + math.cos(math.pi * i / steps)))
    )
    clip_ids, t5_ids = text.ids(captions)
    ids = image_ids(latents.shape[-1])
    txt_ids = torch.zeros(MAX_TOKENS, 3)
    for module in (transformer, text.clip, text.t5):
        module.train()
    ema = None
    for step in range(steps):
        idx = torch.randint(0, latents.shape[0], (batch,), generator=gen)
        z = latents[idx] + lat_std[idx] * torch.randn(latents[idx].shape, generator=gen)
        x0 = pack(z)
        noise = torch.randn(x0.shape, generator=gen)
        u = torch.rand(batch, generator=gen)
        s = SHIFT * u / (1 + (SHIFT - 1) * u)
        xt = (1 - s)[:, None, None] * x0 + s[:, None, None] * noise
        c = index[idx]
        embeds, pooled = text(clip_ids[c], t5_ids[c])
        v = transformer(
            hidden_states=xt,
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            timestep=s,
            img_ids=ids,
            txt_ids=txt_ids,
            guidance=torch.full((batch,), GUIDANCE),
            return_dict=False,
        )[0]
        loss = F.mse_loss(v, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if on_step is not None:
            on_step(step + 1)
        if step % 100 == 0 or step == steps - 1:
            log(f"flow step {step}/{steps} loss {loss.item():.4f} (ema {ema:.4f})")
        if time.monotonic() > deadline:
            log(f"flow: time cap reached at step {step}")
            break
    for module in (transformer, text.clip, text.t5):
        module.eval()


# ------------------------------------------------------------------------------------ main


def pretrain(
    out: Path,
    seed: int = 0,
    minutes: float | None = None,
    prompts: Path | None = None,
    snapshots: tuple[int, ...] = (),
    vae_from: Path | None = None,
    **overrides,
) -> dict:
    """Run every stage and write the diffusers directory to ``out``; returns a summary dict."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    hp = {**DEFAULTS, **{k: v for k, v in overrides.items() if v is not None}}
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    start = time.monotonic()
    budget = (minutes * 60) if minutes else float("inf")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log_lines: list[str] = []

    def log(msg: str) -> None:
        line = f"[{time.monotonic() - start:7.1f}s] {msg}"
        print(line, flush=True)
        log_lines.append(line)

    words = vocabulary()
    tok_ids = write_word_tokenizer(out / "tokenizer", words, bos=True)
    write_word_tokenizer(out / "tokenizer_2", words, bos=False)
    captions = corpus_captions(hp["corpus"], prompts)
    pixels, index = render_dataset(captions, hp["renders"], seed, hp["caption_noise"])
    log(
        f"{len(words)} words, {len(captions)} captions ({hp['corpus']}), {pixels.shape[0]} renders, "
        f"caption noise {hp['caption_noise']}"
    )

    if vae_from is not None:  # stage 1 already done (same seed and data): reuse its VAE
        vae = AutoencoderKL.from_pretrained(Path(vae_from) / "vae", local_files_only=True).eval()
        log(f"vae loaded from {vae_from}")
    else:
        vae = AutoencoderKL(**SPEC["vae"])
        train_vae(
            vae, pixels, hp["vae_steps"], hp["vae_batch"], hp["vae_lr"], hp["kl_weight"], gen, start + 0.3 * budget, log
        )
    means, stds = encode_all(vae, pixels)
    shift_factor = float(means.mean())
    scaling_factor = float(1.0 / (means - shift_factor).square().add(stds.square()).mean().sqrt())
    vae.register_to_config(shift_factor=shift_factor, scaling_factor=scaling_factor)
    latents = (means - shift_factor) * scaling_factor
    lat_std = stds * scaling_factor
    log(f"vae done: shift {shift_factor:.4f} scale {scaling_factor:.4f}")
    vae_time = time.monotonic() - start

    torch.manual_seed(seed + 1)  # stage 2 has its own seeds: it does not depend on how stage 1 ran
    gen = torch.Generator().manual_seed(seed + 1)
    clip = CLIPTextModel(CLIPTextConfig(**SPEC["clip"], **tok_ids))
    t5 = T5EncoderModel(T5Config(**SPEC["t5"], **tok_ids, decoder_start_token_id=0))
    transformer = FluxTransformer2DModel(**SPEC["transformer"])
    text = TextEncoders(out, clip, t5)
    vae.save_pretrained(out / "vae")

    def save(root: Path) -> None:
        if root != out:
            for part in ("vae", "tokenizer", "tokenizer_2"):
                shutil.copytree(out / part, root / part, dirs_exist_ok=True)
        for module, part in ((clip, "text_encoder"), (t5, "text_encoder_2"), (transformer, "transformer")):
            module.save_pretrained(root / part)

    def on_step(step: int) -> None:  # optional intermediate copies, for choosing the budget
        if step in snapshots and step < hp["flow_steps"]:
            save(out / "snapshots" / f"step-{step}")
            for module in (transformer, clip, t5):
                module.train()

    train_flow(
        transformer, text, latents, lat_std, index, captions,
        hp["flow_steps"], hp["flow_batch"], hp["flow_lr"], gen, start + budget, log, on_step,
    )  # fmt: skip
    total = time.monotonic() - start
    save(out)
    summary = {
        "seed": seed,
        "hyperparameters": hp,
        "spec": SPEC,
        "parameters": {
            "transformer": count(transformer),
            "vae": count(vae),
            "text_encoder": count(clip),
            "text_encoder_2": count(t5),
        },
        "vae_seconds": round(vae_time, 1),
        "total_seconds": round(total, 1),
        "corpus": hp["corpus"],
        "captions": len(captions),
        "vae_from": None if vae_from is None else str(vae_from),
        "renders": int(pixels.shape[0]),
        "torch": torch.__version__,
    }
    (out / "pretrain.json").write_text(json.dumps(summary, indent=1))
    (out / "pretrain.log").write_text("\n".join(log_lines) + "\n")
    log(f"wrote {out}: {summary['parameters']}")
    return summary


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m dancecore_shapes.pretrain", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="output diffusers directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--minutes", type=float, default=None, help="wall-clock cap (the step counts are the budget)")
    p.add_argument(
        "--prompts", type=Path, default=None, help="training prompts (default configs/prompts/shapes_train.txt)"
    )
    p.add_argument("--vae-from", type=Path, default=None, help="reuse the vae/ of an earlier run (skips stage 1)")
    p.add_argument("--snapshots", type=str, default="", help="comma-separated flow steps to save copies at")
    for key, value in DEFAULTS.items():
        p.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=None, help=f"default {value}")
    args = vars(p.parse_args(argv))
    snaps = tuple(int(x) for x in args.pop("snapshots").split(",") if x)
    pretrain(
        args.pop("out"), args.pop("seed"), args.pop("minutes"), args.pop("prompts"), snaps, args.pop("vae_from"), **args
    )


if __name__ == "__main__":
    main()
