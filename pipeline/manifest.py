"""Streaming the rows of a manifest (CSV, JSONL, Parquet, or a folder of images) into ImageTasks.

Rows are read a block at a time (1 MiB of CSV or JSONL text, see manifest_text.py; 1024 Parquet rows),
so a manifest of any length takes the same memory. A bad row becomes a ManifestError yielded in its
place, never an exception: the run commits it as a failed row and goes on. Only a manifest that cannot
be read at all raises ConfigError. How a row's columns become an ImageTask is manifest_rows.py's job.

Columns (CSV header, JSON keys, Parquet fields):

- ``id``: optional. When absent or empty it is derived from the image references, so the same row gets
  the same id on every run: ``img-`` + the first 16 hex digits of sha256 of the references joined by
  newlines. A row whose id cannot be known at all (a bad line, or a line that is not UTF-8 in its id
  and image cells) is called ``line-<line>``.
- ``image``: one path (relative to the manifest's folder) or http(s)/data URL; or ``images``: a list of
  them (in CSV a JSON array, e.g. ``["a.jpg", "b.jpg"]``); the request plan refuses more than the
  service takes in one request.
- ``prompt`` and ``detail`` (low | high | auto): optional; an empty cell means "as the config says".
- every other column is passed through to the output as text: CSV cells as they are, other JSON or
  Parquet values as compact JSON, null as None.

``ImageTask.line`` is the physical line where the row starts in a CSV or JSONL file (the header is line
1 of a CSV, so its first row is line 2): what an editor shows. In Parquet it is the 1-based row number,
in a folder the 1-based position in the walk.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Collection, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import RequestConfig
from pipeline.idset import IdSet
from pipeline.manifest_rows import Skipped, check_columns, task_from_row
from pipeline.manifest_text import csv_header, read_csv, read_jsonl
from pipeline.records import ConfigError, ImageTask, ManifestError

__all__ = ["Skipped", "count_rows", "manifest_base_dir", "manifest_columns", "read_manifest"]

PARQUET_BATCH_ROWS = 1024
SKIP_CHECK_ROWS = 1024  # rows whose ids are looked up in the skip set at once
COUNT_CHUNK_BYTES = 1024 * 1024
FOLDER_IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
CSV_SUFFIXES = (".csv",)
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)

Item = ImageTask | ManifestError | Skipped


def read_manifest(
    path: Path,
    request: RequestConfig,
    skip: IdSet | Collection[str] = frozenset(),
    *,
    group_skipped: bool = False,
) -> Iterator[Item]:
    """Every row of the manifest at `path`, in order, as an ImageTask or, for a bad row, a ManifestError.

    Streams: nothing is read until the first row is asked for, and no more than one block (1 MiB of
    text, one Parquet batch) is held. `request` supplies the prompt and detail of rows that give none.
    A row whose id (given, derived, or ``line-<n>``) is in `skip` (already committed) comes as a
    ``Skipped`` marker instead. With `group_skipped`, consecutive committed rows come as one marker
    counting them (``Skipped.rows``), and CSV and Parquet rows are looked up a block at a time, before
    any Python object is made for them: resuming a run of millions of rows spends its start-up on the
    rows still to do. Raises ConfigError, at once, when the manifest is missing or of an unknown kind,
    and while iterating when it turns out unreadable (not text, not Parquet, or no ``image``/``images``
    column).
    """
    kind = _manifest_kind(path)
    ids = skip if isinstance(skip, IdSet) else IdSet(skip)
    early = ids if group_skipped and len(ids) else None  # the format's own block-wise skipping
    rows: Iterator[Item]
    if kind == "folder":
        rows = _read_folder(path, request)
    elif kind == "csv":
        rows = read_csv(path, request, early)
    elif kind == "jsonl":
        rows = read_jsonl(path, request)
    else:
        rows = _read_parquet(path, request, early)
    return _skip_committed(rows, ids, group_skipped) if len(ids) else rows


def _skip_committed(rows: Iterator[Item], skip: IdSet, group_skipped: bool) -> Iterator[Item]:
    """`rows` with each row whose id is in `skip` replaced by a Skipped marker (grouped if asked)."""
    while batch := list(itertools.islice(rows, SKIP_CHECK_ROWS)):
        asked = [item for item in batch if not isinstance(item, Skipped)]
        hits = iter(skip.contains_each(pa.array([item.row_id for item in asked], pa.string())).to_pylist())
        group: Skipped | None = None
        for item in batch:
            marker = (
                item if isinstance(item, Skipped) else Skipped(item.row_id, item.line) if next(hits) else None
            )
            if marker is None:
                if group is not None:
                    yield group
                    group = None
                yield item
            elif not group_skipped:
                yield marker
            else:
                group = marker if group is None else Skipped(None, group.line, group.rows + marker.rows)
        if group is not None:
            yield group


def manifest_base_dir(path: Path) -> Path:
    """The folder that relative image paths of the manifest at `path` resolve against (absolute).

    The manifest's own folder, or the folder itself in folder mode. A symlinked manifest file keeps the
    folder of the link, not of its target.
    """
    absolute = path.absolute()
    return absolute if absolute.is_dir() else absolute.parent


def count_rows(path: Path) -> int | None:
    """A cheap row total for progress: lines of a CSV (minus its header) or JSONL file, Parquet metadata.

    An upper bound for text files (blank lines and line breaks inside quoted CSV cells count); None for
    a folder, which would have to be walked twice. Raises ConfigError like ``read_manifest``.
    """
    kind = _manifest_kind(path)
    if kind == "folder":
        return None
    if kind == "parquet":
        with _open_parquet(path) as parquet:
            return int(parquet.metadata.num_rows)
    lines = _count_lines(path)
    return max(0, lines - 1) if kind == "csv" else lines


def _manifest_kind(path: Path) -> str:
    if not path.exists():
        raise ConfigError(f"{path}: manifest not found")
    if path.is_dir():
        return "folder"
    suffix = path.suffix.lower()
    if suffix in CSV_SUFFIXES:
        return "csv"
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    raise ConfigError(
        f"{path}: unknown manifest kind {suffix or '(no suffix)'!r}: use .csv, .jsonl, .ndjson, "
        ".parquet or a folder of images"
    )


def _count_lines(path: Path) -> int:
    """Newlines in the file, plus one for a last line without one."""
    lines = 0
    last = b"\n"
    with open(path, "rb") as f:
        while chunk := f.read(COUNT_CHUNK_BYTES):
            lines += chunk.count(b"\n")
            last = chunk[-1:]
    return lines + (last != b"\n")


def _read_parquet(path: Path, request: RequestConfig, skip: IdSet | None) -> Iterator[Item]:
    """Parquet rows, one batch of PARQUET_BATCH_ROWS in memory at a time; ``line`` is the 1-based row.

    With `skip`, a batch's text ids are looked up at once and its committed rows come as one Skipped
    marker, never turned into Python rows."""
    file = str(path)
    with _open_parquet(path) as parquet:
        check_columns(parquet.schema_arrow.names, file)
        has_text_ids = "id" in parquet.schema_arrow.names and pa.types.is_string(
            parquet.schema_arrow.field("id").type
        )
        line = 0
        batches = parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except (OSError, pa.ArrowException) as err:
                raise ConfigError(f"{file}: unreadable after row {line}: {err}") from None
            rows, kept = batch.num_rows, range(batch.num_rows)
            if skip is not None and has_text_ids:
                committed = skip.contains_each(batch.column("id"))
                if committed.true_count:  # counted first: the marker only counts, it holds no row
                    yield Skipped(None, line + 1, committed.true_count)
                    kept = pc.indices_nonzero(pc.invert(committed)).to_pylist()
                    batch = batch.filter(pc.invert(committed))
            for index, row in zip(kept, batch.to_pylist(), strict=True):
                yield task_from_row(row, file=file, line=line + index + 1, request=request)
            line += rows


def _open_parquet(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as err:
        raise ConfigError(f"{path}: not a readable Parquet file: {err}") from None


def _read_folder(root: Path, request: RequestConfig) -> Iterator[ImageTask | ManifestError]:
    """Every image file under `root`, folder by folder in sorted order; hidden files and folders are skipped.

    The id and the reference are the path relative to `root`, with forward slashes.
    """
    line = 0
    for folder, subfolders, names in os.walk(root, onerror=_raise_unlistable):
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        for name in sorted(names):
            if name.startswith(".") or Path(name).suffix.lower() not in FOLDER_IMAGE_SUFFIXES:
                continue
            line += 1
            ref = (Path(folder) / name).relative_to(root).as_posix()
            if not _is_utf8(ref):  # the id goes to Parquet, which holds UTF-8 text only
                shown = os.fsencode(ref).decode("utf-8", "backslashreplace")  # caf\xe9.jpg
                yield ManifestError(shown, "the file name is not UTF-8: rename it", file=str(root), line=line)
                continue
            yield ImageTask(
                row_id=ref, images=(ref,), prompt=request.prompt, detail=request.detail, line=line
            )


def _is_utf8(name: str) -> bool:
    """False for a name with bytes that are not UTF-8 (os.walk hands them over as lone surrogates)."""
    try:
        name.encode()
    except UnicodeEncodeError:
        return False
    return True


def _raise_unlistable(err: OSError) -> None:
    """A folder that cannot be listed would lose its images without a trace: stop the run instead."""
    raise ConfigError(f"{err.filename}: cannot list the folder: {err.strerror or err}")


JSONL_COLUMN_SAMPLE_ROWS = 1000  # a JSONL manifest's columns are the keys of its first objects


def manifest_columns(path: Path) -> frozenset[str]:
    """The columns a manifest's rows carry, read from its head only: a CSV's header, a Parquet file's
    fields, the keys of a JSONL file's first JSONL_COLUMN_SAMPLE_ROWS objects; none for a folder. Blocking.
    Raises ConfigError as ``read_manifest`` does."""
    kind = _manifest_kind(path)
    if kind == "folder":
        return frozenset()
    if kind == "parquet":
        with _open_parquet(path) as parquet:
            return frozenset(parquet.schema_arrow.names)
    if kind == "csv":
        return frozenset(csv_header(path))
    names: set[str] = set()
    with open(path, "rb") as f:
        for raw in itertools.islice(f, JSONL_COLUMN_SAMPLE_ROWS):
            try:
                row = json.loads(raw)
            except ValueError:
                continue  # a bad row is reported as such when the run reads it
            if isinstance(row, dict):
                names.update(row)
    return frozenset(names)
