"""What a run of a manifest under a config will cost and how long it will take, before anything is sent.

A row's prompt tokens are counted by the run's own request plan (``request.plan_request``) with each
image's size read from its header by ``images.measure_image``, under the run's own refusals: nothing is
decoded, and the run's downscaled image bills the same as the original. An http(s) image is sized only with ``probe_urls`` (``remote.probe_image``: a Range request for
its first bytes, under the download's address rules); an unsized image is counted at the most an image of
its detail can cost, as the run's reservation counts it. Rows the run would fail (bad manifest row,
missing or unsupported file, too many pixels or bytes, too many images, over the model's context or
limits.tokens_per_minute) are counted by their ``ErrorKind`` with the run's own error text and cost
nothing. A file damaged past its header is found only by the
run, which decodes it.

This module is the edge (the manifest, sizing threads, URL probes, the observed output, the ``--per-row``
file) and the count of each row; ``plan.py`` turns the rows into totals, costs, a duration and the text and
JSON the user reads (its docstring documents ``--json`` and ``--per-row``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path
from typing import Self

import aiohttp
import pyarrow as pa

from pipeline.config import RunConfig
from pipeline.manifest import Skipped, manifest_base_dir, read_manifest
from pipeline.plan import (
    Estimate,
    Observed,
    RowEstimate,
    Tally,
    expected_completion_tokens,
    observe,
    per_row_record,
    summarize,
    tally_rows,
)
from pipeline.pricing import Price, price_for_run
from pipeline.records import (
    ConfigError,
    Detail,
    ErrorKind,
    ImageError,
    ImageTask,
    ManifestError,
    PreparedImage,
    RowError,
)
from pipeline.refs import is_remote_url, shorten_url
from pipeline.remote import open_session, probe_image
from pipeline.request import plan_request
from pipeline.sink import ESTIMATE_ROWS_SCHEMA, ParquetFileWriter, read_output, rows_to_table
from pipeline.sniff import measure_image
from pipeline.structured import Structured, load_structured

CHUNK_ROWS = 2048  # rows read, sized and tallied together: memory stays flat whatever the manifest's size
SIZING_THREADS = 4  # header reads are mostly Python under the GIL; threads pay off on slow or network disks
PROBE_CONCURRENCY = 16
PROBE_TIMEOUT_S = 10.0  # one probe
PROBE_BUDGET_S = 120.0  # all probes together; URLs left when it is spent stay unsized
NOT_PROBED = "http(s) URL, not probed (--probe-urls)"
PLACEHOLDER_URL = "data:image/jpeg;base64,"  # a prepared image's data URL costs no tokens; only its size does
OBSERVED_COLUMNS = ("id", "status", "prompt_tokens", "completion_tokens", "latency_s")
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


# ---- one row, counted as the run counts it (pure) -------------------------------------------------------


def failed_row(err: RowError, *, line: int, detail: Detail | None = None, images: int = 0) -> RowEstimate:
    """A row the run would commit as an error with `err`."""
    return RowEstimate(err.row_id, line, detail, images, error=str(err), error_kind=str(err.kind))


def estimate_row(
    task: ImageTask,
    sized: Sequence[ImageSize] | RowError,
    cfg: RunConfig,
    structured: Structured | None = None,
) -> RowEstimate:
    """One row's prompt tokens, counted by the run's own request plan, or the error the run would commit."""
    if isinstance(sized, RowError):
        return failed_row(sized, line=task.line, detail=task.detail, images=len(task.images))
    images = [_stand_in(ref, image) for ref, image in zip(task.images, sized, strict=True)]
    plan = plan_request(task, images, cfg, structured)
    because = tuple(image.unsized_because or NOT_PROBED for image in sized if image.size is None)
    row = RowEstimate(
        task.row_id, task.line, task.detail, len(sized), plan.estimated_prompt_tokens, unsized_because=because
    )
    if plan.refusal is not None:  # the run's own refusal, in its words
        return replace(row, error=str(plan.refusal), error_kind=str(plan.refusal.kind))
    return row


def _stand_in(ref: str, image: ImageSize) -> PreparedImage:
    """What the plan needs of an image: its size, and whether the run sends it as an http(s) URL."""
    width, height = image.size or (None, None)
    return PreparedImage(ref if image.is_remote else PLACEHOLDER_URL, width, height)


# ---- the edges: manifest, sizing threads, URL probes, Parquet --------------------------------------------


async def estimate(cfg: RunConfig, options: EstimateOptions) -> Estimate:
    """Estimate the cost and duration of running `options.manifest` under `cfg`; nothing is sent.

    Raises ConfigError for a model without a price (naming the file to edit), an unreadable manifest or
    observed output; OSError when the per-row file cannot be written.
    """
    price = await asyncio.to_thread(price_for_run, cfg)
    structured = await asyncio.to_thread(load_structured, cfg)
    observed = await asyncio.to_thread(read_observed, options.observed) if options.observed else None
    billed = observed.billed if observed else None
    expected, _ = expected_completion_tokens(cfg.request.max_tokens, observed)
    items = read_manifest(options.manifest, cfg.request)
    base_dir = manifest_base_dir(options.manifest)
    tally, seen = Tally(), set[str]()
    async with AsyncExitStack() as stack:
        sizer = await stack.enter_async_context(_Sizer(cfg, base_dir, options))
        writer = None
        if options.per_row:
            writer = ParquetFileWriter(options.per_row, ESTIMATE_ROWS_SCHEMA)
            stack.push_async_callback(asyncio.to_thread, writer.discard)
        while chunk := await asyncio.to_thread(lambda: list(islice(items, CHUNK_ROWS))):
            fresh = _first_seen(chunk, seen)
            tasks = [item for item in fresh if isinstance(item, ImageTask)]
            sized = dict(zip([task.row_id for task in tasks], await sizer.size(tasks), strict=True))
            rows = [
                estimate_row(item, sized[item.row_id], cfg, structured)
                if isinstance(item, ImageTask)
                else failed_row(item, line=item.line)
                for item in fresh
            ]
            tally = tally_rows(tally, rows, duplicates=len(chunk) - len(fresh), billed=billed)
            if writer:
                await asyncio.to_thread(_write_rows, writer, rows, price, expected)
        if writer:
            await asyncio.to_thread(writer.commit)
    return summarize(tally, cfg, price, observed, manifest=str(options.manifest), window_h=options.window_h)


def _first_seen(
    items: Sequence[ImageTask | ManifestError | Skipped], seen: set[str]
) -> list[ImageTask | ManifestError]:
    """The items whose id was not seen before: the run keeps the first row of a repeated id."""
    fresh = []
    for item in items:
        if isinstance(item, Skipped):  # none: the estimate reads the manifest with nothing to skip
            continue
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


def _write_rows(
    writer: ParquetFileWriter, rows: Sequence[RowEstimate], price: Price, expected: float
) -> None:
    """Append row estimates to the ``--per-row`` file. Blocking."""
    records = [per_row_record(row, price, expected) for row in rows]
    writer.write(rows_to_table(records, ESTIMATE_ROWS_SCHEMA))


def measure_local(
    refs: Sequence[tuple[str, str]], base_dir: Path, cfg: RunConfig
) -> list[ImageSize | ImageError]:
    """Header-only sizes of (row_id, path or data URL) pairs, with the run's refusals as values. Blocking."""
    results: list[ImageSize | ImageError] = []
    for row_id, ref in refs:
        try:
            size = measure_image(ref, base_dir=base_dir, cfg=cfg.images, row_id=row_id)
            assert size is not None, "http(s) references are probed, not measured"
            results.append(ImageSize(size))
        except ImageError as err:
            results.append(err)
    return results


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

    async def __aenter__(self) -> Self:
        if self.options.probe_urls:
            self.session = open_session(self.cfg.images)  # the downloads' address rules hold for probes too
            self.deadline = asyncio.get_running_loop().time() + self.options.probe_budget_s
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.session is not None:
            await self.session.close()
        self.pool.shutdown(wait=True)

    async def size(self, tasks: Sequence[ImageTask]) -> list[list[ImageSize] | RowError]:
        """Each task's image sizes, or the first error the run would meet for it."""
        local = [(task.row_id, ref) for task in tasks for ref in task.images if not is_remote_url(ref)]
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
            urls = {ref for task in tasks for ref in task.images if is_remote_url(ref)} - self.probes.keys()
            await asyncio.gather(*(self._probe(url) for url in urls))
        sized: list[list[ImageSize] | RowError] = []
        for task in tasks:
            sizes = [
                self._remote(task.row_id, ref) if is_remote_url(ref) else found[task.row_id, ref]
                for ref in task.images
            ]
            first_error = next((size for size in sizes if isinstance(size, RowError)), None)
            sized.append(first_error or [size for size in sizes if isinstance(size, ImageSize)])
        return sized

    def _remote(self, row_id: str, url: str) -> ImageSize | ImageError:
        result = self.probes.get(url, ImageSize(None, True, NOT_PROBED))
        if isinstance(result, str):
            return ImageError(row_id, result, kind=ErrorKind.TOO_LARGE, path=shorten_url(url))
        # with images.fetch_remote the run downloads the image and counts its size like a file's
        return replace(result, is_remote=False) if self.cfg.images.fetch_remote else result

    async def _probe(self, url: str) -> None:
        assert self.session is not None
        async with self.slots:
            left_s = min(self.options.probe_timeout_s, self.deadline - asyncio.get_running_loop().time())
            if left_s <= 0:
                self.probes[url] = ImageSize(None, True, "probe: time budget spent")
                return
            probe = await probe_image(self.session, url, self.cfg.images, timeout_s=left_s)
        limit = self.cfg.images.max_image_bytes
        total = probe.total_bytes
        if total is not None and total > limit and not self.cfg.images.fetch_remote:  # a URL is sent as given
            self.probes[url] = (
                f"{total:,} bytes is more than images.max_image_bytes = {limit:,}; the service refuses it"
            )
        else:
            self.probes[url] = ImageSize(probe.size, True, probe.unsized_because)
