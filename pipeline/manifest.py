"""Streaming the rows of a manifest (CSV, JSONL, Parquet, or a folder of images) into ImageTasks.

Rows are read one at a time (Parquet in batches of 1024), so a manifest of any length takes the same
memory. A bad row becomes a ManifestError yielded in its place, never an exception: the run commits it
as a failed row and goes on. Only a manifest that cannot be read at all raises ConfigError.

Columns (CSV header, JSON keys, Parquet fields):

- ``id``: optional. When absent or empty it is derived from the image references, so the same row gets
  the same id on every run: ``img-`` + the first 16 hex digits of sha256 of the references joined by
  newlines. A row whose id cannot be known at all is called ``line-<line>``.
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

import csv
import hashlib
import itertools
import json
import os
from collections.abc import Container, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import RequestConfig
from pipeline.records import DETAILS, ConfigError, Detail, ImageTask, ManifestError

PARQUET_BATCH_ROWS = 1024
CSV_FIELD_LIMIT_CHARS = 64 * 1024 * 1024  # a data URL of a 20 MB image in one cell; csv's default is 128 KiB
COUNT_CHUNK_BYTES = 1024 * 1024
FOLDER_IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
CSV_SUFFIXES = (".csv",)
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
KNOWN_COLUMNS = frozenset({"id", "image", "images", "prompt", "detail"})
DERIVED_ID_HEX_DIGITS = 16


def read_manifest(
    path: Path, request: RequestConfig, skip: Container[str] = frozenset()
) -> Iterator[ImageTask | ManifestError | Skipped]:
    """Every row of the manifest at `path`, in order, as an ImageTask or, for a bad row, a ManifestError.

    Streams: nothing is read until the first row is asked for, and no more than one Parquet batch is held.
    `request` supplies the prompt and detail of rows that give none. A row whose own id is in `skip`
    (already committed) comes as a cheap ``Skipped`` marker, not parsed further: resuming a run of
    millions of rows spends its start-up on the rows still to do. Raises ConfigError, at once, when
    the manifest is missing or of an unknown kind, and while iterating when it turns out unreadable (not
    UTF-8, not Parquet, or no ``image``/``images`` column).
    """
    kind = _manifest_kind(path)
    if kind == "folder":
        return _read_folder(path, request, skip)
    if kind == "csv":
        return _read_csv(path, request, skip)
    if kind == "jsonl":
        return _read_jsonl(path, request, skip)
    return _read_parquet(path, request, skip)


@dataclass(frozen=True, slots=True)
class Skipped:
    """A row whose id was in the `skip` set: committed before, so not parsed further."""

    row_id: str
    line: int


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


def _read_csv(
    path: Path, request: RequestConfig, skip: Container[str]
) -> Iterator[ImageTask | ManifestError | Skipped]:
    """CSV rows; ``line`` is where each record starts (a quoted cell may span several lines)."""
    csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT_CHARS))
    file = str(path)
    with open(path, encoding="utf-8-sig", newline="") as f:
        # csv.reader rather than DictReader: DictReader skips blank lines unseen, so rows' start lines
        # would drift, and it files surplus cells under a None key instead of saying what is wrong.
        reader = csv.reader(f)
        try:
            header = [name.strip() for name in next(reader)]
        except StopIteration:
            raise ConfigError(f"{file}: empty CSV manifest, no header row") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{file}: not UTF-8 text at or after line 1: save it as UTF-8") from None
        except csv.Error as err:
            raise ConfigError(f"{file}: header row unreadable: {err}") from None
        _check_columns(header, file)
        while True:
            line = reader.line_num + 1
            try:
                cells = next(reader)
            except StopIteration:
                return
            except UnicodeDecodeError:
                # text is decoded in chunks ahead of the parser, so the bad byte is at or after this line
                raise ConfigError(
                    f"{file}: not UTF-8 text at or after line {line}: save it as UTF-8"
                ) from None
            except csv.Error as err:
                yield ManifestError(f"line-{line}", f"bad CSV: {err}", file=file, line=line)
                continue
            if not any(cell.strip() for cell in cells):
                continue  # a blank line, or a row of empty cells as spreadsheets leave at the end
            if len(cells) != len(header):
                yield ManifestError(
                    f"line-{line}",
                    f"{len(cells)} cells, but the header names {len(header)}",
                    file=file,
                    line=line,
                )
                continue
            row = dict(zip(header, cells, strict=True))
            yield _task_from_row(row, file=file, line=line, request=request, skip=skip)


def _read_jsonl(
    path: Path, request: RequestConfig, skip: Container[str]
) -> Iterator[ImageTask | ManifestError | Skipped]:
    """JSON Lines: one object per line; blank lines are skipped, a bad line is a bad row."""
    file = str(path)
    with open(path, "rb") as f:
        for line, raw in enumerate(f, start=1):
            if line == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except UnicodeDecodeError:
                yield ManifestError(f"line-{line}", "not UTF-8 text", file=file, line=line)
                continue
            except ValueError as err:
                yield ManifestError(f"line-{line}", f"not valid JSON: {err}", file=file, line=line)
                continue
            if not isinstance(row, dict):
                yield ManifestError(
                    f"line-{line}",
                    f"a line must be a JSON object, got {_json_type(row)}",
                    file=file,
                    line=line,
                )
                continue
            yield _task_from_row(row, file=file, line=line, request=request, skip=skip)


def _read_parquet(
    path: Path, request: RequestConfig, skip: Container[str]
) -> Iterator[ImageTask | ManifestError | Skipped]:
    """Parquet rows, one batch of PARQUET_BATCH_ROWS in memory at a time; ``line`` is the 1-based row."""
    file = str(path)
    with _open_parquet(path) as parquet:
        _check_columns(parquet.schema_arrow.names, file)
        line = 0
        batches = parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS)
        while True:
            try:
                rows = next(batches).to_pylist()
            except StopIteration:
                return
            except (OSError, pa.ArrowException) as err:
                raise ConfigError(f"{file}: unreadable after row {line}: {err}") from None
            for row in rows:
                line += 1
                yield _task_from_row(row, file=file, line=line, request=request, skip=skip)


def _open_parquet(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as err:
        raise ConfigError(f"{path}: not a readable Parquet file: {err}") from None


def _read_folder(
    root: Path, request: RequestConfig, skip: Container[str]
) -> Iterator[ImageTask | ManifestError | Skipped]:
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
                if shown in skip:
                    yield Skipped(shown, line)
                else:
                    yield ManifestError(
                        shown, "the file name is not UTF-8: rename it", file=str(root), line=line
                    )
                continue
            if ref in skip:
                yield Skipped(ref, line)
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


def _check_columns(names: list[str], file: str) -> None:
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ConfigError(f"{file}: column {duplicates[0]!r} appears more than once")
    if "image" not in names and "images" not in names:
        raise ConfigError(f"{file}: no 'image' or 'images' column (columns: {', '.join(names) or 'none'})")


def _task_from_row(
    row: Mapping[str, object], *, file: str, line: int, request: RequestConfig, skip: Container[str]
) -> ImageTask | ManifestError | Skipped:
    """One row as a task, or the reason it cannot be one; validated here, once, for every later stage."""
    try:
        given_id = _row_id(row.get("id"))
    except ValueError as err:
        return ManifestError(f"line-{line}", str(err), file=file, line=line)
    if given_id is not None and given_id in skip:
        return Skipped(given_id, line)
    try:
        images = _images(row)
        row_id = given_id or _derived_id(images)
        prompt = _text(row.get("prompt"), "prompt")
        detail = _detail(row.get("detail"))
    except ValueError as err:
        return ManifestError(given_id or f"line-{line}", str(err), file=file, line=line)
    return ImageTask(
        row_id=row_id,
        images=images,
        prompt=request.prompt if prompt is None else prompt,
        detail=request.detail if detail is None else detail,
        line=line,
        extra={key: _extra_text(value) for key, value in row.items() if key not in KNOWN_COLUMNS},
    )


def _row_id(value: object) -> str | None:
    """The row's own id as text, or None when it gives none; whole numbers are accepted as ids."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise ValueError(f"id must be text or a whole number, got {_json_type(value)}")  # noqa: TRY004  # the row reader turns ValueError into a ManifestError
    return value.strip() or None


def _images(row: Mapping[str, object]) -> tuple[str, ...]:
    """The row's image references from ``image`` or ``images``, stripped of surrounding blanks."""
    single, several = row.get("image"), _list_cell(row.get("images"))
    if isinstance(single, str) and not single.strip():
        single = None
    if several == []:
        several = None
    if single is not None and several is not None:
        raise ValueError("give image or images, not both")
    if single is not None:
        if not isinstance(single, str):
            raise ValueError(f"image must be text, got {_json_type(single)} (a list goes in images)")
        return (single.strip(),)
    if several is None:
        raise ValueError("no image: the image (or images) column is empty")
    if not isinstance(several, list) or not all(isinstance(ref, str) and ref.strip() for ref in several):
        raise ValueError("images must be a list of non-empty strings")
    return tuple(ref.strip() for ref in several)


def _list_cell(value: object) -> object:
    """``images`` as given, with a text cell (CSV's only kind) parsed as a JSON array; None when blank."""
    if not isinstance(value, str):
        return value
    if not value.strip():
        return None
    try:
        return json.loads(value)
    except ValueError:
        raise ValueError('images must be a JSON array of strings, e.g. ["a.jpg", "b.jpg"]') from None


def _derived_id(images: tuple[str, ...]) -> str:
    """A stable id for a row without one: the same references give the same id on every run."""
    digest = hashlib.sha256("\n".join(images).encode("utf-8")).hexdigest()
    return f"img-{digest[:DERIVED_ID_HEX_DIGITS]}"


def _text(value: object, column: str) -> str | None:
    """A text cell, None when absent, null or blank (blank means "use the config")."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{column} must be text, got {_json_type(value)}")  # noqa: TRY004  # as above
    return value if value.strip() else None


def _detail(value: object) -> Detail | None:
    text = _text(value, "detail")
    if text is None:
        return None
    detail = text.strip().lower()
    if detail not in DETAILS:
        raise ValueError(f"detail must be low, high or auto, got {text!r}")
    return detail


def _extra_text(value: object) -> str | None:
    """A passed-through value as text: strings as they are, null as None, anything else as compact JSON."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool | int | float | list | dict | tuple):
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)
    return str(value)  # dates, timestamps, decimals from Parquet: their usual text form


def _json_type(value: object) -> str:
    names = {
        dict: "an object",
        list: "a list",
        str: "text",
        bool: "true/false",
        int: "a number",
        float: "a number",
        type(None): "null",
    }
    return names.get(type(value), type(value).__name__)


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
        with open(path, encoding="utf-8-sig", newline="") as f:
            try:
                return frozenset(name.strip() for name in next(csv.reader(f), []))
            except (UnicodeDecodeError, csv.Error) as err:
                raise ConfigError(f"{path}: header row unreadable: {err}") from None
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
