"""Seconds per iteration saved by ``train.overlap_reward`` with a slow remote reward.

    python -m benchmarks.overlap                     # tiny FLUX, G=8, 4 micro-batches of 2, 40 ms/sample
    python -m benchmarks.overlap --delay-ms 100 --rounds 5

A real reward server (the ``serve-reward`` application under uvicorn, on a loopback ephemeral
port, in its own process) serves brightness behind a latency of ``--delay-ms`` per sample: a reward
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
import time
from pathlib import Path
from typing import Any

import httpx
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


def _serve(delay_s: float, ports: Any) -> None:
    """The server process: slow brightness under uvicorn on a loopback ephemeral port."""
    import uvicorn

    from dancecore.serving.server import ServedReward, ServerLimits, build_app

    torch.set_num_threads(1)
    reward = ServedReward("slow-brightness", "brightness", SlowBrightness(delay_s), 64, {})
    app = build_app([reward], ServerLimits(), None, "bench")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    ports.put(sock.getsockname()[1])
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])


def start_server(delay_s: float) -> tuple[str, Any]:
    """A served slow brightness in its own process (as a remote reward would be); its URL and process."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    ports = context.Queue()
    process = context.Process(target=_serve, args=(delay_s, ports), daemon=True)
    process.start()
    url = f"http://127.0.0.1:{ports.get(timeout=120)}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/v1/health", timeout=1).status_code == 200:
                return url, process
        except httpx.TransportError:
            time.sleep(0.1)
    raise RuntimeError("the benchmark's reward server did not start")


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
    server.terminate()
    server.join(10)
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
