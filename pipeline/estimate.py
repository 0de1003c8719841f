"""What a run of a manifest under a config will cost and how long it will take, before anything is sent.

A row's prompt tokens are counted as the run counts them (``client.build_body``, then
``tokens.count_prompt_tokens``) with each image's size read from its header by ``images.measure_image``:
nothing is decoded, and the run's downscaled image bills the same as the original. An http(s) image is
sized only with ``probe_urls`` (a Range request for its first bytes); an unsized image is counted at the
most an image of its detail can cost, as the run's reservation counts it. Rows the run would fail (bad
manifest row, missing or unsupported file, too many pixels or bytes, more than limits.tokens_per_minute)
are counted by reason with the run's own error text and cost nothing. A file damaged past its header is
found only by the run, which decodes it.

Duration follows ``pipeline/limits.py``: each window (``WINDOW_S`` plus the limiter's slack) admits
``tokens_per_minute / 6`` reserved tokens (prompt + max_tokens per request; a larger request goes alone)
and ``requests_per_minute / 6`` requests. The budget that admits fewer rows per window binds.

JSON (``estimate --json``), schema ``vision-pipeline/estimate/1``; keys are only ever added, an unknown
value is null, money is US dollars::

    schema, manifest, config, model     str
    rows            {read, to_send, failing, duplicates}   duplicates: ids seen before, ignored like the run
    images          {total, by_detail: {low, high, auto}, unsized, unsized_because: {cause: n},
                     unsized_assumption}                    of the rows to send; auto is counted as high
    prompt_tokens   int                                     of the rows to send, as the service bills them
    output_tokens   {max, expected, expected_per_row, expected_source}    max: max_tokens × rows to send
    price           {model, input_per_1m, output_per_1m, batch_discount, checked, source, file}  USD per 1M
    cost, batch_cost {input_usd, output_max_usd, output_expected_usd, total_max_usd, total_expected_usd}
    duration        {tokens_per_minute, requests_per_minute, reserve_tokens_per_row, window_s,
                     rows_per_window_by_tokens, rows_per_window_by_requests,
                     binding: "tokens_per_minute" | "requests_per_minute", rows_per_min, duration_h,
                     window_h, fits_window, concurrency_rows_per_min (a note: concurrency / observed latency)}
    failing         {reason: {rows, row_ids}}               row_ids: the first LISTED_IDS_PER_REASON
    observed        null | {output, ok_rows, mean_completion_tokens, mean_latency_s, rows (compared: ok
                     rows of the output whose id is to send), differing_rows, differing_ids,
                     estimated_prompt_tokens, billed_prompt_tokens, billed_completion_tokens,
                     estimated_cost_usd, billed_cost_usd, cost_difference_pct}

Per-row Parquet (``--per-row``), one row per manifest row: ``id``, ``line``, ``detail``, ``images``,
``unsized_images``, ``prompt_tokens``, ``cost_usd`` (prompt at the input price plus the expected
completion at the output price; null for a failing row), ``reason`` and ``error`` (null unless failing).
"""

from __future__ import annotations

import asyncio
import base64
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass, field, replace
from itertools import islice
from pathlib import Path
from typing import Any

import aiohttp
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.client import build_body, endpoint_for
from pipeline.config import RunConfig
from pipeline.images import SUPPORTED_NAMES, measure_image, shorten_url
from pipeline.limits import WINDOW_S, WINDOW_SLACK_S, WINDOWS_PER_MINUTE
from pipeline.manifest import MAX_IMAGES_PER_REQUEST, manifest_base_dir, read_manifest
from pipeline.pricing import Price, cost_usd, price_for_run
from pipeline.records import (
    DETAILS,
    ApiError,
    ConfigError,
    Detail,
    ImageError,
    ImageTask,
    ManifestError,
    PreparedImage,
    RowError,
    Usage,
)
from pipeline.sink import read_output
from pipeline.tokens import count_prompt_tokens, max_image_tokens

SCHEMA = "vision-pipeline/estimate/1"
CHUNK_ROWS = 2048  # rows read, sized and tallied together: memory stays flat whatever the manifest's size
SIZING_THREADS = 4  # header reads are mostly Python under the GIL; threads pay off on slow or network disks
DEFAULT_COMPLETION_SHARE = 0.5  # without --observed, a row is assumed to use half of max_tokens
LISTED_IDS_PER_REASON = 100
LISTED_DIFFERING_IDS = 20
PRINTED_IDS_PER_REASON = 10
PROBE_BYTES = 64 * 1024  # a JPEG's size comes after its EXIF block, which is rarely larger
PROBE_CONCURRENCY = 16
PROBE_TIMEOUT_S = 10.0  # one probe
PROBE_BUDGET_S = 120.0  # all probes together; URLs left when it is spent stay unsized
NOT_PROBED = "http(s) URL, not probed (--probe-urls)"
PLACEHOLDER_URL = "https://estimate.invalid/image"  # an image's URL costs no tokens; only its size does
OBSERVED_COLUMNS = ("id", "status", "prompt_tokens", "completion_tokens", "latency_s")
PER_ROW_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("line", pa.int64()),
        pa.field("detail", pa.string()),
        pa.field("images", pa.int32()),
        pa.field("unsized_images", pa.int32()),
        pa.field("prompt_tokens", pa.int64()),
        pa.field("cost_usd", pa.float64()),
        pa.field("reason", pa.string()),
        pa.field("error", pa.string()),
    ]
)
# A failing row is listed under the first reason whose marker its error holds; the texts are the run's.
_REASONS = (
    ("too many images", f"at most {MAX_IMAGES_PER_REQUEST} per request"),
    ("file not found", "file not found"),
    ("over the size limit", "images.max_image_bytes"),
    ("too many pixels", "too many pixels"),
    ("unsupported format", f"not a {SUPPORTED_NAMES} image"),
    ("unsupported format", "URLs are not supported"),
    ("unsupported format", "cannot read AVIF"),
    ("unsupported format", "no HEIF reader"),
    ("outside the allowed folders", "outside the manifest's folder"),
    ("outside the allowed folders", "outside images.allowed_roots"),
    ("over the tokens-per-minute budget", "limits.tokens_per_minute"),
)
_WINDOW_PART = re.compile(r"(\d+(?:\.\d+)?)([dhms])")
_UNIT_H = {"d": 24.0, "h": 1.0, "m": 1 / 60, "s": 1 / 3600}

Size = tuple[int, int]


@dataclass(frozen=True, slots=True)
class EstimateOptions:
    manifest: Path
    observed: Path | None = None  # an earlier run's output: completion tokens, latency and bills by id
    per_row: Path | None = None  # write every row's estimate to this Parquet file
    window_h: float | None = None  # does the run fit in this many hours?
    probe_urls: bool = False
    probe_concurrency: int = PROBE_CONCURRENCY
    probe_timeout_s: float = PROBE_TIMEOUT_S
    probe_budget_s: float = PROBE_BUDGET_S


@dataclass(frozen=True, slots=True)
class ImageSize:
    """One image's size as the service bills it; None when unknown (counted at its detail's most)."""

    size: Size | None
    is_remote: bool = False  # an http(s) URL: the run reserves it at its most, probed or not
    unsized_because: str | None = None


@dataclass(frozen=True, slots=True)
class RowEstimate:
    row_id: str
    line: int
    detail: Detail | None  # None for a row the manifest could not give
    images: int
    prompt_tokens: int | None = None  # as the service bills them; None when the row fails before counting
    error: str | None = None  # the error the run would commit; None for a row it would send
    reason: str | None = None  # the error's kind, to count failing rows by
    unsized_because: tuple[str, ...] = ()  # one cause per image not sized


@dataclass(frozen=True, slots=True)
class Observed:
    """An earlier output's ok rows: their mean completion tokens and latency, and their bills by id."""

    output: str
    ok_rows: int
    mean_completion_tokens: float | None
    mean_latency_s: float | None
    billed: Mapping[str, Usage]


@dataclass(frozen=True, slots=True)
class Comparison:
    """Estimated against billed prompt tokens, row by row, over the ok rows of ``Observed``."""

    rows: int = 0
    differing_rows: int = 0
    differing_ids: tuple[str, ...] = ()
    estimated_prompt_tokens: int = 0
    billed_prompt_tokens: int = 0
    billed_completion_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Tally:
    """Totals over the rows estimated so far; images and tokens count the rows to send only."""

    read: int = 0
    duplicates: int = 0
    to_send: int = 0
    prompt_tokens: int = 0
    images_by_detail: Mapping[str, int] = field(default_factory=dict)
    unsized_because: Mapping[str, int] = field(default_factory=dict)
    failing: Mapping[str, int] = field(default_factory=dict)  # rows by reason
    failing_ids: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    comparison: Comparison = field(default_factory=Comparison)


@dataclass(frozen=True, slots=True)
class Costs:
    input_usd: float
    output_max_usd: float
    output_expected_usd: float
    total_max_usd: float
    total_expected_usd: float


@dataclass(frozen=True, slots=True)
class Duration:
    tokens_per_minute: int
    requests_per_minute: int
    reserve_tokens_per_row: float | None  # mean prompt + max_tokens; None without rows
    window_s: float
    rows_per_window_by_tokens: int | None
    rows_per_window_by_requests: int
    binding: str | None  # "tokens_per_minute" or "requests_per_minute"
    rows_per_min: float | None
    duration_h: float
    window_h: float | None
    fits_window: bool | None
    concurrency_rows_per_min: float | None  # concurrency × 60 / observed mean latency: a note, not a bound


@dataclass(frozen=True, slots=True)
class Estimate:
    manifest: str
    config: str
    model: str
    max_tokens: int
    tally: Tally
    expected_completion_tokens: float  # per row
    expected_source: str
    unsized_assumption: str | None
    price: Price
    cost: Costs
    batch_cost: Costs
    duration: Duration
    observed: Observed | None


# ---- the pure core -------------------------------------------------------------------------------------


def reason_of(err: RowError) -> str:
    """The kind of a row's failure, to count failing rows by."""
    for label, marker in _REASONS:
        if marker in err.reason:
            return label
    return "bad manifest row" if isinstance(err, ManifestError) else "unreadable image"


def failed_row(err: RowError, *, line: int, detail: Detail | None = None, images: int = 0) -> RowEstimate:
    """A row the run would commit as an error with `err`."""
    return RowEstimate(err.row_id, line, detail, images, error=str(err), reason=reason_of(err))


def estimate_row(task: ImageTask, sized: Sequence[ImageSize] | RowError, cfg: RunConfig) -> RowEstimate:
    """One row's prompt tokens, counted as the run counts them, or the error the run would commit."""
    if isinstance(sized, RowError):
        return failed_row(sized, line=task.line, detail=task.detail, images=len(task.images))
    model_in_body = cfg.endpoint.model if endpoint_for(cfg.endpoint, None).sends_model else None
    placeholders = [PreparedImage(PLACEHOLDER_URL, None, None) for _ in sized]
    messages = build_body(task, placeholders, cfg.request, model_in_body)["messages"]
    model = cfg.endpoint.model
    prompt = count_prompt_tokens(messages, [image.size for image in sized], model)
    reserved = prompt
    if any(image.is_remote and image.size for image in sized):  # the run counts http(s) images at their most
        reserved = count_prompt_tokens(messages, [None if i.is_remote else i.size for i in sized], model)
    because = tuple(image.unsized_because or NOT_PROBED for image in sized if image.size is None)
    row = RowEstimate(task.row_id, task.line, task.detail, len(sized), prompt, unsized_because=because)
    reserve = reserved + cfg.request.max_tokens
    if reserve > cfg.limits.tokens_per_minute:  # the runner's refusal (Limits.admits), word for word
        err = ApiError(
            task.row_id,
            f"needs {reserve} tokens (prompt {reserved} + max_tokens {cfg.request.max_tokens}), more "
            f"than limits.tokens_per_minute = {cfg.limits.tokens_per_minute}; not sent",
            status=None,
        )
        return replace(row, error=str(err), reason=reason_of(err))
    return row


def tally_rows(
    tally: Tally,
    rows: Iterable[RowEstimate],
    *,
    duplicates: int = 0,
    billed: Mapping[str, Usage] | None = None,
) -> Tally:
    """`tally` plus `rows` and `duplicates` ignored rows; a row to send whose id is `billed` is compared."""
    read, to_send, prompt_tokens = tally.read + duplicates, tally.to_send, tally.prompt_tokens
    images, unsized, failing = (
        Counter(tally.images_by_detail),
        Counter(tally.unsized_because),
        Counter(tally.failing),
    )
    failing_ids = {reason: list(ids) for reason, ids in tally.failing_ids.items()}
    c = asdict(tally.comparison)
    differing_ids = list(c.pop("differing_ids"))
    for row in rows:
        read += 1
        if row.error is not None or row.prompt_tokens is None:
            failing[row.reason or "unknown"] += 1
            listed = failing_ids.setdefault(row.reason or "unknown", [])
            if len(listed) < LISTED_IDS_PER_REASON:
                listed.append(row.row_id)
            continue
        to_send += 1
        prompt_tokens += row.prompt_tokens
        images[row.detail or "auto"] += row.images
        unsized.update(row.unsized_because)
        if billed is not None and (usage := billed.get(row.row_id)) is not None:
            c["rows"] += 1
            c["estimated_prompt_tokens"] += row.prompt_tokens
            c["billed_prompt_tokens"] += usage.prompt_tokens
            c["billed_completion_tokens"] += usage.completion_tokens
            if row.prompt_tokens != usage.prompt_tokens:
                c["differing_rows"] += 1
                differing_ids += [row.row_id][: LISTED_DIFFERING_IDS - len(differing_ids)]
    return Tally(
        read,
        tally.duplicates + duplicates,
        to_send,
        prompt_tokens,
        dict(images),
        dict(unsized),
        dict(failing),
        {reason: tuple(ids) for reason, ids in failing_ids.items()},
        Comparison(**c, differing_ids=tuple(differing_ids)),
    )


def observe(output: str, rows: Iterable[Mapping[str, Any]]) -> Observed:
    """Summarize an earlier output's rows (mappings of OBSERVED_COLUMNS); only ok rows with usage count."""
    billed: dict[str, Usage] = {}
    latencies: list[float] = []
    for row in rows:
        if row.get("status") != "ok" or row.get("prompt_tokens") is None:
            continue
        prompt, completion = int(row["prompt_tokens"]), int(row.get("completion_tokens") or 0)
        billed[str(row["id"])] = Usage(prompt, completion, prompt + completion)
        if row.get("latency_s") is not None:
            latencies.append(float(row["latency_s"]))
    completions = sum(usage.completion_tokens for usage in billed.values())
    mean_latency_s = sum(latencies) / len(latencies) if latencies else None
    return Observed(
        output, len(billed), completions / len(billed) if billed else None, mean_latency_s, billed
    )


def expected_completion_tokens(max_tokens: int, observed: Observed | None) -> tuple[float, str]:
    """Completion tokens expected per row, and where that figure comes from."""
    if observed is not None and observed.mean_completion_tokens is not None:
        mean = min(float(max_tokens), observed.mean_completion_tokens)
        return mean, f"mean of {observed.ok_rows} ok rows in {observed.output}"
    why = f"no ok rows in {observed.output}" if observed is not None else "no --observed output"
    return (
        max_tokens * DEFAULT_COMPLETION_SHARE,
        f"assumed {DEFAULT_COMPLETION_SHARE:.0%} of max_tokens, {why}",
    )


def costs(
    prompt_tokens: int, rows: int, max_tokens: int, expected: float, price: Price, *, batch: bool
) -> Costs:
    """Input and output dollars, the output at its upper bound and at its expected value."""
    input_usd = cost_usd(prompt_tokens, 0, price, batch=batch)
    output_max_usd = cost_usd(0, max_tokens * rows, price, batch=batch)
    output_expected_usd = cost_usd(0, expected * rows, price, batch=batch)
    return Costs(
        input_usd,
        output_max_usd,
        output_expected_usd,
        input_usd + output_max_usd,
        input_usd + output_expected_usd,
    )


def plan_duration(
    rows: int, prompt_tokens: int, cfg: RunConfig, *, window_h: float | None, latency_s: float | None
) -> Duration:
    """How long the limiter takes to admit `rows` requests holding `prompt_tokens` in all."""
    tpm, rpm, max_tokens = cfg.limits.tokens_per_minute, cfg.requests_per_minute, cfg.request.max_tokens
    window_s = WINDOW_S + WINDOW_SLACK_S  # the limiter keeps each reservation this long
    by_requests = max(1, math.floor(rpm / WINDOWS_PER_MINUTE))
    concurrency = cfg.limits.concurrency * 60 / latency_s if latency_s else None
    plan = Duration(tpm, rpm, None, window_s, None, by_requests, None, None, 0.0, window_h, None, concurrency)
    if rows == 0:
        return replace(plan, fits_window=None if window_h is None else True)
    reserve = (prompt_tokens + max_tokens * rows) / rows
    by_tokens = max(1, math.floor(tpm / WINDOWS_PER_MINUTE / reserve))  # a request larger goes alone
    rows_per_min = min(by_tokens, by_requests) * 60 / window_s
    duration_h = rows / rows_per_min / 60
    return replace(
        plan,
        reserve_tokens_per_row=reserve,
        rows_per_window_by_tokens=by_tokens,
        binding="tokens_per_minute" if by_tokens <= by_requests else "requests_per_minute",
        rows_per_min=rows_per_min,
        duration_h=duration_h,
        fits_window=None if window_h is None else duration_h <= window_h,
    )


def summarize(
    tally: Tally, cfg: RunConfig, price: Price, observed: Observed | None, options: EstimateOptions
) -> Estimate:
    """The estimate of a manifest from its tally."""
    expected, source = expected_completion_tokens(cfg.request.max_tokens, observed)
    rows, max_tokens, model = tally.to_send, cfg.request.max_tokens, cfg.endpoint.model
    assumption = None
    if tally.unsized_because:
        assumption = (
            f"each counted at the most an image of its detail can cost ({max_image_tokens('high', model)} "
            f"tokens at high or auto, {max_image_tokens('low', model)} at low), as the run reserves it"
        )
    latency_s = observed.mean_latency_s if observed else None
    return Estimate(
        str(options.manifest),
        cfg.source,
        model,
        max_tokens,
        tally,
        expected,
        source,
        assumption,
        price,
        costs(tally.prompt_tokens, rows, max_tokens, expected, price, batch=False),
        costs(tally.prompt_tokens, rows, max_tokens, expected, price, batch=True),
        plan_duration(rows, tally.prompt_tokens, cfg, window_h=options.window_h, latency_s=latency_s),
        observed,
    )


def parse_window_h(text: str) -> float:
    """Hours in a duration such as "6h", "90m", "1h30m", "2d", or "1.5" (hours). Raises ValueError."""
    text = text.strip().lower()
    try:
        hours = float(text)
    except ValueError:
        parts = _WINDOW_PART.findall(text)
        if not parts or "".join(n + u for n, u in parts) != text:
            raise ValueError(f"{text!r} is not a duration such as 6h, 90m or 1h30m") from None
        hours = sum(float(n) * _UNIT_H[u] for n, u in parts)
    if not 0 < hours < math.inf:
        raise ValueError(f"{text!r}: the window must be longer than 0")
    return hours


# ---- the edges: manifest, sizing threads, URL probes, Parquet --------------------------------------------


async def estimate(cfg: RunConfig, options: EstimateOptions) -> Estimate:
    """Estimate the cost and duration of running `options.manifest` under `cfg`; nothing is sent.

    Raises ConfigError for a model without a price (naming the file to edit), an unreadable manifest or
    observed output; OSError when the per-row file cannot be written.
    """
    price = await asyncio.to_thread(price_for_run, cfg)
    observed = await asyncio.to_thread(read_observed, options.observed) if options.observed else None
    billed = observed.billed if observed else None
    items = read_manifest(options.manifest, cfg.request)
    base_dir = manifest_base_dir(options.manifest)
    tally, seen = Tally(), set[str]()
    async with AsyncExitStack() as stack:
        sizer = await stack.enter_async_context(_Sizer(cfg, base_dir, options))
        writer = None
        if options.per_row:
            expected, _ = expected_completion_tokens(cfg.request.max_tokens, observed)
            writer = _PerRowWriter(options.per_row, price, expected)
            stack.push_async_callback(asyncio.to_thread, writer.discard)
        while chunk := await asyncio.to_thread(lambda: list(islice(items, CHUNK_ROWS))):
            fresh = _first_seen(chunk, seen)
            tasks = [item for item in fresh if isinstance(item, ImageTask)]
            sized = dict(zip([task.row_id for task in tasks], await sizer.size(tasks), strict=True))
            rows = [
                estimate_row(item, sized[item.row_id], cfg)
                if isinstance(item, ImageTask)
                else failed_row(item, line=item.line)
                for item in fresh
            ]
            tally = tally_rows(tally, rows, duplicates=len(chunk) - len(fresh), billed=billed)
            if writer:
                await asyncio.to_thread(writer.write, rows)
        if writer:
            await asyncio.to_thread(writer.commit)
    return summarize(tally, cfg, price, observed, options)


def _first_seen(
    items: Sequence[ImageTask | ManifestError], seen: set[str]
) -> list[ImageTask | ManifestError]:
    """The items whose id was not seen before: the run keeps the first row of a repeated id."""
    fresh = []
    for item in items:
        if item.row_id not in seen:
            seen.add(item.row_id)
            fresh.append(item)
    return fresh


def read_observed(output: Path) -> Observed:
    """The ok rows of an earlier run's output folder. Raises ConfigError naming the folder."""
    if not output.is_dir():
        raise ConfigError(f"{output}: --observed must be the output folder of an earlier run")
    try:
        table = read_output(output, OBSERVED_COLUMNS)
    except (OSError, pa.ArrowException) as err:
        raise ConfigError(f"{output}: cannot read the output: {' '.join(str(err).split())}") from None
    return observe(str(output), table.to_pylist())


def measure_local(
    refs: Sequence[tuple[str, str]], base_dir: Path, cfg: RunConfig
) -> list[ImageSize | ImageError]:
    """Header-only sizes of (row_id, path or data URL) pairs, with the run's refusals as values. Blocking."""
    results: list[ImageSize | ImageError] = []
    for row_id, ref in refs:
        try:
            if ref[:5].lower() == "data:" and (n := _data_url_bytes(ref)) > cfg.images.max_image_bytes:
                limit = cfg.images.max_image_bytes  # a data URL is sent as given: prepare_image's refusal
                raise ImageError(
                    row_id,
                    f"{n:,} bytes is more than images.max_image_bytes = {limit:,}",
                    path=shorten_url(ref),
                )
            size = measure_image(
                ref, base_dir=base_dir, row_id=row_id, allowed_roots=cfg.images.allowed_roots
            )
            assert size is not None, "http(s) references are probed, not measured"
            if size[0] * size[1] > cfg.images.max_pixels:  # prepare_image's refusal, before decoding
                raise ImageError(
                    row_id,
                    f"too many pixels: {size[0]}×{size[1]} is more than images.max_pixels = "
                    f"{cfg.images.max_pixels:,}",
                    path=shorten_url(ref),
                )
            results.append(ImageSize(size))
        except ImageError as err:
            results.append(err)
    return results


def _data_url_bytes(ref: str) -> int:
    payload = ref.partition(",")[2]
    return len(payload) * 3 // 4 - (len(payload) - len(payload.rstrip("=")))


class _Sizer:
    """Sizes the images of a chunk of rows: files and data URLs in threads, http(s) URLs by probe."""

    def __init__(self, cfg: RunConfig, base_dir: Path, options: EstimateOptions) -> None:
        self.cfg, self.base_dir, self.options = cfg, base_dir, options
        self.pool = ThreadPoolExecutor(SIZING_THREADS, thread_name_prefix="estimate-sizing")
        self.session: aiohttp.ClientSession | None = None
        # by URL, so a URL used twice is probed once; a str says why the service will refuse the image
        self.probes: dict[str, ImageSize | str] = {}
        self.deadline = 0.0
        self.slots = asyncio.Semaphore(options.probe_concurrency)

    async def __aenter__(self) -> _Sizer:
        if self.options.probe_urls:
            connector = aiohttp.TCPConnector(limit=self.options.probe_concurrency)
            self.session = aiohttp.ClientSession(connector=connector, headers={"Accept-Encoding": "identity"})
            self.deadline = asyncio.get_running_loop().time() + self.options.probe_budget_s
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.session is not None:
            await self.session.close()
        self.pool.shutdown(wait=True)

    async def size(self, tasks: Sequence[ImageTask]) -> list[list[ImageSize] | RowError]:
        """Each task's image sizes, or the first error the run would meet for it."""
        local = [(task.row_id, ref) for task in tasks for ref in task.images if not _is_remote(ref)]
        slices = [part for part in (local[n::SIZING_THREADS] for n in range(SIZING_THREADS)) if part]
        loop = asyncio.get_running_loop()
        measured = await asyncio.gather(
            *(
                loop.run_in_executor(self.pool, measure_local, part, self.base_dir, self.cfg)
                for part in slices
            )
        )
        found = {
            pair: size
            for part, sizes in zip(slices, measured, strict=True)
            for pair, size in zip(part, sizes, strict=True)
        }
        if self.session is not None:
            urls = {ref for task in tasks for ref in task.images if _is_remote(ref)} - self.probes.keys()
            await asyncio.gather(*(self._probe(url) for url in urls))
        sized: list[list[ImageSize] | RowError] = []
        for task in tasks:
            sizes = [
                self._remote(task.row_id, ref) if _is_remote(ref) else found[task.row_id, ref]
                for ref in task.images
            ]
            first_error = next((size for size in sizes if isinstance(size, RowError)), None)
            sized.append(first_error or [size for size in sizes if isinstance(size, ImageSize)])
        return sized

    def _remote(self, row_id: str, url: str) -> ImageSize | ImageError:
        result = self.probes.get(url, ImageSize(None, True, NOT_PROBED))
        if isinstance(result, str):
            return ImageError(row_id, result, path=shorten_url(url))
        # with images.fetch_remote the run downloads the image and counts its size like a file's
        return replace(result, is_remote=False) if self.cfg.images.fetch_remote else result

    async def _probe(self, url: str) -> None:
        async with self.slots:
            left_s = min(self.options.probe_timeout_s, self.deadline - asyncio.get_running_loop().time())
            if left_s <= 0:
                self.probes[url] = ImageSize(None, True, "probe: time budget spent")
            else:
                self.probes[url] = await self._fetch_size(url, left_s)

    async def _fetch_size(self, url: str, timeout_s: float) -> ImageSize | str:
        """The size in the header of `url`'s first PROBE_BYTES, fetched with a Range request."""
        assert self.session is not None
        try:
            async with asyncio.timeout(timeout_s):
                async with self.session.get(url, headers={"Range": f"bytes=0-{PROBE_BYTES - 1}"}) as response:
                    if response.status not in (200, 206):
                        return ImageSize(None, True, f"probe: HTTP {response.status}")
                    total = _total_bytes(response.headers, response.status)
                    head = await _read_at_most(response.content, PROBE_BYTES)
        except TimeoutError:
            return ImageSize(None, True, "probe: timed out")
        except (aiohttp.ClientError, ValueError) as err:  # ValueError: a URL aiohttp cannot parse
            return ImageSize(None, True, f"probe: {type(err).__name__}")
        limit = self.cfg.images.max_image_bytes
        if total is not None and total > limit and not self.cfg.images.fetch_remote:  # a URL is sent as given
            return f"{total:,} bytes is more than images.max_image_bytes = {limit:,}; the service refuses it"
        try:  # the header reader used for files, over the bytes we have
            size = await asyncio.get_running_loop().run_in_executor(
                self.pool, _header_size, head, self.base_dir
            )
        except ImageError:  # not an image, or its size lies past the bytes read
            return ImageSize(None, True, f"probe: no size in the first {PROBE_BYTES // 1024} KiB")
        return ImageSize(size, True)


def _header_size(head: bytes, base_dir: Path) -> Size | None:
    data_url = "data:image/probe;base64," + base64.b64encode(head).decode("ascii")
    return measure_image(data_url, base_dir=base_dir, row_id="probe")


def _is_remote(ref: str) -> bool:
    return ref[:8].lower().startswith(("http://", "https://"))


def _total_bytes(headers: Mapping[str, str], status: int) -> int | None:
    """The whole file's length: Content-Range of a 206, Content-Length of a 200."""
    text = (
        headers.get("Content-Range", "").rpartition("/")[2]
        if status == 206
        else headers.get("Content-Length")
    )
    return int(text) if text and text.isdigit() else None


async def _read_at_most(stream: aiohttp.StreamReader, limit: int) -> bytes:
    """Up to `limit` bytes: a server that ignores Range would send us the whole file."""
    chunks: list[bytes] = []
    while (got := sum(map(len, chunks))) < limit and (chunk := await stream.read(limit - got)):
        chunks.append(chunk)
    return b"".join(chunks)


class _PerRowWriter:
    """Streams row estimates into a Parquet file under a temporary name, renamed into place when complete."""

    def __init__(self, path: Path, price: Price, expected: float) -> None:
        self.path, self.price, self.expected = path, price, expected
        self.temp = path.with_name(f".tmp-{path.name}")
        self.writer: pq.ParquetWriter | None = None

    def write(self, rows: Sequence[RowEstimate]) -> None:
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.temp, PER_ROW_SCHEMA, compression="zstd")
        columns: dict[str, list[Any]] = {name: [] for name in PER_ROW_SCHEMA.names}
        for row in rows:
            is_sent = row.error is None and row.prompt_tokens is not None
            values = (
                row.row_id,
                row.line,
                row.detail,
                row.images,
                len(row.unsized_because),
                row.prompt_tokens,
                cost_usd(row.prompt_tokens or 0, self.expected, self.price) if is_sent else None,
                row.reason,
                row.error,
            )
            for name, value in zip(PER_ROW_SCHEMA.names, values, strict=True):
                columns[name].append(value)
        self.writer.write_table(pa.table(columns, schema=PER_ROW_SCHEMA))

    def commit(self) -> None:
        if self.writer is None:
            self.write([])
        assert self.writer is not None
        self.writer.close()
        os.replace(self.temp, self.path)
        self.writer = None

    def discard(self) -> None:
        """After a failure: no half-written file is left behind."""
        if self.writer is not None:
            self.writer.close()
            self.temp.unlink(missing_ok=True)


# ---- what the user reads -------------------------------------------------------------------------------


def estimate_as_json(e: Estimate) -> dict[str, Any]:
    """The estimate as the JSON object documented at the top of this module."""
    t, o = e.tally, e.observed
    observed = None
    if o is not None:
        estimated_usd, billed_usd = _compared_costs(e)
        observed = {
            "output": o.output,
            "ok_rows": o.ok_rows,
            "mean_completion_tokens": o.mean_completion_tokens,
            "mean_latency_s": o.mean_latency_s,
            **asdict(t.comparison),
            "estimated_cost_usd": estimated_usd,
            "billed_cost_usd": billed_usd,
            "cost_difference_pct": _difference_pct(estimated_usd, billed_usd),
        }
    return {
        "schema": SCHEMA,
        "manifest": e.manifest,
        "config": e.config,
        "model": e.model,
        "rows": {
            "read": t.read,
            "to_send": t.to_send,
            "failing": sum(t.failing.values()),
            "duplicates": t.duplicates,
        },
        "images": {
            "total": sum(t.images_by_detail.values()),
            "by_detail": {detail: t.images_by_detail.get(detail, 0) for detail in DETAILS},
            "unsized": sum(t.unsized_because.values()),
            "unsized_because": dict(t.unsized_because),
            "unsized_assumption": e.unsized_assumption,
        },
        "prompt_tokens": t.prompt_tokens,
        "output_tokens": {
            "max": e.max_tokens * t.to_send,
            "expected": round(e.expected_completion_tokens * t.to_send),
            "expected_per_row": e.expected_completion_tokens,
            "expected_source": e.expected_source,
        },
        "price": asdict(e.price),
        "cost": asdict(e.cost),
        "batch_cost": asdict(e.batch_cost),
        "duration": asdict(e.duration),
        "failing": {
            reason: {"rows": n, "row_ids": list(t.failing_ids.get(reason, ()))}
            for reason, n in sorted(t.failing.items())
        },
        "observed": observed,
    }


def format_estimate(e: Estimate) -> str:
    """The lines an operator reads before deciding to spend."""
    t, d, p, rows, o = e.tally, e.duration, e.price, e.tally.to_send, e.observed
    by_detail = ", ".join(f"{detail} {t.images_by_detail.get(detail, 0):,}" for detail in DETAILS)
    images = sum(t.images_by_detail.values())
    lines = [
        f"estimate of {e.manifest} under {e.config} (model {e.model}); nothing was sent",
        f"rows: {t.read:,} read, {rows:,} to send, {sum(t.failing.values()):,} would fail, "
        f"{t.duplicates:,} duplicate ids ignored",
        f"images: {images:,} ({by_detail}; auto is counted as high, the upper bound)",
    ]
    if t.unsized_because:
        causes = "; ".join(f"{cause}: {n:,}" for cause, n in sorted(t.unsized_because.items()))
        lines.append(f"  {sum(t.unsized_because.values()):,} not sized ({causes}): {e.unsized_assumption}")
    expected = e.expected_completion_tokens
    lines += [
        f"prompt tokens: {t.prompt_tokens:,} (as the run counts them and the service bills them)",
        f"output tokens: at most {e.max_tokens * rows:,} (max_tokens {e.max_tokens} × {rows:,} rows); "
        f"expected {round(expected * rows):,} ({expected:,.1f} per row: {e.expected_source})",
        f"cost: input ${e.cost.input_usd:,.4f} + output ${e.cost.output_expected_usd:,.4f} expected "
        f"= ${e.cost.total_expected_usd:,.4f}; at most ${e.cost.total_max_usd:,.4f}",
        f"  at Batch API prices ({p.batch_discount:.0%} off): ${e.batch_cost.total_expected_usd:,.4f} "
        f"expected, at most ${e.batch_cost.total_max_usd:,.4f}",
        f"  prices: {p.model} ${p.input_per_1m:g} in, ${p.output_per_1m:g} out per 1M tokens; "
        f"checked {p.checked}; {p.file}",
    ]
    if d.rows_per_min is None or d.reserve_tokens_per_row is None:
        lines.append("duration: nothing to send")
    else:
        lines += [
            f"duration: {_hours(d.duration_h)} at {d.rows_per_min:,.1f} rows/min ({d.binding} binds)",
            f"  per {d.window_s:g} s window: {d.tokens_per_minute:,} TPM at {d.reserve_tokens_per_row:,.0f} "
            f"tokens reserved per row admits {d.rows_per_window_by_tokens:,} rows, "
            f"{d.requests_per_minute:,} RPM admits {d.rows_per_window_by_requests:,}",
        ]
    if d.concurrency_rows_per_min is not None:
        lines.append(
            f"  note: concurrency at the observed latency allows {d.concurrency_rows_per_min:,.0f} rows/min"
        )
    if d.window_h is not None:
        verdict = "fits" if d.fits_window else "does NOT fit"
        lines.append(f"window {_hours(d.window_h)}: {verdict} ({d.duration_h / d.window_h:.0%} of it)")
    for reason, n in sorted(t.failing.items()):
        shown = t.failing_ids.get(reason, ())[:PRINTED_IDS_PER_REASON]
        more = f" and {n - len(shown):,} more" if n > len(shown) else ""
        lines.append(f"would fail, {reason}: {n:,} ({', '.join(shown)}{more})")
    if o is not None:
        c = t.comparison
        estimated_usd, billed_usd = _compared_costs(e)
        pct = _difference_pct(estimated_usd, billed_usd)
        lines += [
            f"observed {o.output}: {c.rows:,} rows compared; estimated prompt tokens differ from the billed "
            f"ones in {c.differing_rows:,}",
            f"  cost of those rows: ${estimated_usd:,.4f} estimated, ${billed_usd:,.4f} billed"
            + ("" if pct is None else f" ({pct:+.2f} %)"),
        ]
        if c.differing_ids:
            lines.append(f"  differing: {', '.join(c.differing_ids)}")
    return "\n".join(lines)


def _compared_costs(e: Estimate) -> tuple[float, float]:
    """Dollars of the compared rows: as estimated (expected completion per row), and as billed."""
    c = e.tally.comparison
    estimated = cost_usd(c.estimated_prompt_tokens, e.expected_completion_tokens * c.rows, e.price)
    return estimated, cost_usd(c.billed_prompt_tokens, c.billed_completion_tokens, e.price)


def _difference_pct(estimated_usd: float, billed_usd: float) -> float | None:
    return (estimated_usd - billed_usd) / billed_usd * 100 if billed_usd else None


def _hours(hours: float) -> str:
    if hours >= 1:
        return f"{hours:,.2f} h"
    return f"{hours * 60:,.1f} min" if hours * 60 >= 1 else f"{hours * 3600:,.1f} s"
