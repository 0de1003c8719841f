"""The command line: parse, call one public function, print, exit with a code cron understands.

Exit codes: 0 every row ok or filtered; 1 some rows ended in error; 2 bad usage or config;
3 the endpoint refused us (key, deployment, route, quota gone); 4 the output could not be written;
130 interrupted (exits.EXIT_MEANINGS).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import click

from pipeline.captioner import collect_garbage_less_often
from pipeline.config import load_config, with_max_cost
from pipeline.estimate import EstimateOptions, estimate
from pipeline.estimate_text import estimate_as_json, format_estimate
from pipeline.exits import EXIT_MEANINGS, EXIT_OK, EXIT_OUTPUT_FAILED, EXIT_REFUSED, EXIT_USAGE
from pipeline.logs import LOG_FORMATS, LogFormat, setup_logging
from pipeline.plan import parse_window_h
from pipeline.preview import preview_as_json, preview_first_request
from pipeline.records import ConfigError, RunAborted
from pipeline.report import REPORT_FILE, write_report
from pipeline.runner import RunOptions, run
from pipeline.status import format_status, read_status
from pipeline.summary import RunSummary, describe_endpoints, summary_as_dict

EXIT_CODES_HELP = (
    "Exit codes: " + "; ".join(f"{code} {meaning}" for code, meaning in EXIT_MEANINGS.items()) + "."
)


def _setup_logging(verbose: int, quiet: bool, log_format: LogFormat = "auto") -> str:
    return setup_logging(verbose, quiet, log_format)


@contextlib.contextmanager
def _exit_on_errors(writing: str) -> Iterator[None]:
    """One line on stderr and the exit code cron reads: ConfigError exits 2, OSError while writing
    `writing` exits 4."""
    try:
        yield
    except ConfigError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(EXIT_USAGE)
    except OSError as err:
        click.echo(f"error: cannot {writing}: {err}", err=True)
        sys.exit(EXIT_OUTPUT_FAILED)


@click.group(epilog=EXIT_CODES_HELP)
@click.version_option(package_name="vision-pipeline")
def main() -> None:
    """Caption image collections with vision chat-completion APIs (Azure OpenAI, OpenAI, compatible servers)."""


@main.command(name="run", epilog=EXIT_CODES_HELP)
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--manifest", required=True, type=click.Path(path_type=Path), help="CSV, JSONL, Parquet or a folder."
)
@click.option(
    "--output",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Parquet dataset folder.",
)
@click.option("--limit", type=click.IntRange(min=1), help="Send at most this many new rows.")
@click.option("--retry-failed", is_flag=True, help="Send rows committed as error again; the newest row wins.")
@click.option(
    "--new-run", is_flag=True, help="OUTPUT was made with other settings: set its rows aside, start afresh."
)
@click.option("-v", "--verbose", count=True, help="More log detail (a line per row).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors; no progress display.")
@click.option(
    "--log-format",
    type=click.Choice(LOG_FORMATS),
    default="auto",
    show_default=True,
    help="json: one object per line on stderr, and the summary as one JSON line on stdout. "
    "auto: json unless stderr is a terminal.",
)
@click.option(
    "--progress/--no-progress",
    default=None,
    help="The live progress display on stderr. Default: on in a terminal with text logs.",
)
@click.option(
    "--metrics-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Keep this Prometheus textfile (*.prom) up to date during the run.",
)
@click.option(
    "--max-cost",
    type=float,
    help="Spend at most this many US dollars in this run (wins over limits.max_cost_usd); exit 5 when reached.",
)
@click.option(
    "--no-wait",
    is_flag=True,
    help='endpoint.mode = "batch": submit the batch jobs and exit 0; a later run collects their answers.',
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Print the first request that would be sent (images shortened, no key) and exit 0; send nothing.",
)
@click.option(
    "--engine",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="local: this process. ray: Ray actors sharing one quota (the optional extra; see the README).",
)
@click.option(
    "--workers", type=click.IntRange(min=1), default=2, show_default=True, help="--engine ray: workers."
)
@click.option(
    "--worker-cpus",
    type=click.FloatRange(min=0.01),
    default=0.5,
    show_default=True,
    help="--engine ray: the CPU share each worker asks Ray for (1 for image-heavy runs).",
)
@click.option("--ray-address", help="--engine ray: a cluster's address, or auto; default: start a local Ray.")
def run_command(
    config: Path,
    manifest: Path,
    output: Path,
    limit: int | None,
    retry_failed: bool,
    new_run: bool,
    verbose: int,
    quiet: bool,
    log_format: LogFormat,
    progress: bool | None,
    metrics_file: Path | None,
    max_cost: float | None,
    no_wait: bool,
    dry_run: bool,
    engine: Literal["local", "ray"],
    workers: int,
    worker_cpus: float,
    ray_address: str | None,
) -> None:
    """Caption every manifest row not yet in OUTPUT; a rerun resumes where the last one stopped."""
    chosen = _setup_logging(verbose, quiet, log_format)
    collect_garbage_less_often()
    if progress is None:
        progress = chosen == "text" and not quiet and sys.stderr.isatty()
    options = RunOptions(
        manifest, output, limit=limit, retry_failed=retry_failed, new_run=new_run, progress=progress,
        metrics_file=metrics_file, no_wait=no_wait, engine=engine, workers=workers, worker_cpus=worker_cpus,
        ray_address=ray_address,
    )  # fmt: skip
    with _exit_on_errors(f"use the output {output}"):
        cfg = load_config(config)
        if max_cost is not None:
            cfg = with_max_cost(cfg, max_cost)
        if dry_run:
            preview = asyncio.run(preview_first_request(cfg, manifest, output, retry_failed=retry_failed))
            click.echo(json.dumps(preview_as_json(preview), indent=2))
            sys.exit(EXIT_OK)
        summary = asyncio.run(run(cfg, options))
    click.echo(json.dumps(summary_as_dict(summary)) if chosen == "json" else format_summary(summary))
    sys.exit(summary.exit_code)


def format_summary(summary: RunSummary) -> str:
    """The few lines an operator reads after a run."""
    counts = summary.counts
    cost = "unknown (no price for the model)" if summary.cost_usd is None else f"${summary.cost_usd:.4f}"
    lines = [
        (
            f"rows: {counts['ok']} ok, {counts['filtered']} filtered, {counts['error']} error"
            f" ({summary.skipped} already done, {summary.duplicates} duplicate ids ignored)"
        ),
        f"tokens: {summary.prompt_tokens} prompt + {summary.completion_tokens} completion; cost {cost}",
        (
            f"time: {summary.duration_s:.1f} s ({summary.rows_per_s:.1f} rows/s), {summary.retries} retries, "
            f"{summary.http_429s} answers 429, {summary.pauses} pauses ({summary.paused_s:.1f} s)"
        ),
        f"output: {summary.output}",
    ]
    if summary.max_cost_usd is not None and summary.spend_usd is not None:
        lines.insert(2, f"spend: ${summary.spend_usd:.4f} of the ${summary.max_cost_usd:.4f} cap")
    if len(summary.endpoints) > 1:
        lines[-1:-1] = describe_endpoints(summary.endpoints)
    if summary.stopped_because:
        lines.append(f"stopped early: {summary.stopped_because}")
    return "\n".join(lines)


@main.command(name="status")
@click.argument("output", type=click.Path(file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="One JSON object, for scripts.")
def status_command(output: Path, as_json: bool) -> None:
    """Rows by status, tokens, cost, the last run, and the failed rows with their reasons."""
    with _exit_on_errors(f"read {output}"):
        status = read_status(output)
    click.echo(json.dumps(dataclasses.asdict(status), indent=2) if as_json else format_status(status))


def _window_h(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    try:
        return None if value is None else parse_window_h(value)
    except ValueError as err:
        raise click.BadParameter(str(err)) from None


@main.command(name="estimate")
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--manifest", required=True, type=click.Path(path_type=Path), help="CSV, JSONL, Parquet or a folder."
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object (schema in the README), for scripts.")
@click.option(
    "--per-row",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write each row's images, prompt tokens and cost to this Parquet file.",
)
@click.option(
    "--observed",
    type=click.Path(file_okay=False, path_type=Path),
    help="An earlier run's OUTPUT: its mean completion tokens, and its billed prompt tokens row by row.",
)
@click.option(
    "--window", "window_h", callback=_window_h, help="Does the run fit in this time? e.g. 6h, 90m, 1h30m."
)
@click.option(
    "--probe-urls", is_flag=True, help="Size http(s) images from their first 64 KiB (Range requests)."
)
@click.option("--max-cost", type=float, help="Does the run fit under this spend cap (US dollars)?")
def estimate_command(
    config: Path,
    manifest: Path,
    as_json: bool,
    per_row: Path | None,
    observed: Path | None,
    window_h: float | None,
    probe_urls: bool,
    max_cost: float | None,
) -> None:
    """What captioning MANIFEST under CONFIG will cost and how long it will take; nothing is sent."""
    _setup_logging(0, True)
    options = EstimateOptions(
        manifest, observed=observed, per_row=per_row, window_h=window_h, probe_urls=probe_urls
    )
    with _exit_on_errors(f"write {per_row}"):
        cfg = load_config(config)
        if max_cost is not None:
            cfg = with_max_cost(cfg, max_cost)
        result = asyncio.run(estimate(cfg, options))
    click.echo(json.dumps(estimate_as_json(result), indent=2) if as_json else format_estimate(result))


@main.command(name="report")
@click.argument("output", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "-o",
    "--out",
    "dest",
    type=click.Path(dir_okay=False, path_type=Path),
    help=f"Where to write the page (default OUTPUT/{REPORT_FILE}).",
)
def report_command(output: Path, dest: Path | None) -> None:
    """Write one self-contained HTML page about OUTPUT: summary, failed rows, filter hits, histograms, samples."""
    with _exit_on_errors("write the report"):
        path = write_report(output, dest)
    click.echo(str(path))


@main.group(name="batches")
def batches_group() -> None:
    """Batch API jobs of an output (endpoint.mode = "batch")."""


@batches_group.command(name="cancel")
@click.argument("output", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--config",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The run config naming the endpoint (default: the config of OUTPUT's last run).",
)
def batches_cancel_command(output: Path, config: Path | None) -> None:
    """Cancel OUTPUT's jobs still running; the next run collects the lines they finished."""
    from pipeline.batch.control import cancel_batches, last_run_config
    from pipeline.config import api_key

    _setup_logging(0, True)
    with _exit_on_errors(f"read {output}"):
        cfg = load_config(config or last_run_config(output))
        try:
            answers = asyncio.run(cancel_batches(cfg, output, api_key(cfg)))
        except RunAborted as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(EXIT_REFUSED)
    for batch_id, status in answers:
        click.echo(f"{batch_id}: {status}")
    if not answers:
        click.echo("no batch of this output is running")


@main.command(name="emulator")
@click.option("--host", default="127.0.0.1", show_default=True, help="Loopback only, unless you mean it.")
@click.option("--port", default=0, show_default=True, help="0 picks a free port.")
@click.option("--api-key", default="emulator", show_default=True, help="The key clients must send.")
@click.option("--deployment", default="gpt-4-vision", show_default=True)
@click.option("--model", default="gpt-4-turbo", show_default=True, help="For token accounting.")
@click.option("--latency", "latency_s", default=0.0, show_default=True, help="Seconds before each answer.")
@click.option("--fault-rate", default=0.0, show_default=True, help="Share of requests answered 500.")
@click.option("--drop-rate", default=0.0, show_default=True, help="Share of connections dropped.")
@click.option("--tpm", default=0, show_default=True, help="Enforce this tokens-per-minute quota (0: none).")
@click.option(
    "--rpm", default=0, show_default=True, help="Enforce this requests-per-minute quota (0: from TPM)."
)
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--request-log", type=click.Path(dir_okay=False, path_type=Path), help="Append a JSON line per request."
)
@click.option(
    "--batch-delay",
    "batch_delay_s",
    default=0.0,
    show_default=True,
    help="Batch API: seconds a job waits before its lines are answered.",
)
@click.option(
    "--batch-expire-after",
    default=0,
    show_default=True,
    help="Batch API: a job expires after answering this many lines (0: never).",
)
@click.option(
    "--batch-fail-every",
    default=0,
    show_default=True,
    help="Batch API: every Nth line is answered with a server_error line (0: none).",
)
@click.option(
    "--batch-enqueued-tokens",
    default=0,
    show_default=True,
    help="Batch API: refuse jobs past this many enqueued tokens (token_limit_exceeded; 0: none).",
)
def emulator_command(
    host: str,
    port: int,
    api_key: str,
    deployment: str,
    model: str,
    latency_s: float,
    fault_rate: float,
    drop_rate: float,
    tpm: int,
    rpm: int,
    seed: int,
    request_log: Path | None,
    batch_delay_s: float,
    batch_expire_after: int,
    batch_fail_every: int,
    batch_enqueued_tokens: int,
) -> None:
    """Serve the Azure and OpenAI chat-completions, Files and Batches APIs locally, for demos, tests and
    quota rehearsals.

    The first line printed is "listening on http://HOST:PORT".
    """
    from pipeline.config import EmulatorConfig
    from pipeline.emulator import Emulator, serve_forever

    _setup_logging(0, True)
    cfg = EmulatorConfig(
        latency_s=latency_s,
        fault_rate=fault_rate,
        drop_rate=drop_rate,
        tokens_per_minute=tpm,
        requests_per_minute=rpm,
        seed=seed,
        batch_delay_s=batch_delay_s,
        batch_expire_after_lines=batch_expire_after,
        batch_fail_every=batch_fail_every,
        batch_enqueued_tokens=batch_enqueued_tokens,
    )
    emulator = Emulator(
        cfg, api_key=api_key, deployment=deployment, model=model, request_log=request_log, keep_requests=False
    )
    try:
        asyncio.run(serve_forever(emulator, host, port))
    except KeyboardInterrupt:
        pass
