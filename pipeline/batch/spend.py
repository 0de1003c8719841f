"""The spend cap in batch mode: each line holds its worst case from packing until its job is collected.

A line's worst case is live mode's (``budget.py``: its estimated prompt tokens at the input price plus
``max_tokens`` at the output price), at the batch price. It is held when the line is packed, and only if
what is spent, plus what every line in a live job holds, plus its own worst case stay within the cap;
a line that does not fit is not packed and its row stays uncommitted. Lines in jobs an earlier run
submitted and this run finds in the ledger are held from the start, whatever the cap: they may be billed
while this run runs, and this run is the one that collects them, so their bill is counted in its spend.

When a job is collected each of its lines settles as live mode's rules say: to the bill from ``usage``;
to the prompt alone for a prompt the content filter refused; to nothing for a line the service did not
bill (an error line, a line left over as ``batch_expired``, ``batch_cancelled`` or ``request_timeout``,
every line of a job that failed validation or never became one); and it stays whole when the cost cannot
be known (a row no line names, a 200 without usage, a job the service no longer knows).
"""

from __future__ import annotations

from collections.abc import Iterable

from pipeline.batch.lines import PackedRow
from pipeline.budget import Budget, Hold
from pipeline.pricing import Price
from pipeline.records import VisionResult


class BatchSpend:
    """The run's spend cap over batch lines, by row id. Without a cap every line fits (and, with a price,
    spend is still counted)."""

    def __init__(self, max_cost_usd: float | None, price: Price | None, max_tokens: int) -> None:
        self.budget = Budget(max_cost_usd, price, batch=True)
        # request.max_tokens of this run, for lines of earlier runs too: it is one of the output's settings
        # (a run with another refuses to add to its rows), so their lines carry the same
        self.max_tokens = max_tokens
        self._holds: dict[str, Hold] = {}
        self._earlier: set[str] = set()  # rows of jobs an earlier run submitted
        self.earlier_usd = 0.0  # what their settled lines count in spent_usd

    @property
    def is_reached(self) -> bool:
        """Whether a line did not fit while nothing was held: no collection can make room for it."""
        return self.budget.is_reached

    @property
    def spent_usd(self) -> float:
        return self.budget.spent_usd

    @property
    def held_usd(self) -> float:
        """Worst cases of the lines in jobs not yet collected."""
        return self.budget.in_flight_usd

    def worst_usd(self, row: PackedRow) -> float:
        return self.budget.worst_case_usd(row.estimated_prompt_tokens, self.max_tokens)

    def hold_earlier(self, rows: Iterable[PackedRow]) -> None:
        """Hold the lines an earlier run left in live jobs (or uploaded files waiting for one)."""
        for row in rows:
            row_id = row.task.row_id
            if row_id not in self._holds:
                self._holds[row_id] = self.budget.take(self.worst_usd(row))
                self._earlier.add(row_id)

    def try_hold(self, row: PackedRow) -> bool:
        """Hold the line's worst case if it fits under the cap now; False when it does not."""
        hold = self.budget.try_hold(self.worst_usd(row))
        if hold is None:
            return False
        self._holds[row.task.row_id] = hold
        return True

    def settle(self, row_id: str, billed_usd: float | None) -> None:
        """The line is over: count `billed_usd` as spent (None: its whole worst case, cost unknown)."""
        hold = self._holds.pop(row_id, None)
        if hold is None:
            return
        before = self.budget.spent_usd
        self.budget.settle(hold, billed_usd)
        if row_id in self._earlier:
            self._earlier.discard(row_id)
            self.earlier_usd += self.budget.spent_usd - before

    def settle_results(self, results: Iterable[VisionResult]) -> None:
        """Settle collected rows to what the service bills for them (module docstring)."""
        for result in results:
            self.settle(result.task.row_id, self.billed_usd(result))

    def billed_usd(self, result: VisionResult) -> float | None:
        """What a collected line costs: its bill, the prompt alone for a filtered prompt with no usage,
        None (unknown) for a 200 without usage, nothing for an error line."""
        if result.usage is not None:
            return self.budget.billed_usd(result.usage)
        if result.status == "filtered":
            return self.budget.worst_case_usd(result.estimated_prompt_tokens or 0, 0)
        return None if result.http_status == 200 else 0.0
