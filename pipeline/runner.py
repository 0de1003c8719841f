"""Wiring the stages together: one producer, a bounded queue, N workers, one sink, under one TaskGroup.

Lifecycle: open the output (skip committed ids), start the emulator when asked, caption every row,
commit, write ``_stats.json``. SIGINT/SIGTERM stop the producer, give in-flight requests
``limits.grace_s`` to finish, flush, and exit 130; a second signal cancels in-flight requests at once
(still committing every finished row).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import random
import signal
import time
from array import array
from collections import Counter
from collections.abc import AsyncIterator, Container, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import aiohttp

from pipeline import checkpoint
from pipeline.client import Client, Outcome, build_body, endpoint_for, oversize_reason
from pipeline.config import RunConfig, api_key
from pipeline.images import (
    check_request_size,
    image_threads,
    prepare_image,
    prepare_image_bytes,
    reuse_freed_image_memory,
)
from pipeline.limits import Limits
from pipeline.manifest import Skipped, count_rows, manifest_base_dir, read_manifest
from pipeline.metrics import publish_metrics
from pipeline.pricing import Price, price_for_run, usage_cost_usd
from pipeline.progress import show_progress
from pipeline.records import (
    ApiError,
    ConfigError,
    ErrorKind,
    ImageTask,
    ManifestError,
    NotSent,
    PreparedImage,
    RowError,
    RunAborted,
    RunProgress,
    VisionResult,
)
from pipeline.refs import is_remote_url
from pipeline.remote import fetch_image, open_session
from pipeline.sink import STATS_FILE, Sink, write_json_atomic
from pipeline.tokens import count_prompt_tokens

log = logging.getLogger(__name__)

EXIT_OK = 0  # every row ok or filtered
EXIT_ROW_ERRORS = 1  # some rows ended in error (they are committed with the reason)
EXIT_USAGE = 2  # bad usage or config
EXIT_REFUSED = 3  # the endpoint refused us: key, deployment, route, or a quota that is gone
EXIT_OUTPUT_FAILED = 4  # the output could not be written (disk full, permissions); committed rows stay valid
EXIT_INTERRUPTED = 130  # SIGINT/SIGTERM
EXIT_MEANINGS = {  # for --help, the README's table and the report
    EXIT_OK: "every row ok or filtered",
    EXIT_ROW_ERRORS: "some rows ended in error",
    EXIT_USAGE: "bad usage or config",
    EXIT_REFUSED: "the endpoint refused us (key, deployment, route, quota gone)",
    EXIT_OUTPUT_FAILED: "the output could not be written",
    EXIT_INTERRUPTED: "interrupted",
}

MANIFEST_BATCH_ROWS = 256  # rows read per thread hop
QUEUE_ROWS_PER_WORKER = 2


@dataclass(frozen=True, slots=True)
class RunOptions:
    manifest: Path
    output: Path
    limit: int | None = None  # send at most this many new rows
    retry_failed: bool = False  # send rows committed as error again; the newest row wins
    new_run: bool = False  # set aside rows made with other settings instead of refusing
    handle_signals: bool = True  # off when embedded in another program's loop
    progress: bool = False  # draw the live progress display on stderr (progress.py)
    metrics_file: Path | None = None  # keep this Prometheus textfile up to date (metrics.py)


@dataclass(frozen=True, slots=True)
class RunSummary:
    output: Path
    run_id: str
    counts: dict[str, int]  # rows committed this run by status: ok, filtered, error
    skipped: int  # rows already committed by an earlier run
    duplicates: int  # manifest rows whose id was seen before in this manifest
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float | None
    retries: int
    pauses: int  # 429 cool-downs
    paused_s: float
    duration_s: float
    exit_code: int
    stopped_because: str | None = None  # why the run ended early, one line
    rows_per_s: float = 0.0  # rows of this run per second of its duration
    http_429s: int = 0
    retries_by_cause: dict[str, int] = field(default_factory=dict)  # see client.retry_cause
    latency_percentiles_s: dict[str, float] = field(default_factory=dict)  # p50, p90, p99 of this run's rows

    @property
    def rows(self) -> int:
        return sum(self.counts.values())


@dataclass
class _Tally:
    """Counters of this run, updated by the workers."""

    counts: Counter[str] = field(default_factory=Counter)
    skipped: int = 0
    duplicates: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    retries: int = 0
    latencies_s: array[float] = field(default_factory=lambda: array("d"))  # 8 bytes a row

    def add(self, result: VisionResult) -> None:
        self.counts[result.status] += 1
        self.retries += max(0, result.attempts - 1)
        if result.latency_s is not None:
            self.latencies_s.append(result.latency_s)
        if result.usage is not None:
            self.prompt_tokens += result.usage.prompt_tokens
            self.completion_tokens += result.usage.completion_tokens
        if result.cost_usd is not None:
            self.cost_usd += result.cost_usd


async def run(cfg: RunConfig, options: RunOptions) -> RunSummary:
    """Caption every row of the manifest not yet committed in the output.

    Raises ConfigError for bad settings, before anything is sent, and OSError when the output cannot be
    written. Every other way a run ends is in the summary's exit_code and stopped_because.
    """
    key = api_key(cfg)  # a missing key stops us before the output is touched
    with checkpoint.output_lock(options.output):
        return await _run_locked(cfg, options, key)


async def _run_locked(cfg: RunConfig, options: RunOptions, key: str | None) -> RunSummary:
    loop = asyncio.get_running_loop()
    started_at, started = time.time(), loop.time()
    resume = await asyncio.to_thread(
        functools.partial(
            checkpoint.open_output,
            options.output,
            cfg,
            options.manifest,
            started_at,
            retry_failed=options.retry_failed,
            new_run=options.new_run,
        )
    )
    run_id = resume.run_id
    if resume.archived:
        log.warning("rows made with other settings moved to %s", resume.archived)
    if resume.compacted:
        log.info(
            "removed %d rows superseded by newer ones (an earlier run stopped before compacting)",
            resume.compacted,
        )
    log.info(
        "run %s: %d rows already committed, %d failed rows to retry", run_id, len(resume.skip), resume.retrying,
        extra={"event": "run_started", "run_id": run_id, "manifest": str(options.manifest),
               "output": str(options.output), "committed": len(resume.skip), "retrying": resume.retrying},
    )  # fmt: skip
    async with contextlib.AsyncExitStack() as stack:
        if cfg.endpoint.provider == "emulator":
            cfg = await _start_emulator(cfg, key, stack)
        limits = Limits(cfg.limits.tokens_per_minute, cfg.requests_per_minute)
        connector = aiohttp.TCPConnector(limit=cfg.limits.concurrency)
        session = await stack.enter_async_context(aiohttp.ClientSession(connector=connector))
        client = Client(session, endpoint_for(cfg.endpoint, key), limits, cfg.limits, random.Random())
        reuse_freed_image_memory()
        image_pool = ThreadPoolExecutor(image_threads(cfg.images), thread_name_prefix="images")
        stack.callback(image_pool.shutdown, wait=True, cancel_futures=True)
        stages = _Stages(
            cfg, options, client, Sink(options.output, cfg.output, run_id), resume.skip, image_pool
        )
        await stages.run()
    if resume.retrying and stages.stop_code != EXIT_OUTPUT_FAILED:
        superseded = await asyncio.to_thread(checkpoint.compact, options.output)
        log.info("retried rows replaced %d earlier error rows", superseded)
    tally = stages.tally
    duration_s = loop.time() - started
    summary = RunSummary(
        output=options.output,
        run_id=run_id,
        counts={status: tally.counts.get(status, 0) for status in ("ok", "filtered", "error")},
        skipped=tally.skipped,
        duplicates=tally.duplicates,
        prompt_tokens=tally.prompt_tokens,
        completion_tokens=tally.completion_tokens,
        cost_usd=round(tally.cost_usd, 6) if stages.price else None,
        retries=tally.retries,
        pauses=limits.pauses,
        paused_s=round(limits.paused_s, 3),
        duration_s=round(duration_s, 3),
        exit_code=stages.exit_code(),
        stopped_because=stages.stopped_because,
        rows_per_s=round(sum(tally.counts.values()) / duration_s, 3) if duration_s > 0 else 0.0,
        http_429s=client.http_429s,
        retries_by_cause=dict(sorted(client.retries_by_cause.items())),
        latency_percentiles_s=latency_percentiles(tally.latencies_s),
    )
    stats = summary_as_dict(summary)
    log.info(
        "run %s finished with exit code %d",
        run_id,
        summary.exit_code,
        extra={"event": "run_finished", **stats},
    )
    try:
        await asyncio.to_thread(write_json_atomic, options.output / STATS_FILE, stats)
    except OSError as err:
        log.error("could not write %s: %s", STATS_FILE, err)
    return summary


def summary_as_dict(summary: RunSummary) -> dict[str, object]:
    """The summary as ``_stats.json`` holds it (and ``run --log-format json`` prints it)."""
    return {**dataclasses.asdict(summary), "output": str(summary.output), "rows": summary.rows}


def _price_or_none(cfg: RunConfig) -> Price | None:
    try:
        return price_for_run(cfg)
    except ConfigError as err:
        log.warning("costs will not be computed: %s", err)
        return None


async def _start_emulator(cfg: RunConfig, key: str | None, stack: contextlib.AsyncExitStack) -> RunConfig:
    from pipeline.emulator import Emulator  # only this provider needs the server code

    deployment = cfg.endpoint.deployment or "gpt-4-vision"
    emulator = await stack.enter_async_context(
        Emulator(
            cfg.emulator,
            api_key=key or "",
            deployment=deployment,
            model=cfg.endpoint.model,
            keep_requests=False,
        )
    )
    log.info("emulator listening on %s", emulator.url)
    endpoint = dataclasses.replace(cfg.endpoint, url=emulator.url, deployment=deployment)
    return dataclasses.replace(cfg, endpoint=endpoint)


class _Stages:
    """One run's producer, workers and sink, and how they stop."""

    def __init__(
        self,
        cfg: RunConfig,
        options: RunOptions,
        client: Client,
        sink: Sink,
        prior: Container[str],
        image_pool: Executor,
    ) -> None:
        self.cfg = cfg
        self.options = options
        self.client = client
        self.sink = sink
        self.image_pool = image_pool  # decodes and encodes images; the loop's default pool keeps to file I/O
        self.prior = prior  # ids committed by earlier runs; read by the manifest's thread, never changed
        self.taken: set[str] = set()  # ids taken up in this run, to tell duplicates from resumed rows
        self.price = _price_or_none(cfg)
        self.base_dir = manifest_base_dir(options.manifest)
        self.model_in_body = cfg.endpoint.model if client.endpoint.sends_model else None
        self.tally = _Tally()
        self.queue: asyncio.Queue[ImageTask | None] = asyncio.Queue(
            QUEUE_ROWS_PER_WORKER * cfg.limits.concurrency
        )
        self.stopping = asyncio.Event()  # a signal came: read no more rows
        self.tasks: list[asyncio.Task[None]] = []
        self.stopped_because: str | None = None
        self.stop_code: int | None = None
        self.started = asyncio.get_running_loop().time()
        self.rows_total: int | None = None  # counted in a thread for the progress display

    def exit_code(self) -> int:
        if self.stop_code is not None:
            return self.stop_code
        return EXIT_ROW_ERRORS if self.tally.counts["error"] else EXIT_OK

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        signals = (signal.SIGINT, signal.SIGTERM) if self.options.handle_signals else ()
        for sig in signals:
            loop.add_signal_handler(sig, self.on_signal, sig.name)
        workers_done = asyncio.Event()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(
                    self.sink.flush_every(self.cfg.output.flush_seconds, workers_done), name="flusher"
                )
                workers = [
                    tg.create_task(self.work(), name=f"worker-{n}")
                    for n in range(self.cfg.limits.concurrency)
                ]
                self.tasks = [*workers, tg.create_task(self.produce(), name="producer")]
                counting = (
                    tg.create_task(self.count_total(), name="count-rows") if self.options.progress else None
                )
                if self.options.progress:
                    tg.create_task(show_progress(self.progress, workers_done), name="progress")
                if self.options.metrics_file is not None:
                    tg.create_task(
                        publish_metrics(self.options.metrics_file, self.progress, workers_done),
                        name="metrics",
                    )
                await asyncio.wait(workers)
                workers_done.set()
                if counting is not None:
                    counting.cancel()  # a --limit run on a huge manifest does not wait for the count
        except* RunAborted as group:
            log.error(
                "run stopped: %s",
                group.exceptions[0],
                extra={"event": "run_stopped", "exit_code": EXIT_REFUSED},
            )
            self.stop_code, self.stopped_because = EXIT_REFUSED, str(group.exceptions[0])
        except* OSError as group:
            self.output_failed(group.exceptions[0])
        except* ConfigError as group:  # the manifest turned out unreadable partway
            log.error(
                "run stopped: %s",
                group.exceptions[0],
                extra={"event": "run_stopped", "exit_code": EXIT_USAGE},
            )
            self.stop_code, self.stopped_because = EXIT_USAGE, str(group.exceptions[0])
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)
            if self.stop_code != EXIT_OUTPUT_FAILED:
                await self.flush_remaining()

    async def flush_remaining(self) -> None:
        """Commit every finished row, however the run ends."""
        try:
            async with asyncio.timeout(self.cfg.limits.grace_s):
                await self.sink.flush()
        except OSError as err:
            self.output_failed(err)
        except TimeoutError:
            log.error("committing the last %d rows took longer than limits.grace_s", self.sink.buffered_rows)

    def output_failed(self, err: BaseException) -> None:
        message = f"cannot write to {self.options.output}: {err}; the rows committed before stay valid"
        log.error("run stopped: %s", message, extra={"event": "run_stopped", "exit_code": EXIT_OUTPUT_FAILED})
        self.stop_code, self.stopped_because = EXIT_OUTPUT_FAILED, message

    def on_signal(self, signame: str) -> None:
        if self.stopping.is_set():
            log.warning("%s again: cancelling in-flight rows now", signame)
            self.cancel()
            return
        grace_s = self.cfg.limits.grace_s
        log.warning(
            "%s: reading and sending no more rows; requests on the wire get %g s to finish, then commit",
            signame,
            grace_s,
        )
        self.stopping.set()
        self.client.stop_sending()  # rows waiting for the budget or a retry would not finish in time
        self.stop_code, self.stopped_because = EXIT_INTERRUPTED, f"interrupted by {signame}"
        asyncio.get_running_loop().call_later(grace_s, self.cancel)

    def cancel(self) -> None:
        for task in self.tasks:
            task.cancel()  # a cancelled row is not committed: the next run sends it again

    async def commit(self, result: VisionResult) -> None:
        self.tally.add(result)
        log.debug(
            "row %r: %s after %d attempts", result.task.row_id, result.error or result.status, result.attempts
        )
        await self.sink.put(result)

    def progress(self) -> RunProgress:
        """How far the run has got, for the progress display and the metrics file."""
        tally, limits = self.tally, self.client.limits
        return RunProgress(
            elapsed_s=asyncio.get_running_loop().time() - self.started,
            rows_total=self.rows_total,
            rows_before=tally.skipped + tally.duplicates,
            rows_limit=self.options.limit,
            ok=tally.counts["ok"],
            filtered=tally.counts["filtered"],
            error=tally.counts["error"],
            prompt_tokens=tally.prompt_tokens,
            completion_tokens=tally.completion_tokens,
            cost_usd=round(tally.cost_usd, 6) if self.price else None,
            http_429s=self.client.http_429s,
            retries=sum(self.client.retries_by_cause.values()),
            paused_s=limits.paused_s,
            is_paused=limits.is_paused,
            tokens_per_minute=self.cfg.limits.tokens_per_minute,
        )

    async def count_total(self) -> None:
        """The manifest's row total for the display, counted in a thread: no request waits for it."""
        try:
            self.rows_total = await asyncio.to_thread(count_rows, self.options.manifest)
        except (
            ConfigError,
            OSError,
        ) as err:  # the producer reports an unreadable manifest; a total is optional
            log.debug("no row total for the progress display: %s", err)

    async def produce(self) -> None:
        """Queue each manifest row that is neither committed nor a duplicate; then one stop per worker."""
        limit = self.options.limit
        async for item in _stream_manifest(self.options.manifest, self.cfg, self.prior):
            if self.stopping.is_set() or (limit is not None and len(self.taken) >= limit):
                break
            if isinstance(item, Skipped) or item.row_id in self.prior:
                self.tally.skipped += 1
                continue
            if item.row_id in self.taken:
                self.tally.duplicates += 1
                log.warning("row %r: duplicate id again at manifest line %d, ignored", item.row_id, item.line)
                continue
            self.taken.add(item.row_id)
            if isinstance(item, ManifestError):
                log.warning("%s", item)
                await self.commit(_manifest_failure(item, self.cfg))
            else:
                await self.queue.put(item)  # waits while the workers are busy: back-pressure
        for _ in range(self.cfg.limits.concurrency):
            await self.queue.put(None)

    async def work(self) -> None:
        while (task := await self.queue.get()) is not None:
            if self.stopping.is_set():
                continue  # drain without sending: these rows stay uncommitted for the next run
            if (result := await self.serve(task)) is not None:
                await self.commit(result)

    async def serve(self, task: ImageTask) -> VisionResult | None:
        """One row from images to answer; a row's failure becomes its result, a run's failure raises.

        None: the run is stopping and the row was not sent; it stays uncommitted for the next run.
        """
        cfg, loop = self.cfg, asyncio.get_running_loop()
        started_at, started = time.time(), loop.time()
        estimated: int | None = None
        try:
            images = await _prepare_images(task, self.base_dir, cfg, self.image_pool)
            body = build_body(task, images, cfg.request, self.model_in_body)
            sizes = [(i.width, i.height) if i.width and i.height else None for i in images]
            estimated = count_prompt_tokens(body["messages"], sizes, cfg.endpoint.model)
            if (too_big := oversize_reason(estimated, cfg.request, cfg.limits)) is not None:
                raise ApiError(
                    task.row_id, too_big, status=None, kind=ErrorKind.OVER_BUDGET
                )  # the limiter could never admit it
            reserve = estimated + cfg.request.max_tokens
            result = _answered(
                task, await self.client.caption(task, body, reserve), cfg, estimated, self.price
            )
        except RunAborted:
            raise
        except NotSent:
            return None
        except RowError as err:
            result = _failed(task, err, cfg, estimated)
        except Exception as err:  # a surprise fails this row, not the run
            log.exception("row %r: unexpected error", task.row_id)
            result = _failed(
                task,
                RowError(task.row_id, f"unexpected {type(err).__name__}: {err}", kind=ErrorKind.UNEXPECTED),
                cfg,
                estimated,
            )
        return dataclasses.replace(
            result, started_at=started_at, finished_at=time.time(), latency_s=round(loop.time() - started, 4)
        )


LATENCY_PERCENTILES = (50, 90, 99)


def latency_percentiles(latencies_s: Sequence[float]) -> dict[str, float]:
    """p50, p90, p99 of row latencies in seconds (linear interpolation, as numpy and Arrow's default); {} for none."""
    ordered = sorted(latencies_s)
    if not ordered:
        return {}
    percentiles = {}
    for q in LATENCY_PERCENTILES:
        position = (len(ordered) - 1) * q / 100
        low = int(position)
        high = min(low + 1, len(ordered) - 1)
        percentiles[f"p{q}"] = round(ordered[low] + (ordered[high] - ordered[low]) * (position - low), 4)
    return percentiles


async def _stream_manifest(
    path: Path, cfg: RunConfig, skip: Container[str]
) -> AsyncIterator[ImageTask | ManifestError | Skipped]:
    """The manifest's rows, read in a thread a batch at a time so the loop never waits on the disk."""
    rows = read_manifest(path, cfg.request, skip)
    while batch := await asyncio.to_thread(lambda: list(islice(rows, MANIFEST_BATCH_ROWS))):
        for item in batch:
            yield item


async def _prepare_images(
    task: ImageTask, base_dir: Path, cfg: RunConfig, pool: Executor
) -> list[PreparedImage]:
    """The row's images ready to send, each decoded and encoded in `pool` (Pillow and libvips block).

    With images.fetch_remote, http(s) images are downloaded first, one after another over a session of
    this row's, and prepared like local files; otherwise they pass through as URLs. Threads, not
    processes: libvips and Pillow's decoders release the GIL, and a process pool prepared no more photos
    per second on 2 cores while it would copy every data URL back (bench/images_bench.py). Raises
    ImageError for the first image that fails, RowError when the images are too large together.
    """
    images, row_id, detail = cfg.images, task.row_id, task.detail
    downloads: dict[int, bytes] = {}
    remote = [n for n, ref in enumerate(task.images) if images.fetch_remote and is_remote_url(ref)]
    if remote:
        async with open_session(images) as session:
            for n in remote:
                downloads[n] = await fetch_image(session, task.images[n], images, row_id=row_id)

    def prepare(n: int, ref: str) -> PreparedImage:
        if n in downloads:
            return prepare_image_bytes(downloads[n], ref=ref, detail=detail, cfg=images, row_id=row_id)
        return prepare_image(ref, base_dir=base_dir, detail=detail, cfg=images, row_id=row_id)

    loop = asyncio.get_running_loop()
    jobs = [loop.run_in_executor(pool, prepare, n, ref) for n, ref in enumerate(task.images)]
    prepared = await asyncio.gather(*jobs)  # executor futures, not tasks: the images of a row in parallel
    check_request_size(prepared, cfg=images, row_id=row_id)
    return prepared


def _answered(
    task: ImageTask, outcome: Outcome, cfg: RunConfig, estimated: int, price: Price | None
) -> VisionResult:
    answer = outcome.answer
    return VisionResult(
        task=task,
        status=outcome.status,
        model=answer.model or cfg.endpoint.model,
        estimated_prompt_tokens=estimated,
        description=answer.description,
        finish_reason=answer.finish_reason,
        response_id=answer.response_id,
        usage=answer.usage,
        cost_usd=usage_cost_usd(answer.usage, price) if answer.usage and price else None,
        prompt_filter=answer.prompt_filter,
        completion_filter=answer.completion_filter,
        attempts=outcome.attempts,
        http_status=outcome.http_status,
    )


def _failed(task: ImageTask, err: RowError, cfg: RunConfig, estimated: int | None) -> VisionResult:
    return VisionResult(
        task=task,
        status="error",
        model=cfg.endpoint.model,
        estimated_prompt_tokens=estimated,
        attempts=err.attempts if isinstance(err, ApiError) else 0,
        http_status=err.status if isinstance(err, ApiError) else None,
        error=str(err),
    )


def _manifest_failure(err: ManifestError, cfg: RunConfig) -> VisionResult:
    task = ImageTask(row_id=err.row_id, images=(), prompt="", detail=cfg.request.detail, line=err.line)
    return VisionResult(task=task, status="error", model=cfg.endpoint.model, error=str(err))
