"""The ledger of an output's batches, ``_batches.jsonl``: every step of every input file and job, in order.

One JSON object per line, appended and fsynced before the step's effect is relied on:

- ``packed``: file number, the run, and every row it holds (custom_id, id, image references, prompt,
  detail, manifest line and extra columns, estimated prompt tokens): enough to build results in any
  later run, whatever the manifest has become;
- ``uploaded``: the file's id at the service; ``creating``: a job is being created from it (its
  metadata names the run and the file number, so a run killed before ``created`` finds it by listing);
- ``created``: the batch id; ``ended``: its terminal status; ``collected``: its answers committed and
  how many rows it left over;
- ``requeued``: the file waits for a new job (the last one failed on the enqueued-token quota);
  ``dropped``: the file will never become a job (the service refused it).

A row is *held* while a file holding it was uploaded and is waiting for, or in, a batch not yet
collected: such rows are never planned again. A line cut short by a kill is ignored when read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.batch.lines import PackedFile, PackedRow
from pipeline.records import ImageTask

LEDGER_FILE = "_batches.jsonl"
BATCH_STATUS_FILE = "_batches_status.json"  # each job's Batch object as last polled, for `status`
BATCH_FILES_DIR = "_batch_files"  # input files while they upload, output files while they are read
TERMINAL_STATUSES = frozenset({"completed", "expired", "cancelled", "failed"})


@dataclass(slots=True)
class FileEntry:
    """One input file, as the ledger knows it."""

    file_no: int
    run_id: str
    rows: tuple[PackedRow, ...]
    tokens: int
    file_id: str | None = None
    batch_ids: list[str] = field(default_factory=list)
    is_waiting: bool = False  # uploaded (or requeued) and no job created from it since
    is_dropped: bool = False
    uploaded_at: float = 0.0  # epoch seconds


@dataclass(slots=True)
class BatchEntry:
    """One job, as the ledger knows it."""

    batch_id: str
    file_no: int
    created_at: float
    status: str | None = None  # terminal status once ended
    is_collected: bool = False
    left: int = 0


@dataclass(slots=True)
class LedgerState:
    files: dict[int, FileEntry] = field(default_factory=dict)
    batches: dict[str, BatchEntry] = field(default_factory=dict)

    def held_row_ids(self) -> set[str]:
        """Ids of rows in an uploaded file waiting for a job, or in a job not yet collected."""
        held: set[str] = set()
        for entry in self.files.values():
            if self.is_holding(entry):
                held.update(row.task.row_id for row in entry.rows)
        return held

    def is_holding(self, entry: FileEntry) -> bool:
        if entry.file_id is None or entry.is_dropped:
            return False
        return entry.is_waiting or any(not self.batches[b].is_collected for b in entry.batch_ids)

    def uncollected(self) -> list[BatchEntry]:
        return [b for b in self.batches.values() if not b.is_collected]

    def waiting_files(self) -> list[FileEntry]:
        return [f for f in self.files.values() if f.is_waiting and not f.is_dropped and f.file_id]

    def next_file_no(self) -> int:
        return max(self.files, default=0) + 1

    def file_of(self, batch_id: str) -> FileEntry:
        return self.files[self.batches[batch_id].file_no]


def task_as_json(task: ImageTask) -> dict[str, Any]:
    return {
        "id": task.row_id,
        "images": list(task.images),
        "prompt": task.prompt,
        "detail": task.detail,
        "line": task.line,
        "extra": dict(task.extra),
    }


def task_from_json(value: Mapping[str, Any]) -> ImageTask:
    return ImageTask(
        str(value["id"]),
        tuple(value["images"]),
        str(value["prompt"]),
        value["detail"],
        int(value["line"]),
        dict(value.get("extra") or {}),
    )


class Ledger:
    """The output's ``_batches.jsonl``: read once at start, then appended to. Blocking: use a thread."""

    def __init__(self, output: Path) -> None:
        self.path = output / LEDGER_FILE
        self.state = LedgerState()
        for record in read_records(self.path):
            apply(self.state, record)

    def append(self, record: Mapping[str, Any]) -> None:
        """Write one record and fsync it, then apply it to the state."""
        line = json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        apply(self.state, record)

    def packed(self, packed: PackedFile, run_id: str, now: float) -> None:
        rows = [
            {"custom_id": r.custom_id, "estimated": r.estimated_prompt_tokens, **task_as_json(r.task)}
            for r in packed.rows
        ]
        self.append(
            {
                "event": "packed",
                "at": now,
                "file_no": packed.file_no,
                "run_id": run_id,
                "bytes": packed.size_bytes,
                "tokens": packed.tokens,
                "rows": rows,
            }
        )


def read_records(path: Path) -> Iterator[dict[str, Any]]:
    """The ledger's records in order; a last line cut short by a kill is skipped."""
    try:
        with open(path, "rb") as f:
            for raw in f:
                try:
                    record = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(record, dict):
                    yield record
    except FileNotFoundError:
        return


def apply(state: LedgerState, record: Mapping[str, Any]) -> None:
    """Fold one record into the state. Pure but for `state`."""
    event = record.get("event")
    if event == "packed":
        rows = tuple(_packed_row(row) for row in record["rows"])
        no = int(record["file_no"])
        state.files[no] = FileEntry(no, str(record["run_id"]), rows, int(record.get("tokens", 0)))
    elif event == "uploaded":
        entry = state.files[int(record["file_no"])]
        entry.file_id, entry.is_waiting = str(record["file_id"]), True
        entry.uploaded_at = float(record.get("at") or 0.0)
    elif event == "created":
        batch_id, no = str(record["batch_id"]), int(record["file_no"])
        state.batches.setdefault(batch_id, BatchEntry(batch_id, no, float(record.get("at", 0.0))))
        entry = state.files[no]
        if batch_id not in entry.batch_ids:
            entry.batch_ids.append(batch_id)
        entry.is_waiting = False
    elif event == "ended" and record["batch_id"] in state.batches:
        state.batches[record["batch_id"]].status = str(record["status"])
    elif event == "collected" and record["batch_id"] in state.batches:
        batch = state.batches[record["batch_id"]]
        batch.is_collected, batch.left = True, int(record.get("left", 0))
    elif event == "requeued":
        state.files[int(record["file_no"])].is_waiting = True
    elif event == "dropped":
        state.files[int(record["file_no"])].is_dropped = True


def _packed_row(value: Mapping[str, Any]) -> PackedRow:
    return PackedRow(str(value["custom_id"]), task_from_json(value), int(value["estimated"]))


def rows_by_custom_id(rows: Iterable[PackedRow]) -> dict[str, PackedRow]:
    return {row.custom_id: row for row in rows}


def read_batch_status(output: Path) -> dict[str, dict[str, Any]]:
    """Each job's Batch object as last polled (``_batches_status.json``); {} when never polled."""
    try:
        value = json.loads((output / BATCH_STATUS_FILE).read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return {}
    batches = value.get("batches") if isinstance(value, dict) else None
    return dict(batches) if isinstance(batches, dict) else {}


@dataclass(frozen=True, slots=True)
class BatchInfo:
    """One job of an output, for ``status``: as the ledger and the last poll know it."""

    batch_id: str
    state: str  # the service's status at the last poll; "collected" once its answers are committed
    rows: int
    total: int | None  # request counts at the last poll
    completed: int | None
    failed: int | None
    age_s: float  # since it was created
    left: int = 0  # rows it left over, once collected


def batch_infos(output: Path, now: float) -> list[BatchInfo]:
    """Every job the output's ledger knows, oldest first. Blocking; [] without a ledger."""
    state = Ledger(output).state
    polled = read_batch_status(output)
    infos = []
    for batch in sorted(state.batches.values(), key=lambda b: b.created_at):
        seen = polled.get(batch.batch_id) or {}
        counts = seen.get("request_counts") or {}
        status = "collected" if batch.is_collected else str(seen.get("status") or batch.status or "created")
        infos.append(
            BatchInfo(
                batch.batch_id,
                status,
                len(state.files[batch.file_no].rows),
                counts.get("total"),
                counts.get("completed"),
                counts.get("failed"),
                round(now - batch.created_at, 1),
                batch.left,
            )
        )
    return infos
