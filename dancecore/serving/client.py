"""The ``remote`` reward: scores through a ``dancecore serve-reward`` server.

Every failure raises :class:`RemoteRewardError`, whose message names the URL and the cause; the
run's reward-failure policy (``reward_failure``) then decides (fail, skip the groups, retry). A
non-finite score arrives as NaN and is the policy's business too (under ``skip_group`` only the
groups holding it are dropped). ``timeout_s`` bounds a whole ``score`` call, retries and backoff
included: nothing waits longer.

Retried (up to ``retries`` more attempts, exponential backoff): a refused or dropped connection,
a timeout of one attempt, 5xx answers and 429. Not retried: 4xx answers (bad token, oversize,
unknown reward, bad request) and malformed answers: another attempt would get the same.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar

import torch
from pydantic import Field

from dancecore.contracts.component import ComponentConfig
from dancecore.contracts.protocols import BuildContext
from dancecore.errors import UserError
from dancecore.serving import protocol

RETRIED_STATUS = {429, 500, 502, 503, 504}
T = TypeVar("T")


class RemoteRewardError(RuntimeError):
    """A remote reward call that failed; the message names the URL and the cause."""


class RemoteConfig(ComponentConfig):
    """Options of the ``remote`` reward."""

    url: str = Field(description="Base URL of the reward server, e.g. http://127.0.0.1:8765.")
    reward: str = Field(description="Name of the served reward to call (see GET /v1/rewards).")
    token_env: str | None = Field(
        "DANCECORE_REWARD_TOKEN",
        description="Environment variable holding the bearer token (sent when set; never written in YAML).",
    )
    timeout_s: float = Field(120.0, gt=0, description="Time limit of one score call, retries included.")
    retries: int = Field(2, ge=0, le=10, description="Extra attempts after a connection error, timeout or 5xx.")
    backoff_s: float = Field(0.5, ge=0, description="First wait between attempts; doubled after each.")
    encoding: Literal["safetensors", "png"] = Field(
        "safetensors", description="'safetensors': exact float pixels (remote == local); 'png': 8-bit, smaller."
    )
    max_connections: int = Field(4, ge=1, description="Connections kept open to the server (pooled).")


class RemoteReward:
    """Scores samples by calling a reward served by ``dancecore serve-reward``."""

    Config = RemoteConfig

    def __init__(self, config: RemoteConfig, context: BuildContext | None = None) -> None:
        self.config = config
        self.base = config.url.rstrip("/")
        if not self.base.startswith(("http://", "https://")):
            raise UserError(f"remote reward: url {config.url!r} must start with http:// or https://")
        self.endpoint = f"{self.base}/v1/rewards/{config.reward}/score"
        self.headers = {"accept": protocol.JSON_TYPE}
        token = os.environ.get(config.token_env) if config.token_env else None
        if token:
            self.headers["authorization"] = f"Bearer {token}"
        self._lock = threading.Lock()
        self._http: Any = None  # one pooled httpx.Client (thread-safe), made on first use

    @property
    def source(self) -> str:
        """Where the scores come from (named in failure messages)."""
        return self.endpoint

    def _client(self) -> Any:
        with self._lock:
            if self._http is None:
                self._http = pooled_client(self.config.max_connections, self.headers)
            return self._http

    def close(self) -> None:
        """Close the pooled connections."""
        with self._lock:
            if self._http is not None:
                self._http.close()
                self._http = None

    def _encode(self, samples: torch.Tensor, prompts: Sequence[str]) -> tuple[bytes, str]:
        if self.config.encoding == "png":
            return protocol.encode_json(samples, prompts), protocol.JSON_TYPE
        if samples.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            samples = samples.float()
        return protocol.encode_safetensors(samples, prompts), protocol.SAFETENSORS_TYPE

    def _attempt(self, body: bytes, content_type: str, batch: int, remaining: float) -> torch.Tensor:
        """One POST; raises :class:`Retry` for what another attempt may fix, RemoteRewardError otherwise."""
        answer = post_once(
            self._client(), self.endpoint, remaining, content=body, headers={"content-type": content_type}
        )
        if answer.status_code == 401:
            hint = f" (set {self.config.token_env})" if self.config.token_env else ""
            raise RemoteRewardError(f"{self.endpoint}: the server refused the token (401){hint}")
        if answer.status_code != 200:
            raise RemoteRewardError(
                f"{self.endpoint}: refused the request ({answer.status_code}): {protocol.error_text(answer.content)}"
            )
        try:
            return protocol.decode_scores(answer.content, batch)
        except protocol.ProtocolError as exc:
            raise RemoteRewardError(f"{self.endpoint}: malformed answer: {exc}") from None

    def score(self, samples: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Scores from the server, one per sample (NaN where the server's reward gave a non-finite one)."""
        body, content_type = self._encode(samples.detach().cpu(), prompts)
        c = self.config
        return with_retries(
            self.endpoint,
            lambda remaining: self._attempt(body, content_type, samples.shape[0], remaining),
            c.timeout_s,
            c.retries,
            c.backoff_s,
        )


class Retry(Exception):
    """A failure another attempt may fix (connection, timeout, 5xx, 429)."""


def post_once(client: Any, url: str, remaining: float, **request: Any) -> Any:
    """One POST within ``remaining`` seconds; a transport failure, timeout or retried status
    raises :class:`Retry`, any other answer is returned."""
    import httpx

    try:
        answer = client.post(url, timeout=httpx.Timeout(remaining), **request)
    except httpx.TimeoutException:
        raise Retry(f"no answer within {remaining:.3g} s") from None
    except httpx.TransportError as exc:
        raise Retry(f"connection failed ({type(exc).__name__}: {exc or 'no detail'})") from None
    if answer.status_code in RETRIED_STATUS:
        raise Retry(f"server error {answer.status_code}: {protocol.error_text(answer.content)}")
    return answer


def with_retries(url: str, attempt: Callable[[float], T], timeout_s: float, retries: int, backoff_s: float) -> T:
    """``attempt(remaining_seconds)`` until it succeeds, at most ``retries`` more times after a
    :class:`Retry`, with exponential backoff, all within ``timeout_s``; then :class:`RemoteRewardError`."""
    deadline = time.monotonic() + timeout_s
    wait = backoff_s
    attempts = 0
    while True:
        attempts += 1
        try:
            return attempt(max(deadline - time.monotonic(), 1e-3))
        except Retry as exc:
            cause = str(exc)
        if attempts > retries or deadline - time.monotonic() <= wait:
            raise RemoteRewardError(f"{url}: {cause} (after {attempts} attempt{'s' if attempts > 1 else ''})")
        time.sleep(wait)
        wait *= 2


def pooled_client(max_connections: int, headers: dict[str, str]) -> Any:
    """An ``httpx.Client`` keeping up to ``max_connections`` connections open (thread-safe)."""
    import httpx

    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    return httpx.Client(limits=limits, headers=headers, follow_redirects=False)
