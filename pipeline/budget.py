"""The spend cap: what this run may spend (``limits.max_cost_usd`` or ``--max-cost``), held request by request.

Before an attempt is sent it reserves its worst case: its estimated prompt tokens at the input price
plus ``max_tokens`` at the output price. It starts only if what is spent, plus the reservations of every
attempt in flight, plus its own worst case stay within the cap. When the answer comes the reservation is
settled: to the bill (``usage``) when there is one; to nothing for an answer the services do not bill (a
429, a 5xx, a 4xx other than the content filter); to the prompt alone for a prompt the content filter
refused (it carries no usage, and no completion was made); and kept whole when the cost cannot be known
(a connection dropped or timed out after the request went out may have been billed). So ``spent_usd`` is
never less than what the service bills.

When a worst case does not fit, no new attempt starts, in any worker: waiting attempts queue in order,
and the first goes as soon as settled answers leave room for it. When nothing is in flight and the first
in line still does not fit, the cap is reached: every waiting attempt ends with ``BudgetReached`` and its
row stays uncommitted for the next run.

Batch mode (``batch/spend.py``) holds each line at the batch price (``batch=True``) without waiting:
``try_hold`` takes a hold only if it fits now, and ``take`` holds what an earlier run already submitted.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass

from pipeline.pricing import Price, cost_usd
from pipeline.records import BudgetReached, Usage

# Costs are sums of products of token counts and prices: compare with a little room for float rounding.
ROUNDING_USD = 1e-9


@dataclass(slots=True, eq=False)
class Hold:
    """One attempt's reservation; `usd` is its worst case until settled."""

    usd: float
    is_settled: bool = False


class Budget:
    """The run's spend cap in US dollars at `price`; ``max_cost_usd`` None means no cap (spend is still
    counted when the model has a price; without one, nothing is)."""

    def __init__(self, max_cost_usd: float | None, price: Price | None, *, batch: bool = False) -> None:
        if max_cost_usd is not None and price is None:
            raise ValueError("a spend cap needs the model's price")  # config.py and the runner check first
        self.max_cost_usd = max_cost_usd
        self.price = price
        self.batch = batch  # worst cases and bills at the Batch API's price
        self.spent_usd = 0.0  # settled holds: billed, or kept whole when the bill cannot be known
        self.in_flight_usd = 0.0  # worst cases of the holds not yet settled
        self.is_reached = False
        self._in_flight = 0
        self._waiting: deque[tuple[float, asyncio.Future[None]]] = deque()

    def worst_case_usd(self, prompt_tokens: int, max_tokens: int) -> float:
        """The most one attempt can cost: its prompt at the input price, max_tokens at the output price."""
        return (
            0.0 if self.price is None else cost_usd(prompt_tokens, max_tokens, self.price, batch=self.batch)
        )

    def billed_usd(self, usage: Usage) -> float:
        """What the service bills for `usage`."""
        if self.price is None:
            return 0.0
        return cost_usd(usage.prompt_tokens, usage.completion_tokens, self.price, batch=self.batch)

    @property
    def is_idle(self) -> bool:
        """Whether no hold is waiting to be settled."""
        return self._in_flight == 0

    def try_hold(self, worst_usd: float) -> Hold | None:
        """Reserve `worst_usd` if it fits now, without waiting; None when it does not (and, when nothing
        is in flight either, the cap is reached: ``is_reached``)."""
        if self.is_reached:
            return None
        if not self._waiting and self._fits(worst_usd):
            return self._take(worst_usd)
        self.is_reached = self.is_idle
        return None

    def take(self, usd: float) -> Hold:
        """Hold `usd` whether it fits or not: money an earlier decision already committed."""
        return self._take(usd)

    async def hold(self, worst_usd: float) -> Hold:
        """Reserve `worst_usd` for one attempt, waiting in line while the cap has no room for it.

        Raises BudgetReached when the cap is reached (see the module docstring).
        """
        if self.is_reached:
            raise BudgetReached
        if not self._waiting and self._fits(worst_usd):
            return self._take(worst_usd)
        waiter = asyncio.get_running_loop().create_future()
        self._waiting.append((worst_usd, waiter))
        self._admit()
        try:
            await waiter
        except BaseException:
            if not waiter.done() or waiter.cancelled():
                self._forget(waiter)
            elif waiter.exception() is None:  # admitted just as we were cancelled: give it back
                self._release(worst_usd)
            raise
        return Hold(worst_usd)

    def settle(self, hold: Hold, billed_usd: float | None) -> None:
        """The attempt is over: count `billed_usd` as spent (None: its whole worst case, cost unknown)."""
        if hold.is_settled:
            return
        hold.is_settled = True
        self.spent_usd += hold.usd if billed_usd is None else billed_usd  # before the waiting are let in
        self._release(hold.usd)

    def _fits(self, usd: float) -> bool:
        if self.max_cost_usd is None:
            return True
        return self.spent_usd + self.in_flight_usd + usd <= self.max_cost_usd + ROUNDING_USD

    def _take(self, usd: float) -> Hold:
        self.in_flight_usd += usd
        self._in_flight += 1
        return Hold(usd)

    def _release(self, usd: float) -> None:
        self._in_flight -= 1
        self.in_flight_usd = max(0.0, self.in_flight_usd - usd) if self._in_flight else 0.0
        self._admit()

    def _admit(self) -> None:
        """Let the waiting attempts go in order while they fit; declare the cap reached when none can."""
        while self._waiting:
            usd, waiter = self._waiting[0]
            if waiter.done():
                self._waiting.popleft()
                continue
            if self._fits(usd):
                self._waiting.popleft()
                self._take(usd)
                waiter.set_result(None)
                continue
            if self._in_flight == 0:
                self.is_reached = True
                for _, left in self._waiting:
                    if not left.done():
                        left.set_exception(BudgetReached())
                self._waiting.clear()
            return

    def _forget(self, waiter: asyncio.Future[None]) -> None:
        self._waiting = deque(entry for entry in self._waiting if entry[1] is not waiter)
        self._admit()
