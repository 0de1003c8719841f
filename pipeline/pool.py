"""The live transport: a pool of endpoints, which endpoint each request goes to, and the one retry loop.

A run has one endpoint (``[endpoint]``) or several (``[[endpoints]]``); either way it is a ``Pool``, the
single form a pool of one, so there is one retry loop and one set of rules:

* **Route by room.** Each endpoint keeps its own budget and 429 pauses (``limits.py``). A request is
  offered to every endpoint in service at once and goes to the first that admits it; the offers at the
  others are withdrawn unsent. Admitted by several at the same moment, it goes to the one with the most
  room left in its window.
* **429.** It holds only its endpoint, for exactly what the server asked (``client.retry_after_s``); the
  row is offered again at once and goes wherever there is room. A 429 asking longer than
  ``limits.max_retry_after_s`` means that endpoint's quota is gone: it is taken out for the run.
* **401/403/404** take their endpoint out for the run, with one log line naming it and its key variable.
  When no endpoint is left, the run stops (``RunAborted``, exit 3).
* **Circuit breaker.** 5xx answers, timeouts and connection failures count against their endpoint;
  ``BREAKER_FAILURES`` in a row take it out for ``BREAKER_OPEN_S`` (doubling to ``BREAKER_MAX_OPEN_S``)
  while another endpoint is in service. Its requests on the wire are ended at once and its waiting rows
  go elsewhere; then one probe request is let through (half-open), and an answer puts it back. With no
  other endpoint in service the breaker stays closed and rows back off and retry as a single endpoint's
  do.
* **Attempts.** A row fails after ``limits.max_attempts`` attempts that failed on endpoints healthy at
  the time: an attempt lost to an endpoint that was (or thereby was) taken out does not count.
* **Pauses.** ``paused_s`` is the time every endpoint was held at once (no worker could send); each
  endpoint's own held time is in its counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from pipeline.budget import Budget
from pipeline.client import Client, Tried, backoff_s, endpoint_for, error_code
from pipeline.config import LimitsConfig, PoolMember, RunConfig
from pipeline.limits import Limits, LimitsClosed, Reservation
from pipeline.records import (
    ApiError,
    ConfigError,
    Delivery,
    EndpointCounters,
    ErrorKind,
    NotSent,
    RunAborted,
    TransportCounters,
)
from pipeline.request import RequestPlan

log = logging.getLogger(__name__)

BREAKER_FAILURES = 3  # 5xx, timeouts or connection failures in a row that take an endpoint out a while
BREAKER_OPEN_S = 5.0  # its first time out; doubled each time its probe fails
BREAKER_MAX_OPEN_S = 60.0


@dataclass(slots=True, eq=False)
class Member:
    """One endpoint of the pool and the state the pool keeps about it."""

    name: str
    client: Client
    tokens_per_minute: int
    where: str = "endpoint"  # how the config names it: endpoint, or endpoints[1]
    failures: int = 0  # 5xx, timeouts and connection failures in a row
    is_tripped: bool = False  # the breaker is open (or half-open once `open_until` has passed)
    open_until: float = 0.0
    open_s: float = BREAKER_OPEN_S  # how long the next trip lasts
    is_probing: bool = False  # half-open: the one request let through is on its way
    trips: int = 0
    out_because: str | None = None  # taken out for the run

    def takes_new(self, now: float) -> bool:
        """Whether a new request may be offered to it now."""
        if self.out_because is not None:
            return False
        return not self.is_tripped or (now >= self.open_until and not self.is_probing)

    def is_in_service(self) -> bool:
        return self.out_because is None and not self.is_tripped

    def held_until(self) -> float:
        """Until when it admits nothing (loop time): its 429 hold or its breaker; forever once out."""
        if self.out_because is not None:
            return math.inf
        return max(self.client.limits.resume_at, self.open_until if self.is_tripped else 0.0)


def open_pool(
    cfg: RunConfig,
    keys: Mapping[str, str | None],
    session: aiohttp.ClientSession,
    budget: Budget,
    limits_for: Callable[[PoolMember], Limits] = lambda m: Limits(m.tokens_per_minute, m.requests_per_minute),
) -> Pool:
    """The run's pool: a client and budgets per endpoint of ``cfg.pool``; `keys` by endpoint name.
    `limits_for` makes each endpoint's quota (a Ray worker's: ``shared_quota.SharedLimits``)."""
    members = [
        Member(
            m.name,
            Client(session, endpoint_for(m.endpoint, keys[m.name]), limits_for(m), cfg.limits, budget),
            m.tokens_per_minute,
            f"endpoints[{n}]" if cfg.endpoints else "endpoint",
        )
        for n, m in enumerate(cfg.pool)
    ]
    return Pool(members, cfg.limits, random.Random(), budget)


class Pool:
    """The live transport over one or more endpoints (see the module docstring). Create in the loop."""

    def __init__(
        self, members: Sequence[Member], cfg: LimitsConfig, rng: random.Random, budget: Budget
    ) -> None:
        if not members:
            raise ValueError("a pool needs at least one endpoint")
        self.members = list(members)
        self.budget = budget
        self._cfg = cfg
        self._rng = rng
        self._loop = asyncio.get_running_loop()
        self._changed: asyncio.Future[None] = self._loop.create_future()  # set when who takes rows changes
        self._stopping = asyncio.Event()
        self._aborted: RunAborted | None = None
        self._wakers: list[asyncio.TimerHandle] = []
        self.retries_by_cause: Counter[str] = Counter()
        self.paused_s = 0.0  # every endpoint held at once
        self._all_held_until = 0.0

    def stop_sending(self) -> None:
        """Start no more attempts: requests on the wire finish; rows waiting for an endpoint, or backing off
        before a retry, end at once, not sent."""
        self._stopping.set()
        for member in self.members:
            member.client.limits.close()
        for waker in self._wakers:
            waker.cancel()
        self._signal()

    def counters(self) -> TransportCounters:
        """What the pool has met so far: 429s, retries by cause, pauses; and the same per endpoint."""
        now = self._loop.time()
        endpoints = tuple(
            EndpointCounters(
                name=m.name,
                tokens_per_minute=m.tokens_per_minute,
                requests=m.client.requests,
                charged_tokens=m.client.charged_tokens,
                http_429s=m.client.http_429s,
                pauses=m.client.limits.pauses,
                held_s=round(m.client.limits.paused_s, 3),
                breaker_trips=m.trips,
                out_because=m.out_because,
            )
            for m in self.members
        )
        return TransportCounters(
            http_429s=sum(e.http_429s for e in endpoints),
            retries_by_cause=dict(self.retries_by_cause),
            pauses=sum(e.pauses for e in endpoints),
            paused_s=self.paused_s,
            is_paused=all(m.held_until() > now for m in self.members),
            endpoints=endpoints,
        )

    async def send(self, plan: RequestPlan) -> Delivery:
        """Send one planned request, retrying what is worth retrying, and return the answer that is a result.

        Every attempt first holds its worst-case cost within the spend cap (``budget.py``), then goes to
        the endpoint that admits it first. Raises ApiError when the row fails (not retryable, or out of
        attempts), RunAborted when no endpoint is left, ConfigError when the service refuses a setting,
        BudgetReached when the cap has no room for the attempt, and NotSent when an attempt was due after
        ``stop_sending``.
        """
        cfg, row_id = self._cfg, plan.task.row_id
        worst_usd = self.budget.worst_case_usd(
            plan.estimated_prompt_tokens, int(plan.body.get("max_tokens", 0))
        )
        counted = sent = 0  # attempts that count toward max_attempts; attempts sent
        retrying: str | None = None  # the retry_cause of the attempt before, counted once this one is sent
        while True:
            member, tried = await self._attempt(plan, worst_usd, retrying)
            sent += 1
            reply, verdict = tried.reply, tried.verdict
            if reply is not None and reply.status < 500:
                self._answered(member)
            if (
                reply is not None
                and verdict.action in ("done", "filtered")
                and isinstance(reply.body, Mapping)
            ):
                return Delivery(reply.status, reply.body, sent, endpoint=member.name)
            if reply is not None and verdict.action == "unsupported":
                raise ConfigError(
                    f"request.response_format: the endpoint does not take it with this deployment: {tried.reason}"
                )
            if reply is not None and verdict.action == "fail":
                raise ApiError(
                    row_id,
                    tried.reason,
                    status=reply.status,
                    kind=ErrorKind.HTTP_4XX,
                    code=error_code(reply.body),
                    attempts=sent,
                    endpoint=member.name,
                )
            is_lost = self._judge(member, tried, plan.reserve_tokens)
            if not is_lost or sent - counted > cfg.max_attempts * len(self.members):
                counted += 1
            if counted >= cfg.max_attempts:
                raise ApiError(
                    row_id,
                    f"gave up after {cfg.max_attempts} attempts; last: {tried.reason}",
                    status=tried.status,
                    kind=ErrorKind.RETRIES_EXHAUSTED,
                    attempts=sent,
                    endpoint=member.name,
                )
            retrying = tried.cause
            if not is_lost and tried.status != 429:
                wait_s = verdict.wait_s if verdict.wait_s is not None else backoff_s(counted, cfg, self._rng)
                with contextlib.suppress(TimeoutError):  # a stop cuts the wait short; routing then says so
                    await asyncio.wait_for(self._stopping.wait(), wait_s)

    def _judge(self, member: Member, tried: Tried, tokens: int) -> bool:
        """Book a retryable outcome of a request of `tokens` against its endpoint; True when the attempt was
        lost to an endpoint that is (now) out of service, so it does not count toward the row's attempts."""
        verdict, status = tried.verdict, tried.status
        if tried.is_moved:
            return True
        if verdict.action == "abort" and tried.reply is not None:
            self._take_out(member, member.client.refusal_message(tried.reply, member.name, member.where))
            return True
        if verdict.wait_s is not None and verdict.wait_s > self._cfg.max_retry_after_s:
            self._take_out(
                member,
                f"endpoint {member.name!r} asks us to wait {verdict.wait_s:.0f} s, more than "
                f"limits.max_retry_after_s = {self._cfg.max_retry_after_s:.0f} s: its quota is used up "
                f"({tried.reason})",
            )
            return True
        if status == 429:
            wait_s = verdict.wait_s if verdict.wait_s is not None else backoff_s(1, self._cfg, self._rng)
            log.info(
                "429 from endpoint %r: holding it for %.2f s", member.name, wait_s,
                extra={"event": "paused_on_429", "endpoint": member.name, "wait_s": round(wait_s, 3)},
            )  # fmt: skip
            member.client.limits.pause(wait_s, tokens)
            self._note_holds()
            return False
        if status is None or status >= 500:
            return self._failed(member)
        return False  # 408, 409, a 200 without choices: the endpoint answered

    def _answered(self, member: Member) -> None:
        """An answer came (not a 5xx): the endpoint works."""
        member.failures = 0
        if member.is_tripped and member.is_probing:
            member.is_tripped = member.is_probing = False
            member.open_s = BREAKER_OPEN_S
            log.info("endpoint %r answered its probe: back in service", member.name,
                     extra={"event": "endpoint_back", "endpoint": member.name})  # fmt: skip
            self._signal()

    def _failed(self, member: Member) -> bool:
        """A 5xx, timeout or connection failure at `member`; True when the attempt does not count."""
        now = self._loop.time()
        if member.out_because is not None or (member.is_tripped and not member.is_probing):
            return True  # lost on an endpoint already taken out
        member.failures += 1
        others = any(m.is_in_service() for m in self.members if m is not member)
        if not others:
            member.is_tripped = member.is_probing = False  # nowhere else to go: back off as one endpoint does
            return False
        if member.is_probing or member.failures >= BREAKER_FAILURES:
            if member.is_probing:
                member.open_s = min(BREAKER_MAX_OPEN_S, member.open_s * 2)
            member.is_tripped, member.is_probing = True, False
            member.open_until = now + member.open_s
            member.trips += 1
            log.warning(
                "endpoint %r: %d failures in a row; its rows go elsewhere for %.0f s", member.name,
                member.failures, member.open_s,
                extra={"event": "endpoint_tripped", "endpoint": member.name, "open_s": member.open_s},
            )  # fmt: skip
            member.client.abandon_in_flight()
            self._wakers.append(self._loop.call_at(member.open_until, self._signal))
            self._note_holds()
            self._signal()
            return True
        return False

    def _take_out(self, member: Member, reason: str) -> None:
        """Take `member` out for the run; when it was the last, the run stops."""
        if member.out_because is not None:
            return
        member.out_because = reason
        log.error(
            "taken out for the run: %s", reason,
            extra={"event": "endpoint_out", "endpoint": member.name, "api_key_env": member.client.endpoint.key_env},
        )  # fmt: skip
        member.client.limits.close()
        member.client.abandon_in_flight()
        if all(m.out_because is not None for m in self.members):
            reasons = [m.out_because or "" for m in self.members]
            self._aborted = RunAborted(
                reasons[0] if len(reasons) == 1 else "no endpoint left: " + "; ".join(reasons)
            )
        self._note_holds()
        self._signal()

    def _signal(self) -> None:
        """Wake every row waiting for an endpoint: which endpoints take rows has changed."""
        self._wakers = [w for w in self._wakers if not w.cancelled() and w.when() > self._loop.time()]
        changed, self._changed = self._changed, self._loop.create_future()
        if not changed.done():
            changed.set_result(None)

    def _note_holds(self) -> None:
        """Count the time every endpoint is held at once into ``paused_s`` (no worker can send then)."""
        now = self._loop.time()
        until = min(m.held_until() for m in self.members)
        if math.isfinite(until) and until > max(now, self._all_held_until):
            self.paused_s += until - max(now, self._all_held_until)
            self._all_held_until = until

    async def _attempt(
        self, plan: RequestPlan, worst_usd: float, retrying: str | None
    ) -> tuple[Member, Tried]:
        """One request: hold its cost, find it an endpoint, post, settle the hold."""
        hold = await self.budget.hold(worst_usd)  # BudgetReached: the row stays for the next run
        billed_usd: float | None = 0.0  # None: the request may have been billed, for how much is unknown
        try:
            member, reservation = await self._route(plan, is_retry=retrying is not None)
            try:
                if retrying is not None:
                    self.retries_by_cause[retrying] += 1
                billed_usd = None  # from here on the request may reach the service
                tried = await member.client.attempt(plan, reservation)
            except BaseException:
                member.is_probing = False  # a probe that never finished: let another go
                raise
            billed_usd = tried.billed_usd
            return member, tried
        finally:
            self.budget.settle(hold, billed_usd)

    async def _route(self, plan: RequestPlan, *, is_retry: bool) -> tuple[Member, Reservation]:
        """The endpoint that admits the request first, and its booking there, paced and ready to send.

        Raises NotSent after ``stop_sending``, RunAborted when no endpoint is left."""
        row_id, tokens = plan.task.row_id, plan.reserve_tokens
        offers: dict[Member, asyncio.Future[Reservation]] = {}
        try:
            while True:
                if self._stopping.is_set():
                    raise NotSent(row_id)
                if self._aborted is not None:
                    raise self._aborted
                left = [m for m in self.members if m.out_because is None]
                if not any(m.client.limits.admits(tokens) for m in left):
                    raise ApiError(
                        row_id,
                        f"needs {tokens} tokens, more than the minute's budget of any endpoint left "
                        f"({', '.join(m.name for m in left)}); not sent",
                        status=None,
                        kind=ErrorKind.OVER_BUDGET,
                    )
                now = self._loop.time()
                for member in [m for m in offers if not m.takes_new(now)]:
                    member.client.limits.withdraw(offers.pop(member))
                for member in self.members:
                    if member not in offers and member.takes_new(now) and member.client.limits.admits(tokens):
                        offers[member] = member.client.limits.offer(tokens, is_retry=is_retry)
                if not any(offered.done() for offered in offers.values()):  # admitted at once: no loop trip
                    waiting: list[asyncio.Future[Any]] = [*offers.values(), self._changed]
                    await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                admitted = []
                for member, offered in list(offers.items()):
                    if not offered.done():
                        continue
                    if offered.cancelled() or offered.exception() is not None:  # closed: out or stopping
                        del offers[member]
                    elif member.takes_new(self._loop.time()):
                        admitted.append(member)
                if not admitted:
                    continue
                chosen = max(admitted, key=lambda m: m.client.limits.room)
                reservation = offers.pop(chosen).result()
                for member, offered in offers.items():
                    member.client.limits.withdraw(offered)
                offers.clear()
                if chosen.is_tripped:
                    chosen.is_probing = True  # half-open: this request is the probe
                try:
                    return chosen, await chosen.client.limits.take(reservation)
                except LimitsClosed:
                    chosen.is_probing = False
                    continue  # taken out (or stopping) between admission and sending
        finally:
            for member, offered in offers.items():
                member.client.limits.withdraw(offered)
