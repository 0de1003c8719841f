"""One endpoint's quota and the run's spend cap, shared by every Ray worker: the actors and their proxies.

The Ray engine (``ray_run.py``) starts one ``QuotaKeeper`` actor per endpoint and, with a spend cap, one
``BudgetKeeper``. Each holds the very objects the local run uses (``limits.Limits``: the 10-s window log,
the ramp, 429 pauses; ``budget.Budget``: worst cases held, settled to the bill), so the rules are the same
as on one machine. Workers reach them through ``SharedLimits`` and ``SharedBudget``, which the live
``client.Client`` takes in place of its local ones.

- **Reservations.** A worker reserves one request at a time, when it is about to send it, and tells the
  keeper once its headers are sent (the session's trace hook, ``client.sent_tracing``): the window log
  must book a request when the server will count it, and a block reserved ahead would sit in the log
  earlier than the server sees its requests, so the server's window could hold more than ours. The
  keeper books the request from when that word reaches it (``QuotaKeeper.sent``), on its own clock: after
  the send, by a message's trip of a few milliseconds, so no booking counts a request earlier than it
  left, and no two machines' clocks are compared. What a worker does not use it gives back (``settle``
  with the bill, 0 for a 429 or a request never sent).
- **429s.** A worker that meets a 429 reports its wait; the keeper pauses admissions for every worker.
- **Restarts.** Ray restarts a keeper that died, empty. It cannot know what the last 10 s admitted, so it
  books that window as full: a restart never doubles a window. Reservations of the dead keeper are
  forgotten (their settles are ignored); a spend cap's keeper is not restarted (what was spent would be
  lost), and a run whose budget keeper died stops.

With an endpoint pool, one ``QuotaKeeper`` per endpoint: the routing by room stays in the workers' pool.
Nothing here imports Ray: the keepers are plain classes that ``ray_run`` turns into actors, and the proxies
only call ``.remote`` on the handles they are given.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable, Mapping
from typing import Any

from pipeline.budget import Budget, Hold
from pipeline.limits import Limits, LimitsClosed, Reservation
from pipeline.pricing import Price
from pipeline.records import BudgetReached

log = logging.getLogger(__name__)

# What the server tells about the quota others use (limits.Limits.observe); the rest stays on the worker.
QUOTA_HEADERS = ("x-ratelimit-remaining-tokens", "x-ratelimit-remaining-requests")
# Booked by a restarted keeper: none of the window is left (see the module docstring).
WINDOW_FULL = dict.fromkeys(QUOTA_HEADERS, "0")


class QuotaKeeper:
    """The body of the quota actor: one endpoint's ``Limits`` for every worker (an asyncio actor)."""

    def __init__(self, tokens_per_minute: int, requests_per_minute: int, *, is_restart: bool) -> None:
        self._per_minute = (tokens_per_minute, requests_per_minute)
        self._is_restart = is_restart
        self._limits: Limits | None = None
        self._booked: dict[int, Reservation] = {}
        self._keys = itertools.count(1)

    def _get(self) -> Limits:
        if self._limits is None:  # Limits lives in the loop that runs the actor's methods
            self._limits = Limits(*self._per_minute)
            if self._is_restart:
                log.warning("quota keeper restarted: the last 10 s count as full")
                self._limits.observe(WINDOW_FULL)
        return self._limits

    async def acquire(self, tokens: int) -> int | None:
        """Admit one request of `tokens` when it fits; its key, or None once closed."""
        try:
            reservation = await self._get().acquire(tokens)
        except LimitsClosed:
            return None
        key = next(self._keys)
        self._booked[key] = reservation
        return key

    def sent(self, key: int) -> None:
        """Reservation `key` is on its way (its headers are sent): book it from now, when the keeper hears so.

        In one process a request is restamped as its headers go (``Limits.restamp``). A worker sends an
        admission's round trip later, and the next window's requests may have shorter ones: the server would
        count both in one window. So the booking moves to when the worker's word arrives, which is after
        the send: a request's transit to the server and this message's to the keeper differ by a few
        milliseconds, within ``limits.WINDOW_SLACK_S`` as in one process.
        """
        reservation = self._booked.get(key)
        if reservation is not None:
            self._get().restamp(reservation)

    def settle(self, key: int, tokens: int) -> None:
        """Correct reservation `key` to what the server billed (0: not charged, or never sent)."""
        reservation = self._booked.pop(key, None)
        if reservation is not None:  # unknown: booked by a keeper before a restart
            self._get().settle(reservation, tokens)

    def pause(self, wait_s: float, tokens: int = 0) -> None:
        """A worker met a 429 refusing a request of `tokens`: hold every worker for `wait_s`."""
        self._get().pause(wait_s, tokens)

    def observe(self, headers: Mapping[str, str]) -> None:
        self._get().observe(headers)

    def close(self) -> None:
        """The run is stopping: admit nothing more; every waiting acquire answers None."""
        self._get().close()

    def counters(self) -> tuple[int, float, bool]:
        """Pauses, seconds paused, and whether paused now."""
        limits = self._get()
        return limits.pauses, limits.paused_s, limits.is_paused


class BudgetKeeper:
    """The body of the budget actor: the run's one ``Budget`` (an asyncio actor)."""

    def __init__(self, max_cost_usd: float, price: Price) -> None:
        self._budget = Budget(max_cost_usd, price)
        self._held: dict[int, Hold] = {}
        self._keys = itertools.count(1)

    async def hold(self, worst_usd: float) -> int | None:
        """Hold `worst_usd` for one attempt, waiting in line; its key, or None when the cap is reached."""
        try:
            held = await self._budget.hold(worst_usd)
        except BudgetReached:
            return None
        key = next(self._keys)
        self._held[key] = held
        return key

    def settle(self, key: int, billed_usd: float | None) -> None:
        held = self._held.pop(key, None)
        if held is not None:
            self._budget.settle(held, billed_usd)

    def spent_usd(self) -> float:
        return self._budget.spent_usd


def _on_arrival(ref: Any, then: Callable[[Any], None]) -> None:
    """Call `then` with what `ref` (an ObjectRef) answers, whenever it does; errors are logged."""

    def done(future: asyncio.Future[Any]) -> None:
        if not future.cancelled() and future.exception() is None:
            then(future.result())

    asyncio.wrap_future(ref.future()).add_done_callback(done)


async def _first_or_closed(ref: Any, closed: asyncio.Event) -> tuple[bool, Any]:
    """(True, the answer of `ref`) or, when `closed` is set first, (False, None)."""
    answer = asyncio.wrap_future(ref.future())
    closing = asyncio.get_running_loop().create_task(closed.wait(), name="closing")
    try:
        await asyncio.wait([answer, closing], return_when=asyncio.FIRST_COMPLETED)
    finally:
        closing.cancel()
    if answer.done():
        return True, answer.result()
    return False, None


class SharedLimits(Limits):
    """``Limits`` kept by a ``QuotaKeeper`` actor: what the client of a Ray worker uses. Create in the loop."""

    def __init__(self, keeper: Any, tokens_per_minute: int, requests_per_minute: int) -> None:
        super().__init__(tokens_per_minute, requests_per_minute)
        self._keeper = keeper
        self._keys: dict[Reservation, int] = {}
        self._stopping = asyncio.Event()

    def close(self) -> None:
        self._stopping.set()
        super().close()

    async def acquire(self, tokens: int) -> Reservation:
        if not self.admits(tokens):
            raise ValueError(f"{tokens} tokens exceed limits.tokens_per_minute = {self.tokens_per_minute}")
        if self._stopping.is_set():
            raise LimitsClosed()
        ref = self._keeper.acquire.remote(tokens)
        try:
            arrived, key = await _first_or_closed(ref, self._stopping)
        except asyncio.CancelledError:
            _on_arrival(ref, self._give_back)  # admitted after all: its tokens go back to the window
            raise
        if not arrived:
            _on_arrival(ref, self._give_back)
            raise LimitsClosed()
        if key is None:
            raise LimitsClosed()
        reservation = Reservation(asyncio.get_running_loop().time(), tokens)
        self._keys[reservation] = key
        return reservation

    def restamp(self, reservation: Reservation) -> None:
        """Its headers are sent (the session's trace hook): the keeper books it from when it hears so."""
        key = self._keys.get(reservation)
        if key is not None:
            self._keeper.sent.remote(key)

    def offer(self, tokens: int, *, is_retry: bool = False) -> asyncio.Future[Reservation]:
        """Queue one request at the keeper (``acquire``): a retry waits in the keeper's line as any request."""
        return asyncio.ensure_future(self.acquire(tokens))

    def withdraw(self, offered: asyncio.Future[Reservation]) -> None:
        """Take an offer back: one still waiting is cancelled (its admission, if it comes, is given back)."""
        if not offered.done():
            offered.cancel()
        elif not offered.cancelled() and offered.exception() is None:
            self.settle(offered.result(), 0)

    def _give_back(self, key: int | None) -> None:
        if key is not None:
            self._keeper.settle.remote(key, 0)

    def settle(self, reservation: Reservation, tokens: int) -> None:
        reservation.tokens = tokens
        key = self._keys.pop(reservation, None)
        if key is not None:
            self._keeper.settle.remote(key, tokens)

    def pause(self, wait_s: float, tokens: int = 0) -> None:
        super().pause(wait_s, tokens)  # this worker's own view, for its counters
        self._keeper.pause.remote(wait_s, tokens)

    def observe(self, headers: Mapping[str, str]) -> None:
        told = {name: headers[name] for name in QUOTA_HEADERS if name in headers}
        if told:
            self._keeper.observe.remote(told)


class SharedBudget(Budget):
    """``Budget`` kept by a ``BudgetKeeper`` actor: every worker's attempts under one spend cap."""

    def __init__(self, keeper: Any, max_cost_usd: float, price: Price) -> None:
        super().__init__(max_cost_usd, price)
        self._keeper = keeper
        self._keys: dict[Hold, int] = {}

    async def hold(self, worst_usd: float) -> Hold:
        if self.is_reached:
            raise BudgetReached
        ref = self._keeper.hold.remote(worst_usd)
        try:
            key = await asyncio.wrap_future(ref.future())
        except asyncio.CancelledError:
            _on_arrival(ref, lambda key: None if key is None else self._keeper.settle.remote(key, 0.0))
            raise
        if key is None:
            self.is_reached = True
            raise BudgetReached
        held = Hold(worst_usd)
        self._keys[held] = key
        return held

    def settle(self, hold: Hold, billed_usd: float | None) -> None:
        if hold.is_settled:
            return
        hold.is_settled = True
        self.spent_usd += hold.usd if billed_usd is None else billed_usd  # this worker's share, for its log
        key = self._keys.pop(hold, None)
        if key is not None:
            self._keeper.settle.remote(key, billed_usd)
