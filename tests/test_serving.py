"""Rewards served by a real ``dancecore serve-reward`` on loopback: the remote scores equal the
local ones bit for bit, several clients at once are batched and answered correctly, metadata and
health answer, and the quickstart trains through a served reward with the local run's metrics."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
import yaml

from dancecore.builtins.rewards import Brightness, JpegCompressibility, JpegIncompressibility
from dancecore.serving import protocol
from dancecore.serving.client import RemoteReward
from tests.conftest import ROOT
from tests.reward_server import RewardServer

torch.set_num_threads(1)

SERVED = [
    {"name": "brightness"},
    {"name": "brightness", "label": "grey", "target": 0.5},
    {"name": "jpeg-compressibility", "quality": 80},
    {"name": "jpeg-incompressibility"},
]
LOCAL = {
    "brightness": Brightness(Brightness.Config()),
    "grey": Brightness(Brightness.Config(target=0.5)),
    "jpeg-compressibility": JpegCompressibility(JpegCompressibility.Config(quality=80)),
    "jpeg-incompressibility": JpegIncompressibility(JpegIncompressibility.Config()),
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RewardServer]:
    config = tmp_path_factory.mktemp("serve") / "rewards.yaml"
    config.write_text(yaml.safe_dump({"rewards": SERVED}))
    server = RewardServer(str(config), "--max-wait-ms", "50", "--batch-size", "16")
    yield server
    assert server.stop() == 0, server.output()
    assert "reward server stopped" in server.output()


def _remote(server: RewardServer, reward: str, **options) -> RemoteReward:
    return RemoteReward(RemoteReward.Config(url=server.url, reward=reward, **options))


@pytest.mark.parametrize("reward", sorted(LOCAL))
@pytest.mark.parametrize("shape", [(6, 3, 16, 16), (3, 2, 3, 8, 8)], ids=["images", "videos"])
def test_remote_scores_equal_local_scores(server: RewardServer, reward: str, shape: tuple[int, ...]) -> None:
    samples = torch.rand(shape, generator=torch.Generator().manual_seed(len(shape)))
    prompts = [f"prompt {i}" for i in range(shape[0])]
    local = LOCAL[reward].score(samples, prompts)
    remote = _remote(server, reward).score(samples, prompts)
    assert remote.dtype == torch.float32 and torch.equal(remote, local.float()), (remote, local)
    # 8-bit PNG: equal to the local score of the same 8-bit pixels
    quantised = (samples * 255).round() / 255
    png = _remote(server, reward, encoding="png").score(samples, prompts)
    assert torch.allclose(png, LOCAL[reward].score(quantised, prompts).float(), atol=1e-6)


def test_health_and_metadata_name_rewards_options_and_versions(server: RewardServer) -> None:
    assert httpx.get(f"{server.url}/v1/health").json() == {"schema": 1, "status": "ok"}
    meta = httpx.get(f"{server.url}/v1/rewards").json()
    assert meta["schema"] == protocol.SCHEMA and meta["server"].startswith("dancecore ")
    by_name = {r["name"]: r for r in meta["rewards"]}
    assert set(by_name) == set(LOCAL)
    assert by_name["grey"]["plugin"] == "brightness" and by_name["grey"]["options"] == {"target": 0.5}
    assert by_name["jpeg-compressibility"]["options"] == {"quality": 80}
    assert by_name["brightness"]["package"] == "dancecore" and by_name["brightness"]["batch_size"] == 16
    assert {"max_request_bytes", "max_batch", "request_timeout_s"} <= set(meta["limits"])


def test_an_unknown_reward_is_a_404_naming_the_served_ones(server: RewardServer) -> None:
    with pytest.raises(RuntimeError, match=r"404.*no reward 'hps'.*brightness"):
        _remote(server, "hps").score(torch.rand(2, 3, 8, 8), ["a", "b"])


def test_concurrent_clients_are_batched_and_each_gets_its_own_scores(server: RewardServer) -> None:
    clients, rounds = 4, 3
    barrier = threading.Barrier(clients)
    results: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
    errors: list[BaseException] = []
    before = {r["name"]: r for r in httpx.get(f"{server.url}/v1/rewards").json()["rewards"]}["brightness"]

    def client(k: int) -> None:
        remote = _remote(server, "brightness")
        try:
            for j in range(rounds):
                samples = torch.rand(3 + k, 3, 8, 8)
                barrier.wait(timeout=30)
                results[(k, j)] = (remote.score(samples, ["p"] * samples.shape[0]), samples)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert len(results) == clients * rounds
    for scores, samples in results.values():
        assert torch.equal(scores, LOCAL["brightness"].score(samples, [""] * samples.shape[0]))
    after = {r["name"]: r for r in httpx.get(f"{server.url}/v1/rewards").json()["rewards"]}["brightness"]
    requests = after["requests_scored"] - before["requests_scored"]
    batches = after["batches_scored"] - before["batches_scored"]
    assert requests == clients * rounds
    assert batches < requests, (batches, requests)  # concurrent requests shared reward calls


def test_binding_beyond_loopback_needs_a_token() -> None:
    env = {k: v for k, v in __import__("os").environ.items() if k != "DANCECORE_REWARD_TOKEN"}
    result = subprocess.run(
        [sys.executable, "-m", "dancecore.cli", "serve-reward", "brightness", "--host", "0.0.0.0", "--port", "0"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "refusing to serve on 0.0.0.0 without a bearer token: set DANCECORE_REWARD_TOKEN" in result.stderr
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------- the quickstart, served


def _quickstart(tmp_path: Path, recipe: str, *extra: str):
    from dancecore.config.schema import load_run

    overrides = [
        f"output_dir={tmp_path / Path(recipe).stem}",
        "train.iterations=2",
        "logging.progress_bar=false",
        "logging.tensorboard=false",
        "train.checkpoint_every=1000",
        "train.sample_every=0",
        *extra,
    ]
    return load_run(ROOT / "configs" / recipe, overrides)


def _metrics(run) -> list[dict]:
    records = [json.loads(line) for line in (run.config.output_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "seconds" and not k.startswith("time/")} for r in records]


@pytest.mark.slow
def test_the_quickstart_trains_through_a_served_reward_with_the_local_metrics(
    server: RewardServer, tmp_path: Path
) -> None:
    from dancecore.training.trainer import Trainer

    local = _quickstart(tmp_path, "smoke.yaml")
    # the bundled recipe: brightness served by `dancecore serve-reward`, scored while the rollout goes on
    remote = _quickstart(tmp_path, "serving/smoke-remote.yaml", f"rewards[0].url={server.url}")
    assert remote.config.train.overlap_reward and remote.rewards[0].name == "remote"
    assert Trainer(local).train() == "finished"
    assert Trainer(remote).train() == "finished"
    expected, got = _metrics(local), _metrics(remote)
    assert len(got) == 2 and "reward/brightness" in got[0]
    assert json.dumps(got) == json.dumps(expected)


def test_the_remote_reward_honours_the_reward_contract(server: RewardServer) -> None:
    from dancecore.testing import check_reward_plugin

    check_reward_plugin("remote", {"url": server.url, "reward": "jpeg-compressibility"})


def test_the_served_reward_kit_passes_a_builtin_and_catches_a_difference() -> None:
    from dancecore.testing import check_served_reward

    assert check_served_reward(LOCAL["grey"]).shape == (4,)

    class CountsCalls:  # a different answer on every call: served != local
        calls = 0

        def score(self, samples, prompts):
            self.calls += 1
            return torch.full((samples.shape[0],), float(self.calls))

    with pytest.raises(AssertionError, match="differ from local scores"):
        check_served_reward(CountsCalls())


def test_half_precision_pixels_reach_the_reward_as_sent() -> None:
    from dancecore.testing import check_served_reward

    class SeesDtype:  # 1.0 for bfloat16 pixels, 2.0 for float16, 0.0 otherwise
        def score(self, samples, prompts):
            code = {torch.bfloat16: 1.0, torch.float16: 2.0}.get(samples.dtype, 0.0)
            return torch.full((samples.shape[0],), code)

    for dtype, code in ((torch.bfloat16, 1.0), (torch.float16, 2.0), (torch.float32, 0.0)):
        scores = check_served_reward(SeesDtype(), torch.rand(2, 3, 8, 8).to(dtype))
        assert scores.tolist() == [code, code]
