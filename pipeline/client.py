"""The live transport's endpoint: sending planned requests with aiohttp, classifying answers.

The pure parts (``endpoint_for``, ``classify``, ``retry_cause``, ``retry_after_s``, ``backoff_s``) take
values and return values, so the tests and the retry loop share them. ``Client.attempt`` is the one place
that talks to the network; the one retry loop, and the choice among endpoints, are ``pool.py``'s. What a
request holds is ``request.py``'s; what an answer means for the row is ``results.py``'s.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp
import orjson

from pipeline.budget import Budget
from pipeline.config import EndpointConfig, LimitsConfig
from pipeline.limits import Limits, Reservation
from pipeline.request import RequestPlan, body_for_endpoint, sends_model_in_body
from pipeline.results import parse_usage

log = logging.getLogger(__name__)

RETRYABLE_STATUSES = frozenset({408, 409, 429})  # and every 5xx, as openai-python does
FATAL_STATUSES = frozenset({401, 403, 404})  # wrong key, no access, wrong deployment or route
ERROR_TEXT_CHARS = 300  # how much of an unexpected error body goes into a row's error column


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where to POST and with which headers; the only difference between Azure and OpenAI."""

    url: str
    headers: Mapping[str, str]
    key_env: str  # the variable the key came from, named when the key is refused
    model_in_body: str | None = None  # OpenAI-style routes name the model in the body

    def __repr__(self) -> str:  # the headers hold the key: never print them
        return f"Endpoint(url={self.url!r})"


def endpoint_for(cfg: EndpointConfig, api_key: str | None) -> Endpoint:
    """The URL and headers for a provider (reference: "Call the Chat Completion APIs").

    Azure: ``{url}/openai/deployments/{deployment}/chat/completions?api-version=…`` with ``api-key``.
    OpenAI and compatible servers: ``{url}/chat/completions`` with ``Authorization: Bearer`` when a key
    is set. The emulator speaks the Azure route.
    """
    base = cfg.url.rstrip("/")
    if sends_model_in_body(cfg.provider):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        return Endpoint(f"{base}/chat/completions", headers, key_env=cfg.api_key_env, model_in_body=cfg.model)
    url = f"{base}/openai/deployments/{cfg.deployment}/chat/completions?api-version={cfg.api_version}"
    return Endpoint(url, {"api-key": api_key or ""}, key_env=cfg.api_key_env)


@dataclass(frozen=True, slots=True)
class Verdict:
    """What one HTTP answer means for this row."""

    action: Literal["done", "filtered", "retry", "fail", "abort", "unsupported"]
    wait_s: float | None = None  # what the server asked for, if it asked


def classify(status: int, headers: Mapping[str, str], body: object, *, now: float) -> Verdict:
    """Classify an answer. Pure: the retry loop and the tests share it. `now` is epoch seconds."""
    if status == 200:
        return Verdict("done") if isinstance(body, Mapping) and "choices" in body else Verdict("retry")
    if status == 400 and error_code(body) == "content_filter":
        return Verdict("filtered")  # the filter's answer is a result, not a fault
    if status == 400 and is_unsupported_format(body):
        return Verdict("unsupported")  # every row would get the same answer: a setting to change
    if status in FATAL_STATUSES:
        return Verdict("abort")
    if status in RETRYABLE_STATUSES or status >= 500:
        return Verdict("retry", retry_after_s(headers, now=now))
    return Verdict("fail")  # 400, 413, 422 …: this row is wrong, sending it again will not help


def retry_cause(status: int | None, err: BaseException | None = None) -> str:
    """Why an attempt is tried again, as counted in ``_stats.json``: http_429, http_5xx, http_408, http_409,
    bad_body (a 200 without choices), timeout, connection. Pure."""
    if status is None:
        return "timeout" if isinstance(err, asyncio.TimeoutError) else "connection"
    if status == 200:
        return "bad_body"
    return "http_5xx" if status >= 500 else f"http_{status}"


def is_unsupported_format(body: object) -> bool:
    """A 400 saying the deployment takes no such response_format (its `param`, or its message, names it)."""
    if not (isinstance(body, Mapping) and isinstance(body.get("error"), Mapping)):
        return False
    error = body["error"]
    return error.get("param") == "response_format" or "response_format" in str(error.get("message") or "")


def error_code(body: object) -> str | None:
    """`error.code` of an error body, or None."""
    if isinstance(body, Mapping) and isinstance(body.get("error"), Mapping):
        code = body["error"].get("code")
        return str(code) if code is not None else None
    return None


def error_message(body: object, text: str) -> str:
    """A one-line reason from an error body, short enough for a Parquet cell."""
    if isinstance(body, Mapping) and isinstance(body.get("error"), Mapping):
        text = str(body["error"].get("message") or body["error"].get("code") or text)
    return " ".join(text.split())[:ERROR_TEXT_CHARS]


_DURATION = re.compile(r"(?P<n>\d+(?:\.\d+)?)(?P<unit>ms|s|m|h)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def retry_after_s(headers: Mapping[str, str], *, now: float) -> float | None:
    """How long the server asked us to wait, in seconds, or None.

    Reads ``retry-after-ms`` before ``retry-after`` (seconds or an HTTP date), as the official SDK does,
    then OpenAI's ``x-ratelimit-reset-requests`` / ``-tokens`` durations such as "6m0s" or "20ms"
    (the longer of the two). `headers` lookups must be case-insensitive (aiohttp's are).
    """
    if (value := headers.get("retry-after-ms")) is not None:
        try:
            return max(0.0, float(value) / 1000)
        except ValueError:
            pass
    if (value := headers.get("retry-after")) is not None:
        try:
            return max(0.0, float(value))
        except ValueError:
            parsed = email.utils.parsedate_tz(value)
            if parsed is not None:
                return max(0.0, email.utils.mktime_tz(parsed) - now)
    resets = [
        _parse_duration(headers.get(name, ""))
        for name in ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens")
    ]
    known = [r for r in resets if r is not None]
    return max(known) if known else None


def _parse_duration(text: str) -> float | None:
    parts = _DURATION.findall(text.strip())
    if not parts or "".join(n + u for n, u in parts) != text.strip():
        return None
    return sum(float(n) * _UNIT_S[u] for n, u in parts)


def backoff_s(attempt: int, limits: LimitsConfig, rng: random.Random) -> float:
    """Exponential backoff with full jitter before retry number `attempt` (1 = first retry)."""
    ceiling = min(limits.backoff_max_s, limits.backoff_initial_s * 2 ** (attempt - 1))
    return rng.uniform(0, ceiling)


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    headers: Mapping[str, str]
    body: object  # parsed JSON, or None when the body was not JSON
    text: str


@dataclass(frozen=True, slots=True)
class _Sending:
    """What the trace hook needs to restamp a request's reservation once it is on the wire."""

    limits: Limits
    reservation: Reservation


def open_session(concurrency: int) -> aiohttp.ClientSession:
    """A run's session (every engine's): at most `concurrency` connections, and each request's reservation
    counted from when its headers are sent (``sent_tracing``)."""
    connector = aiohttp.TCPConnector(limit=concurrency)
    return aiohttp.ClientSession(connector=connector, trace_configs=[sent_tracing()])


def sent_tracing() -> aiohttp.TraceConfig:
    """A trace hook for the run's session: a request's reservation counts from when its headers are sent
    (``Limits.restamp``; a Ray worker's tells its quota keeper), not from its admission."""

    async def on_headers_sent(
        session: aiohttp.ClientSession, context: Any, params: aiohttp.TraceRequestHeadersSentParams
    ) -> None:
        sending = context.trace_request_ctx
        if isinstance(sending, _Sending):
            sending.limits.restamp(sending.reservation)

    tracing = aiohttp.TraceConfig()
    tracing.on_request_headers_sent.append(on_headers_sent)
    return tracing


@dataclass(frozen=True, slots=True)
class Tried:
    """How one attempt went: the answer (None when none came), what it means, and why, in one line."""

    reply: Reply | None
    verdict: Verdict
    cause: str  # retry_cause, counted if the row is tried again
    billed_usd: float | None  # what the attempt costs; None: it may have been billed, for how much is unknown
    failure: str = ""  # why no answer came (timeout, connection), when none did
    is_moved: bool = False  # cut short because its endpoint was taken out (``Client.abandon_in_flight``)

    @property
    def status(self) -> int | None:
        return None if self.reply is None else self.reply.status

    @property
    def reason(self) -> str:
        """Why the attempt gave no result, in one line; built only when asked: most attempts succeed."""
        if self.reply is None:
            return self.failure
        return f"HTTP {self.reply.status}: {error_message(self.reply.body, self.reply.text)}"


class Client:
    """One endpoint of the live transport: its URL and key, its budgets (``limits.py``), one attempt at a
    time over the run's aiohttp session. The retry loop and the choice of endpoint are ``pool.py``'s."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        endpoint: Endpoint,
        limits: Limits,
        cfg: LimitsConfig,
        budget: Budget,
    ) -> None:
        self._session = session
        self.endpoint = endpoint
        self._headers = {**endpoint.headers, "Content-Type": "application/json"}
        self.limits = limits
        self.budget = budget
        self._cfg = cfg
        self.requests = 0  # attempts sent to this endpoint
        self.charged_tokens = 0  # what the quota counts: prompt tokens + max_tokens of each answer billed
        self.http_429s = 0
        self._in_flight: set[asyncio.Timeout] = set()
        self._abandoned: set[asyncio.Timeout] = set()

    def abandon_in_flight(self) -> None:
        """End every request on the wire to this endpoint now (it was taken out): their rows go elsewhere."""
        now = asyncio.get_running_loop().time()
        for scope in self._in_flight:
            self._abandoned.add(scope)
            scope.reschedule(now)

    async def attempt(self, plan: RequestPlan, reservation: Reservation) -> Tried:
        """Send one booked request, read the answer and settle its reservation with the server's count."""
        self.requests += 1
        max_tokens = int(plan.body.get("max_tokens", 0))
        scope = asyncio.timeout(None)  # abandon_in_flight ends it early
        try:
            async with scope:
                self._in_flight.add(scope)
                try:
                    body = body_for_endpoint(plan.body, self.endpoint.model_in_body)
                    reply = await self._post(body, _Sending(self.limits, reservation))
                finally:
                    self._in_flight.discard(scope)
        except (TimeoutError, aiohttp.ClientError) as err:
            if scope in self._abandoned:
                self._abandoned.discard(scope)
                reason = "moved: its endpoint was taken out while the request was on the wire"
                return Tried(None, Verdict("retry"), "moved", None, reason, is_moved=True)
            reason = _describe_exception(err, self._cfg.timeout_s)
            return Tried(None, Verdict("retry"), retry_cause(None, err), None, reason)
        if reply.status != 429:
            # A 429 saying "0 remaining" describes the moment of the refusal, which its retry-after already
            # covers; booked as a full window it would hold the endpoint ~10 s instead of what was asked.
            self.limits.observe(reply.headers)
        self.http_429s += reply.status == 429
        verdict = classify(reply.status, reply.headers, reply.body, now=time.time())
        usage = parse_usage(reply.body) if isinstance(reply.body, Mapping) else None
        if usage is not None:  # the server's own count replaces our estimate in the window
            self.limits.settle(reservation, usage.prompt_tokens + max_tokens)
            self.charged_tokens += usage.prompt_tokens + max_tokens
        elif reply.status == 429:
            self.limits.settle(reservation, 0)  # a refused request is not charged against the quota
        return Tried(reply, verdict, retry_cause(reply.status), self._billed_usd(reply, verdict, plan))

    async def _post(self, body: Mapping[str, Any], sending: _Sending) -> Reply:
        timeout = aiohttp.ClientTimeout(total=self._cfg.timeout_s)
        async with self._session.post(
            self.endpoint.url,
            data=orjson.dumps(body),
            headers=self._headers,
            timeout=timeout,
            trace_request_ctx=sending,
        ) as response:
            raw = await response.read()
        try:
            parsed: object = orjson.loads(raw)
        except orjson.JSONDecodeError:
            parsed = None  # a proxy's HTML error page, a truncated body: classify retries a 200 like this
        return Reply(response.status, response.headers, parsed, raw.decode("utf-8", "replace"))

    def _billed_usd(self, reply: Reply, verdict: Verdict, plan: RequestPlan) -> float | None:
        """What an answer costs: its bill; nothing for what the services do not bill (429, 5xx, other
        4xx); at most its prompt for a prompt the filter refused (it carries no usage, but no completion
        was made); None, the whole worst case, for a 200 without usage."""
        usage = parse_usage(reply.body) if isinstance(reply.body, Mapping) else None
        if usage is not None:
            return self.budget.billed_usd(usage)
        if verdict.action == "filtered":
            return self.budget.worst_case_usd(plan.estimated_prompt_tokens, 0)
        return None if reply.status == 200 else 0.0

    def refusal_message(self, reply: Reply, name: str, where: str) -> str:
        """One line for a 401/403/404 naming the endpoint (`name`, configured as `where`: ``endpoint`` or
        ``endpoints[1]``) and its key's variable, never the key."""
        reason = error_message(reply.body, reply.text)
        if reply.status in (401, 403):
            key = self.endpoint.key_env
            what = (
                f"the key in ${key} ({where}.api_key_env)"
                if key
                else f"us: {where}.api_key_env is empty, no key sent"
            )
            return f"HTTP {reply.status}: endpoint {name!r} refused {what}: {reason}"
        return (
            f"HTTP 404: endpoint {name!r}: no such deployment or route, check {where}.url and "
            f"{where}.deployment: {reason}"
        )


def _describe_exception(err: BaseException, timeout_s: float) -> str:
    if isinstance(err, asyncio.TimeoutError):
        return f"no answer within limits.timeout_s = {timeout_s:g} s"
    return f"connection error: {type(err).__name__}: {' '.join(str(err).split())[:ERROR_TEXT_CHARS]}"
