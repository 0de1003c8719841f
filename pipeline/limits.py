"""Requests-per-minute and tokens-per-minute budgets, the global cool-down on 429, and header feedback.

How the quota is kept (Azure's rules, which the emulator's quota mode mirrors):

* A request is charged when it arrives, with its estimated prompt tokens plus ``max_tokens``.
* The quota is enforced over short windows, not per minute: no 10-second window may receive more than a
  sixth of the minute's budget, in tokens and in requests. A log of the reservations of the last
  ``WINDOW_S + WINDOW_SLACK_S`` seconds admits a request only when it fits, so the rule holds exactly and
  the budget is used to the full. The slack covers the difference in transit time between a request and
  the one that takes its place a window later (both travel, so the transit itself cancels out).
* Waiting requests are admitted in order, except that a later one goes first when it fits now and does
  not delay the first in line (backfilling, as batch schedulers do it). Strict order would leave the
  window part-empty while a large request waits for room: 3 to 4 % of the quota with mixed image sizes.
* For one window after the start and after each pause, admissions also keep to the quota's own rate (the
  request that opens the window may run ahead), so the first window fills over 10 s rather than in one
  burst; after that the log replays the same smooth pattern. A pacer kept at the quota's rate for the
  whole run would cost about 4 %: every delay it adds pushes the next window back and is never made up.
* Requests are also kept to a sixtieth of the RPM in any second (aiolimiter), as Azure counts them over
  1-s windows too.
* A 429 pauses every worker until the time the server gave, cuts the budget by a quarter and restarts
  the ramp; the budget then grows back linearly over ``RECOVERY_S`` (the deployment's quota may be
  shared with other clients).
* ``x-ratelimit-remaining-tokens`` / ``-requests`` lower than our own view means someone else uses the
  quota: the difference is booked into the window so we slow down before the server says 429.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

from aiolimiter import AsyncLimiter

WINDOW_S = 10.0  # Azure evaluates the per-minute quota over 10-second windows
WINDOWS_PER_MINUTE = 6
# Keep reservations a little longer than the server does; each 0.1 s costs 1 % of the quota. Transit to
# the in-process emulator varies by ~2 ms (36 ms at worst); a request that still comes too early gets a 429.
WINDOW_SLACK_S = 0.05
BACKOFF_FACTOR = 0.75  # budget share kept after a 429
MIN_SHARE = 0.25  # never throttle below this share of the configured budget
RECOVERY_S = 30.0  # time to grow from MIN_SHARE back to the full budget
TIMER_EARLY_S = 1e-6  # asyncio may run a timer up to its clock's resolution early: count that as on time


class LimitsClosed(Exception):
    """The run is stopping: ``Limits.close`` was called, and nothing more is admitted."""


@dataclass(slots=True, eq=False)  # two bookings of the same size at the same time are still two
class Reservation:
    """One admitted request in the window; `tokens` is corrected once the bill is known.

    `requests` is 1, or what others used according to the server's headers (see `Limits.observe`).
    `in_window`: still counted in the window log, so that settling it is O(1), not a scan of the log.
    """

    at: float
    tokens: int
    requests: int = 1
    in_window: bool = False


class _WindowLog:
    """The reservations of the last WINDOW_S + WINDOW_SLACK_S seconds."""

    def __init__(self) -> None:
        self.entries: deque[Reservation] = deque()
        self.tokens = 0
        self.requests = 0

    def add(self, reservation: Reservation) -> None:
        self.entries.append(reservation)
        reservation.in_window = True
        self.tokens += reservation.tokens
        self.requests += reservation.requests

    def expire(self, now: float) -> None:
        while self.entries and self.entries[0].at + WINDOW_S + WINDOW_SLACK_S <= now + TIMER_EARLY_S:
            gone = self.entries.popleft()
            gone.in_window = False
            self.tokens -= gone.tokens
            self.requests -= gone.requests

    def wait_s(
        self, now: float, tokens: int, token_cap: float, request_cap: float, ahead: int | None
    ) -> float:
        """How long until a request of `tokens` fits, 0 when it fits now. `ahead`: the tokens of one more
        request booked now, before it. A request larger than the token cap goes alone, into an empty window.
        """
        self.expire(now)
        if not self.entries and ahead is None:
            return 0.0
        used, count = self.tokens, self.requests
        if ahead is not None:
            used, count = used + ahead, count + 1
        if used + tokens <= token_cap and count + 1 <= request_cap:
            return 0.0
        # oldest first: the first expiry after which it fits
        for n, entry in enumerate(self.entries, start=1):
            used, count = used - entry.tokens, count - entry.requests
            is_empty = n == len(self.entries) and ahead is None
            if is_empty or (used + tokens <= token_cap and count + 1 <= request_cap):
                return entry.at + WINDOW_S + WINDOW_SLACK_S - now
        return WINDOW_S + WINDOW_SLACK_S  # it must wait for the request booked ahead of it to leave


class _Ramp:
    """For one window from `start`, admissions at most at `per_s`; the one that opens the way runs ahead."""

    def __init__(self, per_s: float, start: float) -> None:
        self.per_s = per_s
        self.start = start
        self.used = 0.0

    def wait_s(self, now: float, ahead: float = 0.0) -> float:
        end = self.start + WINDOW_S
        if now >= end:
            return 0.0
        return max(0.0, min(end, self.start + (self.used + ahead) / self.per_s) - now)

    def take(self, now: float, amount: float) -> None:
        if now < self.start + WINDOW_S:
            self.used += amount


@dataclass(slots=True)
class _Waiter:
    tokens: int
    admitted: asyncio.Future[Reservation]


class Limits:
    """The run's shared request and token budgets. Create inside the running loop, one per run."""

    def __init__(self, tokens_per_minute: int, requests_per_minute: int) -> None:
        self.tokens_per_minute = tokens_per_minute
        self.requests_per_minute = requests_per_minute
        self._loop = asyncio.get_running_loop()
        now = self._loop.time()
        self._log = _WindowLog()
        self._waiting: deque[_Waiter] = deque()  # in order of arrival
        self._timer: asyncio.TimerHandle | None = None  # wakes the waiting when the first in line may go
        self._token_ramp = _Ramp(tokens_per_minute / 60, now)
        self._request_ramp = _Ramp(max(1.0, requests_per_minute / WINDOWS_PER_MINUTE) / WINDOW_S, now)
        # aiolimiter keeps any second to its share of the RPM (Azure's other, 1-s window); it binds only
        # when requests, not tokens, are the scarce budget
        self._per_second = AsyncLimiter(max(1.0, requests_per_minute / 60), 1.0)
        self._resume_at = 0.0
        self._share = 1.0
        self._share_at = now
        self.pauses = 0
        self.paused_s = 0.0
        self._closed = False

    def close(self) -> None:
        """Admit nothing more: every waiting ``acquire``, and every later one, raises LimitsClosed now."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.admitted.done():
                waiter.admitted.set_exception(LimitsClosed())

    def admits(self, tokens: int) -> bool:
        """Whether a request reserving `tokens` can ever be sent under the per-minute budget."""
        return tokens <= self.tokens_per_minute

    async def acquire(self, tokens: int) -> Reservation:
        """Wait until one request of `tokens` fits every budget, then book it. Raises ValueError when
        `tokens` exceeds the whole per-minute budget (check `admits` first), LimitsClosed after ``close``."""
        if not self.admits(tokens):
            raise ValueError(f"{tokens} tokens exceed limits.tokens_per_minute = {self.tokens_per_minute}")
        if self._closed:
            raise LimitsClosed()
        waiter = _Waiter(tokens, self._loop.create_future())
        self._waiting.append(waiter)
        self._admit()
        try:
            reservation = await waiter.admitted
            await self._per_second.acquire(1)  # Azure also counts requests over 1-s windows
            if self._closed:  # closed while this one was admitted but not yet on its way
                self.settle(reservation, 0)
                raise LimitsClosed()
            return reservation
        except asyncio.CancelledError:
            admitted = waiter.admitted
            if admitted.done() and not admitted.cancelled() and admitted.exception() is None:
                self.settle(admitted.result(), 0)  # booked but never sent: give its tokens back
            self._admit()  # the next in line may go sooner
            raise

    def _admit(self) -> None:
        """Admit every waiting request that may go now, then set the timer for the first in line."""
        now = self._loop.time()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._waiting and self._waiting[0].admitted.done():  # cancelled while waiting
            self._waiting.popleft()
        while self._waiting and self._wait_s(now, self._waiting[0].tokens) <= TIMER_EARLY_S:
            first = self._waiting.popleft()
            if not first.admitted.done():
                first.admitted.set_result(self._book(now, first.tokens))
        if not self._waiting:
            return
        first = self._waiting[0]
        first_wait_s = self._wait_s(now, first.tokens)
        for waiter in list(self._waiting)[1:]:  # backfill: go first when the first in line is not delayed
            if waiter.admitted.done():
                self._waiting.remove(waiter)
            elif self._wait_s(now, waiter.tokens) <= TIMER_EARLY_S and (
                self._wait_s(now, first.tokens, ahead=waiter.tokens) <= first_wait_s
            ):
                self._waiting.remove(waiter)
                waiter.admitted.set_result(self._book(now, waiter.tokens))
        self._timer = self._loop.call_at(now + first_wait_s, self._admit)

    def _book(self, now: float, tokens: int) -> Reservation:
        reservation = Reservation(now, tokens)
        self._log.add(reservation)
        self._token_ramp.take(now, tokens)
        self._request_ramp.take(now, 1)
        return reservation

    def _wait_s(self, now: float, tokens: int, ahead: int | None = None) -> float:
        """How long a request of `tokens` must wait; `ahead`: with one more request booked now before it."""
        share = self._current_share(now)
        token_cap = self.tokens_per_minute / WINDOWS_PER_MINUTE * share
        request_cap = max(1.0, self.requests_per_minute / WINDOWS_PER_MINUTE * share)
        return max(
            self._resume_at - now,
            self._log.wait_s(now, tokens, token_cap, request_cap, ahead),
            self._token_ramp.wait_s(now, ahead or 0),
            self._request_ramp.wait_s(now, 0 if ahead is None else 1),
        )

    def _current_share(self, now: float) -> float:
        grown = self._share + (now - self._share_at) * (1 - MIN_SHARE) / RECOVERY_S
        self._share, self._share_at = min(1.0, grown), now
        return self._share

    def settle(self, reservation: Reservation, tokens: int) -> None:
        """Correct a reservation with what the server billed (prompt tokens + max_tokens)."""
        if reservation.in_window:  # not `in self._log.entries`: a scan of the window per row
            self._log.tokens += tokens - reservation.tokens
        reservation.tokens = tokens
        if self._waiting:
            self._admit()  # a smaller bill may make room now

    def move(self, reservation: Reservation, at: float) -> None:
        """Count `reservation` from `at` (loop time), when it is later than its booking: the request left
        after its admission by more than the same process would take (a Ray worker's, shared_quota.py)."""
        entries = self._log.entries
        if at <= reservation.at or reservation not in entries:
            return
        entries.remove(reservation)
        reservation.at = at
        index = len(entries)
        while index > 0 and entries[index - 1].at > at:  # the log stays in order of time: expiry reads it so
            index -= 1
        entries.insert(index, reservation)

    def pause(self, wait_s: float) -> None:
        """A 429: stop every worker for `wait_s` seconds, then resume gradually at a reduced budget."""
        if self._closed:
            return  # nothing will be sent again: a pause would only be counted
        now = self._loop.time()
        resume_at = now + wait_s
        if resume_at > self._resume_at:
            self.paused_s += resume_at - max(now, self._resume_at)
            self._resume_at = resume_at
        self.pauses += 1
        self._share = max(MIN_SHARE, self._current_share(now) * BACKOFF_FACTOR)
        self._token_ramp = _Ramp(self._token_ramp.per_s, self._resume_at)
        self._request_ramp = _Ramp(self._request_ramp.per_s, self._resume_at)
        if self._waiting:
            self._admit()

    @property
    def is_paused(self) -> bool:
        return self._loop.time() < self._resume_at

    def observe(self, headers: Mapping[str, str]) -> None:
        """Book quota that others use, as told by x-ratelimit-remaining-* (per-minute figures)."""
        now = self._loop.time()
        self._log.expire(now)
        left_tokens = headers.get("x-ratelimit-remaining-tokens")
        left_requests = headers.get("x-ratelimit-remaining-requests")
        unseen_tokens = _unseen(left_tokens, self.tokens_per_minute, self._log.tokens)
        unseen_requests = _unseen(left_requests, self.requests_per_minute, self._log.requests)
        if unseen_tokens or unseen_requests:
            self._log.add(Reservation(now, unseen_tokens, unseen_requests))


def _unseen(remaining: str | None, per_minute: int, ours: int) -> int:
    """How much of a window the server counts beyond our own reservations: 0 when it counts less."""
    if remaining is None:
        return 0
    try:
        server_left = float(remaining) / WINDOWS_PER_MINUTE
    except ValueError:
        return 0
    our_left = per_minute / WINDOWS_PER_MINUTE - ours
    return int(our_left - server_left) if server_left < our_left - 1 else 0
