"""The journal of paid answers: every row is written here before it waits in the sink's buffer, so a run
killed before its part was committed leaves its answers for the next run to commit, not to buy again.

Layout: ``OUTPUT/_journal/<run_id>-<segment>.jsonl``, one JSON object per line, each the output row as
``sink.result_to_row`` makes it (no key, and image references with data URLs shortened). A run with a
structured answer format starts each segment with a line ``{"run_id", "typed_columns"}`` holding the
Arrow types of its columns (base64 of the serialized schema), so recovered rows keep their types.
Dataset readers skip the folder (its name starts with ``_``).

- **Writing.** ``Journal.append`` hands each line to the kernel with one ``os.write`` on a file opened for
  appending, before the row is buffered: a SIGKILL after that loses nothing. For power loss the segment
  is fsynced every ``SYNC_EVERY_S`` (group commit: one fsync for every row of that interval, in a
  thread), so a crash of the machine loses at most that much.
- **Segments.** The sink starts a new segment as it starts writing a part. A segment is removed once
  every row written to it is in a committed part; at the end of a clean run none is left.
- **Recovery.** Before a run opens its output, ``recover`` reads every segment, keeps the rows that no
  committed part holds for the same run, commits them in a part named after the run that paid for them,
  and removes the segments. A torn last line (the process died mid-write) is not JSON, or has no newline:
  it is skipped, with a warning.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.sink import fsync_dir, part_files, read_output, rows_to_table, schema_with_extras, write_part

log = logging.getLogger(__name__)

JOURNAL_DIR = "_journal"
SYNC_EVERY_S = 0.05  # group commit: a machine crash loses at most this much of paid answers


@dataclass(frozen=True, slots=True)
class Recovered:
    """Rows a killed run had paid for and a later run committed from the journal."""

    rows: int = 0
    cost_usd: float = 0.0  # their cost_usd, summed: already spent, not counted against this run's cap
    torn_lines: int = 0  # lines skipped: a record cut short by the kill


class Journal:
    """The journal of one run: append rows, rotate segments as parts are written, drop what is committed."""

    def __init__(
        self, output: Path, run_id: str, typed_columns: Sequence[pa.Field] = (), name: str | None = None
    ) -> None:
        self.folder = output / JOURNAL_DIR
        self.run_id = run_id
        self.name = name or run_id  # segments are <name>-NNNNN.jsonl: a Ray worker's name its block's own
        self._header: dict[str, str] | None = None
        if typed_columns:
            encoded = base64.b64encode(pa.schema(list(typed_columns)).serialize().to_pybytes()).decode()
            self._header = {"run_id": run_id, "typed_columns": encoded}
        self._segment = 0
        self._fd: int | None = None
        self._rows_written = 0  # rows appended by this run
        self._segment_ends: list[tuple[Path, int]] = []  # closed segments and the row count at their end
        self._is_dirty = False  # appended since the last fsync

    @property
    def path(self) -> Path:
        return self.folder / f"{self.name}-{self._segment:05d}.jsonl"

    def append(self, row: Mapping[str, Any]) -> None:
        """Write one output row; it has reached the kernel when this returns. Blocking, but short: one write."""
        if self._fd is None:
            self._open()
        assert self._fd is not None
        data = orjson.dumps(row, option=orjson.OPT_APPEND_NEWLINE)
        while data:
            data = data[os.write(self._fd, data) :]
        self._rows_written += 1
        self._is_dirty = True

    def rotate(self) -> None:
        """Start a new segment: the sink is about to commit every row written so far, or a prefix of them."""
        if self._fd is None:
            return
        self._segment_ends.append((self.path, self._rows_written))
        os.close(self._fd)  # not fsynced here: its rows are about to be in a part, which is
        self._fd, self._is_dirty = None, False
        self._segment += 1

    def committed(self, rows: int) -> None:
        """`rows` of this run's rows, the oldest first, are in committed parts: drop the segments they cover."""
        while self._segment_ends and self._segment_ends[0][1] <= rows:
            path, _ = self._segment_ends.pop(0)
            path.unlink(missing_ok=True)

    def close(self, *, is_all_committed: bool) -> None:
        """The run is over; with every row committed the journal is removed, else it stays for the next run."""
        if self._fd is not None:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
        if is_all_committed:
            for path in [*(path for path, _ in self._segment_ends), self.path]:
                path.unlink(missing_ok=True)
            self._segment_ends.clear()
            _remove_if_empty(self.folder)

    async def sync_every(self, done: asyncio.Event) -> None:
        """Group commit: fsync the open segment every SYNC_EVERY_S, if written to, until `done` is set."""
        while not done.is_set():
            try:
                await asyncio.wait_for(done.wait(), timeout=SYNC_EVERY_S)
            except TimeoutError:
                if self._fd is not None and self._is_dirty:
                    self._is_dirty = False
                    fd = os.dup(self._fd)  # the segment may be rotated and closed while the thread syncs
                    await asyncio.to_thread(_sync_and_close, fd)

    def _open(self) -> None:
        if not self.folder.is_dir():
            self.folder.mkdir(parents=True, exist_ok=True)
            fsync_dir(self.folder.parent)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        fsync_dir(self.folder)  # the new segment's name survives a crash
        if self._header is not None:
            os.write(self._fd, (json.dumps(self._header) + "\n").encode())


def pending_rows(output: Path) -> tuple[list[dict[str, Any]], int]:
    """The journalled rows that no committed part holds for the same run, and the torn lines skipped. Blocking."""
    rows, _, torn = _pending(output)
    return rows, torn


def _pending(
    output: Path, pattern: str = "*.jsonl"
) -> tuple[list[dict[str, Any]], dict[str, list[pa.Field]], int]:
    """What pending_rows says (of the segments matching `pattern`), and the typed columns of each run that
    has some."""
    segments = sorted((output / JOURNAL_DIR).glob(pattern))
    typed: dict[str, list[pa.Field]] = {}
    if not segments:
        return [], typed, 0
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    torn = 0
    for segment in segments:
        with open(segment, "rb") as f:
            for line in f:
                record = _parse(line)
                if record is None:
                    torn += 1
                    continue
                if "typed_columns" in record:
                    schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(record["typed_columns"])))
                    typed[str(record["run_id"])] = list(schema)
                    continue
                rows[(str(record["id"]), str(record["run_id"]))] = record
    if rows and part_files(output):
        done = read_output(output, ["id", "run_id"])
        committed = set(
            zip(done.column("id").to_pylist(), pc.fill_null(done.column("run_id"), "").to_pylist())
        )
        rows = {key: row for key, row in rows.items() if key not in committed}
    return list(rows.values()), typed, torn


def recover(output: Path, pattern: str = "*.jsonl") -> Recovered:
    """Commit the rows a killed run journalled but never committed, then remove the journal. Blocking.

    Each run's rows go into a part named after that run (``part-<run_id>-j00001.parquet``), so they sort
    with the parts it did commit. `pattern`: only the segments it matches (a dead Ray worker's), the rest
    of the journal stays.
    """
    rows, typed, torn = _pending(output, pattern)
    if torn:
        log.warning(
            "journal: %d record(s) cut short by the kill are skipped; their rows will be sent again", torn
        )
    by_run: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_run.setdefault(str(row["run_id"]), []).append(row)
    for run_id, run_rows in sorted(by_run.items()):
        extras = dict.fromkeys(key for row in run_rows for key in row)
        write_part(
            output,
            _recovery_part_name(output, run_id),
            rows_to_table(run_rows, schema_with_extras(extras, typed.get(run_id, ()))),
        )
        log.info(
            "committed %d rows that run %s had been answered for, from its journal", len(run_rows), run_id
        )
    for segment in sorted((output / JOURNAL_DIR).glob(pattern)):
        segment.unlink()
    if pattern == "*.jsonl":  # a dead Ray worker's segments: live ones may be opening theirs in the folder
        _remove_if_empty(output / JOURNAL_DIR)
    cost = sum(float(row.get("cost_usd") or 0.0) for row in rows)
    return Recovered(len(rows), round(cost, 6), torn)


def _recovery_part_name(output: Path, run_id: str) -> str:
    taken = {path.name for path in part_files(output)}
    n = 1
    while (name := f"part-{run_id}-j{n:05d}.parquet") in taken:
        n += 1
    return name


def _parse(line: bytes) -> dict[str, Any] | None:
    if not line.endswith(b"\n"):
        return None
    try:
        record = json.loads(line)
    except ValueError:
        return None
    is_record = (
        isinstance(record, dict) and "run_id" in record and ("id" in record or "typed_columns" in record)
    )
    return record if is_record else None


def _sync_and_close(fd: int) -> None:
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        return  # not there, or not empty
    fsync_dir(folder.parent)
