"""The reward server's ASGI application (Starlette): auth, limits, batching, health and metadata.

Endpoints (schema 1, docs/serving.md):

- ``GET /v1/health``: ``{"status": "ok"}`` (no token needed: load balancers probe it);
- ``GET /v1/rewards``: the served rewards, their plugins, package versions, options, batch sizes
  and the server's limits;
- ``POST /v1/rewards/<name>/score``: scores for one batch (see :mod:`dancecore.serving.protocol`).

Concurrent requests for one reward are batched: a worker takes the first waiting request, adds
the others that arrived within ``max_wait_s`` while they fit in the reward's batch size and have
the same sample shape, scores them in one call (in the reward's own thread: a model is never
called from two threads at once) and splits the scores back. A request larger than the batch size
is scored alone, in chunks of the batch size.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from dancecore.serving import protocol


@dataclass(frozen=True)
class ServerLimits:
    """What one request may ask for, and how long it may take."""

    max_request_bytes: int = 256 * 1024 * 1024
    max_batch: int = 1024
    request_timeout_s: float = 300.0
    max_wait_s: float = 0.005


@dataclass
class ServedReward:
    """A built reward under the name clients call it by."""

    name: str
    plugin: str
    component: Any
    batch_size: int
    options: dict[str, Any]
    package: str = "?"
    version: str = "?"
    executor: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(max_workers=1))


class RequestError(Exception):
    """An error answer: HTTP status and message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class _Job:
    request: protocol.ScoreRequest
    future: asyncio.Future[torch.Tensor]

    @property
    def size(self) -> int:
        return int(self.request.pixels.shape[0])

    @property
    def shape(self) -> tuple[object, ...]:
        """What requests batched together must share: sample shape and dtype."""
        return (*self.request.pixels.shape[1:], self.request.pixels.dtype)


def score_in_chunks(reward: ServedReward, pixels: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """Score ``pixels`` with the reward, ``batch_size`` samples per call; the output is checked."""
    out = []
    size = reward.batch_size
    for start in range(0, pixels.shape[0], size):
        chunk, texts = pixels[start : start + size], list(prompts[start : start + size])
        with torch.no_grad():
            raw = reward.component.score(chunk, texts)
        scores = torch.as_tensor(raw) if not isinstance(raw, torch.Tensor) else raw
        if tuple(scores.shape) != (chunk.shape[0],):
            raise ValueError(f"returned shape {tuple(scores.shape)} for {chunk.shape[0]} samples")
        out.append(scores.detach().to("cpu", torch.float64))
    return torch.cat(out)


class Batcher:
    """Gathers concurrent requests for one reward into batches of at most its batch size."""

    def __init__(self, reward: ServedReward, max_wait_s: float) -> None:
        self.reward = reward
        self.max_wait_s = max_wait_s
        self.queue: asyncio.Queue[_Job] = asyncio.Queue()
        self.carry: _Job | None = None
        self.task: asyncio.Task[None] | None = None
        self.batches = 0
        self.requests = 0

    def start(self) -> None:
        """Start the worker on the running loop."""
        self.task = asyncio.get_running_loop().create_task(self._work())

    async def stop(self) -> None:
        """Stop the worker (waiting requests are failed)."""
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        self.reward.executor.shutdown(wait=False, cancel_futures=True)

    async def score(self, request: protocol.ScoreRequest) -> torch.Tensor:
        """Queue a request and wait for its scores."""
        future: asyncio.Future[torch.Tensor] = asyncio.get_running_loop().create_future()
        await self.queue.put(_Job(request, future))
        return await future

    async def _next_batch(self) -> list[_Job]:
        first = self.carry if self.carry is not None else await self.queue.get()
        self.carry = None
        jobs, size = [first], first.size
        deadline = time.monotonic() + self.max_wait_s
        while size < self.reward.batch_size:
            try:
                job = await asyncio.wait_for(self.queue.get(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                break
            if job.shape != first.shape or size + job.size > self.reward.batch_size:
                self.carry = job  # starts the next batch
                break
            jobs.append(job)
            size += job.size
        return [j for j in jobs if not j.future.done()]  # a timed-out request is not scored

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = await self._next_batch()
            if not jobs:
                continue
            prompts = [p for j in jobs for p in j.request.prompts]
            self.batches += 1
            self.requests += len(jobs)
            try:
                pixels = torch.cat([j.request.pixels for j in jobs])
                scores = await loop.run_in_executor(self.reward.executor, score_in_chunks, self.reward, pixels, prompts)
            except Exception as exc:  # the reward's own failure, reported to every request of the batch
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            start = 0
            for job in jobs:
                if not job.future.done():
                    job.future.set_result(scores[start : start + job.size])
                start += job.size


def _error(status: int, message: str) -> Response:
    return Response(protocol.encode_error(message), status_code=status, media_type=protocol.JSON_TYPE)


def _json(body: dict[str, Any]) -> Response:
    import json

    return Response(json.dumps(body).encode(), media_type=protocol.JSON_TYPE)


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"request of {int(declared)} bytes exceeds the limit of {limit} bytes")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise RequestError(413, f"request exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


class RewardService:
    """The endpoints' logic over the served rewards, their batchers, the limits and the token."""

    def __init__(self, rewards: Sequence[ServedReward], limits: ServerLimits, token: str | None, version: str) -> None:
        self.rewards = {r.name: r for r in rewards}
        self.limits, self.token, self.version = limits, token, version
        self.batchers: dict[str, Batcher] = {}

    def authorised(self, request: Request) -> bool:
        """Whether the request carries the bearer token (compared in constant time)."""
        if self.token is None:
            return True
        given = request.headers.get("authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode())

    async def health(self, request: Request) -> Response:
        """Liveness: no token needed, nothing revealed."""
        return _json({"schema": protocol.SCHEMA, "status": "ok"})

    def _describe(self, reward: ServedReward) -> dict[str, Any]:
        batcher = self.batchers.get(reward.name)
        return {
            "name": reward.name,
            "plugin": reward.plugin,
            "package": reward.package,
            "version": reward.version,
            "options": reward.options,
            "batch_size": reward.batch_size,
            "requests_scored": batcher.requests if batcher else 0,
            "batches_scored": batcher.batches if batcher else 0,
        }

    async def metadata(self, request: Request) -> Response:
        """Which rewards, their options and versions, and the limits."""
        if not self.authorised(request):
            return _error(401, "missing or wrong bearer token")
        limits = self.limits
        return _json(
            {
                "schema": protocol.SCHEMA,
                "server": f"dancecore {self.version}",
                "rewards": [self._describe(r) for r in self.rewards.values()],
                "limits": {
                    "max_request_bytes": limits.max_request_bytes,
                    "max_batch": limits.max_batch,
                    "request_timeout_s": limits.request_timeout_s,
                },
                "encodings": [protocol.SAFETENSORS_TYPE, protocol.JSON_TYPE],
            }
        )

    async def _scores(self, request: Request, name: str) -> torch.Tensor:
        body = await _read_body(request, self.limits.max_request_bytes)
        parsed = protocol.decode_request(request.headers.get("content-type", ""), body)
        if parsed.pixels.shape[0] > self.limits.max_batch:
            raise RequestError(413, f"{parsed.pixels.shape[0]} samples exceed the limit of {self.limits.max_batch}")
        return await asyncio.wait_for(self.batchers[name].score(parsed), self.limits.request_timeout_s)

    async def score(self, request: Request) -> Response:
        """Score one request's samples (batched with concurrent ones)."""
        if not self.authorised(request):
            return _error(401, "missing or wrong bearer token")
        name = request.path_params["name"]
        if name not in self.rewards:
            return _error(404, f"no reward {name!r} is served here (served: {', '.join(self.rewards)})")
        try:
            scores = await self._scores(request, name)
        except RequestError as exc:
            return _error(exc.status, exc.message)
        except protocol.ProtocolError as exc:
            return _error(415 if "content type" in str(exc) else 400, str(exc))
        except TimeoutError:
            return _error(504, f"reward {name!r} did not answer within {self.limits.request_timeout_s:g} s")
        except Exception as exc:  # the reward plugin's own failure
            return _error(500, f"reward {name!r} raised {type(exc).__name__}: {exc}")
        return Response(protocol.encode_scores(name, scores), media_type=protocol.JSON_TYPE)

    @asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        """Start a batcher per reward; stop them at shutdown."""
        for reward in self.rewards.values():
            self.batchers[reward.name] = Batcher(reward, self.limits.max_wait_s)
            self.batchers[reward.name].start()
        yield
        for batcher in self.batchers.values():
            await batcher.stop()


def build_app(rewards: Sequence[ServedReward], limits: ServerLimits, token: str | None, version: str) -> Starlette:
    """The ASGI application serving ``rewards``; with a ``token`` every endpoint but health needs
    ``Authorization: Bearer <token>``."""
    service = RewardService(rewards, limits, token, version)
    routes = [
        Route("/v1/health", service.health, methods=["GET"]),
        Route("/v1/rewards", service.metadata, methods=["GET"]),
        Route("/v1/rewards/{name}/score", service.score, methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=service.lifespan)
    app.state.service = service
    return app
