"""How log lines look: text for a person at a terminal, one JSON object per line for cron and CI.

The pipeline logs with the standard library everywhere (``log = logging.getLogger(__name__)``). An event
that matters to an operator carries ``extra={"event": "<name>", ...fields}``: the JSON format puts the
event and the fields into the object; the text format shows the message only. Events: ``run_started``,
``paused_on_429``, ``part_committed``, ``run_stopped`` (a fatal error), ``run_finished`` (the summary).
Nothing logs a line per row at INFO.

Both formats shorten any data URL that reaches a message or a field (``data:image/png;base64,<12 kB>``)
as a last guard; the code never puts the API key into a message in the first place.
"""

from __future__ import annotations

import datetime
import json
import logging
import re
import sys
from typing import Any, Literal, TextIO

from pipeline.refs import shorten_url

LogFormat = Literal["text", "json", "auto"]
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json", "auto")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
QUIET_LOGGERS = ("aiohttp",)  # their INFO lines are per request

_DATA_URL = re.compile(r"(?<![A-Za-z0-9])data:[^,\s\"']{0,200},[A-Za-z0-9+/=_-]*", re.IGNORECASE)
# every attribute a bare LogRecord has: the rest came in through `extra=`
_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def redact(text: str) -> str:
    """`text` with every data URL shortened to its header and size. Pure."""
    if "data:" not in text.lower():
        return text  # the common case costs one scan
    return _DATA_URL.sub(lambda match: shorten_url(match.group(0)), text)


def resolve_format(log_format: LogFormat, stream: TextIO) -> Literal["text", "json"]:
    """`auto` is JSON when `stream` is not a terminal (cron, CI, a pipe), text when it is."""
    if log_format != "auto":
        return log_format
    isatty = getattr(stream, "isatty", None)
    return "text" if isatty is not None and isatty() else "json"


def event_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a log call passed with ``extra=``, in the order given."""
    return {k: v for k, v in vars(record).items() if k not in _RECORD_ATTRIBUTES and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC, ISO 8601), level, logger, event, message, then the extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.datetime.fromtimestamp(record.created, tz=datetime.UTC)
        fields = event_fields(record)
        line: dict[str, Any] = {
            "ts": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": fields.pop("event", None),
            "message": redact(record.getMessage()),
        }
        for name, value in fields.items():
            line.setdefault(name, value)
        if record.exc_info:
            line["traceback"] = redact(self.formatException(record.exc_info))
        text = json.dumps(line, default=str, ensure_ascii=False)
        return redact(text) if "data:" in text else text  # a data URL that came in through a field


class TextFormatter(logging.Formatter):
    """The classic one-line format, data URLs shortened."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a line is logged, as logging's own last-resort handler does.

    The live progress display swaps ``sys.stderr`` for a proxy that prints above itself; a handler that
    kept the original stream would draw through the display.
    """

    def __init__(self) -> None:
        logging.Handler.__init__(self)  # StreamHandler.__init__ would store a stream: ours is looked up

    @property
    def stream(self) -> TextIO:
        return sys.stderr


def setup_logging(verbose: int, quiet: bool, log_format: LogFormat = "auto") -> Literal["text", "json"]:
    """Send the root logger's lines to stderr in the chosen format; returns the format used.

    Levels: WARNING with `quiet`, DEBUG with `verbose`, else INFO.
    """
    chosen = resolve_format(log_format, sys.stderr)
    handler = StderrHandler()
    handler.setFormatter(JsonFormatter() if chosen == "json" else TextFormatter())
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    return chosen
