"""The Prometheus textfile: the exposition format node_exporter reads, kept current, replaced atomically."""

from __future__ import annotations

import asyncio
import dataclasses
import re

from conftest import azure_config

from pipeline.emulator import Fault
from pipeline.metrics import publish_metrics, render_textfile
from pipeline.records import RunProgress
from pipeline.runner import RunOptions, run

PROGRESS = RunProgress(
    elapsed_s=12.5, rows_total=None, rows_before=3, rows_limit=None, ok=7, filtered=1, error=2, prompt_tokens=4200,
    completion_tokens=900, cost_usd=0.0123, http_429s=4, retries=6, paused_s=2.25, is_paused=False,
    tokens_per_minute=30_000,
)  # fmt: skip
SAMPLE = re.compile(r"^(?P<name>[a-z_][a-z0-9_]*)(?:\{(?P<labels>[^}]*)\})? (?P<value>[0-9.eE+-]+)$")


def samples(text: str) -> dict[str, float]:
    """name{labels} -> value, checking every line is a comment or a well-formed sample."""
    values = {}
    for line in text.splitlines():
        if line.startswith(("# HELP ", "# TYPE ")):
            continue
        match = SAMPLE.match(line)
        assert match, f"not an exposition line: {line!r}"
        key = match["name"] + (f"{{{match['labels']}}}" if match["labels"] else "")
        values[key] = float(match["value"])
    return values


def test_the_textfile_has_the_counters_and_the_cost_gauge():
    values = samples(render_textfile(PROGRESS))

    assert values['vision_pipeline_rows_total{status="ok"}'] == 7
    assert values['vision_pipeline_rows_total{status="filtered"}'] == 1
    assert values['vision_pipeline_rows_total{status="error"}'] == 2
    assert values['vision_pipeline_tokens_total{kind="prompt"}'] == 4200
    assert values['vision_pipeline_tokens_total{kind="completion"}'] == 900
    assert values["vision_pipeline_http_429_total"] == 4
    assert values["vision_pipeline_errors_total"] == 2
    assert values["vision_pipeline_cost_usd"] == 0.0123


def test_every_metric_is_declared_with_its_type_once():
    text = render_textfile(PROGRESS)

    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, flags=re.MULTILINE))

    assert types["vision_pipeline_rows_total"] == "counter" and types["vision_pipeline_cost_usd"] == "gauge"
    assert {name.split("{")[0] for name in samples(text)} == set(types)
    assert text.endswith("\n")


def test_no_cost_gauge_when_the_model_has_no_price():
    assert "cost_usd" not in render_textfile(dataclasses.replace(PROGRESS, cost_usd=None))


async def test_the_file_is_rewritten_while_the_run_goes_on_and_once_more_at_the_end(tmp_path):
    path = tmp_path / "vision.prom"
    done = asyncio.Event()
    seen: list[float] = []
    reads = 0

    def read() -> RunProgress:
        nonlocal reads
        reads += 1
        if path.exists():
            seen.append(samples(path.read_text())['vision_pipeline_rows_total{status="ok"}'])
        if reads == 3:
            done.set()
        return dataclasses.replace(PROGRESS, ok=reads)

    await asyncio.wait_for(publish_metrics(path, read, done, period_s=0), 5)

    assert seen == [1, 2, 3]  # each write was whole when read
    assert samples(path.read_text())['vision_pipeline_rows_total{status="ok"}'] == 4  # the one after `done`
    assert [p.name for p in tmp_path.iterdir()] == ["vision.prom"]  # no temp file left behind


async def test_a_run_leaves_metrics_that_match_its_summary(tmp_path, emulator, images_manifest, key_in_env):
    emulator.script(Fault(status=429, headers={"retry-after-ms": "10"}), Fault(status=500))
    path = tmp_path / "vision.prom"

    summary = await run(
        azure_config(emulator),
        RunOptions(images_manifest(4), tmp_path / "out", handle_signals=False, metrics_file=path),
    )

    values = samples(path.read_text())
    assert values['vision_pipeline_rows_total{status="ok"}'] == summary.counts["ok"] == 4
    assert values['vision_pipeline_tokens_total{kind="prompt"}'] == summary.prompt_tokens
    assert values['vision_pipeline_tokens_total{kind="completion"}'] == summary.completion_tokens
    assert values["vision_pipeline_http_429_total"] == summary.http_429s == 1
    assert values["vision_pipeline_retries_total"] == summary.retries == 2
    assert values["vision_pipeline_cost_usd"] == summary.cost_usd


async def test_an_unwritable_metrics_file_is_reported_and_the_run_goes_on(
    tmp_path, emulator, images_manifest, key_in_env, caplog
):
    path = tmp_path / "no-such-folder" / "vision.prom"

    summary = await run(
        azure_config(emulator),
        RunOptions(images_manifest(2), tmp_path / "out", handle_signals=False, metrics_file=path),
    )

    assert summary.exit_code == 0 and summary.counts["ok"] == 2
    assert "cannot write the metrics file" in caplog.text


def test_a_pool_publishes_each_endpoints_figures_labelled_by_name():
    from pipeline.records import EndpointCounters

    pool = dataclasses.replace(
        PROGRESS,
        endpoints=(
            EndpointCounters("eastus", 450_000, requests=9, charged_tokens=3_600, http_429s=1, held_s=2.5),
            EndpointCounters("sweden", 150_000, requests=2, out_because="HTTP 401"),
        ),
    )

    values = samples(render_textfile(pool))

    assert values['vision_pipeline_endpoint_requests_total{endpoint="eastus"}'] == 9
    assert values['vision_pipeline_endpoint_held_seconds_total{endpoint="eastus"}'] == 2.5
    assert values['vision_pipeline_endpoint_quota_tokens_per_minute{endpoint="sweden"}'] == 150_000
    assert values['vision_pipeline_endpoint_in_service{endpoint="sweden"}'] == 0
