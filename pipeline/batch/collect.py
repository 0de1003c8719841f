"""A finished batch's output and error files into results, joined to its rows on ``custom_id``.

Line shapes (OpenAI's Batch API reference; Azure's are the same):

- output: ``{"id", "custom_id", "response": {"status_code", "request_id", "body": <chat completion>},
  "error": null}``; a prompt Azure's content filter refused has ``status_code`` 400 and the filter's
  error body: a ``filtered`` row, as live;
- error file: ``{"custom_id", "response": {"status_code", "body": {"error": {...}}}, "error": null}``, or
  ``{"custom_id", "response": null, "error": {"code", "message"}}``.

Each row gets one outcome, the first line naming it: a result (ok, filtered, or an error row with the
line's code), or *left over* when the job ran out before answering it (``batch_expired``,
``batch_cancelled``, ``request_timeout``) or no line names it at all. Left-over rows stay uncommitted,
to be submitted again. Costs are at the batch price (``pricing.cost_usd(batch=True)``). A left-over row
no line names, or named by a line that is neither an answer nor an error, may have been billed: it is
listed in ``unknown_cost`` too, for the spend cap to keep its whole worst case. Blocking: read the files in
a thread.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.batch.lines import PackedRow
from pipeline.client import error_code, error_message
from pipeline.config import RunConfig
from pipeline.pricing import Price, cost_usd
from pipeline.records import ApiError, Delivery, ErrorKind, VisionResult
from pipeline.results import answered_result, failed_result
from pipeline.structured import Structured

log = logging.getLogger(__name__)

LEFT_OVER_CODES = frozenset({"batch_expired", "batch_cancelled", "request_timeout"})


@dataclass(slots=True)
class Collected:
    """What one batch's files gave: results to commit and ids of rows to submit again."""

    results: list[VisionResult] = field(default_factory=list)
    left: list[str] = field(default_factory=list)  # row ids
    unknown_cost: list[str] = field(default_factory=list)  # left-over row ids the service may have billed
    unknown_lines: int = 0  # lines naming a custom_id this file never held (logged)


def collect_files(
    files: list[Path],
    rows: Mapping[str, PackedRow],
    cfg: RunConfig,
    price: Price | None,
    structured: Structured | None,
) -> Collected:
    """The outcome of every row in `rows` from a batch's downloaded output and error files."""
    collected, seen = Collected(), set()
    finished_at = time.time()
    for line in _lines(files):
        custom_id = line.get("custom_id")
        row = rows.get(custom_id) if isinstance(custom_id, str) else None
        if row is None:
            collected.unknown_lines += 1
            continue
        if custom_id in seen:
            continue  # one outcome per row: the first line wins
        seen.add(custom_id)
        result = line_result(line, row, cfg, price, structured)
        if result is None:
            collected.left.append(row.task.row_id)
            if left_over_code(line) is None:
                collected.unknown_cost.append(row.task.row_id)
        else:
            collected.results.append(dataclasses.replace(result, finished_at=finished_at))
    missing = [row.task.row_id for cid, row in rows.items() if cid not in seen]
    collected.left += missing
    collected.unknown_cost += missing
    if collected.unknown_lines:
        log.warning("%d lines named a custom_id that this batch never held; ignored", collected.unknown_lines)
    return collected


def line_result(
    line: Mapping[str, Any],
    row: PackedRow,
    cfg: RunConfig,
    price: Price | None,
    structured: Structured | None,
) -> VisionResult | None:
    """One line's result, or None when its row is left over for another submission. Pure."""
    task, estimated = row.task, row.estimated_prompt_tokens
    error, response = line.get("error"), line.get("response")
    if left_over_code(line) is not None:
        return None
    if isinstance(error, Mapping):
        code = str(error.get("code") or "unknown")
        reason = f"row {task.row_id!r}: batch line failed: {code}: {error_message({'error': error}, code)}"
        err = ApiError(
            task.row_id, reason, status=None, kind=ErrorKind.BATCH_LINE_FAILED, code=code, attempts=1
        )
        return _batch(failed_result(task, err, cfg, estimated), cfg)
    if not isinstance(response, Mapping):
        return None  # neither an answer nor an error: treat as never answered
    status, body = int(response.get("status_code") or 0), response.get("body")
    body = body if isinstance(body, Mapping) else {}
    is_answer = status == 200 or (status == 400 and error_code(body) == "content_filter")
    if is_answer:
        result = answered_result(task, Delivery(status, body, 1), cfg, estimated, price, structured)
        usage = result.usage
        cost = (
            cost_usd(usage.prompt_tokens, usage.completion_tokens, price, batch=True)
            if usage and price
            else None
        )
        return _batch(dataclasses.replace(result, cost_usd=cost), cfg)
    body_code = error_code(body)
    reason = f"row {task.row_id!r}: HTTP {status} {body_code or ''}: {error_message(body, f'HTTP {status}')}"
    kind = ErrorKind.HTTP_4XX if 400 <= status < 500 else ErrorKind.BATCH_LINE_FAILED
    err = ApiError(task.row_id, reason, status=status, kind=kind, code=body_code, attempts=1)
    return _batch(failed_result(task, err, cfg, estimated), cfg)


def left_over_code(line: Mapping[str, Any]) -> str | None:
    """The line's code when it says the job ran out before answering (``LEFT_OVER_CODES``), else None. Pure."""
    error, response = line.get("error"), line.get("response")
    if isinstance(error, Mapping):
        code = str(error.get("code") or "")
    elif isinstance(response, Mapping) and isinstance(response.get("body"), Mapping):
        code = error_code(response["body"]) or ""
    else:
        return None
    return code if code in LEFT_OVER_CODES else None


def _batch(result: VisionResult, cfg: RunConfig) -> VisionResult:
    """A result of a line the service answered: by the Batch API, at the run's one endpoint."""
    return dataclasses.replace(result, mode="batch", endpoint=cfg.endpoint.name)


def _lines(files: list[Path]) -> Iterator[Mapping[str, Any]]:
    for path in files:
        with path.open("rb") as f:
            for n, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    value = json.loads(raw)
                except ValueError:
                    log.warning("%s line %d: not JSON; ignored", path.name, n)
                    continue
                if isinstance(value, Mapping):
                    yield value
