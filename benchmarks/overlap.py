"""Seconds per iteration saved by ``train.overlap_reward`` with a slow remote reward.

    python -m benchmarks.overlap                     # tiny FLUX, G=8, 4 micro-batches of 2, 40 ms/sample
    python -m benchmarks.overlap --delay-ms 100 --rounds 5

A real reward server (the ``serve-reward`` application under uvicorn, on a loopback ephemeral
port, in this process) serves brightness behind a latency of ``--delay-ms`` per sample: a reward
model busy on another machine. The same tiny-FLUX trainer configuration runs with the ``remote``
reward, scoring after the rollout (plain) and scoring each micro-batch while the rest rolls out
(overlap), in interleaved rounds; the medians and their difference are printed and written to
``benchmarks/results/overlap.json``. Both runs compute the same numbers (tests/test_overlap.py).
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.cases import build_trainer
from benchmarks.measure import machine
from dancecore.builtins.rewards import Brightness

RESULTS = Path(__file__).resolve().parent / "results"


class SlowBrightness:
    """Brightness, after ``delay_s`` seconds per sample (the reward's own compute time, elsewhere)."""

    def __init__(self, delay_s: float) -> None:
        self.inner = Brightness(Brightness.Config())
        self.delay_s = delay_s

    def score(self, samples: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        time.sleep(self.delay_s * samples.shape[0])
        return self.inner.score(samples, prompts)


def start_server(delay_s: float) -> tuple[str, Any]:
    """A served slow brightness on a loopback ephemeral port; returns its URL and the uvicorn server."""
    import uvicorn

    from dancecore.serving.server import ServedReward, ServerLimits, build_app

    reward = ServedReward("slow-brightness", "brightness", SlowBrightness(delay_s), 64, {})
    app = build_app([reward], ServerLimits(), None, "bench")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{sock.getsockname()[1]}", server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delay-ms", type=float, default=40.0, help="reward latency per sample")
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    url, server = start_server(args.delay_ms / 1000.0)
    reward = f"rewards=[{{name: remote, label: brightness, url: '{url}', reward: slow-brightness}}]"
    common = [reward, f"train.micro_batch_size={args.micro_batch}", "train.checkpoint_every=1000"]
    trainers = {
        "plain": build_trainer(common, args.threads),
        "overlap": build_trainer([*common, "train.overlap_reward=true"], args.threads),
    }
    times: dict[str, list[float]] = {name: [] for name in trainers}
    reward_wait: dict[str, list[float]] = {name: [] for name in trainers}
    for trainer in trainers.values():  # warm-up (first-call costs), not measured
        trainer.iteration(0)
    for it in range(1, args.rounds + 1):
        for name, trainer in trainers.items():
            began = time.perf_counter()
            trainer.iteration(it)
            times[name].append(time.perf_counter() - began)
            reward_wait[name].append(trainer.phase_times.get("reward", 0.0))
    server.should_exit = True
    plain, overlap = statistics.median(times["plain"]), statistics.median(times["overlap"])
    samples = trainers["plain"].group_size * len(trainers["plain"].local_prompts(0))
    result = {
        "setting": {
            "policy": "flux tiny",
            "samples": samples,
            "micro_batch_size": args.micro_batch,
            "reward_delay_ms_per_sample": args.delay_ms,
            "rounds": args.rounds,
        },
        "seconds_per_iteration": {"plain": plain, "overlap": overlap},
        "reward_wait_s": {k: statistics.median(v) for k, v in reward_wait.items()},
        "saved_s_per_iteration": plain - overlap,
        "ratio_overlap_to_plain": overlap / plain,
        "machine": machine(),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "overlap.json").write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"{samples} samples in micro-batches of {args.micro_batch}, remote reward {args.delay_ms:g} ms/sample: "
        f"plain {plain:.2f} s/iteration (waiting {result['reward_wait_s']['plain']:.2f} s for rewards), "
        f"overlap {overlap:.2f} s (waiting {result['reward_wait_s']['overlap']:.2f} s): "
        f"saved {plain - overlap:.2f} s per iteration ({overlap / plain:.2f}x)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
