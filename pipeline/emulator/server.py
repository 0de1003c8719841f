"""A local aiohttp server that answers like Azure OpenAI "GPT-4 Turbo with Vision", plus the OpenAI route.

For demos, tests, benchmarks and quota rehearsals. A request meets these steps in order; the first that
answers wins:

1. route: Azure ``POST /openai/deployments/{deployment}/chat/completions`` with ``api-key``, or OpenAI
   ``POST /v1/chat/completions`` with ``Authorization: Bearer``; anything else is 404;
2. the key (401 in the route's shape), then a scripted ``Fault`` if one is queued;
3. Azure only: ``api-version`` present and the deployment known, else 404 as Azure answers;
4. the body, validated like the service (400); its prompt tokens are counted by
   ``pipeline.tokens.count_prompt_tokens``, so a bill and an estimate agree to the token;
5. quota, when configured: charged at arrival with prompt tokens + max_tokens over a sliding 10 s window,
   else 429 with ``retry-after-ms`` and ``retry-after`` (a 429 is not charged);
6. seeded latency, then the filter marker (400 ``content_filter``), seeded faults (500 or a dropped
   connection), and finally a 200 whose description is deterministic for the request.

Image sizes come from the data URL's header (Pillow, no full decode). An http(s) image is never fetched:
its size is unknown, so it is billed at the most an image of its detail can cost.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import re
import secrets
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal, Self, TypeVar

from aiohttp import web

from pipeline.config import EmulatorConfig
from pipeline.emulator.batches import BatchService
from pipeline.emulator.quota import QUOTA_WINDOW_S, QuotaWindow
from pipeline.emulator.wire import (
    DEFAULT_MAX_TOKENS,
    FILTER_MARKER,
    MAX_IMAGES_PER_REQUEST,
    NOT_JSON,
    Invalid,
    completion_body,
    error_body,
    fault_body,
    filtered_prompt_body,
    inspect_body,
    parse_json,
    user_text,
)

__all__ = ["DEFAULT_MAX_TOKENS", "DROPPED", "MAX_IMAGES_PER_REQUEST", "QUOTA_WINDOW_S", "Emulator", "Fault"]

LATENCY_JITTER = 0.2  # latency varies ±20% around EmulatorConfig.latency_s
MAX_BODY_BYTES = 64 * 1024 * 1024  # the emulator's own limit; aiohttp answers 413 above it
INLINE_BODY_BYTES = 256 * 1024  # larger bodies are parsed and their images read in a thread
SHUTDOWN_TIMEOUT_S = 1.0  # stop() gives answers still sleeping this long
DROPPED = 0  # the status recorded for a connection closed without an answer

Route = Literal["azure", "openai", "other"]
T = TypeVar("T")

_AZURE_PATH = re.compile(r"/openai/deployments/([^/]+)/chat/completions/?")
_OPENAI_PATH = re.compile(r"/v1/chat/completions/?")
_SECRET_HEADERS = ("api-key", "authorization")

# The services' own words, so that a client's error messages read as they will in production.
_AZURE_401 = (
    "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid key "
    "for an active subscription and use a correct regional API endpoint for your resource."
)
_OPENAI_401 = (
    "Incorrect API key provided. You can find your API key at https://platform.openai.com/account/api-keys."
)
_DEPLOYMENT_404 = (
    "The API deployment for this resource does not exist. If you created the deployment within the last 5 "
    "minutes, please wait a moment and try again."
)
_QUOTA_429 = (
    "Requests to the ChatCompletions_Create Operation under Azure OpenAI API version 2024-02-15-preview have "
    "exceeded {limit} rate limit of your current OpenAI S0 pricing tier. Please retry after {wait_s} "
    "seconds. Please go here: https://aka.ms/oai/quotaincrease if you would like to further increase the "
    "default rate limit."
)


@dataclass(frozen=True, slots=True)
class Fault:
    """One scripted answer for the next request (after its key is checked)."""

    status: int = 500
    headers: Mapping[str, str] = field(default_factory=dict)  # e.g. {"retry-after-ms": "1500"}
    body: object | None = None  # JSON body; an Azure-shaped error body when None
    delay_s: float = 0.0  # answer after this long (a slow answer)
    drop: bool = False  # close the connection without answering


@dataclass(frozen=True, slots=True)
class ReceivedRequest:
    """What the emulator saw and answered, for tests and benchmarks."""

    at: float  # loop time of arrival
    route: Route  # "other" for a path that is neither API route (answered 404)
    headers: Mapping[str, str]  # api-key and Authorization values replaced by "<redacted>"
    body: object | None  # the parsed JSON body; None when not JSON or keep_bodies=False
    prompt_text: str  # the text parts of the user messages, joined with "\n"
    status: int  # DROPPED (0) when the connection was closed without an answer
    prompt_tokens: int | None  # billed, 200s only
    completion_tokens: int | None


@dataclass(slots=True)
class EmulatorStats:
    """Live counters of every request since the emulator was made."""

    requests: int = 0
    by_status: Counter[int] = field(default_factory=Counter)
    prompt_tokens: int = 0  # billed, 200s only
    completion_tokens: int = 0


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    body: object = None
    headers: Mapping[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    drop: bool = False
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


async def _maybe_in_thread(in_thread: bool, fn: Callable[..., T], *args: object) -> T:
    """Run CPU work for a large body in a thread; a small one costs less than the hop."""
    return await asyncio.to_thread(fn, *args) if in_thread else fn(*args)


class Emulator:
    """The Azure OpenAI / OpenAI chat-completions API on a local port, billing as pipeline.tokens counts.

    ``async with Emulator() as emu:`` (or start/stop). ``emu.url`` is the Azure endpoint, ``emu.url + "/v1"``
    the OpenAI base URL. Random faults and latency jitter are drawn from ``random.Random(cfg.seed)``.
    """

    def __init__(
        self,
        cfg: EmulatorConfig | None = None,
        *,
        api_key: str = "emulator",
        deployment: str = "gpt-4-vision",
        model: str = "gpt-4-turbo",
        request_log: str | Path | None = None,
        keep_requests: bool = True,
        keep_bodies: bool = True,
    ) -> None:
        cfg = cfg or EmulatorConfig()
        self.cfg, self.api_key, self.deployment, self.model = cfg, api_key, deployment, model
        # Tests and benchmarks read every request back from .requests; a server that runs for hours or
        # serves a whole run passes keep_requests=False and keeps the counters only (a high-detail
        # body is ~160 kB: a million of them would not fit in memory).
        self.keep_requests = keep_requests
        self.keep_bodies = keep_bodies
        self.url = ""
        self.requests: list[ReceivedRequest] = []
        self.stats = EmulatorStats()
        self._request_log_path = None if request_log is None else Path(request_log)
        self._request_log: IO[str] | None = None
        self._script: deque[Fault] = deque()
        self._rng = random.Random(cfg.seed)
        is_quota = cfg.tokens_per_minute > 0 or cfg.requests_per_minute > 0
        self._window = QuotaWindow(cfg.tokens_per_minute, cfg.requests_per_minute) if is_quota else None
        self._runner: web.AppRunner | None = None
        self._answered = 0
        # the Files and Batches APIs (batches.py): tests script them through emu.batches
        self.batches = BatchService(cfg, api_key=api_key, deployment=deployment, model=model)

    def script(self, *faults: Fault) -> None:
        """Answer the next len(faults) requests with these, in order, once their key has been checked."""
        self._script.extend(faults)

    def clear_script(self) -> None:
        """Drop the scripted answers no request has taken yet: later requests are answered as configured."""
        self._script.clear()

    @property
    def scripted_left(self) -> int:
        """Scripted answers no request has taken yet: 0 once the last one's request has arrived."""
        return len(self._script)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on host:port (port 0: any free one) and return the URL. Raises OSError if it cannot bind."""
        if self._runner is not None:
            raise RuntimeError("the emulator is already started")
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        self.batches.add_routes(app)  # before the catch-all: aiohttp matches routes in the order added
        app.router.add_route("*", "/{path:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        if self._request_log_path is not None:
            self._request_log = self._request_log_path.open("a", encoding="utf-8")
        shown_host = "127.0.0.1" if host in ("", "0.0.0.0") else host  # "everywhere" includes loopback
        self.url = f"http://{shown_host}:{runner.addresses[0][1]}"
        return self.url

    async def stop(self) -> None:
        """Stop listening; answers still sleeping get SHUTDOWN_TIMEOUT_S to finish. Safe to call twice."""
        runner, self._runner = self._runner, None
        try:
            await self.batches.close()
            if runner is not None:
                await runner.cleanup()
        finally:
            if self._request_log is not None:
                self._request_log.close()
                self._request_log = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        at = loop.time()
        raw = await request.read()
        in_thread = len(raw) > INLINE_BODY_BYTES
        body = await _maybe_in_thread(in_thread, parse_json, raw)
        azure = _AZURE_PATH.fullmatch(request.path) if request.method == "POST" else None
        is_openai = request.method == "POST" and _OPENAI_PATH.fullmatch(request.path) is not None
        route: Route = "azure" if azure else "openai" if is_openai else "other"
        answer = await self._answer(request, route, azure.group(1) if azure else "", body, in_thread)
        if answer.delay_s > 0:
            await asyncio.sleep(answer.delay_s)  # other requests go on meanwhile
        self._record(request, at, route, body, answer)
        if answer.drop:
            if request.transport is not None:
                request.transport.close()
            return web.Response(status=500)  # never sent: the client sees the connection close
        headers = dict(answer.headers)
        if self._window is not None:
            headers.update(self._window.remaining_headers(loop.time()))
        return web.json_response(answer.body, status=answer.status, headers=headers)

    async def _answer(
        self, request: web.Request, route: Route, deployment: str, body: object, in_thread: bool
    ) -> _Answer:
        """Decide the answer, in the order the module docstring lists."""
        if route == "other":
            return _Answer(404, error_body("404", "Resource not found"))
        if route == "azure" and not secrets.compare_digest(request.headers.get("api-key", ""), self.api_key):
            return _Answer(401, error_body("401", _AZURE_401))
        bearer = request.headers.get("Authorization", "")
        if route == "openai" and not secrets.compare_digest(bearer, f"Bearer {self.api_key}"):
            refusal = error_body("invalid_api_key", _OPENAI_401, type="invalid_request_error", param=None)
            return _Answer(401, refusal)
        if self._script:
            fault = self._script.popleft()
            body_of_fault = fault_body(fault.status) if fault.body is None else fault.body
            return _Answer(fault.status, body_of_fault, fault.headers, delay_s=fault.delay_s, drop=fault.drop)
        if route == "azure" and "api-version" not in request.query:
            return _Answer(404, error_body("404", "Resource not found"))  # Azure's answer without api-version
        if route == "azure" and deployment != self.deployment:
            return _Answer(404, error_body("DeploymentNotFound", _DEPLOYMENT_404))
        try:
            if body is NOT_JSON:
                raise Invalid("We could not parse the JSON body of your request.", None, "invalid_json")
            model = self.model if route == "azure" else None  # OpenAI: the body names the model
            prompt = await _maybe_in_thread(in_thread, inspect_body, body, model)
        except Invalid as err:
            return _Answer(
                400, error_body(err.code, err.message, param=err.param, type="invalid_request_error")
            )
        if self._window is not None:
            now = asyncio.get_running_loop().time()
            if refused := self._window.try_charge(now, prompt.prompt_tokens + prompt.max_tokens):
                wait_s, limit = refused
                message = _QUOTA_429.format(limit=limit, wait_s=math.ceil(wait_s))
                headers = {
                    "retry-after-ms": str(math.ceil(wait_s * 1000)),
                    "retry-after": str(math.ceil(wait_s)),
                }
                return _Answer(429, error_body("429", message), headers)
        # Two draws per request in a fixed order, so a seed replays the same faults for the same arrivals.
        delay_s = self.cfg.latency_s * self._rng.uniform(1 - LATENCY_JITTER, 1 + LATENCY_JITTER)
        roll = self._rng.random()
        if FILTER_MARKER in prompt.prompt_text:
            return _Answer(400, filtered_prompt_body(), delay_s=delay_s)
        if roll < self.cfg.drop_rate:
            return _Answer(DROPPED, delay_s=delay_s, drop=True)
        if roll < self.cfg.drop_rate + self.cfg.fault_rate:
            return _Answer(500, fault_body(500), delay_s=delay_s)
        self._answered += 1
        completion = completion_body(prompt, f"chatcmpl-{prompt.seed:016x}{self._answered:013x}")
        usage = completion["usage"]
        return _Answer(
            200,
            completion,
            delay_s=delay_s,
            prompt_tokens=usage["prompt_tokens"],
            completion_tokens=usage["completion_tokens"],
        )

    def _record(self, request: web.Request, at: float, route: Route, body: object, answer: _Answer) -> None:
        """Keep what was seen, count it, and log it before the answer leaves."""
        status = DROPPED if answer.drop else answer.status
        headers = {k: "<redacted>" if k.lower() in _SECRET_HEADERS else v for k, v in request.headers.items()}
        kept_body = body if self.keep_bodies and body is not NOT_JSON else None
        seen = ReceivedRequest(
            at,
            route,
            headers,
            kept_body,
            user_text(body),
            status,
            answer.prompt_tokens,
            answer.completion_tokens,
        )
        if self.keep_requests:
            self.requests.append(seen)
        self.stats.requests += 1
        self.stats.by_status[status] += 1
        self.stats.prompt_tokens += answer.prompt_tokens or 0
        self.stats.completion_tokens += answer.completion_tokens or 0
        if self._request_log is not None:
            # Written in the loop on purpose: a short append that must reach the OS before the answer
            # leaves, so a client killed after reading an answer never finds that answer unlogged.
            line = {
                "at": at,
                "route": route,
                "status": status,
                "prompt_text": seen.prompt_text,
                "prompt_tokens": answer.prompt_tokens,
                "completion_tokens": answer.completion_tokens,
            }
            self._request_log.write(json.dumps(line) + "\n")
            self._request_log.flush()


async def serve_forever(emulator: Emulator, host: str, port: int) -> None:
    """Start, print "listening on URL" as the first stdout line, serve until cancelled, then stop."""
    await emulator.start(host, port)
    try:
        print(f"listening on {emulator.url}", flush=True)
        await asyncio.Event().wait()
    finally:
        await emulator.stop()
