"""The live progress display for a run watched in a terminal.

Two lines on stderr, redrawn every ``REFRESH_S`` from a task of the run (never per row, so a fast run
pays nothing for it): rows done / total with a bar, rows/s and ETA; tokens/min against the quota, 429s,
pause time, errors, retries, spend and time so far. Rates are taken over the last ``RATE_WINDOW_S``
so that a pause on 429 shows at once and the ETA follows the current pace.

``measure`` and ``progress_lines`` are pure; ``show_progress`` draws with rich. Log lines written
meanwhile appear above the display (rich swaps ``sys.stderr``; see ``logs.StderrHandler``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Self

from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from pipeline.records import RunProgress

REFRESH_S = 0.5
RATE_WINDOW_S = 30.0  # rates and ETA follow the pace of the last half minute
BAR_WIDTH = 30


@dataclass(frozen=True, slots=True)
class Pace:
    """Rates over the recent window."""

    rows_per_s: float
    tokens_per_min: float  # billed: prompt + completion
    eta_s: float | None  # None while the total or the pace is unknown


def measure(then: RunProgress, now: RunProgress) -> Pace:
    """The pace between two readings of one run. Pure."""
    span_s = now.elapsed_s - then.elapsed_s
    if span_s <= 0:
        return Pace(0.0, 0.0, None)
    rows_per_s = (now.rows_done - then.rows_done) / span_s
    tokens = (now.prompt_tokens + now.completion_tokens) - (then.prompt_tokens + then.completion_tokens)
    left = rows_left(now)
    eta_s = left / rows_per_s if left is not None and rows_per_s > 0 else None
    return Pace(rows_per_s, tokens / span_s * 60, eta_s)


def rows_left(progress: RunProgress) -> int | None:
    """Rows this run has still to finish: to the manifest's end, or to --limit if that comes first."""
    candidates = []
    if progress.rows_total is not None:
        candidates.append(progress.rows_total - progress.rows_before - progress.rows_done)
    if progress.rows_limit is not None:
        candidates.append(progress.rows_limit - progress.rows_done)
    return max(0, min(candidates)) if candidates else None


def _is_limited(progress: RunProgress) -> bool:
    """Whether --limit, not the manifest's end, is where this run stops."""
    if progress.rows_limit is None:
        return False
    return progress.rows_total is None or progress.rows_limit < progress.rows_total - progress.rows_before


def duration_text(seconds: float | None) -> str:
    """1h02m, 4m05s, 12s; an em dash when unknown."""
    if seconds is None:
        return "—"
    whole = int(seconds + 0.5)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def count_text(n: float) -> str:
    """1234 → 1.2k, 2_500_000 → 2.5M."""
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= limit:
            return f"{n / limit:.1f}{suffix}"
    return f"{n:.0f}"


def progress_lines(progress: RunProgress, pace: Pace) -> tuple[str, str]:
    """The display's two lines of text (the bar is drawn beside the first). Pure."""
    done = progress.rows_before + progress.rows_done
    if _is_limited(progress):
        share = min(100, progress.rows_done * 100 // max(1, progress.rows_limit or 0))
        rows = f"{progress.rows_done:,} / {progress.rows_limit:,} new rows ({share} %, --limit)"
    elif progress.rows_total:
        share = min(100, done * 100 // progress.rows_total)
        rows = f"{done:,} / {progress.rows_total:,} rows ({share} %)"
    else:
        rows = f"{done:,} rows (total unknown)" if progress.rows_total is None else f"{done:,} rows"
    first = f"{rows} · {pace.rows_per_s:.1f} rows/s · ETA {duration_text(pace.eta_s)}"
    quota = f"{count_text(pace.tokens_per_min)}/min of {count_text(progress.tokens_per_minute)}/min quota"
    paused = " now" if progress.is_paused else ""
    spend = "$?" if progress.cost_usd is None else f"${progress.cost_usd:.4f}"
    if progress.max_cost_usd is not None and progress.spend_usd is not None:
        spend = f"${progress.spend_usd:.4f} of ${progress.max_cost_usd:.2f} cap"
    second = (
        f"tokens {quota} · 429s {progress.http_429s} (paused {progress.paused_s:.1f} s{paused}) · "
        f"errors {progress.failed} · retries {progress.retries} · spend {spend} · {duration_text(progress.elapsed_s)}"
    )
    return first, second


def endpoint_lines(progress: RunProgress) -> list[str]:
    """One line per endpoint of a pool (none for a single endpoint): requests, tokens/min against its
    quota, 429s, its held time, and whether it is out. Pure."""
    if len(progress.endpoints) < 2:
        return []
    minutes = max(progress.elapsed_s, 1e-9) / 60
    lines = []
    for e in progress.endpoints:
        line = (
            f"  {e.name}: {e.requests:,} requests · {count_text(e.charged_tokens / minutes)}/min of "
            f"{count_text(e.tokens_per_minute)}/min quota · 429s {e.http_429s} (held {e.held_s:.1f} s)"
        )
        if e.out_because is not None:
            line += " · out for the run"
        lines.append(line)
    return lines


class LiveDisplay:
    """The two lines, redrawn in place on `console` (stderr by default) while the run goes on."""

    def __init__(self, console: Console | None = None) -> None:
        self._live = Live(console=console or Console(stderr=True), auto_refresh=False, redirect_stdout=False)
        self._readings: deque[RunProgress] = deque()

    def __enter__(self) -> Self:
        self._live.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._live.stop()

    def update(self, progress: RunProgress) -> None:
        """Redraw with a new reading."""
        self._readings.append(progress)
        while self._readings[0].elapsed_s < progress.elapsed_s - RATE_WINDOW_S:
            self._readings.popleft()
        first, second = progress_lines(progress, measure(self._readings[0], progress))
        if _is_limited(progress):
            bar = ProgressBar(total=progress.rows_limit, completed=progress.rows_done, width=BAR_WIDTH)
        else:
            done = progress.rows_before + progress.rows_done
            bar = ProgressBar(total=progress.rows_total or None, completed=done, width=BAR_WIDTH)
        line = Table.grid(padding=(0, 1))
        line.add_row(bar, Text(first))
        endpoints = [Text(text) for text in endpoint_lines(progress)]
        self._live.update(Group(line, Text(second), *endpoints), refresh=True)


async def show_progress(
    read: Callable[[], RunProgress],
    done: asyncio.Event,
    *,
    console: Console | None = None,
    period_s: float = REFRESH_S,
) -> None:
    """Draw the display every `period_s` until `done` is set, then once more with the final figures."""
    with LiveDisplay(console) as display:
        while not done.is_set():
            display.update(read())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(period_s):
                    await done.wait()
        display.update(read())
