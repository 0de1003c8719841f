"""What an output holds: rows by status, tokens, cost, the last run, and the failed rows with reasons.

``summarize`` is pure (an Arrow table and the run files in, a record out); ``read_status`` does the I/O.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.batch.ledger import BatchInfo, batch_infos
from pipeline.journal import pending_rows
from pipeline.records import FAILED_STATUSES, STATUSES, TEXT_STATUSES, ConfigError
from pipeline.sink import RUN_FILE, STATS_FILE, part_files, read_output

STATUS_COLUMNS = ("id", "status", "prompt_tokens", "completion_tokens", "cost_usd", "error", "finished_at")
MAX_FAILED_LISTED = 1000
MAX_COLLECTED_BATCHES_LISTED = 5  # the text lists every live batch and the last few collected


@dataclass(frozen=True, slots=True)
class FailedRow:
    row_id: str
    error: str | None


@dataclass(frozen=True, slots=True)
class OutputStatus:
    output: str
    rows: int
    by_status: dict[str, int]
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    last_finished_at: str | None  # ISO 8601, UTC: the newest row's finish time
    last_run: dict[str, Any] | None  # _stats.json of the last run, as written
    failed: list[FailedRow]  # at most MAX_FAILED_LISTED, by id
    failed_total: int
    journalled: int = (
        0  # rows answered (and paid for) but in no committed part yet: a run is going, or was killed
    )
    batches: list[BatchInfo] = field(default_factory=list)  # Batch API jobs of the output (batch mode)


def summarize(output: str, table: pa.Table, last_run: dict[str, Any] | None) -> OutputStatus:
    """The status of an output from its committed rows. Pure."""
    statuses = table.column("status").to_pylist()
    by_status: dict[str, int] = {s: n for s in STATUSES if (n := statuses.count(s)) or s in TEXT_STATUSES}
    failed_table = table.filter(pc.is_in(table.column("status"), pa.array(FAILED_STATUSES))).sort_by("id")
    failed = [
        FailedRow(row["id"], row["error"] or row["status"])
        for row in failed_table.slice(0, MAX_FAILED_LISTED).to_pylist()
    ]
    finished = pc.max(table.column("finished_at")).as_py() if table.num_rows else None
    return OutputStatus(
        output=output,
        rows=table.num_rows,
        by_status=by_status,
        prompt_tokens=int(pc.sum(table.column("prompt_tokens")).as_py() or 0),
        completion_tokens=int(pc.sum(table.column("completion_tokens")).as_py() or 0),
        cost_usd=round(float(pc.sum(table.column("cost_usd")).as_py() or 0.0), 6),
        last_finished_at=finished.isoformat() if finished else None,
        last_run=last_run,
        failed=failed,
        failed_total=failed_table.num_rows,
    )


def read_status(output: Path) -> OutputStatus:
    """Read an output folder's status. Raises ConfigError when it is not an output of ours."""
    if not (output / RUN_FILE).exists() and not part_files(output):
        raise ConfigError(f"{output}: not a vision-pipeline output (no {RUN_FILE}, no part files)")
    stats_path = output / STATS_FILE
    last_run = json.loads(stats_path.read_text(encoding="utf-8")) if stats_path.exists() else None
    status = summarize(str(output), read_output(output, STATUS_COLUMNS), last_run)
    journalled, _ = pending_rows(output)
    return replace(status, journalled=len(journalled), batches=batch_infos(output, time.time()))


def format_status(status: OutputStatus) -> str:
    """The status as a few lines for a terminal."""
    counts = status.by_status
    lines = [
        f"output: {status.output}",
        f"rows: {status.rows} ({counts['ok']} ok, {counts['filtered']} filtered, {counts['error']} error"
        + "".join(f", {counts[s]} {s}" for s in ("refused", "invalid_output") if counts.get(s))
        + ")",
        f"tokens: {status.prompt_tokens} prompt + {status.completion_tokens} completion; cost ${status.cost_usd:.4f}",
        f"last row finished: {status.last_finished_at or 'never'}",
    ]
    if status.journalled:
        lines.append(
            f"journalled: {status.journalled} rows answered but not yet in a part (a run is going on, or was "
            "killed: the next run commits them without sending them again)"
        )
    if status.last_run:
        run = status.last_run
        lines.append(
            f"last run: {run.get('run_id')}, exit code {run.get('exit_code')}, {run.get('rows')} rows in "
            f"{run.get('duration_s')} s"
            + (f", stopped: {run['stopped_because']}" if run.get("stopped_because") else "")
        )
    if status.batches:
        lines.append("batches (state at the last poll; `run` collects finished ones):")
        collected = [b for b in status.batches if b.state == "collected"]
        older = collected[:-MAX_COLLECTED_BATCHES_LISTED]
        lines += [format_batch(b) for b in status.batches if b not in older]
        if older:
            lines.append(f"  … and {len(older)} earlier collected batches (see --json)")
    if status.failed:
        lines.append(f"failed rows ({status.failed_total}; `run --retry-failed` sends them again):")
        lines += [f"  {row.row_id}: {row.error}" for row in status.failed]
        if status.failed_total > len(status.failed):
            lines.append(f"  … and {status.failed_total - len(status.failed)} more (see --json)")
    return "\n".join(lines)


def format_batch(info: BatchInfo) -> str:
    """One job in one line: id, state, request counts, age."""
    counts = "" if info.total is None else f", {info.completed}/{info.total} done, {info.failed} failed"
    left = f", {info.left} rows left over" if info.left else ""
    return f"  {info.batch_id}: {info.state}, {info.rows} rows{counts}{left}, {_age(info.age_s)} old"


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"
