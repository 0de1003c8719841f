"""The command line: parse, call one public function, print, exit with a code cron understands.

Exit codes: 0 every row ok or filtered; 1 some rows ended in error; 2 bad usage or config;
3 the endpoint refused us (key, deployment, route, quota gone); 130 interrupted.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

import click

import dataclasses
import json

from pipeline.config import load_config
from pipeline.records import ConfigError
from pipeline.runner import EXIT_OUTPUT_FAILED, EXIT_USAGE, RunOptions, RunSummary, run
from pipeline.status import format_status, read_status

EXIT_CODES_HELP = (
    "Exit codes: 0 every row ok or filtered; 1 some rows ended in error; 2 bad usage or config; "
    "3 the endpoint refused us (key, deployment, route, quota gone); 4 the output could not be written; "
    "130 interrupted."
)


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("aiohttp").setLevel(logging.WARNING)


@click.group(epilog=EXIT_CODES_HELP)
@click.version_option(package_name="vision-pipeline")
def main() -> None:
    """Caption image collections with vision chat-completion APIs (Azure OpenAI, OpenAI, compatible servers)."""


@main.command(name="run", epilog=EXIT_CODES_HELP)
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--manifest", required=True, type=click.Path(path_type=Path), help="CSV, JSONL, Parquet or a folder.")
@click.option("--output", required=True, type=click.Path(file_okay=False, path_type=Path), help="Parquet dataset folder.")
@click.option("--limit", type=click.IntRange(min=1), help="Send at most this many new rows.")
@click.option("--retry-failed", is_flag=True, help="Send rows committed as error again; the newest row wins.")
@click.option("--new-run", is_flag=True, help="OUTPUT was made with other settings: set its rows aside, start afresh.")
@click.option("-v", "--verbose", count=True, help="More log detail.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
def run_command(
    config: Path,
    manifest: Path,
    output: Path,
    limit: int | None,
    retry_failed: bool,
    new_run: bool,
    verbose: int,
    quiet: bool,
) -> None:
    """Caption every manifest row not yet in OUTPUT; a rerun resumes where the last one stopped."""
    _setup_logging(verbose, quiet)
    options = RunOptions(manifest, output, limit=limit, retry_failed=retry_failed, new_run=new_run)
    try:
        cfg = load_config(config)
        summary = asyncio.run(run(cfg, options))
    except ConfigError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(EXIT_USAGE)
    except OSError as err:
        click.echo(f"error: cannot use the output {output}: {err}", err=True)
        sys.exit(EXIT_OUTPUT_FAILED)
    click.echo(format_summary(summary))
    sys.exit(summary.exit_code)


def format_summary(summary: RunSummary) -> str:
    """The few lines an operator reads after a run."""
    counts = summary.counts
    cost = "unknown (no price for the model)" if summary.cost_usd is None else f"${summary.cost_usd:.4f}"
    lines = [
        f"rows: {counts['ok']} ok, {counts['filtered']} filtered, {counts['error']} error"
        f" ({summary.skipped} already done, {summary.duplicates} duplicate ids ignored)",
        f"tokens: {summary.prompt_tokens} prompt + {summary.completion_tokens} completion; cost {cost}",
        f"time: {summary.duration_s:.1f} s, {summary.retries} retries, {summary.pauses} pauses on 429",
        f"output: {summary.output}",
    ]
    if summary.stopped_because:
        lines.append(f"stopped early: {summary.stopped_because}")
    return "\n".join(lines)


@main.command(name="status")
@click.argument("output", type=click.Path(file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="One JSON object, for scripts.")
def status_command(output: Path, as_json: bool) -> None:
    """Rows by status, tokens, cost, the last run, and the failed rows with their reasons."""
    try:
        status = read_status(output)
    except ConfigError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(EXIT_USAGE)
    click.echo(json.dumps(dataclasses.asdict(status), indent=2) if as_json else format_status(status))


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
@click.option("--rpm", default=0, show_default=True, help="Enforce this requests-per-minute quota (0: from TPM).")
@click.option("--seed", default=0, show_default=True)
@click.option("--request-log", type=click.Path(dir_okay=False, path_type=Path), help="Append a JSON line per request.")
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
) -> None:
    """Serve the Azure and OpenAI chat-completions API locally, for demos, tests and quota rehearsals.

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
    )
    emulator = Emulator(cfg, api_key=api_key, deployment=deployment, model=model, request_log=request_log)
    try:
        asyncio.run(serve_forever(emulator, host, port))
    except KeyboardInterrupt:
        pass
