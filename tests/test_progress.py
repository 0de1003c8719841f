"""The live progress display: what it says, that it follows the run, and that it is drawn on a timer."""

from __future__ import annotations

import asyncio
import dataclasses
import io

import pytest
from conftest import azure_config
from rich.console import Console

from pipeline.progress import LiveDisplay, Pace, duration_text, measure, progress_lines, show_progress
from pipeline.records import RunProgress
from pipeline.runner import RunOptions, run

START = RunProgress(
    elapsed_s=10.0, rows_total=1000, rows_before=100, rows_limit=None, ok=40, filtered=5, error=5, prompt_tokens=40_000,
    completion_tokens=10_000, cost_usd=0.5, http_429s=0, retries=0, paused_s=0.0, is_paused=False,
    tokens_per_minute=300_000,
)  # fmt: skip


def later(progress: RunProgress, **changes: object) -> RunProgress:
    return dataclasses.replace(progress, **changes)


def test_pace_is_rows_and_billed_tokens_over_the_window_and_eta_covers_the_rows_left():
    now = later(START, elapsed_s=20.0, ok=140, prompt_tokens=90_000, completion_tokens=20_000)

    pace = measure(START, now)

    assert pace.rows_per_s == 10.0  # 100 rows in 10 s
    assert pace.tokens_per_min == 360_000  # 60k tokens in 10 s
    assert pace.eta_s == pytest.approx((1000 - 100 - 150) / 10.0)


def test_no_eta_without_a_total_or_while_nothing_finishes():
    assert measure(START, later(START, elapsed_s=20.0, rows_total=None, ok=140)).eta_s is None
    assert measure(START, later(START, elapsed_s=20.0)).eta_s is None
    assert measure(START, START) == Pace(0.0, 0.0, None)


@pytest.mark.parametrize(
    ("seconds", "text"), [(None, "—"), (0.4, "0s"), (59.6, "1m00s"), (245, "4m05s"), (3720, "1h02m")]
)
def test_durations_read_at_a_glance(seconds, text):
    assert duration_text(seconds) == text


def test_the_lines_show_done_of_total_rate_quota_429s_errors_spend_and_eta():
    now = later(START, elapsed_s=70.0, ok=640, http_429s=3, paused_s=4.5, is_paused=True, retries=7)

    first, second = progress_lines(now, measure(START, now))

    assert "750 / 1,000 rows (75 %)" in first and "10.0 rows/s" in first and "ETA 25s" in first
    assert "of 300.0k/min quota" in second and "429s 3 (paused 4.5 s now)" in second
    assert "errors 5" in second and "retries 7" in second and "spend $0.5000" in second


def test_with_a_limit_below_the_rows_left_the_display_counts_toward_the_limit():
    now = later(START, elapsed_s=20.0, ok=140, rows_limit=300)  # 150 of 300 new rows, 750 to the end

    first, _ = progress_lines(now, measure(START, now))

    assert "150 / 300 new rows (50 %, --limit)" in first
    assert measure(START, now).eta_s == pytest.approx(150 / 10.0)


def test_a_limit_beyond_the_manifest_end_changes_nothing():
    now = later(START, elapsed_s=20.0, ok=140, rows_limit=5000)

    first, _ = progress_lines(now, measure(START, now))

    assert "250 / 1,000 rows (25 %)" in first and measure(START, now).eta_s == pytest.approx(75.0)


def test_an_unknown_total_and_an_unpriced_model_are_said_as_such():
    first, second = progress_lines(later(START, rows_total=None, cost_usd=None), measure(START, START))

    assert "150 rows (total unknown)" in first and "ETA —" in first and "spend $?" in second


def test_the_display_redraws_in_place_on_a_terminal():
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=140, color_system=None)

    with LiveDisplay(console) as display:
        display.update(START)
        display.update(later(START, elapsed_s=20.0, ok=140))

    text = screen.getvalue()
    assert "150 / 1,000 rows" in text and "250 / 1,000 rows" in text
    assert "\x1b[" in text  # cursor movements: the lines are redrawn, not appended


async def test_show_progress_draws_on_a_timer_not_per_reading_and_ends_with_the_final_figures():
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=140, color_system=None)
    done = asyncio.Event()
    reads = 0

    def read() -> RunProgress:
        nonlocal reads
        reads += 1
        return later(START, ok=40 + reads)

    drawing = asyncio.create_task(show_progress(read, done, console=console, period_s=3600))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    done.set()
    await asyncio.wait_for(drawing, 5)

    assert reads == 2  # once at the start, once at the end: an hour's period never ticked
    assert f"{100 + 50 + 2} / 1,000 rows" in screen.getvalue()


async def test_a_run_with_progress_counts_the_manifest_and_shows_its_total(
    tmp_path, emulator, images_manifest, key_in_env, capsys
):
    manifest = images_manifest(5)

    summary = await run(
        azure_config(emulator), RunOptions(manifest, tmp_path / "out", handle_signals=False, progress=True)
    )

    err = capsys.readouterr().err
    assert summary.counts["ok"] == 5
    assert "5 / 5 rows (100 %)" in err and "errors 0" in err


def test_a_pool_shows_a_line_per_endpoint_with_its_rate_against_its_quota():
    from pipeline.progress import endpoint_lines
    from pipeline.records import EndpointCounters

    pool = later(
        START,
        elapsed_s=60.0,
        endpoints=(
            EndpointCounters(
                "eastus", 450_000, requests=100, charged_tokens=400_000, http_429s=2, held_s=2.5
            ),
            EndpointCounters("sweden", 150_000, requests=10, out_because="HTTP 401: refused"),
        ),
    )

    lines = endpoint_lines(pool)

    assert lines[0] == "  eastus: 100 requests · 400.0k/min of 450.0k/min quota · 429s 2 (held 2.5 s)"
    assert lines[1].startswith("  sweden: 10 requests") and lines[1].endswith("out for the run")
    assert endpoint_lines(START) == []  # one endpoint: the run's own line says it all
