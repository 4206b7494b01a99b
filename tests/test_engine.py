"""The single-process engine: clipping and the (fused) AdamW update against torch's plain AdamW."""

from __future__ import annotations

import torch

from dancecore.config.schema import TrainConfig
from dancecore.training.engine import LocalEngine


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def test_local_engine_updates_like_plain_adamw_with_clipping():
    train = TrainConfig(iterations=1, learning_rate=1e-2, weight_decay=1e-2, grad_clip=0.5)
    ours, theirs = _model(0), _model(0)
    engine = LocalEngine(ours, train)
    assert engine.optimizer.defaults["fused"]  # one fused kernel on CPU
    plain = torch.optim.AdamW(
        theirs.parameters(), lr=1e-2, betas=train.adam_betas, eps=train.adam_eps, weight_decay=1e-2, foreach=False
    )
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        x = torch.randn(8, 6, generator=g)
        engine.backward(ours(x).square().sum())
        norm = engine.step()
        theirs(x).square().sum().backward()
        expected = float(torch.nn.utils.clip_grad_norm_(list(theirs.parameters()), 0.5))
        plain.step()
        plain.zero_grad(set_to_none=True)
        assert abs(norm - expected) <= 1e-5 * expected
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
        assert a.grad is None  # gradients are dropped after each step


def test_optimizer_checkpoint_is_engine_neutral_and_resumes_fused():
    train = TrainConfig(iterations=1, learning_rate=1e-2)
    engine = LocalEngine(_model(0), train)
    engine.backward(engine.module(torch.ones(2, 6)).sum())
    engine.step()
    tensors, meta = engine.optimizer_state()
    assert not {"fused", "foreach"} & set(meta["param_groups"][0])  # how to compute is not saved
    resumed = LocalEngine(_model(0), train)
    resumed.load_state(engine.model_state(), tensors, meta)
    assert resumed.optimizer.param_groups[0]["fused"] is True  # the engine keeps its own kernel choice
    assert torch.equal(resumed.optimizer.state_dict()["state"][0]["exp_avg"], tensors["0.exp_avg"])
