"""plan.py: from row estimates to totals, costs, the duration the limiter allows, and whether it fits."""

from __future__ import annotations

import asyncio

import pytest

from pipeline.config import RunConfig, config_from_mapping
from pipeline.limits import WINDOW_S, WINDOW_SLACK_S, Limits
from pipeline.plan import parse_window_h, plan_duration


def config(**sections: dict) -> RunConfig:
    return config_from_mapping(sections, source="test.toml")


@pytest.mark.looptime
@pytest.mark.parametrize(
    ("tpm", "rpm", "reserve", "binding"),
    [
        (30_000, 180, 1_400, "tokens_per_minute"),
        (300_000, 60, 500, "requests_per_minute"),
        (10_000, 60, 9_000, "tokens_per_minute"),
        (60_000, 360, 1_800, "tokens_per_minute"),
    ],
)
async def test_the_planned_rate_is_what_the_limiter_admits(tpm, rpm, reserve, binding):
    """A request larger than a window's share goes alone: 6 a minute, where TPM / reserve would say 1.1."""
    cfg = config(limits={"tokens_per_minute": tpm, "requests_per_minute": rpm}, request={"max_tokens": 300})
    limits, loop = Limits(tpm, rpm), asyncio.get_running_loop()
    start, admitted = loop.time(), []

    async def worker() -> None:
        while loop.time() - start < 1200:
            await limits.acquire(reserve)
            admitted.append(loop.time() - start)

    async with asyncio.TaskGroup() as tg:
        for _ in range(8):
            tg.create_task(worker())
    rows = sum(t < 1200 for t in admitted)
    plan = plan_duration(rows, (reserve - 300) * rows, cfg, window_h=None, latency_s=None)

    assert plan.binding == binding
    assert plan.rows_per_min == pytest.approx(rows / 20, rel=0.02)


def test_a_run_fits_a_window_or_says_it_does_not():
    cfg = config(
        limits={"tokens_per_minute": 30_000, "requests_per_minute": 180}, request={"max_tokens": 300}
    )

    fits = plan_duration(1_000, 1_100_000, cfg, window_h=6.0, latency_s=None)
    too_long = plan_duration(10_000, 11_000_000, cfg, window_h=6.0, latency_s=None)

    assert (
        fits.rows_per_window_by_tokens == 3 and fits.fits_window is True
    )  # 5000 / 1400 per window of WINDOW_S + WINDOW_SLACK_S
    assert too_long.fits_window is False and too_long.duration_h == pytest.approx(
        10_000 / (3 * 60 / (WINDOW_S + WINDOW_SLACK_S)) / 60
    )


@pytest.mark.parametrize(
    ("text", "hours"), [("6h", 6.0), ("90m", 1.5), ("1h30m", 1.5), ("2d", 48.0), ("1.5", 1.5)]
)
def test_windows_are_read_in_days_hours_minutes_or_seconds(text, hours):
    assert parse_window_h(text) == hours


@pytest.mark.parametrize("text", ["6x", "", "0h", "h"])
def test_a_window_that_is_not_a_duration_is_refused(text):
    with pytest.raises(ValueError):
        parse_window_h(text)
