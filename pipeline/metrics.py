"""A Prometheus textfile (``--metrics-file``) kept up to date during a run, for node_exporter's collector.

The file is rewritten every ``PUBLISH_S`` and once at the end, each time to a temporary name and renamed,
so the collector never reads half a file. Counters count this run (they restart at 0 with the next run,
which Prometheus's ``rate`` and ``increase`` take as a counter reset).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

from pipeline.records import EndpointCounters, RunProgress

log = logging.getLogger(__name__)

PUBLISH_S = 5.0
PREFIX = "vision_pipeline"


def render_textfile(progress: RunProgress) -> str:
    """The metrics in the Prometheus text exposition format. Pure."""
    metrics: list[tuple[str, str, str, list[tuple[str, float]]]] = [
        (
            "rows_total", "counter", "Rows finished by this run, by status.",
            [('status="ok"', progress.ok), ('status="filtered"', progress.filtered), ('status="error"', progress.error),
             ('status="refused"', progress.refused), ('status="invalid_output"', progress.invalid_output)],
        ),
        (
            "tokens_total", "counter", "Tokens billed to this run, by kind.",
            [('kind="prompt"', progress.prompt_tokens), ('kind="completion"', progress.completion_tokens)],
        ),
        ("http_429_total", "counter", "HTTP 429 answers received by this run.", [("", progress.http_429s)]),
        ("errors_total", "counter", "Rows of this run that ended in error.", [("", progress.error)]),
        ("retries_total", "counter", "Requests sent again by this run.", [("", progress.retries)]),
        ("paused_seconds_total", "counter", "Time every endpoint was held at once after 429s (no worker could send).",
         [("", progress.paused_s)]),
        ("rows_skipped", "gauge", "Rows committed by earlier runs or repeated ids: nothing to send.",
         [("", progress.rows_before)]),
        ("elapsed_seconds", "gauge", "Time since this run started.", [("", progress.elapsed_s)]),
    ]  # fmt: skip
    if progress.cost_usd is not None:  # no price for the model: no figure rather than a false 0
        metrics.append(("cost_usd", "gauge", "US dollars spent by this run.", [("", progress.cost_usd)]))
    if progress.spend_usd is not None:
        metrics.append(
            ("spend_usd", "gauge", "US dollars this run's requests cost as the spend cap counts them.",
             [("", progress.spend_usd)])
        )  # fmt: skip
    if progress.max_cost_usd is not None:
        metrics.append(
            ("max_cost_usd", "gauge", "The run's spend cap in US dollars.", [("", progress.max_cost_usd)])
        )
    if len(progress.endpoints) > 1:
        metrics += _endpoint_metrics(progress)
    lines = []
    for name, kind, help_text, samples in metrics:
        full = f"{PREFIX}_{name}"
        lines += [f"# HELP {full} {help_text}", f"# TYPE {full} {kind}"]
        lines += [
            f"{full}{{{labels}}} {_number(value)}" if labels else f"{full} {_number(value)}"
            for labels, value in samples
        ]
    return "\n".join(lines) + "\n"


def _endpoint_metrics(progress: RunProgress) -> list[tuple[str, str, str, list[tuple[str, float]]]]:
    """Per endpoint of a pool, labelled by its name."""

    def by_endpoint(value: Callable[[EndpointCounters], float]) -> list[tuple[str, float]]:
        return [(f'endpoint="{e.name}"', value(e)) for e in progress.endpoints]

    return [
        ("endpoint_requests_total", "counter", "Requests sent to each endpoint.", by_endpoint(lambda e: e.requests)),
        ("endpoint_charged_tokens_total", "counter", "Tokens each endpoint's quota counted (prompt + max_tokens).",
         by_endpoint(lambda e: e.charged_tokens)),
        ("endpoint_quota_tokens_per_minute", "gauge", "Each endpoint's quota.", by_endpoint(lambda e: e.tokens_per_minute)),
        ("endpoint_http_429_total", "counter", "HTTP 429 answers from each endpoint.", by_endpoint(lambda e: e.http_429s)),
        ("endpoint_held_seconds_total", "counter", "Time each endpoint admitted nothing after its 429s.",
         by_endpoint(lambda e: e.held_s)),
        ("endpoint_in_service", "gauge", "1 while the endpoint serves, 0 once taken out for the run.",
         by_endpoint(lambda e: int(e.out_because is None))),
    ]  # fmt: skip


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else repr(round(float(value), 6))


def write_textfile(path: Path, text: str) -> None:
    """Replace `path` with `text`: written beside it under a dot name, then renamed. Blocking."""
    temp = path.with_name(f".{path.name}.tmp")  # the collector reads *.prom only
    temp.write_text(text, encoding="utf-8")
    os.replace(temp, path)


async def publish_metrics(
    path: Path, read: Callable[[], RunProgress], done: asyncio.Event, *, period_s: float = PUBLISH_S
) -> None:
    """Write the textfile now, every `period_s` until `done` is set, and once more at the end (or when cancelled).

    A write that fails is logged and tried again next time: the rows matter more than their metrics.
    """
    try:
        while not done.is_set():
            await _publish(path, read())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(period_s):
                    await done.wait()
    finally:
        await _publish(path, read())


async def _publish(path: Path, progress: RunProgress) -> None:
    try:
        await asyncio.to_thread(write_textfile, path, render_textfile(progress))
    except OSError as err:
        log.warning("cannot write the metrics file %s: %s", path, err)
