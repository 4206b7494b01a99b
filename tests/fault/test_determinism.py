"""Same seed, same run: identical weights and reward curve, with 1 and with 2 threads; the
importance ratio is exactly 1 at the first inner step."""

from __future__ import annotations

import torch


def _run(tiny_run, name: str, threads: int, ratios: list[torch.Tensor] | None = None):
    from dancecore.training.trainer import Trainer

    trainer = Trainer(tiny_run(name, train={"iterations": 3, "num_threads": threads}))
    if ratios is not None:
        real_loss = trainer.algorithm.loss

        def recording(new, old, adv):
            result = real_loss(new, old, adv)
            ratios.append(result.ratio.detach().clone())
            return result

        trainer.algorithm.loss = recording
    trainer.train()
    weights = {k: v.clone() for k, v in trainer.engine.model_state().items()}
    curve = [(r["reward_mean"], r["loss"], r["grad_norm"]) for r in trainer.metrics.read()]
    return weights, curve


def _same(a, b) -> bool:
    return a[1] == b[1] and a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0])


def test_same_seed_twice_is_identical_with_1_and_2_threads(tiny_run, fault_report):
    threads_before = torch.get_num_threads()
    try:
        ratios: list[torch.Tensor] = []
        one_a = _run(tiny_run, "one-a", 1, ratios)
        one_b = _run(tiny_run, "one-b", 1)
        two_a = _run(tiny_run, "two-a", 2)
        two_b = _run(tiny_run, "two-b", 2)
    finally:
        torch.set_num_threads(threads_before)
    first_inner_step_rho_is_one = bool((ratios[0] == 1.0).all())
    across = _same(one_a, two_a)
    ok = _same(one_a, one_b) and _same(two_a, two_b) and first_inner_step_rho_is_one
    fault_report.row(
        "same seed twice (1 and 2 threads)",
        f"identical weights + reward curve at 1 and at 2 threads; 1 vs 2 threads {'identical' if across else 'differ'}; "
        f"rho == 1 at first inner step: {first_inner_step_rho_is_one}",
        ok,
    )
    assert ok
