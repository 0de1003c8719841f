"""Requests-per-minute and tokens-per-minute budgets, the global cool-down on 429, and header feedback.

How the quota is kept (Azure's rules, which the emulator's quota mode mirrors):

* A request is charged when it arrives, with its estimated prompt tokens plus ``max_tokens``.
* The quota is enforced over short windows, not per minute: no 10-second window may receive more than a
  sixth of the minute's budget. A sliding log of the last 10 s of reservations admits a request only
  when it fits, so the rule holds exactly and the budget is used to the full; a leaky bucket cannot
  promise both, since it lets one request more through whenever its level has drained.
* Under that, aiolimiter buckets of one second pace the sends so that no second gets a burst, at
  start-up or after a pause (a reservation larger than the 1-s bucket is clamped to its size, as
  aiolimiter refuses more than its capacity).
* A 429 pauses every worker until the time the server gave, and cuts the budget by a quarter; the budget
  then grows back linearly over ``RECOVERY_S`` (the deployment's quota may be shared with other clients).
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
WINDOW_SLACK_S = 0.25  # keep reservations a little longer than the server does: clocks and latency differ
PACING_PERIOD_S = 1.0
BACKOFF_FACTOR = 0.75  # budget share kept after a 429
MIN_SHARE = 0.25  # never throttle below this share of the configured budget
RECOVERY_S = 30.0  # time to grow from MIN_SHARE back to the full budget


@dataclass(slots=True)
class Reservation:
    """One admitted request in the window; `tokens` is corrected once the bill is known."""

    at: float
    tokens: int


class _WindowLog:
    """The reservations of the last WINDOW_S seconds."""

    def __init__(self) -> None:
        self.entries: deque[Reservation] = deque()
        self.tokens = 0

    def expire(self, now: float) -> None:
        horizon = now - WINDOW_S - WINDOW_SLACK_S
        while self.entries and self.entries[0].at <= horizon:
            self.tokens -= self.entries.popleft().tokens

    def wait_s(self, now: float, tokens: int, token_cap: float, request_cap: float) -> float:
        """How long until a request of `tokens` fits, 0 when it fits now.

        A request larger than the token cap is let through alone, into an empty window.
        """
        self.expire(now)
        used, count = self.tokens, len(self.entries)
        if count == 0 or (used + tokens <= token_cap and count + 1 <= request_cap):
            return 0.0
        for entry in self.entries:  # oldest first: find the first expiry after which it fits
            used, count = used - entry.tokens, count - 1
            if count == 0 or (used + tokens <= token_cap and count + 1 <= request_cap):
                return entry.at + WINDOW_S + WINDOW_SLACK_S - now
        raise AssertionError("unreachable: an empty window admits anything")  # pragma: no cover


class Limits:
    """The run's shared request and token budgets. Create inside the running loop, one per run."""

    def __init__(self, tokens_per_minute: int, requests_per_minute: int) -> None:
        self.tokens_per_minute = tokens_per_minute
        self.requests_per_minute = requests_per_minute
        self._loop = asyncio.get_running_loop()
        self._log = _WindowLog()
        self._lock = asyncio.Lock()  # FIFO: a large request is not starved by smaller ones
        self._token_pacer = AsyncLimiter(tokens_per_minute / 60 * PACING_PERIOD_S, PACING_PERIOD_S)
        self._request_pacer = AsyncLimiter(max(1.0, requests_per_minute / 60 * PACING_PERIOD_S), PACING_PERIOD_S)
        self._resume_at = 0.0
        self._share = 1.0
        self._share_at = self._loop.time()
        self.pauses = 0
        self.paused_s = 0.0

    def admits(self, tokens: int) -> bool:
        """Whether a request reserving `tokens` can ever be sent under the per-minute budget."""
        return tokens <= self.tokens_per_minute

    async def acquire(self, tokens: int) -> Reservation:
        """Wait until one request of `tokens` fits every budget, then book it. Raises ValueError when
        `tokens` exceeds the whole per-minute budget (check `admits` first)."""
        if not self.admits(tokens):
            raise ValueError(f"{tokens} tokens exceed limits.tokens_per_minute = {self.tokens_per_minute}")
        async with self._lock:
            while (wait_s := self._wait_s(tokens)) > 0:
                await asyncio.sleep(wait_s)  # a known deadline; pause() may move it, so look again
            await self._request_pacer.acquire(1)
            await self._token_pacer.acquire(min(tokens, self._token_pacer.max_rate))
            reservation = Reservation(self._loop.time(), tokens)
            self._log.entries.append(reservation)
            self._log.tokens += tokens
            return reservation

    def _wait_s(self, tokens: int) -> float:
        now = self._loop.time()
        share = self._current_share(now)
        token_cap = self.tokens_per_minute / WINDOWS_PER_MINUTE * share
        request_cap = max(1.0, self.requests_per_minute / WINDOWS_PER_MINUTE * share)
        return max(self._resume_at - now, self._log.wait_s(now, tokens, token_cap, request_cap))

    def _current_share(self, now: float) -> float:
        grown = self._share + (now - self._share_at) * (1 - MIN_SHARE) / RECOVERY_S
        self._share, self._share_at = min(1.0, grown), now
        return self._share

    def settle(self, reservation: Reservation, tokens: int) -> None:
        """Correct a reservation with what the server billed (prompt tokens + max_tokens)."""
        if reservation in self._log.entries:
            self._log.tokens += tokens - reservation.tokens
        reservation.tokens = tokens

    def pause(self, wait_s: float) -> None:
        """A 429: stop every worker for `wait_s` seconds, then resume at a reduced budget."""
        now = self._loop.time()
        resume_at = now + wait_s
        if resume_at > self._resume_at:
            self.paused_s += resume_at - max(now, self._resume_at)
            self._resume_at = resume_at
        self.pauses += 1
        self._share = max(MIN_SHARE, self._current_share(now) * BACKOFF_FACTOR)

    @property
    def is_paused(self) -> bool:
        return self._loop.time() < self._resume_at

    def observe(self, headers: Mapping[str, str]) -> None:
        """Book quota that others use, as told by x-ratelimit-remaining-* (per-minute figures)."""
        remaining = headers.get("x-ratelimit-remaining-tokens")
        if remaining is None:
            return
        try:
            server_left = float(remaining) / WINDOWS_PER_MINUTE
        except ValueError:
            return
        now = self._loop.time()
        self._log.expire(now)
        our_left = self.tokens_per_minute / WINDOWS_PER_MINUTE - self._log.tokens
        if server_left < our_left - 1:
            unseen = int(our_left - server_left)
            self._log.entries.append(Reservation(now, unseen))
            self._log.tokens += unseen
