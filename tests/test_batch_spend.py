"""The batch spend cap's holds and how each collected line settles (pipeline/batch/spend.py)."""

from __future__ import annotations

import pytest

from pipeline.batch.lines import PackedRow
from pipeline.batch.spend import BatchSpend
from pipeline.pricing import Price, cost_usd
from pipeline.records import ImageTask, Usage, VisionResult

PRICE = Price("gpt-4o", input_per_1m=2.5, output_per_1m=10.0, batch_discount=0.5)
MAX_TOKENS = 300
PROMPT = 1000
WORST_USD = cost_usd(PROMPT, MAX_TOKENS, PRICE, batch=True)  # 0.00275


def row(n: int) -> PackedRow:
    return PackedRow(f"r{n}", ImageTask(f"r{n}", ("a.png",), "Describe.", "high", n), PROMPT)


def result(n: int, status: str, usage: Usage | None, http_status: int | None) -> VisionResult:
    return VisionResult(
        row(n).task,
        status,
        "gpt-4o",
        PROMPT,
        usage=usage,
        http_status=http_status,  # type: ignore[arg-type]
    )


def test_a_line_is_held_at_its_worst_case_at_the_batch_price_only_while_it_fits():
    spend = BatchSpend(2.5 * WORST_USD, PRICE, MAX_TOKENS)

    held = [spend.try_hold(row(n)) for n in range(3)]

    assert held == [True, True, False] and spend.held_usd == pytest.approx(2 * WORST_USD)
    assert not spend.is_reached  # two lines in flight: their bills may leave room


def test_the_cap_is_reached_when_a_line_does_not_fit_and_nothing_is_held():
    spend = BatchSpend(0.5 * WORST_USD, PRICE, MAX_TOKENS)

    assert not spend.try_hold(row(0)) and spend.is_reached


@pytest.mark.parametrize(
    ("status", "usage", "http_status", "billed_usd"),
    [
        ("ok", Usage(900, 40, 940), 200, cost_usd(900, 40, PRICE, batch=True)),  # the bill from usage
        ("filtered", None, 400, cost_usd(PROMPT, 0, PRICE, batch=True)),  # the prompt alone
        ("error", None, 500, 0.0),  # an error line: not billed
        ("ok", None, 200, WORST_USD),  # a 200 without usage: unknown, kept whole
    ],
)
def test_a_collected_line_settles_as_live_mode_would(status, usage, http_status, billed_usd):
    spend = BatchSpend(10 * WORST_USD, PRICE, MAX_TOKENS)
    spend.try_hold(row(0))

    spend.settle_results([result(0, status, usage, http_status)])

    assert spend.spent_usd == pytest.approx(billed_usd) and spend.held_usd == 0


def test_lines_of_an_earlier_run_are_held_past_the_cap_and_their_bill_counted_apart():
    spend = BatchSpend(1.5 * WORST_USD, PRICE, MAX_TOKENS)

    spend.hold_earlier([row(0), row(1)])
    fits_before = spend.try_hold(row(2))
    spend.settle_results([result(0, "ok", Usage(900, 40, 940), 200)])
    spend.settle("r1", 0.0)  # expired
    fits_after = spend.try_hold(row(2))

    assert not fits_before and not spend.is_reached and fits_after
    assert spend.earlier_usd == pytest.approx(cost_usd(900, 40, PRICE, batch=True)) == spend.spent_usd
