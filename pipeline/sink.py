"""The output dataset: the Parquet schema (defined here and nowhere else), buffering, atomic part files.

A row is committed when the part file holding it is renamed into place: written under a temporary
name that starts with a dot (readers skip those), flushed, fsynced, renamed, and the folder fsynced.
The estimate's ``--per-row`` file has its schema here too and is written the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, BinaryIO

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from pipeline.config import OutputConfig
from pipeline.records import FILTER_CATEGORIES, FilterResult, VisionResult
from pipeline.refs import shorten_url

if TYPE_CHECKING:
    from pipeline.journal import Journal

log = logging.getLogger(__name__)

PART_GLOB = "part-*.parquet"
TEMP_PREFIX = ".tmp-"  # pyarrow.dataset, DuckDB and Spark all skip files starting with "." or "_"
RUN_FILE = "_run.json"
STATS_FILE = "_stats.json"

_CATEGORY = pa.struct([("filtered", pa.bool_()), ("severity", pa.string())])
FILTER_TYPE = pa.struct([(name, _CATEGORY) for name in FILTER_CATEGORIES])
TIMESTAMP = pa.timestamp("ms", tz="UTC")

SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("image", pa.string()),  # the first image reference as the manifest gave it, never a data URL
        pa.field("images", pa.list_(pa.string())),  # all of them, for rows with several
        pa.field("prompt", pa.string()),
        pa.field("detail", pa.string()),
        pa.field("status", pa.string(), nullable=False),  # ok | filtered | error
        pa.field("description", pa.string()),
        pa.field("finish_reason", pa.string()),
        pa.field("model", pa.string()),
        pa.field("response_id", pa.string()),
        pa.field("prompt_tokens", pa.int64()),
        pa.field("completion_tokens", pa.int64()),
        pa.field("total_tokens", pa.int64()),
        pa.field("estimated_prompt_tokens", pa.int64()),
        pa.field("cost_usd", pa.float64()),
        pa.field("prompt_filter", FILTER_TYPE),
        pa.field("completion_filter", FILTER_TYPE),
        pa.field("attempts", pa.int32()),
        pa.field("latency_s", pa.float64()),
        pa.field("started_at", TIMESTAMP),
        pa.field("finished_at", TIMESTAMP),
        pa.field("http_status", pa.int32()),
        pa.field("error", pa.string()),
        pa.field("error_kind", pa.string()),  # records.ErrorKind, on every error row
        pa.field("response_extra", pa.string()),  # JSON: what the response held that no column models
        pa.field("run_id", pa.string()),
        pa.field(
            "endpoint", pa.string()
        ),  # the name of the endpoint that answered; null before pools existed
        pa.field("mode", pa.string()),  # live | batch; null on rows of outputs made before the column
    ]
)
BASE_COLUMNS = frozenset(SCHEMA.names)

# The estimate's --per-row file (``estimate --per-row``): one row per manifest row, what it would cost.
ESTIMATE_ROWS_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("line", pa.int64()),
        pa.field("detail", pa.string()),
        pa.field("images", pa.int32()),
        pa.field("unsized_images", pa.int32()),
        pa.field("prompt_tokens", pa.int64()),
        pa.field("cost_usd", pa.float64()),  # expected: prompt plus the expected completion; null if failing
        pa.field("error_kind", pa.string()),  # records.ErrorKind of the failure, null for a row to send
        pa.field("error", pa.string()),  # the error the run would commit
    ]
)


def _filter_value(result: FilterResult | None) -> dict[str, Any] | None:
    if result is None:
        return None
    categories = {name: getattr(result, name) for name in FILTER_CATEGORIES}
    return {
        name: None if c is None else {"filtered": c.filtered, "severity": c.severity}
        for name, c in categories.items()
    }


def _millis(epoch_s: float | None) -> int | None:
    return None if epoch_s is None else round(epoch_s * 1000)


def _as_reference(ref: str) -> str:
    """An image reference fit for the output: a data URL given in the manifest is the image itself, kept
    out of the dataset (and the journal) as its type and size; paths and http(s) URLs stay as given."""
    return shorten_url(ref) if ref[:5].lower() == "data:" else ref


def result_to_row(result: VisionResult, run_id: str) -> dict[str, Any]:
    """One output row (a plain dict keyed by column) from a result. Pure."""
    task, usage = result.task, result.usage
    row: dict[str, Any] = {
        "id": task.row_id,
        "image": _as_reference(task.images[0]) if task.images else None,
        "images": [_as_reference(ref) for ref in task.images],
        "prompt": task.prompt,
        "detail": task.detail,
        "status": result.status,
        "description": result.description,
        "finish_reason": result.finish_reason,
        "model": result.model,
        "response_id": result.response_id,
        "prompt_tokens": usage.prompt_tokens if usage else None,
        "completion_tokens": usage.completion_tokens if usage else None,
        "total_tokens": usage.total_tokens if usage else None,
        "estimated_prompt_tokens": result.estimated_prompt_tokens,
        "cost_usd": result.cost_usd,
        "prompt_filter": _filter_value(result.prompt_filter),
        "completion_filter": _filter_value(result.completion_filter),
        "attempts": result.attempts,
        "latency_s": result.latency_s,
        "started_at": _millis(result.started_at),
        "finished_at": _millis(result.finished_at),
        "http_status": result.http_status,
        "error": result.error,
        "error_kind": None if result.error_kind is None else str(result.error_kind),
        "response_extra": result.response_extra,
        "run_id": run_id,
        "endpoint": result.endpoint,
        "mode": result.mode,
    }
    if result.fields is not None:  # a structured answer's columns (structured.py); checked not to collide
        row.update(result.fields)
    for name, value in task.extra.items():
        if name not in BASE_COLUMNS and name not in row:  # a manifest column never shadows one of ours
            row[name] = value
    return row


def schema_with_extras(extra_columns: Iterable[str], typed: Sequence[pa.Field] = ()) -> pa.Schema:
    """The output schema: ours, a structured answer's `typed` columns, then the manifest's extra columns
    as strings."""
    schema = pa.schema([*SCHEMA, *typed])
    for name in extra_columns:
        if schema.get_field_index(name) < 0:
            schema = schema.append(pa.field(name, pa.string()))
    return schema


def rows_to_table(rows: Sequence[Mapping[str, Any]], schema: pa.Schema) -> pa.Table:
    """Rows as an Arrow table of `schema`; missing extra columns are null. Pure."""
    return pa.Table.from_pylist([dict(row) for row in rows], schema=schema)


def write_part(output: Path, name: str, table: pa.Table) -> Path:
    """Commit `table` as part file `name`: temp file, fsync, rename, fsync the folder. Blocking."""
    part = ParquetFileWriter(output / name, table.schema)
    try:
        part.write(table)
        return part.commit()
    except BaseException:
        part.discard()
        raise


_NO_HARD_LINKS = frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK})


def write_new_part(output: Path, name: str, table: pa.Table) -> Path:
    """Commit `table` as part file `name`, which must not exist: temp file, fsync, hard link to `name` (an
    existing part is never replaced: FileExistsError), unlink the temp, fsync the folder. Blocking.

    For writers that share an output (Ray workers): a name taken twice fails instead of losing a part.
    """
    final = output / name
    temp = final.with_name(f"{TEMP_PREFIX}{name}")
    try:
        with open(temp, "wb") as f:
            pq.write_table(table, f, compression="zstd")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(temp, final)  # the commit; unlike a rename, it fails when the name is taken
        except OSError as err:
            if err.errno not in _NO_HARD_LINKS:
                raise
            if final.exists():  # a filesystem without hard links: check, then rename (names are unique)
                raise FileExistsError(errno.EEXIST, "part exists", str(final)) from None
            os.replace(temp, final)
    finally:
        temp.unlink(missing_ok=True)
    fsync_dir(output)
    return final


class _Columns:
    """Rows buffered column by column: one list per column, not a dict per row (a sixth of the memory for
    the output's 26 columns). A row without a column that others have holds null there."""

    def __init__(self, values: dict[str, list[Any]] | None = None, rows: int = 0) -> None:
        self.values: dict[str, list[Any]] = {} if values is None else values
        self.rows = rows

    def append(self, row: Mapping[str, Any]) -> None:
        values, n = self.values, self.rows
        for name, value in row.items():
            column = values.get(name)
            if column is None:
                column = values[name] = [None] * n
            column.append(value)
        self.rows = n + 1
        if len(row) != len(values):  # this row lacks a column an earlier one had
            for column in values.values():
                if len(column) == n:
                    column.append(None)

    def take(self, count: int) -> _Columns:
        """Remove the first `count` rows and return them."""
        taken = _Columns(
            {name: column[:count] for name, column in self.values.items()}, min(count, self.rows)
        )
        for column in self.values.values():
            del column[:count]
        self.rows -= taken.rows
        return taken

    def put_back(self, taken: _Columns) -> None:
        """Return rows that `take` removed (their part was not written) to the front of the buffer."""
        for name in self.values.keys() | taken.values.keys():
            before = taken.values.get(name) or [None] * taken.rows
            self.values[name] = before + (self.values.get(name) or [None] * self.rows)
        self.rows += taken.rows

    def to_table(self, schema: pa.Schema) -> pa.Table:
        """The rows as an Arrow table of `schema`, converted as ``rows_to_table`` converts rows. Pure."""
        nulls = [None] * self.rows
        arrays = [pa.array(self.values.get(field.name, nulls), type=field.type) for field in schema]
        return pa.Table.from_arrays(arrays, schema=schema)


def _commit_columns(output: Path, name: str, columns: _Columns, schema: pa.Schema) -> Path:
    try:
        return write_part(output, name, columns.to_table(schema))
    finally:
        # Arrow's allocator keeps the pages of a part's buffers for the next one; handed back, a run's
        # peak RSS no longer creeps up part after part.
        pa.default_memory_pool().release_unused()


class ParquetFileWriter:
    """One Parquet file written a table at a time under a temporary name that readers skip, then committed
    whole: fsynced, renamed into place, its folder fsynced. Memory holds one table, not the file. Blocking:
    call it from a thread.
    """

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        self.path, self.schema = path, schema
        self.temp = path.with_name(f"{TEMP_PREFIX}{path.name}")
        self._file: BinaryIO | None = None
        self._writer: pq.ParquetWriter | None = None

    def write(self, table: pa.Table) -> None:
        """Append `table`'s rows (of this file's schema); the first call creates the temporary file."""
        if self._writer is None:
            self._file = open(self.temp, "wb")  # noqa: SIM115  # open across write() calls; commit/discard close it
            self._writer = pq.ParquetWriter(self._file, self.schema, compression="zstd")
        self._writer.write_table(table)

    def commit(self) -> Path:
        """Put the file in place under its name, with no rows when none were written; returns its path."""
        if self._writer is None:
            self.write(self.schema.empty_table())
        assert self._writer is not None and self._file is not None
        self._writer.close()  # writes the footer; the file itself stays open
        self._writer = None
        _sync_and_rename(self._file, self.temp, self.path)  # the commit
        self._file = None
        return self.path

    def discard(self) -> None:
        """After a failure: remove the temporary file, so no half-written file is left behind. Does
        nothing when nothing was written, or once committed."""
        if self._file is None:
            return
        if self._writer is not None:
            with contextlib.suppress(OSError, pa.ArrowException):  # the failure itself may be a full disk
                self._writer.close()
            self._writer = None
        self._file.close()
        self._file = None
        self.temp.unlink(missing_ok=True)


def _sync_and_rename(f: IO[Any], temp: Path, final: Path) -> None:
    """Flush and fsync `f`, written at `temp`, close it and rename it to `final`; then fsync the folder."""
    f.flush()
    os.fsync(f.fileno())
    f.close()
    os.replace(temp, final)
    fsync_dir(final.parent)


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, value: Any) -> None:
    """Replace a small JSON file atomically (temp, fsync, rename). Blocking."""
    temp = path.with_name(f"{TEMP_PREFIX}{path.name}")
    with open(temp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.write("\n")
        _sync_and_rename(f, temp, path)


def part_files(output: Path) -> list[Path]:
    """The committed part files, oldest first (their names sort by run and sequence)."""
    return sorted(output.glob(PART_GLOB))


def read_output(
    output: Path, columns: Sequence[str] | None = None, row_filter: ds.Expression | None = None
) -> pa.Table:
    """Every committed row (or those matching `row_filter`), with the schemas of all parts unified (extra
    columns may differ by part)."""
    files = part_files(output)
    if not files:
        return schema_with_extras([]).empty_table()
    schema = pa.unify_schemas([pq.read_schema(f) for f in files])
    dataset = ds.dataset(files, schema=schema, format="parquet")
    return dataset.to_table(columns=list(columns) if columns else None, filter=row_filter)


async def _finish_in_thread(fn: Any, *args: Any) -> Any:
    """Run `fn` in a thread and wait for it even when cancelled meanwhile, then re-raise the cancel.

    A part write that was started finishes (or fails) before anyone is told: otherwise a cancelled
    flush could not know whether its rows were committed, and might commit them twice.
    """
    future = asyncio.get_running_loop().run_in_executor(None, fn, *args)
    cancelled: asyncio.CancelledError | None = None
    while not future.done():
        try:
            await asyncio.shield(future)
        except asyncio.CancelledError as err:
            cancelled = err
    result = future.result()
    if cancelled is not None:
        raise cancelled
    return result


class Sink:
    """Buffers results and commits them in part files of at most `rows_per_part` rows.

    `put` may be called from many workers; parts are written in a thread so the loop never blocks.
    """

    def __init__(
        self,
        output: Path,
        cfg: OutputConfig,
        run_id: str,
        extra_columns: Sequence[str] = (),
        journal: Journal | None = None,
        typed_columns: Sequence[pa.Field] = (),
    ) -> None:
        self.output = output
        self.journal = journal  # each row is journalled before it is buffered (journal.py)
        self.typed_columns = tuple(typed_columns)  # a structured answer's columns (structured.py)
        self._cfg = cfg
        self._run_id = run_id
        self._extra: dict[str, None] = dict.fromkeys(extra_columns)  # ordered set
        self._rows = _Columns()
        self._lock = asyncio.Lock()
        self._sequence = 0
        self.committed_rows = 0
        self.committed_parts = 0

    @property
    def buffered_rows(self) -> int:
        return self._rows.rows

    async def put(self, result: VisionResult) -> None:
        """Add one row (journalled first); commits a part when the buffer holds `rows_per_part` rows."""
        row = result_to_row(result, self._run_id)
        if self.journal is not None:
            self.journal.append(row)  # one write to the kernel: a kill from here on loses nothing paid for
        self._rows.append(row)
        self._extra.update(dict.fromkeys(k for k in result.task.extra if k not in BASE_COLUMNS))
        if self._rows.rows >= self._cfg.rows_per_part:
            await self._commit(full_parts_only=True)

    async def flush(self) -> None:
        """Commit everything buffered now as one or more part files."""
        await self._commit(full_parts_only=False)

    async def _commit(self, *, full_parts_only: bool) -> None:
        # Rows put while a part is being written wait for the next part: draining them as well would
        # follow every full part with a trickle of tiny ones whenever the workers are fast.
        per_part = self._cfg.rows_per_part
        async with self._lock:
            left = self._rows.rows
            while self._rows.rows and (self._rows.rows >= per_part if full_parts_only else left > 0):
                if self.journal is not None:
                    self.journal.rotate()  # rows put from now on go to a segment of their own
                part = self._rows.take(per_part if full_parts_only else min(per_part, left))
                left -= part.rows
                self._sequence += 1
                name = f"part-{self._run_id}-{self._sequence:05d}.parquet"
                schema = schema_with_extras(self._extra, self.typed_columns)
                is_committed = False
                try:
                    await _finish_in_thread(_commit_columns, self.output, name, part, schema)
                    is_committed = True
                except asyncio.CancelledError:
                    is_committed = True  # re-raised only after the write succeeded
                    raise
                except OSError:
                    self._rows.put_back(part)  # not committed: keep them for the next try
                    raise
                finally:
                    if is_committed:
                        self.committed_rows += part.rows
                        self.committed_parts += 1
                        if self.journal is not None:
                            self.journal.committed(self.committed_rows)
                log.info(
                    "committed %s: %d rows (%d this run)", name, part.rows, self.committed_rows,
                    extra={"event": "part_committed", "part": name, "rows": part.rows, "committed_rows": self.committed_rows},
                )  # fmt: skip

    async def flush_every(self, seconds: float, done: asyncio.Event) -> None:
        """Commit the buffer every `seconds` until `done` is set, so a kill loses at most that window."""
        while not done.is_set():
            try:
                await asyncio.wait_for(done.wait(), timeout=seconds)
            except TimeoutError:
                await self.flush()
