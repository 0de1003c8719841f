"""The values that flow between stages, and the named errors every stage may raise.

Records are frozen and carry no behaviour: make variants with ``dataclasses.replace``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

Detail = Literal["low", "high", "auto"]
Mode = Literal["live", "batch"]
Status = Literal["ok", "filtered", "error", "refused", "invalid_output"]
STATUSES: tuple[Status, ...] = ("ok", "filtered", "error", "refused", "invalid_output")
TEXT_STATUSES: tuple[Status, ...] = ("ok", "filtered", "error")  # always counted; the others when they occur
FAILED_STATUSES: tuple[Status, ...] = ("error", "refused", "invalid_output")  # exit 1; --retry-failed
JsonObject = Mapping[str, Any]

DETAILS: tuple[Detail, ...] = ("low", "high", "auto")
FILTER_CATEGORIES = ("hate", "self_harm", "sexual", "violence")


class ErrorKind(StrEnum):
    """Why a row failed, set where the error is raised: the ``error_kind`` column, and what the estimate
    groups failing rows by. Never derived from a message's text."""

    BAD_MANIFEST_ROW = "bad_manifest_row"  # a row the manifest cannot give: bad JSON, no image, bad cell
    MISSING_FILE = "missing_file"
    UNREADABLE_IMAGE = "unreadable_image"  # damaged, truncated, or a file that cannot be read
    UNSUPPORTED_FORMAT = "unsupported_format"  # not an image format we (or the service) read
    WRONG_EXTENSION = "wrong_extension"  # a PNG named .jpg (images.extension_must_match)
    OUTSIDE_ALLOWED_FOLDERS = "outside_allowed_folders"
    TOO_MANY_PIXELS = "too_many_pixels"  # over images.max_pixels
    TOO_LARGE = "too_large"  # bytes over images.max_image_bytes or images.max_request_bytes
    TOO_MANY_IMAGES = "too_many_images"  # more than the service takes in one request
    DOWNLOAD_FAILED = "download_failed"  # an http(s) image that images.fetch_remote could not fetch
    OVER_BUDGET = "over_budget"  # reserves more than the minute's token budget: never admitted
    OVER_CONTEXT = "over_context"  # the prompt is longer than the model's context
    HTTP_4XX = "http_4xx"  # the endpoint refused this row (400, 413, 422 ...): sending it again won't help
    RETRIES_EXHAUSTED = "retries_exhausted"  # 429, 5xx, timeouts or dropped connections until out of attempts
    BATCH_LINE_FAILED = (
        "batch_line_failed"  # a Batch API job answered this row's line with an error (its code)
    )
    UNEXPECTED = "unexpected"  # a surprise in our code: the traceback is in the log with the row's id


@dataclass(frozen=True, slots=True)
class ImageTask:
    """One manifest row: what to ask about which images."""

    row_id: str
    images: tuple[str, ...]  # references exactly as the manifest gave them
    prompt: str
    detail: Detail
    line: int  # 1-based data row (CSV/JSONL line, Parquet row, folder entry) for error messages
    extra: Mapping[str, str | None] = field(default_factory=dict)  # passed through to the output


@dataclass(frozen=True, slots=True)
class PreparedImage:
    """An image ready for the wire: the URL to send and the size the model will view."""

    url: str  # an http(s) URL as given, or a data: URL; never log it whole
    width: int | None  # None when the size is unknown (remote image not fetched)
    height: int | None
    source_bytes: int | None = None
    sent_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class RemoteProbe:
    """What the first bytes of an http(s) image told, fetched without downloading it (``remote.probe_image``)."""

    size: tuple[int, int] | None  # width, height in pixels from its header; None when unknown
    total_bytes: int | None = None  # the whole file's length, when the server said it
    unsized_because: str | None = None  # why `size` is None, one short line fit to count by


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


@dataclass(frozen=True, slots=True)
class CategoryFilter:
    filtered: bool
    severity: str | None  # safe | low | medium | high, as the service sends it


@dataclass(frozen=True, slots=True)
class FilterResult:
    """Azure content-filter annotations for a prompt or a completion; a missing category is None."""

    hate: CategoryFilter | None = None
    self_harm: CategoryFilter | None = None
    sexual: CategoryFilter | None = None
    violence: CategoryFilter | None = None

    @property
    def is_filtered(self) -> bool:
        return any(
            c is not None and c.filtered for c in (self.hate, self.self_harm, self.sexual, self.violence)
        )


@dataclass(frozen=True, slots=True)
class VisionResult:
    """The outcome of one row: what gets committed to the output, success or not."""

    task: ImageTask
    status: Status
    model: str
    estimated_prompt_tokens: int | None = None
    description: str | None = None
    finish_reason: str | None = None
    response_id: str | None = None
    usage: Usage | None = None
    cost_usd: float | None = None
    prompt_filter: FilterResult | None = None
    completion_filter: FilterResult | None = None
    attempts: int = 0
    latency_s: float | None = None
    started_at: float | None = None  # epoch seconds, for the row's timestamps only
    finished_at: float | None = None
    http_status: int | None = None
    error: str | None = None
    error_kind: ErrorKind | None = None  # set on every error row
    fields: Mapping[str, Any] | None = None  # structured answers: the schema's columns (structured.py)
    response_extra: str | None = None  # JSON of what the response held that no column models
    endpoint: str | None = None  # the endpoint's name that answered (or last tried), None if never sent
    mode: Mode = "live"  # which transport answered: live requests or a Batch API job


@dataclass(frozen=True, slots=True)
class Delivery:
    """The service's last answer to one request that is a result: a completion (HTTP 200), or a prompt
    the content filter refused (HTTP 400, code content_filter). A transport returns it; ``results.py``
    reads it."""

    http_status: int
    body: JsonObject
    attempts: int  # requests sent for the row, retries included
    endpoint: str | None = None  # the name of the endpoint that answered (config: endpoint.name)


@dataclass(frozen=True, slots=True)
class TransportCounters:
    """What a transport has met so far, for the progress display, the metrics and ``_stats.json``."""

    http_429s: int = 0
    retries_by_cause: Mapping[str, int] = field(default_factory=dict)  # see client.retry_cause
    pauses: int = 0  # 429 cool-downs
    paused_s: float = 0.0  # time every endpoint was held at once (no worker could send)
    is_paused: bool = False
    endpoints: tuple[EndpointCounters, ...] = ()  # per endpoint of the pool, in config order


@dataclass(frozen=True, slots=True)
class EndpointCounters:
    """What one endpoint of the pool has served and met so far."""

    name: str
    tokens_per_minute: int  # its quota
    requests: int = 0  # attempts sent to it
    charged_tokens: int = 0  # as its quota counts them: prompt tokens + max_tokens of each answer billed
    http_429s: int = 0
    pauses: int = 0  # 429 holds
    held_s: float = 0.0  # time it admitted nothing after its 429s
    breaker_trips: int = 0  # times 5xx, timeouts or connection failures took it out for a while
    out_because: str | None = None  # why it was taken out for the run; None while it serves


@dataclass(frozen=True, slots=True)
class RunProgress:
    """How far a run has got: what the progress display and the metrics file read every few seconds."""

    elapsed_s: float
    rows_total: (
        int | None
    )  # rows in the manifest (an upper bound for CSV/JSONL); None while counting, or a folder
    rows_before: int  # rows with nothing to send: committed by an earlier run, or a repeated id
    rows_limit: int | None  # at most this many rows this run (--limit)
    ok: int  # rows finished by this run, by status
    filtered: int
    error: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float | None  # None when the model has no price
    http_429s: int
    retries: int
    paused_s: float
    is_paused: bool
    tokens_per_minute: int  # the budget, limits.tokens_per_minute
    refused: int = 0  # structured answers the model declined
    invalid_output: int = 0  # structured answers that are not JSON, not valid, or cut at max_tokens
    spend_usd: float | None = None  # what the run's requests cost so far, as the spend cap counts it
    max_cost_usd: float | None = None  # the spend cap, when one is set
    endpoints: tuple[EndpointCounters, ...] = ()  # per endpoint of the pool

    @property
    def rows_done(self) -> int:
        return self.ok + self.filtered + self.error + self.refused + self.invalid_output

    @property
    def failed(self) -> int:
        """Rows that count as failures: error, refused, invalid_output."""
        return self.error + self.refused + self.invalid_output


# Errors. Row errors fail one row, which is committed with status "error"; run errors end the run.
# Every message is one line that names the row, the file or the setting, and never a key or a data URL.
#
# The tree:
#   RowError (kind: ErrorKind)    this row cannot be served; committed as an error row, the run goes on
#     ManifestError (file, line)  the manifest's row itself is wrong
#     ImageError (path)           an image of the row cannot be read, or is refused before sending
#     ApiError (status, code)     the endpoint refused or failed the row, after any retries
#   ConfigError                   a setting is wrong: exit 2 before anything is sent
#   NotSent                       the run is stopping; the row stays uncommitted for the next run
#   BudgetReached                 the spend cap has no room for the row: not sent, the run stops (exit 5)
#   RunAborted                    the endpoint refuses every row (key, deployment, quota): exit 3


class RowError(Exception):
    """This row cannot be served; the run goes on."""

    def __init__(self, row_id: str, message: str, *, kind: ErrorKind) -> None:
        super().__init__(f"row {row_id!r}: {message}")
        self.row_id = row_id
        self.reason = message
        self.kind = kind


class ManifestError(RowError):
    def __init__(
        self,
        row_id: str,
        message: str,
        *,
        file: str,
        line: int,
        kind: ErrorKind = ErrorKind.BAD_MANIFEST_ROW,
    ) -> None:
        RowError.__init__(self, row_id, f"{file} line {line}: {message}", kind=kind)
        self.file = file
        self.line = line


class ImageError(RowError):
    def __init__(self, row_id: str, message: str, *, path: str, kind: ErrorKind) -> None:
        RowError.__init__(self, row_id, f"image {path!r}: {message}", kind=kind)
        self.path = path


class ApiError(RowError):
    """The endpoint refused or failed this row, after any retries."""

    def __init__(
        self,
        row_id: str,
        message: str,
        *,
        status: int | None,
        kind: ErrorKind,
        code: str | None = None,
        retry_after_s: float | None = None,
        attempts: int = 0,
        endpoint: str | None = None,
    ) -> None:
        RowError.__init__(self, row_id, message, kind=kind)
        self.endpoint = endpoint  # the name of the endpoint of the last attempt
        self.status = status
        self.code = code
        self.retry_after_s = retry_after_s
        self.attempts = attempts  # requests sent for this row; 0 when it was refused before sending


class ConfigError(Exception):
    """A setting is missing or wrong; the message names the file and the key."""


class NotSent(Exception):
    """The run is stopping: this row was not sent (again), and stays uncommitted for the next run."""

    def __init__(self, row_id: str) -> None:
        super().__init__(f"row {row_id!r}: not sent, the run is stopping")
        self.row_id = row_id


class BudgetReached(Exception):
    """The spend cap leaves no room for the next attempt and nothing is in flight to free any: the row
    was not sent and stays uncommitted; the run stops with exit 5."""


class RunAborted(Exception):
    """The endpoint refuses us for every row (bad key, wrong deployment or route, quota gone)."""

    def __init__(self, message: str, *, http_status: int | None = None) -> None:
        super().__init__(message)
        self.http_status = http_status
