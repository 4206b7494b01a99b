"""Faults of a reward server, injected on the server side, each handled as docs/reliability.md says:
the remote reward's failure names the URL and the cause, the run's reward-failure policy decides,
and nothing waits beyond the client's timeout. Servers are real ``dancecore serve-reward``
processes on loopback (plus, for answers the real server never gives, a raw impostor server).
Every test adds a row to the fault-injection summary table."""

from __future__ import annotations

import http.server
import json
import pickle
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
import yaml

from dancecore.config.schema import RewardFailureConfig
from dancecore.serving import protocol
from dancecore.serving.client import RemoteReward
from dancecore.training.scoring import NamedReward, RewardFailure, score_samples
from tests.fault.conftest import FIXTURE_SITE
from tests.reward_server import RewardServer

torch.set_num_threads(1)
TOKEN = "s3cret-token"
BATCH, GROUP = 8, 4
GROUP_IDS = torch.arange(BATCH) // GROUP
SERVED = [
    {"name": "fault-reward", "label": "ok"},
    {"name": "fault-reward", "label": "hang", "mode": "hang", "seconds": 3.0},
    {"name": "fault-reward", "label": "raise", "mode": "raise"},
    {"name": "fault-reward", "label": "short", "mode": "shape"},
    {"name": "fault-reward", "label": "nan-first", "mode": "nan_first_group"},
    {"name": "fault-reward", "label": "slow", "mode": "hang", "seconds": 1.0},
]


def _start(tmp: Path, *extra: str, rewards=SERVED) -> RewardServer:
    config = tmp / "rewards.yaml"
    config.write_text(yaml.safe_dump({"rewards": rewards}))
    return RewardServer(str(config), *extra, env={"DANCECORE_REWARD_TOKEN": TOKEN}, pythonpath=[FIXTURE_SITE])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RewardServer]:
    server = _start(
        tmp_path_factory.mktemp("faults"), "--request-timeout", "1.5", "--max-request-mb", "0.25", "--max-batch", "64"
    )
    yield server
    assert server.stop() == 0, server.output()


def _remote(url: str, reward: str, token: str | None = TOKEN, monkeypatch=None, **options) -> RemoteReward:
    if monkeypatch is not None:
        if token is None:
            monkeypatch.delenv("DANCECORE_REWARD_TOKEN", raising=False)
        else:
            monkeypatch.setenv("DANCECORE_REWARD_TOKEN", token)
    options.setdefault("backoff_s", 0.05)
    return RemoteReward(RemoteReward.Config(url=url, reward=reward, **options))


def _score(reward: RemoteReward, policy: str = "fail", samples: torch.Tensor | None = None):
    samples = torch.rand(BATCH, 3, 8, 8) if samples is None else samples
    named = NamedReward("judge", 1.0, reward, plugin="remote")
    config = RewardFailureConfig(policy=policy, retries=1)
    return score_samples([named], samples, ["p"] * samples.shape[0], GROUP_IDS[: samples.shape[0]], config)


def _fails(reward: RemoteReward, policy: str = "fail", samples: torch.Tensor | None = None) -> tuple[str, float]:
    began = time.monotonic()
    with pytest.raises(RewardFailure) as info:
        _score(reward, policy, samples)
    return str(info.value), time.monotonic() - began


def test_a_healthy_served_reward_scores(server, monkeypatch, fault_report) -> None:
    result = _score(_remote(server.url, "ok", monkeypatch=monkeypatch))
    passed = result.scores.values.shape == (1, BATCH) and result.failures == 0
    fault_report.row("remote: healthy server", "8 scores, no failure", passed)
    assert passed


def test_a_bad_or_missing_token_fails_at_once_naming_the_url(server, monkeypatch, fault_report) -> None:
    messages = []
    for token in ("wrong", None):
        message, elapsed = _fails(_remote(server.url, "ok", token=token, monkeypatch=monkeypatch, retries=3))
        messages.append(message)
        assert server.url in message and "refused the token (401)" in message and elapsed < 1.0, message
    meta = httpx.get(f"{server.url}/v1/rewards", headers={"authorization": "Bearer wrong"})
    assert meta.status_code == 401
    fault_report.row("remote: bad / missing token", "401, not retried, URL named", True)


def test_oversize_requests_are_refused_without_retry(server, monkeypatch, fault_report) -> None:
    big = torch.rand(BATCH, 3, 64, 64)  # 393 kB of float32 > 0.25 MiB
    message, _ = _fails(_remote(server.url, "ok", monkeypatch=monkeypatch, retries=3), samples=big)
    assert "(413)" in message and "exceeds the limit of 262144 bytes" in message and server.url in message
    many = torch.rand(65, 3, 2, 2)
    remote = _remote(server.url, "ok", monkeypatch=monkeypatch)
    with pytest.raises(RuntimeError, match=r"413.*65 samples exceed the limit of 64"):
        remote.score(many, ["p"] * 65)
    fault_report.row("remote: oversize body / batch", "413, not retried, limit named", True)


def test_slow_beyond_the_client_timeout_fails_within_it(server, monkeypatch, fault_report) -> None:
    message, elapsed = _fails(_remote(server.url, "hang", monkeypatch=monkeypatch, timeout_s=0.8, retries=3))
    passed = "no answer within" in message and server.url in message and elapsed < 0.8 + 1.0
    fault_report.row("remote: slow beyond client timeout", f"failed after {elapsed:.2f} s (timeout 0.8 s)", passed)
    assert passed, (message, elapsed)


def test_slow_beyond_the_server_timeout_is_a_504(server, monkeypatch, fault_report) -> None:
    message, elapsed = _fails(_remote(server.url, "hang", monkeypatch=monkeypatch, timeout_s=20, retries=0))
    passed = "server error 504" in message and "did not answer within 1.5 s" in message and elapsed < 5
    fault_report.row("remote: slow beyond server timeout", f"504 after {elapsed:.2f} s (server limit 1.5 s)", passed)
    assert passed, (message, elapsed)


def test_a_reward_that_raises_on_the_server_is_retried_then_fails(server, monkeypatch, fault_report) -> None:
    message, _ = _fails(_remote(server.url, "raise", monkeypatch=monkeypatch, retries=2))
    passed = "server error 500" in message and "injected reward failure" in message and "after 3 attempts" in message
    fault_report.row("remote: reward raises on the server", "500, retried twice, then failure", passed)
    assert passed, message


def test_a_served_reward_giving_the_wrong_number_of_scores_fails(server, monkeypatch, fault_report) -> None:
    message, _ = _fails(_remote(server.url, "short", monkeypatch=monkeypatch, retries=0))
    passed = "returned shape (7,) for 8 samples" in message and server.url in message
    fault_report.row("remote: wrong number of scores (reward)", "500 naming the shape", passed)
    assert passed, message


def test_nan_scores_are_the_policys_business(server, monkeypatch, fault_report) -> None:
    remote = _remote(server.url, "nan-first", monkeypatch=monkeypatch)
    message, _ = _fails(remote, "fail")
    assert "non-finite" in message and server.url in message, message
    kept = _score(remote, "skip_group")
    passed = kept.dropped_groups == 1 and kept.keep.tolist() == list(range(GROUP, BATCH))
    fault_report.row("remote: NaN score", "fail names URL; skip_group drops 1 group", passed)
    assert passed


# ----------------------------------------------------------------- a raw impostor server


class _Impostor(http.server.BaseHTTPRequestHandler):
    """Answers a score request as its reward name says: garbage, short, schema, drop."""

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
        self.rfile.read(int(self.headers.get("content-length", 0)))
        kind = self.path.split("/")[3]
        if kind == "drop":
            self.connection.close()  # no answer at all
            return
        body = {
            "garbage": b"\x00\xffthis is not json",
            "short": json.dumps({"schema": 1, "scores": [0.5]}).encode(),
            "schema": json.dumps({"schema": 99, "scores": [0.5] * BATCH}).encode(),
            "strings": json.dumps({"schema": 1, "scores": ["high"] * BATCH}).encode(),
        }[kind]
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def impostor() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Impostor)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("garbage", "malformed answer: the answer is not JSON"),
        ("short", "malformed answer: the answer has 1 scores for 8 samples"),
        ("schema", "malformed answer: the answer is not a schema-1 score record"),
        ("strings", "malformed answer: the answer's scores are not all numbers"),
        ("drop", "connection failed"),
    ],
)
def test_malformed_or_missing_answers_fail_naming_the_url(impostor, kind, expected, fault_report) -> None:
    message, elapsed = _fails(_remote(impostor, kind, token=None, retries=1, timeout_s=5))
    passed = expected in message and impostor in message and elapsed < 5
    fault_report.row(f"remote: answer '{kind}'", expected.split(": ")[-1][:55], passed)
    assert passed, message


def test_connection_refused_is_retried_with_backoff_then_fails(fault_report) -> None:
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    message, elapsed = _fails(_remote(url, "ok", token=None, retries=2, backoff_s=0.1, timeout_s=5))
    passed = "connection failed" in message and "after 3 attempts" in message and url in message and elapsed < 2
    fault_report.row("remote: connection refused", f"3 attempts, failed after {elapsed:.2f} s", passed)
    assert passed, message


# ------------------------------------------------------- a server killed or stopped mid-request


def test_a_server_killed_mid_request_fails_the_call_promptly(tmp_path, monkeypatch, fault_report) -> None:
    doomed = _start(tmp_path, rewards=[{"name": "fault-reward", "label": "hang", "mode": "hang", "seconds": 30.0}])
    remote = _remote(doomed.url, "hang", monkeypatch=monkeypatch, timeout_s=20, retries=2, backoff_s=0.1)
    outcome: dict[str, object] = {}

    def call() -> None:
        began = time.monotonic()
        try:
            _score(remote)
        except RewardFailure as exc:
            outcome["message"] = str(exc)
        outcome["elapsed"] = time.monotonic() - began

    caller = threading.Thread(target=call)
    caller.start()
    try:
        time.sleep(1.0)  # the request is in the reward's hands
    finally:
        doomed.kill()
    caller.join(20)
    message, elapsed = str(outcome.get("message")), float(outcome.get("elapsed", 99))  # type: ignore[arg-type]
    passed = "connection failed" in message and doomed.url in message and elapsed < 5
    fault_report.row("remote: server SIGKILLed mid-request", f"failed {elapsed - 1:.2f} s after the kill", passed)
    assert passed, (message, elapsed)


# --------------------------------------------------------------------------------- pickle


class _Evil:
    """Unpickling this writes a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "unpickled!"))


def test_a_pickle_payload_is_refused_and_never_unpickled(server, tmp_path, fault_report) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"pixels": _Evil(marker), "prompts": ["p"]})
    url = f"{server.url}/v1/rewards/ok/score"
    headers = {"authorization": f"Bearer {TOKEN}"}
    statuses = {}
    for content_type in (
        "application/python-pickle",
        "application/octet-stream",
        protocol.SAFETENSORS_TYPE,
        "application/json",
    ):
        answer = httpx.post(url, content=payload, headers={**headers, "content-type": content_type})
        statuses[content_type] = answer.status_code
        assert answer.status_code in (400, 415), (content_type, answer.status_code, answer.text)
    time.sleep(0.2)
    healthy = httpx.get(f"{server.url}/v1/health").status_code == 200
    passed = not marker.exists() and healthy
    figure = "refused (" + ", ".join(str(s) for s in statuses.values()) + "), never unpickled"
    fault_report.row("serve-reward: pickle payload", figure, passed)
    assert passed
    serving = Path(protocol.__file__).parent
    assert not [p.name for p in serving.glob("*.py") if "import pickle" in p.read_text()]


def test_sigterm_answers_the_request_in_flight_then_exits_0(server, monkeypatch, fault_report) -> None:
    """The module's last test: it stops the module's server."""
    remote = _remote(server.url, "slow", monkeypatch=monkeypatch, timeout_s=20, retries=0)
    result: dict[str, torch.Tensor] = {}
    caller = threading.Thread(
        target=lambda: result.setdefault("scores", remote.score(torch.rand(2, 3, 4, 4), ["a", "b"]))
    )
    caller.start()
    try:
        time.sleep(0.7)
    finally:
        began = time.monotonic()
        code = server.stop(timeout=20)
    caller.join(10)
    passed = code == 0 and "scores" in result and "reward server stopped" in server.output()
    fault_report.row("serve-reward: SIGTERM with a request in flight", f"answered, exit {code}", passed)
    assert passed, server.output()
    assert time.monotonic() - began < 10
