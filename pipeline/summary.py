"""A run's tally and its summary: what ``_stats.json`` holds, ``run --log-format json`` prints, and the
report and ``status`` read back."""

from __future__ import annotations

import dataclasses
from array import array
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.exits import EXIT_OK, EXIT_ROW_ERRORS
from pipeline.records import (
    FAILED_STATUSES,
    STATUSES,
    TEXT_STATUSES,
    EndpointCounters,
    TransportCounters,
    VisionResult,
)


@dataclass(frozen=True, slots=True)
class RunSummary:
    output: Path
    run_id: str
    counts: dict[str, int]  # rows committed this run by status: ok, filtered, error
    skipped: int  # rows already committed by an earlier run
    duplicates: int  # manifest rows whose id was seen before in this manifest
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float | None
    retries: int
    pauses: int  # 429 cool-downs
    paused_s: float
    duration_s: float
    exit_code: int
    stopped_because: str | None = None  # why the run ended early, one line
    rows_per_s: float = 0.0  # rows of this run per second of its duration
    http_429s: int = 0
    retries_by_cause: dict[str, int] = field(default_factory=dict)  # see client.retry_cause
    latency_percentiles_s: dict[str, float] = field(default_factory=dict)  # p50, p90, p99 of this run's rows
    spend_usd: float | None = (
        None  # what this run's requests cost as far as it can know (budget.py); no price: None
    )
    max_cost_usd: float | None = None  # the spend cap, when one was set
    recovered_rows: int = 0  # rows a killed run had paid for, committed from its journal before this run
    recovered_cost_usd: float = 0.0  # their cost: spent by that run, not counted against this run's cap
    # per endpoint name: requests, charged tokens and tokens/min against its quota, 429s, held time, trips
    endpoints: dict[str, dict[str, object]] = field(default_factory=dict)
    # batch mode: the part of spend_usd billed for lines an earlier run submitted and this run collected
    spend_of_earlier_runs_usd: float | None = None
    held_usd: float | None = (
        None  # batch mode: worst cases of lines still in live jobs at the end (--no-wait)
    )

    @property
    def rows(self) -> int:
        return sum(self.counts.values())


@dataclass
class Tally:
    """Counters of this run, updated by the workers."""

    counts: Counter[str] = field(default_factory=Counter)
    skipped: int = 0
    duplicates: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    retries: int = 0
    latencies_s: array[float] = field(default_factory=lambda: array("d"))  # 8 bytes a row

    def add(self, result: VisionResult) -> None:
        self.counts[result.status] += 1
        self.retries += max(0, result.attempts - 1)
        if result.latency_s is not None:
            self.latencies_s.append(result.latency_s)
        if result.usage is not None:
            self.prompt_tokens += result.usage.prompt_tokens
            self.completion_tokens += result.usage.completion_tokens
        if result.cost_usd is not None:
            self.cost_usd += result.cost_usd


LATENCY_PERCENTILES = (50, 90, 99)


def tally_fields(tally: Tally, duration_s: float, is_priced: bool) -> dict[str, Any]:
    """The ``RunSummary`` fields every engine (local, Ray, batch) takes from its tally alone."""
    return {
        "counts": {s: tally.counts[s] for s in STATUSES if s in TEXT_STATUSES or tally.counts[s]},
        "skipped": tally.skipped,
        "duplicates": tally.duplicates,
        "prompt_tokens": tally.prompt_tokens,
        "completion_tokens": tally.completion_tokens,
        "cost_usd": round(tally.cost_usd, 6) if is_priced else None,
        "duration_s": round(duration_s, 3),
        "rows_per_s": round(sum(tally.counts.values()) / duration_s, 3) if duration_s > 0 else 0.0,
    }


def latency_percentiles(latencies_s: Sequence[float]) -> dict[str, float]:
    """p50, p90, p99 of row latencies in seconds (linear interpolation, as numpy and Arrow's default); {} for none."""
    ordered = sorted(latencies_s)
    if not ordered:
        return {}
    percentiles = {}
    for q in LATENCY_PERCENTILES:
        position = (len(ordered) - 1) * q / 100
        low = int(position)
        high = min(low + 1, len(ordered) - 1)
        percentiles[f"p{q}"] = round(ordered[low] + (ordered[high] - ordered[low]) * (position - low), 4)
    return percentiles


def endpoint_stats(counters: Sequence[EndpointCounters], duration_s: float) -> dict[str, dict[str, object]]:
    """Each endpoint's figures as ``_stats.json`` holds them; tokens per minute over the run's duration."""
    minutes = duration_s / 60
    return {
        e.name: {
            "requests": e.requests,
            "charged_tokens": e.charged_tokens,
            "tokens_per_min": round(e.charged_tokens / minutes, 1) if minutes > 0 else 0.0,
            "tokens_per_minute_quota": e.tokens_per_minute,
            "http_429s": e.http_429s,
            "pauses": e.pauses,
            "held_s": e.held_s,
            "breaker_trips": e.breaker_trips,
            "out_because": e.out_because,
        }
        for e in counters
    }


def describe_endpoints(endpoints: dict[str, dict[str, object]]) -> list[str]:
    """One line per endpoint for the log and the summary: requests, tokens/min against quota, 429s, holds."""
    lines = []
    for name, e in endpoints.items():
        line = (
            f"endpoint {name}: {e['requests']} requests, {e['tokens_per_min']:,.0f} tokens/min of "
            f"{e['tokens_per_minute_quota']:,} quota, {e['http_429s']} answers 429, held {e['held_s']:.1f} s"
        )
        if e["breaker_trips"]:
            line += f", out a while {e['breaker_trips']} times after failures"
        if e["out_because"]:
            line += f"; out for the run: {e['out_because']}"
        lines.append(line)
    return lines


def summary_as_dict(summary: RunSummary) -> dict[str, object]:
    """The summary as ``_stats.json`` holds it (and ``run --log-format json`` prints it)."""
    return {**dataclasses.asdict(summary), "output": str(summary.output), "rows": summary.rows}


@dataclass(slots=True)
class Outcome:
    """How an engine's run ended: what the summary needs of it."""

    tally: Tally
    counters: TransportCounters
    spent_usd: float
    stop_code: int | None
    stopped_because: str | None

    def exit_code(self) -> int:
        if self.stop_code is not None:
            return self.stop_code
        is_failed = any(self.tally.counts[status] for status in FAILED_STATUSES)
        return EXIT_ROW_ERRORS if is_failed else EXIT_OK
