"""One endpoint's requests-per-minute and tokens-per-minute budgets, its 429 holds, and header feedback.

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
* For one window after the start and after each pause of a window or more, admissions also keep to the quota's own rate (the
  request that opens the window may run ahead), so the first window fills over 10 s rather than in one
  burst; after that the log replays the same smooth pattern. A pacer kept at the quota's rate for the
  whole run would cost about 4 %: every delay it adds pushes the next window back and is never made up.
* Requests are also kept to a sixtieth of the RPM in any second (aiolimiter), as Azure counts them over
  1-s windows too.
* A 429 holds this endpoint for exactly the time the server gave, and no longer. (Cutting the budget by
  a quarter after each 429 cost the steady pool ~10 % of its quota, since a 429 at a window's edge
  comes from transit jitter, not from others; a quota shared with other clients is followed through
  the headers instead: bench/pool.py.) When the hold is shorter than a window, it ends with room for the
  refused request only: the rest wait for an answer's fresh headers, or every request our stale view had
  room for would go at once into the same full window and draw the next 429 (see ``Limits.pause``).
* ``x-ratelimit-remaining-tokens`` / ``-requests`` lower than our own view means someone else uses the
  quota: the difference is booked into the window (each answer replaces the figure of the one before),
  so we slow down before the server says 429 (see ``Limits.observe``). On a 429 these headers say
  nothing new: the client does not pass them here, or "0 remaining" would hold the endpoint a whole
  window instead of what it asked.
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
# A 429 asking for less than this, when our log had room, says the server counts our requests later than
# we do (a busy server charges after reading the body): the slack grows by what it asked, up to this
# (at most 2.5 % of the quota), so the next window's edge does not draw the same 429.
MAX_WINDOW_SLACK_S = 0.25
# While others use the quota, this share of the window is kept free of ours: they send between our
# answers, and a window we fill to the brim has no room for that.
OTHERS_MARGIN_SHARE = 0.05
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
    in_window: bool = False  # set by _WindowLog only


class _WindowLog:
    """The reservations of the last WINDOW_S + `slack_s` seconds."""

    def __init__(self) -> None:
        self.slack_s = WINDOW_SLACK_S
        self.entries: deque[Reservation] = deque()
        self.tokens = 0
        self.requests = 0

    def add(self, reservation: Reservation) -> None:
        self.entries.append(reservation)
        reservation.in_window = True
        self.tokens += reservation.tokens
        self.requests += reservation.requests

    def remove(self, reservation: Reservation) -> None:
        """Take `reservation` out of the log. It is among the newest (booked, restamped or others' share
        of the last answer): searched from the right, so that this costs little with a long window."""
        for back, entry in enumerate(reversed(self.entries)):
            if entry is reservation:
                del self.entries[len(self.entries) - 1 - back]
                break
        reservation.in_window = False
        self.tokens -= reservation.tokens
        self.requests -= reservation.requests

    def insert(self, reservation: Reservation) -> None:
        """Put `reservation` back in order of time (expiry reads the log from the left)."""
        index = len(self.entries)
        while index > 0 and self.entries[index - 1].at > reservation.at:
            index -= 1
        self.entries.insert(index, reservation)
        reservation.in_window = True
        self.tokens += reservation.tokens
        self.requests += reservation.requests

    def expire(self, now: float) -> None:
        while self.entries and self.entries[0].at + WINDOW_S + self.slack_s <= now + TIMER_EARLY_S:
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
                return entry.at + WINDOW_S + self.slack_s - now
        return WINDOW_S + self.slack_s  # it must wait for the request booked ahead of it to leave


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

    def give_back(self, at: float, amount: float) -> None:
        """Undo a ``take`` made at `at` of a booking withdrawn unsent."""
        if self.start <= at < self.start + WINDOW_S:
            self.used = max(0.0, self.used - amount)


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
        self._others: Reservation | None = None  # what others used, per the last answer's headers
        self._resume_at = 0.0
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
        offered = self.offer(tokens)
        try:
            reservation = await offered
        except asyncio.CancelledError:
            self.withdraw(offered)
            raise
        return await self.take(reservation)

    def offer(self, tokens: int, *, is_retry: bool = False) -> asyncio.Future[Reservation]:
        """Queue one request of `tokens`; the future is its booking once admitted (LimitsClosed after
        ``close``). A pool offers a request to several endpoints and ``withdraw``s it from all but one.
        A retry goes before the requests not yet sent: its row has waited once already (and one moved
        off a failed endpoint must not wait behind a full queue)."""
        if not self.admits(tokens):
            raise ValueError(f"{tokens} tokens exceed limits.tokens_per_minute = {self.tokens_per_minute}")
        admitted: asyncio.Future[Reservation] = self._loop.create_future()
        if self._closed:
            admitted.set_exception(LimitsClosed())
            return admitted
        waiter = _Waiter(tokens, admitted)
        if is_retry:
            self._waiting.appendleft(waiter)
        else:
            self._waiting.append(waiter)
        self._admit()
        return admitted

    def withdraw(self, offered: asyncio.Future[Reservation]) -> None:
        """Take an offer back: a waiting one leaves the line; a booked one leaves the window unsent."""
        if not offered.done():
            offered.cancel()
        elif not offered.cancelled() and offered.exception() is None:
            reservation = offered.result()
            if reservation.in_window:
                self._log.remove(reservation)
                self._token_ramp.give_back(reservation.at, reservation.tokens)
                self._request_ramp.give_back(reservation.at, 1)
        if self._waiting:
            self._admit()  # the next in line may go sooner

    def restamp(self, reservation: Reservation) -> None:
        """The request has just gone out (its headers are sent): its time in the window is now, not when it
        was admitted. Opening a new connection can take longer than the window's slack, and the server
        counts the request from its arrival. (A Ray worker's request is restamped by its quota keeper when
        the worker says it is sent: shared_quota.py.)"""
        now = self._loop.time()
        if now <= reservation.at or not reservation.in_window:
            return
        self._log.remove(reservation)
        reservation.at = now
        self._log.insert(reservation)

    async def take(self, reservation: Reservation) -> Reservation:
        """Send a booked request once the per-second pacer lets it go. Raises LimitsClosed after ``close``."""
        try:
            await self._per_second.acquire(1)  # Azure also counts requests over 1-s windows
        except asyncio.CancelledError:
            self.settle(reservation, 0)  # booked but never sent: give its tokens back
            raise
        if self._closed:  # closed while this one was admitted but not yet on its way
            self.settle(reservation, 0)
            raise LimitsClosed()
        return reservation

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
        token_cap = self.tokens_per_minute / WINDOWS_PER_MINUTE
        request_cap = max(1.0, self.requests_per_minute / WINDOWS_PER_MINUTE)
        return max(
            self._resume_at - now,
            self._log.wait_s(now, tokens, token_cap, request_cap, ahead),
            self._token_ramp.wait_s(now, ahead or 0),
            self._request_ramp.wait_s(now, 0 if ahead is None else 1),
        )

    def settle(self, reservation: Reservation, tokens: int) -> None:
        """Correct a reservation with what the server billed (prompt tokens + max_tokens)."""
        if reservation.in_window:  # not `in self._log.entries`: a scan of the window per row
            self._log.tokens += tokens - reservation.tokens
        reservation.tokens = tokens
        if self._waiting:
            self._admit()  # a smaller bill may make room now

    def pause(self, wait_s: float, tokens: int = 0) -> None:
        """A 429 refusing a request of `tokens`: admit nothing for exactly `wait_s` seconds. After a hold
        of a window or more the window is empty, as at the start: admissions then ramp up again rather than
        go in one burst. A shorter hold ends with room for that one request only (``_book_refusal``)."""
        if self._closed:
            return  # nothing will be sent again: a pause would only be counted
        if 0 < tokens and wait_s < WINDOW_S:
            self._book_refusal(self._loop.time() + wait_s, tokens)
        self.hold(wait_s)
        self.pauses += 1
        if wait_s < MAX_WINDOW_SLACK_S:
            self._log.slack_s = min(MAX_WINDOW_SLACK_S, self._log.slack_s + wait_s)
        if wait_s >= WINDOW_S:
            self._token_ramp = _Ramp(self._token_ramp.per_s, self._resume_at)
            self._request_ramp = _Ramp(self._request_ramp.per_s, self._resume_at)
        if self._waiting:
            self._admit()

    def _book_refusal(self, resume_at: float, tokens: int) -> None:
        """The server says the window is full now and has room for a request of `tokens` at `resume_at`:
        book as others' the gap between that and our view, so that when the hold ends the retry goes and
        the rest wait for an answer's fresh headers (``observe`` replaces this booking). Without it every
        request our stale view has room for goes at the end of the hold, and each short hold ends in more
        429s (bench/pool.py, the shared case)."""
        now = self._loop.time()
        self._log.expire(now)
        others = self._others if self._others is not None and self._others.in_window else None
        gone_by = resume_at - WINDOW_S - self._log.slack_s  # ours booked before this have left by then
        own = [e for e in self._log.entries if e is not others and e.at > gone_by]
        token_gap = int(self.tokens_per_minute / WINDOWS_PER_MINUTE) - tokens - sum(e.tokens for e in own)
        request_gap = int(max(1.0, self.requests_per_minute / WINDOWS_PER_MINUTE)) - 1 - len(own)
        if others is not None:
            if others.tokens >= token_gap and others.requests >= request_gap:
                return
            token_gap, request_gap = max(token_gap, others.tokens), max(request_gap, others.requests)
            self._log.remove(others)
            self._others = None
        if token_gap > 0 or request_gap > 0:
            self._others = Reservation(now, max(0, token_gap), max(0, request_gap))
            self._log.add(self._others)

    def hold(self, wait_s: float) -> None:
        """Admit nothing for `wait_s` seconds (counted in ``paused_s``), the budget unchanged."""
        now = self._loop.time()
        resume_at = now + wait_s
        if resume_at > self._resume_at:
            self.paused_s += resume_at - max(now, self._resume_at)
            self._resume_at = resume_at
        if self._waiting:
            self._admit()

    @property
    def resume_at(self) -> float:
        """The loop time until which nothing is admitted (past: nothing held)."""
        return self._resume_at

    @property
    def room(self) -> float:
        """The share of this window's token budget not yet booked, 0..1: how the pool breaks ties."""
        now = self._loop.time()
        self._log.expire(now)
        return max(0.0, 1.0 - self._log.tokens / (self.tokens_per_minute / WINDOWS_PER_MINUTE))

    @property
    def is_paused(self) -> bool:
        return self._loop.time() < self._resume_at

    def observe(self, headers: Mapping[str, str]) -> None:
        """Book quota that others use, as told by x-ratelimit-remaining-* (per-minute figures).

        What the server counts beyond our own reservations is someone else's: it is booked now, as one
        entry that leaves the window in 10 s unless the next answer replaces it with a fresh figure (so it
        does not leave all at once while they keep sending). OTHERS_MARGIN_SHARE of the window is kept
        free of ours on top while others use it: they send between our answers, and a full window has no
        room for that (see bench/pool.py, the shared case). Ours that the server has let go and our log
        still keeps (the window's slack) are not ours in its figure: counted as ours, they would hide as
        much of others' use, and be counted free a second time when they leave our log.
        """
        now = self._loop.time()
        self._log.expire(now)
        others = self._others if self._others is not None and self._others.in_window else None
        own_tokens = self._log.tokens - (others.tokens if others else 0)
        own_requests = self._log.requests - (others.requests if others else 0)
        for entry in self._log.entries:  # oldest first: ours in the slack, which the server no longer counts
            if entry.at > now - WINDOW_S:
                break
            if entry is not others:
                own_tokens, own_requests = own_tokens - entry.tokens, own_requests - entry.requests
        unseen_tokens = _unseen(
            headers.get("x-ratelimit-remaining-tokens"), self.tokens_per_minute, own_tokens
        )
        unseen_requests = _unseen(
            headers.get("x-ratelimit-remaining-requests"), self.requests_per_minute, own_requests
        )
        if others is None and not (unseen_tokens or unseen_requests):
            return  # nothing booked for others, nothing to book
        if unseen_tokens:
            unseen_tokens += int(self.tokens_per_minute / WINDOWS_PER_MINUTE * OTHERS_MARGIN_SHARE)
        if others is not None:
            self._log.remove(others)
        self._others = None
        if unseen_tokens or unseen_requests:
            self._others = Reservation(now, unseen_tokens, unseen_requests)
            self._log.add(self._others)
        if self._waiting:
            self._admit()  # less booked for others than before may leave room now


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
