"""One manifest row, whatever file it came from, validated into an ImageTask or the reason it cannot be.

The rules of the columns (see manifest.py's docstring) live here once, for every format's reader.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass

from pipeline.config import RequestConfig
from pipeline.records import DETAILS, ConfigError, Detail, ImageTask, ManifestError

KNOWN_COLUMNS = frozenset({"id", "image", "images", "prompt", "detail"})
DERIVED_ID_HEX_DIGITS = 16


@dataclass(frozen=True, slots=True)
class Skipped:
    """Rows committed before (their id is in the run's skip set), so not parsed further.

    One marker per row (`row_id` its id), or, when the reader was asked to group them, one per block of
    `rows` consecutive committed rows starting at `line` (`row_id` None).
    """

    row_id: str | None
    line: int
    rows: int = 1


def check_columns(names: list[str], file: str) -> None:
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ConfigError(f"{file}: column {duplicates[0]!r} appears more than once")
    if "image" not in names and "images" not in names:
        raise ConfigError(f"{file}: no 'image' or 'images' column (columns: {', '.join(names) or 'none'})")


def task_from_row(
    row: Mapping[str, object], *, file: str, line: int, request: RequestConfig
) -> ImageTask | ManifestError:
    """One row as a task, or the reason it cannot be one; validated here, once, for every later stage."""
    try:
        given_id = _row_id(row.get("id"))
    except ValueError as err:
        return ManifestError(f"line-{line}", str(err), file=file, line=line)
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
        raise ValueError(f"id must be text or a whole number, got {json_type(value)}")  # noqa: TRY004  # the row reader turns ValueError into a ManifestError
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
            raise ValueError(f"image must be text, got {json_type(single)} (a list goes in images)")
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
        raise ValueError(f"{column} must be text, got {json_type(value)}")  # noqa: TRY004  # as above
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


def json_type(value: object) -> str:
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


def readable_row_id(row: Mapping[str, object], line: int) -> str:
    """The id of a row whose text is partly unreadable (bytes that are not UTF-8, held as lone surrogates).

    Its own id, or the one derived from its images, when that part is readable; else ``line-<line>``.
    The same bytes give the same id on every run, so a rerun skips the committed error row.
    """
    try:
        given = _row_id(row.get("id"))
        if given is not None:
            given.encode()  # raises on a lone surrogate: the id itself holds the bad bytes
            return given
        return _derived_id(_images(row))  # sha256 of the references raises likewise
    except ValueError:  # UnicodeEncodeError is one
        return f"line-{line}"
