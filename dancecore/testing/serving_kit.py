"""Serving a reward in a test: the ``serve-reward`` application on a loopback port of this process.

from dancecore.testing import check_served_reward

def test_my_reward_can_be_served(my_reward):
    check_served_reward(my_reward)   # remote scores == local scores, bit for bit
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from dancecore.serving.client import RemoteReward
from dancecore.serving.server import ServedReward, ServerLimits, build_app
from dancecore.testing.helpers import DEFAULT_PROMPTS, sample_images


@contextmanager
def serve_rewards(rewards: dict[str, Any], *, batch_size: int = 32, token: str | None = None) -> Iterator[str]:
    """Serve built reward components (served name -> component) with uvicorn in a thread on a
    loopback ephemeral port; yields the server's URL and stops it afterwards."""
    import uvicorn

    served = [ServedReward(name, name, component, batch_size, {}) for name, component in rewards.items()]
    app = build_app(served, ServerLimits(), token, "test")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="reward-server")
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test reward server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def check_served_reward(
    reward: Any, samples: torch.Tensor | None = None, prompts: Sequence[str] | None = None, *, batch_size: int = 32
) -> torch.Tensor:
    """Check that ``reward`` (a built component) scores the same served over HTTP (safetensors
    encoding, through the ``remote`` reward) as called directly, bit for bit; returns the scores."""
    samples = sample_images(4, 32) if samples is None else samples
    n = samples.shape[0]
    prompts = list(prompts) if prompts is not None else [DEFAULT_PROMPTS[i % len(DEFAULT_PROMPTS)] for i in range(n)]
    local = torch.as_tensor(reward.score(samples, prompts)).float()
    with serve_rewards({"under-test": reward}, batch_size=batch_size) as url:
        remote = RemoteReward(RemoteReward.Config(url=url, reward="under-test", token_env=None))
        try:
            served = remote.score(samples, prompts)
        finally:
            remote.close()
    assert torch.equal(served, local), f"served scores {served.tolist()} differ from local scores {local.tolist()}"
    return served
