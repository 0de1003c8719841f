"""Reading the text manifests, CSV and JSON Lines, as bytes, a block of lines at a time.

Each physical line is decoded on its own: a line that is not UTF-8 fails its row only (a ManifestError
naming the line and the byte offset of the first bad byte in the file), and the rows around it go on.
A file that is not UTF-8 text at all (a UTF-16 or UTF-32 byte-order mark, a header that is not UTF-8)
raises ConfigError naming the file.

Resuming a long CSV: given the run's committed ids, a block without quotes (so one row a line) is
checked whole with Arrow: the id cell of every line is cut out and looked up in the IdSet at once, and a
run of committed lines becomes one ``Skipped`` marker; only the other lines are parsed in Python.
"""

from __future__ import annotations

import csv
import io
import json
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv

from pipeline.config import RequestConfig
from pipeline.idset import IdSet
from pipeline.manifest_rows import Skipped, check_columns, json_type, readable_row_id, task_from_row
from pipeline.records import ConfigError, ImageTask, ManifestError

BLOCK_BYTES = 1024 * 1024  # read at a time; a block ends at a line's end
CSV_FIELD_LIMIT_CHARS = 64 * 1024 * 1024  # a data URL of a 20 MB image in one cell; csv's default is 128 KiB
UTF8_BOM = b"\xef\xbb\xbf"
PLAIN_CSV = pa_csv.ParseOptions(quote_char=False, newlines_in_values=False, ignore_empty_lines=False)
WIDE_BOMS = {b"\xff\xfe": "UTF-16", b"\xfe\xff": "UTF-16"}  # UTF-32 LE starts like UTF-16 LE


@dataclass(frozen=True, slots=True)
class _Gap:
    """Consecutive committed lines left out of the parse: how many, and their length in bytes."""

    lines: int
    size_bytes: int


class _Lines:
    """The physical lines of a text file as text, for csv.reader, and where each one starts.

    A line that is not UTF-8 is handed over with its bad bytes as lone surrogates (so the csv parser
    still sees its cells) and noted in `bad` as (line, byte offset in the file, the byte).
    """

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.number = 0  # physical lines handed over (or skipped) so far
        self.offset = 0  # bytes of the file before the next line
        self.pending: deque[bytes | _Gap] = deque()
        self.bad: list[tuple[int, int, int]] = []

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        if not self.pending and not self.fill():
            raise StopIteration
        raw = self.pending.popleft()
        assert not isinstance(raw, _Gap), "a gap stands only between one-line rows, never inside a record"
        return self.decode(raw)

    def decode(self, raw: bytes) -> str:
        self.number += 1
        start = self.offset
        self.offset += len(raw)
        if self.number == 1 and raw.startswith(UTF8_BOM):
            raw, start = raw[len(UTF8_BOM) :], start + len(UTF8_BOM)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as err:
            self.bad.append((self.number, start + err.start, raw[err.start]))
            return raw.decode("utf-8", "surrogateescape")

    def read_block(self) -> bytes:
        block = self._f.read(BLOCK_BYTES)
        if block and not block.endswith(b"\n"):
            block += self._f.readline()
        return block

    def fill(self) -> bool:
        """Queue the next block's lines; False at the end of the file."""
        block = self._f.readline() if self.number == 0 else self.read_block()  # the header on its own
        self.pending.extend(block.splitlines(keepends=True))  # \n, \r\n and a lone \r, as csv expects
        return bool(block)

    def fill_skipping(self, skip: IdSet, header: list[str]) -> bool:
        """Like ``fill``, with each run of committed one-line rows queued as one _Gap. Call only between
        records. A block with a quote (a record may span lines), a lone \\r, a blank line or a line of
        another number of cells is queued whole, for the parser to judge line by line."""
        block = self.read_block()
        if not block:
            return False
        self.pending.extend(_gapped(block, _committed_lines(block, skip, header)))
        return True


def _committed_lines(block: bytes, skip: IdSet, header: list[str]) -> pa.BooleanArray | None:
    """Whether each line of `block` is a one-line row with a committed id exactly as written (an id
    with blanks around it is left to the parser, which strips it); None when the block is not plain
    one row a line. Arrow's CSV parser cuts out the id column without a Python object per row."""
    if b'"' in block or (b"\r" in block and block.count(b"\r") != block.count(b"\r\n")):
        return None
    try:
        ids = pa_csv.read_csv(
            io.BytesIO(block),
            read_options=pa_csv.ReadOptions(
                column_names=header, use_threads=False, block_size=len(block) + 1
            ),
            parse_options=PLAIN_CSV,
            convert_options=pa_csv.ConvertOptions(
                column_types={"id": pa.binary()}, include_columns=["id"], strings_can_be_null=False
            ),
        ).column("id")
    except pa.ArrowInvalid:  # a blank line or a line of other cells: the parser says which
        return None
    lines = block.count(b"\n") + (not block.endswith(b"\n"))  # no lone \r: \n ends every line
    return skip.contains_each(ids) if len(ids) == lines else None


def _gapped(block: bytes, committed: pa.BooleanArray | None) -> Iterator[bytes | _Gap]:
    """The lines of `block` with each run of consecutive committed lines replaced by one _Gap."""
    if committed is not None and committed.true_count == len(committed):
        yield _Gap(len(committed), len(block))  # the usual block of a resume: nothing to split
        return
    lines = block.splitlines(keepends=True)  # \n, \r\n and a lone \r, as csv expects
    if committed is None or not committed.true_count:
        yield from lines
        return
    done = 0  # lines of `lines` handed on
    for kept in [*pc.indices_nonzero(pc.invert(committed)).to_pylist(), len(lines)]:
        if kept > done:
            yield _Gap(kept - done, sum(map(len, lines[done:kept])))
        if kept < len(lines):
            yield lines[kept]
        done = kept + 1


def read_csv(
    path: Path, request: RequestConfig, skip: IdSet | None
) -> Iterator[ImageTask | ManifestError | Skipped]:
    """CSV rows; ``line`` is where each record starts (a quoted cell may span several lines). With
    `skip`, runs of committed rows come as grouped ``Skipped`` markers, unparsed."""
    csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT_CHARS))
    file = str(path)
    with open(path, "rb") as f:
        _refuse_wide_text(f, file)
        lines = _Lines(f)
        # csv.reader rather than DictReader: DictReader skips blank lines unseen, so rows' start lines
        # would drift, and it files surplus cells under a None key instead of saying what is wrong.
        reader = csv.reader(lines)
        header = _csv_header(reader, lines, file)
        check_columns(header, file)
        is_skipping = skip is not None and "id" in header
        while True:
            if is_skipping and not lines.pending:
                assert skip is not None
                if not lines.fill_skipping(skip, header):
                    return
            while lines.pending and isinstance(gap := lines.pending[0], _Gap):
                lines.pending.popleft()
                yield Skipped(None, lines.number + 1, gap.lines)
                lines.number += gap.lines
                lines.offset += gap.size_bytes
            if is_skipping and not lines.pending:
                continue
            line = lines.number + 1
            lines.bad.clear()
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as err:
                yield ManifestError(f"line-{line}", f"bad CSV: {err}", file=file, line=line)
                continue
            if lines.bad:
                row = dict(zip(header, cells, strict=False))
                yield _undecodable(readable_row_id(row, line), lines.bad[0], file=file, line=line)
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
            yield task_from_row(dict(zip(header, cells, strict=True)), file=file, line=line, request=request)


def csv_header(path: Path) -> list[str]:
    """The column names of the CSV manifest at `path`; raises ConfigError as ``read_csv`` does."""
    with open(path, "rb") as f:
        _refuse_wide_text(f, str(path))
        lines = _Lines(f)
        return _csv_header(csv.reader(lines), lines, str(path))


def _csv_header(reader: Iterator[list[str]], lines: _Lines, file: str) -> list[str]:
    try:
        header = [name.strip() for name in next(reader)]
    except StopIteration:
        raise ConfigError(f"{file}: empty CSV manifest, no header row") from None
    except csv.Error as err:
        raise ConfigError(f"{file}: header row unreadable: {err}") from None
    if lines.bad:
        _, offset, byte = lines.bad[0]
        raise ConfigError(
            f"{file}: the header row is not UTF-8 text (byte 0x{byte:02x} at byte offset {offset}): "
            "save the file as UTF-8"
        )
    return header


def read_jsonl(path: Path, request: RequestConfig) -> Iterator[ImageTask | ManifestError]:
    """JSON Lines: one object per line; blank lines are skipped, a bad line is a bad row."""
    file = str(path)
    with open(path, "rb") as f:
        _refuse_wide_text(f, file)
        lines = _Lines(f)
        for raw in f:
            text = lines.decode(raw)
            line = lines.number
            if lines.bad:
                row = _json_or_none(text)
                row_id = readable_row_id(row if isinstance(row, dict) else {}, line)
                yield _undecodable(row_id, lines.bad.pop(), file=file, line=line)
                continue
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except ValueError as err:
                yield ManifestError(f"line-{line}", f"not valid JSON: {err}", file=file, line=line)
                continue
            if not isinstance(row, dict):
                yield ManifestError(
                    f"line-{line}",
                    f"a line must be a JSON object, got {json_type(row)}",
                    file=file,
                    line=line,
                )
                continue
            yield task_from_row(row, file=file, line=line, request=request)


def _json_or_none(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _undecodable(row_id: str, bad: tuple[int, int, int], *, file: str, line: int) -> ManifestError:
    bad_line, offset, byte = bad
    where = "" if bad_line == line else f" on line {bad_line}"
    return ManifestError(
        row_id,
        f"not UTF-8 text: byte 0x{byte:02x} at byte offset {offset}{where}: save the file as UTF-8",
        file=file,
        line=line,
    )


def _refuse_wide_text(f: BinaryIO, file: str) -> None:
    """A file in a wider encoding is not a file of bad rows: say so once, naming the file."""
    head = f.read(2)
    f.seek(0)
    if head in WIDE_BOMS:
        raise ConfigError(f"{file}: {WIDE_BOMS[head]} text, not UTF-8: save it as UTF-8")
