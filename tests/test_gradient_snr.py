"""benchmarks/gradient_snr.py: its estimator on known gradients, and one real measurement."""

from __future__ import annotations

import torch

from benchmarks.gradient_snr import gradients, summary


def test_estimator_recovers_a_known_signal_share() -> None:
    gen = torch.Generator().manual_seed(0)
    mu = torch.randn(20_000, generator=gen)
    pure = [mu.clone() for _ in range(4)]
    assert abs(summary(pure)["pairwise_cosine_mean"] - 1.0) < 1e-6
    noisy = [mu + 3.0 * torch.randn(20_000, generator=gen) for _ in range(6)]  # |mu|^2 / E|g|^2 = 1/10
    figures = summary(noisy)
    assert abs(figures["pairwise_cosine_mean"] - 0.1) < 0.02
    assert abs(figures["batches_for_equal_signal_and_noise"] - 9.0) < 2.5
    noise = [torch.randn(20_000, generator=gen) for _ in range(6)]
    assert abs(summary(noise)["pairwise_cosine_mean"]) < 0.03


def test_gradients_are_taken_at_fixed_weights(tmp_path) -> None:
    import yaml

    from tests.conftest import TINY_RUN

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({**TINY_RUN, "output_dir": str(tmp_path / "out")}))
    grads = gradients(config, ["train.iterations=3"], 3, tmp_path / "out")
    assert len(grads) == 3 and all(bool(g.isfinite().all()) and float(g.norm()) > 0 for g in grads)
    assert not torch.equal(grads[0], grads[1]), "each batch has its own rollouts"
