"""The reference GRPO loop, written the way the public research training script runs it.

A plain, single-file re-implementation (no dancecore component is used, only dancecore's seed
derivation so that both loops draw *identical* noise and can be compared number for number):

- every sample encodes its prompt again (CLIP pooled + T5 sequence embeddings), batch 1;
- every sample is rolled out alone (batch 1), its log-probabilities stored as the "old" ones;
- every sample is decoded and scored alone;
- advantages are normalised per group;
- training runs one (sample, timestep) pair at a time (batch 1), the loss scaled by
  ``1 / (accumulation * timesteps)``, one clipped AdamW step after all samples of the iteration.

The knobs (``encode_per_sample``, ``rollout_batch``, ``train_batch``, ``recompute_old_log_probs``,
``sde_window``) exist to measure each optimisation on its own, as a ladder from this reference
to dancecore's loop; their defaults are the reference behaviour. Only tiny FLUX (the policy
the performance targets are set on) is supported.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from dancecore.functional.seeding import generator


@dataclass(frozen=True)
class ReferenceSettings:
    """What the reference loop runs; defaults follow the research script."""

    group_size: int = 8
    num_steps: int = 16
    shift: float = 3.0
    eta: float = 0.3
    guidance: float = 3.5
    clip_range: float = 1e-4
    advantage_clip: float = 5.0
    timestep_fraction: float = 0.6
    learning_rate: float = 1e-5
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    seed: int = 0
    resolution: int = 32
    max_sequence_length: int = 32
    encode_per_sample: bool = True
    rollout_batch: int = 1
    train_batch: int = 1
    recompute_old_log_probs: bool = False
    sde_window: int | None = None


@dataclass
class ReferenceIteration:
    """Everything one iteration produced, for the equivalence check."""

    latents: torch.Tensor  # (B, N + 1, L, D)
    log_probs: torch.Tensor  # (B, N)
    rewards: torch.Tensor  # (B,)
    advantages: torch.Tensor  # (B,)
    trained_steps: torch.Tensor  # (B, k)
    new_log_probs: torch.Tensor  # (B, k), before the update
    ratios: torch.Tensor  # (B, k)
    grad_norm: float


def flux_sigmas(num_steps: int, shift: float) -> torch.Tensor:
    """``linspace(1, 0, N + 1)`` with the SD3 time shift."""
    s = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return (shift * s / (1.0 + (shift - 1.0) * s)).float()


def sde_step(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    eta: float,
    noise: torch.Tensor | None = None,
    x_next: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One stochastic flow step: (next latent, averaged Gaussian log-prob, x0 estimate)."""
    x, v = x.float(), v.float()
    sigma = sigma.float().reshape(-1, *([1] * (x.ndim - 1)))
    sigma_next = sigma_next.float().reshape(-1, *([1] * (x.ndim - 1)))
    delta = sigma - sigma_next
    x0 = x - sigma * v
    score = -(x - (1.0 - sigma) * x0) / sigma**2
    mean = x - delta * v + 0.5 * eta**2 * delta * score
    std = eta * torch.sqrt(delta)
    if x_next is None:
        assert noise is not None
        x_next = mean + std * noise
    elementwise = -((x_next.detach() - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return x_next, elementwise.mean(dim=tuple(range(1, x.ndim))), x0


def ode_step(
    x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Euler step of the flow ODE: (next latent, x0 estimate)."""
    x, v = x.float(), v.float()
    return x - (sigma - sigma_next) * v, x - sigma * v


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, HW/4, 4C), FLUX's 2x2 patches."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, 4 * c)


def unpack(latents: torch.Tensor, side: int) -> torch.Tensor:
    """(B, HW/4, 4C) -> (B, C, H, W)."""
    b, _, d = latents.shape
    c = d // 4
    return latents.view(b, side // 2, side // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, side, side)


def brightness(images: torch.Tensor) -> torch.Tensor:
    """Mean BT.601 luma of (B, 3, H, W) images in [0, 1]."""
    r, g, b = images[:, 0], images[:, 1], images[:, 2]
    return (0.299 * r + 0.587 * g + 0.114 * b).mean(dim=(1, 2))


class ReferenceLoop:
    """Tiny FLUX trained by the reference loop; ``iteration(it, prompts)`` runs one GRPO iteration."""

    def __init__(self, model_dir: Path, settings: ReferenceSettings, device: str = "cpu") -> None:
        from diffusers import AutoencoderKL, FluxTransformer2DModel
        from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

        self.s = settings
        self.device = torch.device(device)
        local = {"local_files_only": True}
        self.clip_tokenizer = AutoTokenizer.from_pretrained(model_dir / "tokenizer", **local)
        self.t5_tokenizer = AutoTokenizer.from_pretrained(model_dir / "tokenizer_2", **local)
        self.clip = CLIPTextModel.from_pretrained(model_dir / "text_encoder", **local).eval().to(self.device)
        self.t5 = T5EncoderModel.from_pretrained(model_dir / "text_encoder_2", **local).eval().to(self.device)
        self.vae = AutoencoderKL.from_pretrained(model_dir / "vae", **local).eval().to(self.device)
        self.transformer = FluxTransformer2DModel.from_pretrained(model_dir / "transformer", **local).to(self.device)
        for frozen in (self.clip, self.t5, self.vae):
            frozen.requires_grad_(False)
        self.transformer.train()
        self.optimizer = torch.optim.AdamW(
            self.transformer.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay
        )
        vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.side = 2 * (settings.resolution // (vae_scale * 2))
        self.channels = self.transformer.config.in_channels // 4
        half = self.side // 2
        ids = torch.zeros(half, half, 3)
        ids[..., 1] += torch.arange(half)[:, None]
        ids[..., 2] += torch.arange(half)[None, :]
        self.image_ids = ids.reshape(half * half, 3).to(self.device)
        self.sigmas = flux_sigmas(settings.num_steps, settings.shift)
        self.phase_times: dict[str, float] = {}  # wall seconds of the last iteration's parts
        #: scores (B, 3, H, W) images against their prompts; brightness unless replaced (benchmarks/algorithms.py)
        self.reward: Callable[[torch.Tensor, list[str]], torch.Tensor] = lambda images, _prompts: brightness(images)

    # ------------------------------------------------------------------------------ pieces

    @torch.no_grad()
    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """T5 sequence embeddings, CLIP pooled embedding and text ids."""
        clip_ids = self.clip_tokenizer(
            texts,
            padding="max_length",
            max_length=self.clip_tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        pooled = self.clip(clip_ids, output_hidden_states=False).pooler_output.float()
        t5_ids = self.t5_tokenizer(
            texts, padding="max_length", max_length=self.s.max_sequence_length, truncation=True, return_tensors="pt"
        ).input_ids.to(self.device)
        embeds = self.t5(t5_ids, output_hidden_states=False)[0].float()
        return embeds, pooled, torch.zeros(embeds.shape[1], 3, device=self.device)

    def velocity(
        self, x: torch.Tensor, sigma: torch.Tensor, text: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        """The transformer's prediction for a batch (sigma per row)."""
        embeds, pooled, text_ids = text
        b = x.shape[0]
        return self.transformer(
            hidden_states=x,
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            timestep=sigma.to(self.device),
            img_ids=self.image_ids,
            txt_ids=text_ids,
            guidance=torch.full((b,), self.s.guidance, device=self.device),
            return_dict=False,
        )[0]

    @torch.no_grad()
    def decode(self, packed: torch.Tensor) -> torch.Tensor:
        """Packed clean latents -> images in [0, 1]."""
        cfg = self.vae.config
        latents = unpack(packed, self.side) / cfg.scaling_factor + (cfg.shift_factor or 0.0)
        return (self.vae.decode(latents, return_dict=False)[0].float() / 2 + 0.5).clamp(0, 1)

    def stochastic(self, iteration: int) -> torch.Tensor:
        """Which steps are SDE steps (all of them, or a window sweeping the schedule)."""
        n, w = self.s.num_steps, self.s.sde_window
        mask = torch.ones(n, dtype=torch.bool)
        if w is not None:
            start = iteration % max(1, n - w)
            mask[:] = False
            mask[start : start + w] = True
        return mask

    # ----------------------------------------------------------------------------- the loop

    def iteration(self, iteration: int, prompts: list[str]) -> ReferenceIteration:
        """One GRPO iteration over ``prompts`` (one group of G samples per prompt)."""
        s, g, n = self.s, self.s.group_size, self.s.num_steps
        total = len(prompts) * g
        stochastic = self.stochastic(iteration)
        per_prompt = None if s.encode_per_sample else [self.encode([p]) for p in prompts]

        began = time.perf_counter()
        # Rollout: `rollout_batch` samples at a time (1 in the reference), old log-probs stored.
        latents = torch.zeros(total, n + 1, (self.side // 2) ** 2, 4 * self.channels)
        log_probs = torch.zeros(total, n)
        finals = torch.zeros(total, *latents.shape[2:])
        texts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for start in range(0, total, s.rollout_batch):
            ids = list(range(start, min(start + s.rollout_batch, total)))
            prompt_of = [i // g for i in ids]
            if per_prompt is None:
                parts = [self.encode([prompts[p]]) for p in prompt_of]
            else:
                parts = [per_prompt[p] for p in prompt_of]
            text = (torch.cat([t[0] for t in parts]), torch.cat([t[1] for t in parts]), parts[0][2])
            texts.extend([(t[0], t[1], t[2]) for t in parts])
            x = torch.cat(
                [
                    pack(
                        torch.randn(
                            (1, self.channels, self.side, self.side), generator=generator(s.seed, "init", iteration, p)
                        )
                    )
                    for p in prompt_of
                ]
            ).to(self.device)
            gens = [generator(s.seed, "sde", iteration, i) for i in ids]
            latents[ids, 0] = x.cpu()
            with torch.no_grad():
                for step in range(n):
                    noise = torch.stack([torch.randn(x.shape[1:], generator=gen) for gen in gens]).to(self.device)
                    sigma = self.sigmas[step].expand(len(ids))
                    v = self.velocity(x, sigma, text)
                    if stochastic[step]:
                        x, lp, x0 = sde_step(x, v, self.sigmas[step], self.sigmas[step + 1], s.eta, noise=noise)
                        log_probs[ids, step] = lp.cpu()
                    else:
                        x, x0 = ode_step(x, v, self.sigmas[step], self.sigmas[step + 1])
                    latents[ids, step + 1] = x.cpu()
            finals[ids] = x0.cpu()

        rolled = time.perf_counter()  # (includes the per-sample prompt encoding)
        # Rewards, one sample at a time; advantages per group.
        rewards = torch.cat(
            [
                self.reward(self.decode(finals[i : i + 1].to(self.device)), [prompts[i // g]]).float().cpu()
                for i in range(total)
            ]
        )
        advantages = torch.zeros(total)
        for p in range(len(prompts)):
            r = rewards[p * g : (p + 1) * g]
            if not bool((r == r[0]).all()):
                advantages[p * g : (p + 1) * g] = (r - r.mean()) / (r.std() + 1e-8)
        advantages = advantages.clamp(-s.advantage_clip, s.advantage_clip)

        scored = time.perf_counter()
        # Training: a random fraction of the trainable steps of each sample, `train_batch` pairs at a
        # time (1 in the reference), one optimizer step after all samples.
        candidates = torch.nonzero(stochastic[:-1]).flatten()
        count = max(1, int(s.timestep_fraction * candidates.numel()))
        trained = torch.stack(
            [
                candidates[
                    torch.randperm(candidates.numel(), generator=generator(s.seed, "steps", iteration, i))[:count]
                ]
                for i in range(total)
            ]
        )
        pairs = [(i, c, int(t)) for i in range(total) for c, t in enumerate(trained[i])]
        old_log_probs = log_probs
        if s.recompute_old_log_probs:  # what a naive PPO port does: one more no-grad pass per pair
            old_log_probs = log_probs.clone()
            with torch.no_grad():
                for chunk in _chunks(pairs, s.train_batch):
                    rows, steps = [i for i, _, _ in chunk], [t for _, _, t in chunk]
                    old_log_probs[rows, steps] = self._pair_log_probs(chunk, latents, texts).cpu()
        new_log_probs = torch.zeros(total, count)
        ratios = torch.zeros(total, count)
        scale = 1.0 / (total * count)
        for chunk in _chunks(pairs, s.train_batch):
            rows, columns, steps = [i for i, _, _ in chunk], [c for _, c, _ in chunk], [t for _, _, t in chunk]
            log_prob = self._pair_log_probs(chunk, latents, texts)
            ratio = torch.exp(log_prob - old_log_probs[rows, steps].to(self.device))
            adv = advantages[rows].to(self.device)
            loss = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - s.clip_range, 1 + s.clip_range))
            (loss.sum() * scale).backward()
            new_log_probs[rows, columns] = log_prob.detach().cpu()
            ratios[rows, columns] = ratio.detach().cpu()
        norm = float(torch.nn.utils.clip_grad_norm_(self.transformer.parameters(), s.grad_clip))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        done = time.perf_counter()
        self.phase_times = {"rollout": rolled - began, "decode+reward": scored - rolled, "update": done - scored}
        return ReferenceIteration(latents, log_probs, rewards, advantages, trained, new_log_probs, ratios, norm)

    def _pair_log_probs(
        self,
        chunk: list[tuple[int, int, int]],
        latents: torch.Tensor,
        texts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        """Log-probabilities of the stored transitions of (sample, column, step) pairs, with grad."""
        rows = [i for i, _, _ in chunk]
        steps = torch.tensor([t for _, _, t in chunk])
        x = latents[rows, steps].to(self.device)
        x_next = latents[rows, steps + 1].to(self.device)
        text = (torch.cat([texts[i][0] for i in rows]), torch.cat([texts[i][1] for i in rows]), texts[rows[0]][2])
        v = self.velocity(x, self.sigmas[steps], text)
        return sde_step(x, v, self.sigmas[steps], self.sigmas[steps + 1], self.s.eta, x_next=x_next)[1]


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]
