"""The live transport: sending planned requests with aiohttp, classifying answers, retrying.

The pure parts (``endpoint_for``, ``classify``, ``retry_cause``, ``retry_after_s``, ``backoff_s``) take
values and return values, so the tests and the retry loop share them. ``Client.send`` is the one place
that talks to the network, and the one retry loop. What a request holds is ``request.py``'s; what an
answer means for the row is ``results.py``'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import logging
import random
import re
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp

from pipeline.budget import Budget
from pipeline.config import EndpointConfig, LimitsConfig
from pipeline.limits import Limits, LimitsClosed
from pipeline.records import (
    ApiError,
    ConfigError,
    Delivery,
    ErrorKind,
    NotSent,
    RunAborted,
    TransportCounters,
)
from pipeline.request import RequestPlan, sends_model_in_body
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
        return Endpoint(f"{base}/chat/completions", headers, key_env=cfg.api_key_env)
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
class _Tried:
    """How one attempt went: the answer (None when none came), what it means, and why, in one line."""

    reply: Reply | None
    verdict: Verdict
    cause: str  # retry_cause, counted if the row is tried again
    failure: str = ""  # why no answer came (timeout, connection), when none did

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
    """The live transport: sends planned requests to one endpoint over one aiohttp session, under the
    run's shared budgets (``limits.py``)."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        endpoint: Endpoint,
        limits: Limits,
        cfg: LimitsConfig,
        rng: random.Random,
        budget: Budget,
    ) -> None:
        self._session = session
        self.endpoint = endpoint
        self.limits = limits
        self.budget = budget
        self._cfg = cfg
        self._rng = rng
        self.retries_by_cause: Counter[str] = Counter()  # attempts sent again, by retry_cause
        self.http_429s = 0
        self._stopping = asyncio.Event()

    def stop_sending(self) -> None:
        """Start no more attempts: requests on the wire finish; rows waiting for the budget or backing off
        before a retry end at once, not sent."""
        self._stopping.set()
        self.limits.close()

    def counters(self) -> TransportCounters:
        """What this transport has met so far: 429s, retries by cause, and the pauses they caused."""
        limits = self.limits
        return TransportCounters(
            http_429s=self.http_429s,
            retries_by_cause=dict(self.retries_by_cause),
            pauses=limits.pauses,
            paused_s=limits.paused_s,
            is_paused=limits.is_paused,
        )

    async def send(self, plan: RequestPlan) -> Delivery:
        """Send one planned request, retrying what is worth retrying, and return the answer that is a result.

        Every attempt first holds its worst-case cost within the spend cap (``budget.py``), then reserves 1
        request and ``plan.reserve_tokens`` from the shared budgets. A 429 pauses every worker for the
        time the server gave. Raises ApiError when the row fails (not retryable, or out of attempts),
        RunAborted when no row can succeed (bad key, wrong deployment, quota gone), BudgetReached when
        the cap has no room left for the attempt, and NotSent when an attempt was due after
        ``stop_sending``: a request started then could not finish within the grace, and would be paid
        for and lost.
        """
        cfg, row_id = self._cfg, plan.task.row_id
        worst_usd = self.budget.worst_case_usd(
            plan.estimated_prompt_tokens, int(plan.body.get("max_tokens", 0))
        )
        retrying: str | None = None  # the retry_cause of the attempt before, counted once this one is sent
        for attempt in range(1, cfg.max_attempts + 1):
            tried = await self._attempt(plan, worst_usd, retrying)
            reply, verdict = tried.reply, tried.verdict
            if (
                reply is not None
                and verdict.action in ("done", "filtered")
                and isinstance(reply.body, Mapping)
            ):
                return Delivery(reply.status, reply.body, attempt)
            if reply is not None and verdict.action == "unsupported":
                raise ConfigError(
                    f"request.response_format: the endpoint does not take it with this deployment: {tried.reason}"
                )
            if reply is not None and verdict.action == "abort":
                raise RunAborted(self._abort_message(reply), http_status=reply.status)
            if reply is not None and verdict.action == "fail":
                code = error_code(reply.body)
                raise ApiError(
                    row_id,
                    tried.reason,
                    status=reply.status,
                    kind=ErrorKind.HTTP_4XX,
                    code=code,
                    attempts=attempt,
                )
            if verdict.wait_s is not None and verdict.wait_s > cfg.max_retry_after_s:
                raise RunAborted(
                    f"the endpoint asks us to wait {verdict.wait_s:.0f} s, more than limits.max_retry_after_s = "
                    f"{cfg.max_retry_after_s:.0f} s: the quota is used up ({tried.reason})",
                    http_status=tried.status,
                )
            if attempt == cfg.max_attempts:
                raise ApiError(
                    row_id,
                    f"gave up after {cfg.max_attempts} attempts; last: {tried.reason}",
                    status=tried.status,
                    kind=ErrorKind.RETRIES_EXHAUSTED,
                    attempts=cfg.max_attempts,
                )
            wait_s = verdict.wait_s if verdict.wait_s is not None else backoff_s(attempt, cfg, self._rng)
            retrying = tried.cause
            if tried.status == 429:
                log.info(
                    "429 from the endpoint: pausing every worker for %.2f s", wait_s,
                    extra={"event": "paused_on_429", "wait_s": round(wait_s, 3), "row_id": row_id},
                )  # fmt: skip
                self.limits.pause(wait_s)  # every worker waits: the quota is shared
            else:
                with contextlib.suppress(TimeoutError):  # a stop cuts the wait short; acquire then says so
                    await asyncio.wait_for(self._stopping.wait(), wait_s)
        raise AssertionError("unreachable: the last attempt returns or raises")  # pragma: no cover

    async def _attempt(self, plan: RequestPlan, worst_usd: float, retrying: str | None) -> _Tried:
        """One request: hold its cost, reserve the quota, post, read the answer, settle both."""
        hold = await self.budget.hold(worst_usd)  # BudgetReached: the row stays for the next run
        billed_usd: float | None = 0.0  # None: the request may have been billed, for how much is unknown
        try:
            try:
                reservation = await self.limits.acquire(plan.reserve_tokens)
            except LimitsClosed:
                raise NotSent(plan.task.row_id) from None
            if retrying is not None:
                self.retries_by_cause[retrying] += 1
            billed_usd = None  # from here on the request may reach the service
            try:
                reply = await self._post(plan.body)
            except (TimeoutError, aiohttp.ClientError) as err:
                return _Tried(
                    None,
                    Verdict("retry"),
                    retry_cause(None, err),
                    _describe_exception(err, self._cfg.timeout_s),
                )
            self.limits.observe(reply.headers)
            self.http_429s += reply.status == 429
            verdict = classify(reply.status, reply.headers, reply.body, now=time.time())
            billed_usd = self._billed_usd(reply, verdict, plan)
            usage = parse_usage(reply.body) if isinstance(reply.body, Mapping) else None
            if usage is not None:  # the server's own count replaces our estimate in the window
                self.limits.settle(reservation, usage.prompt_tokens + int(plan.body.get("max_tokens", 0)))
            elif reply.status == 429:
                self.limits.settle(reservation, 0)  # a refused request is not charged against the quota
            return _Tried(reply, verdict, retry_cause(reply.status))
        finally:
            self.budget.settle(hold, billed_usd)

    async def _post(self, body: Mapping[str, Any]) -> Reply:
        timeout = aiohttp.ClientTimeout(total=self._cfg.timeout_s)
        async with self._session.post(
            self.endpoint.url, json=body, headers=self.endpoint.headers, timeout=timeout
        ) as response:
            text = await response.text()
        try:
            parsed: object = json.loads(text)
        except ValueError:
            parsed = None  # a proxy's HTML error page, a truncated body: classify retries a 200 like this
        return Reply(response.status, response.headers, parsed, text)

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

    def _abort_message(self, reply: Reply) -> str:
        reason = error_message(reply.body, reply.text)
        if reply.status in (401, 403):
            key = self.endpoint.key_env
            what = (
                f"the key in ${key} (endpoint.api_key_env)"
                if key
                else "us: endpoint.api_key_env is empty, no key sent"
            )
            return f"HTTP {reply.status}: the endpoint refused {what}: {reason}"
        return f"HTTP 404: no such deployment or route, check endpoint.url and endpoint.deployment: {reason}"


def _describe_exception(err: BaseException, timeout_s: float) -> str:
    if isinstance(err, asyncio.TimeoutError):
        return f"no answer within limits.timeout_s = {timeout_s:g} s"
    return f"connection error: {type(err).__name__}: {' '.join(str(err).split())[:ERROR_TEXT_CHARS]}"
