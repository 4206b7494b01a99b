"""Scoring overlapped with the rollout (``train.overlap_reward``).

The update needs every reward of the iteration, so the next iteration cannot start early without
going off-policy. What can overlap is this iteration's own work: as soon as a micro-batch's last
step is done, it is decoded and handed to a background thread that scores it (under the reward-
failure policy) while the main thread rolls out the next micro-batches. A slow reward (a remote
server, a large judge on other GPUs) then costs only what is left after the last micro-batch.

The scores equal the non-overlapped ones for rewards whose score of a sample does not depend on
the other samples of its batch (what ``check_reward_plugin`` checks); the reward sees micro-batches
instead of the whole batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from dancecore.config.schema import RewardFailureConfig
from dancecore.contracts.protocols import Policy
from dancecore.training.scoring import NamedReward, ScoringResult, merge_parts, score_part

Part = list[tuple[torch.Tensor, torch.Tensor, int]]


class OverlappedScoring:
    """Decodes each finished micro-batch and scores it in a background thread (one worker: the
    rewards see the micro-batches one at a time, in order)."""

    def __init__(
        self,
        policy: Policy,
        rewards: Sequence[NamedReward],
        texts: Callable[[slice], list[str]],
        failure_policy: RewardFailureConfig,
    ) -> None:
        self.policy, self.rewards, self.texts, self.failure_policy = policy, rewards, texts, failure_policy
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="overlapped-reward")
        self.pixels: list[torch.Tensor] = []
        self.parts: list[Future[Part]] = []

    @torch.no_grad()
    def on_micro_batch(self, rows: slice, final: torch.Tensor) -> None:
        """Decode ``final`` (the micro-batch's clean latents) and queue its scoring."""
        pixels = self.policy.decode(final).cpu()
        self.pixels.append(pixels)
        self.parts.append(self.pool.submit(score_part, self.rewards, pixels, self.texts(rows), self.failure_policy))

    def decoded(self) -> torch.Tensor:
        """Every sample's pixels, in row order."""
        return torch.cat(self.pixels)

    def result(self, group_ids: torch.Tensor) -> ScoringResult:
        """Wait for every part; raises the first part's :class:`~dancecore.errors.RewardFailure`."""
        try:
            return merge_parts(self.rewards, [part.result() for part in self.parts], group_ids)
        finally:
            self.close()

    def close(self) -> None:
        """Stop the worker (parts not started are dropped)."""
        self.pool.shutdown(wait=False, cancel_futures=True)
