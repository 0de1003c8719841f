"""Wiring the stages together: one producer, a bounded queue, N workers, one sink, under one TaskGroup.

Lifecycle: open the output (skip committed ids), start the emulator when asked, caption every row,
commit, write ``_stats.json``. SIGINT/SIGTERM stop the producer, give in-flight requests
``limits.grace_s`` to finish, flush, and exit 130; a second signal cancels in-flight requests at once
(still committing every finished row).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pipeline import checkpoint
from pipeline.budget import Budget
from pipeline.captioner import Captioner
from pipeline.client import open_session
from pipeline.config import RunConfig, api_key_of
from pipeline.exits import (
    EXIT_BUDGET,
    EXIT_INTERRUPTED,
    EXIT_OUTPUT_FAILED,
    EXIT_REFUSED,
    EXIT_USAGE,
)
from pipeline.idset import IdSet
from pipeline.images import image_threads, reuse_freed_image_memory
from pipeline.journal import JOURNAL_DIR, Journal, Recovered, recover
from pipeline.manifest import count_rows, manifest_base_dir, manifest_columns
from pipeline.metrics import publish_metrics
from pipeline.pool import open_pool
from pipeline.pricing import Price, price_for_run
from pipeline.progress import show_progress
from pipeline.records import (
    BudgetReached,
    ConfigError,
    ImageTask,
    ManifestError,
    NotSent,
    RunAborted,
    RunProgress,
    VisionResult,
)
from pipeline.results import manifest_failure
from pipeline.run_rows import budget_reached, rows_to_send
from pipeline.sink import STATS_FILE, Sink, write_json_atomic
from pipeline.structured import Structured, check_manifest_columns, load_structured
from pipeline.summary import (
    Outcome,
    RunSummary,
    Tally,
    describe_endpoints,
    endpoint_stats,
    latency_percentiles,
    summary_as_dict,
    tally_fields,
)
from pipeline.tokens import load_encoding

log = logging.getLogger(__name__)

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
    no_wait: bool = False  # batch mode: submit the jobs and return; a later run collects them
    engine: Literal["local", "ray"] = "local"  # ray: the captioner in Ray actors (ray_run.py)
    workers: int = 2  # --engine ray: CaptionWorker actors
    worker_cpus: float = 0.5  # --engine ray: the CPU share each worker asks Ray for
    ray_address: str | None = None  # --engine ray: a cluster ("auto": this machine's); None: a local Ray


async def run(cfg: RunConfig, options: RunOptions) -> RunSummary:
    """Caption every row of the manifest not yet committed in the output.

    Raises ConfigError for bad settings, before anything is sent, and OSError when the output cannot be
    written. Every other way a run ends is in the summary's exit_code and stopped_because.
    """
    structured = load_structured(cfg)  # a schema or a format the service would refuse stops us here
    if structured is not None:
        check_manifest_columns(structured, manifest_columns(options.manifest), cfg.source)
    keys = {m.name: api_key_of(m.endpoint, cfg.source) for m in cfg.pool}  # a missing key stops us here
    if options.engine == "ray":
        if cfg.endpoint.mode == "batch":
            raise ConfigError(
                f"{cfg.source}: endpoint.mode = 'batch' runs no workers; --engine ray is for live mode"
            )
        if len(cfg.pool) > 1:
            raise ConfigError(
                f"{cfg.source}: [[endpoints]]: --engine ray sends to one endpoint; run a pool with --engine local"
            )
        from pipeline.ray_cluster import import_ray

        import_ray()  # so does a missing Ray extra
    # a spend cap needs a price: without one the run stops here, naming the file to edit
    price = price_for_run(cfg) if cfg.limits.max_cost_usd is not None else _price_or_none(cfg)
    with checkpoint.output_lock(options.output):
        if cfg.endpoint.mode == "batch":
            from pipeline.batch.run import run_batch  # the Batch API transport (pipeline/batch/)

            return await run_batch(cfg, options, keys[cfg.endpoint.name], price, structured)
        return await _run_locked(cfg, options, keys, price, structured)


async def _run_locked(
    cfg: RunConfig,
    options: RunOptions,
    keys: dict[str, str | None],
    price: Price | None,
    structured: Structured | None,
) -> RunSummary:
    loop = asyncio.get_running_loop()
    started_at, started = time.time(), loop.time()
    # building the text encoding (~40 ms), in a thread while the output and the manifest are read;
    # the producer waits for it before the first row goes to a worker
    encoding_ready = loop.run_in_executor(None, load_encoding, cfg.endpoint.model)
    recovered, resume = await open_run_output(cfg, options, structured, started_at)
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
        if any(m.endpoint.provider == "emulator" for m in cfg.pool):
            from pipeline.emulator.for_run import start_emulators  # only this provider needs the server

            cfg = await start_emulators(cfg, keys, stack)
        if options.engine == "ray":
            from pipeline.ray_run import caption_on_ray  # the optional extra: imported when asked for

            stages = await caption_on_ray(cfg, options, run_id, keys[cfg.endpoint.name], resume.skip, price)
        else:
            stages = await _caption_locally(
                cfg, options, (keys, price, structured), resume.skip, run_id, stack, encoding_ready
            )
    await encoding_ready  # done by now; a failure to build it is not left unseen
    if stages.stop_code == EXIT_BUDGET:
        stages.stopped_because = await budget_reached(cfg, options.manifest, options.output, stages.spent_usd)
    counters = stages.counters
    if resume.retrying and stages.stop_code != EXIT_OUTPUT_FAILED:
        superseded = await asyncio.to_thread(checkpoint.compact, options.output)
        log.info("retried rows replaced %d earlier error rows", superseded)
    tally = stages.tally
    duration_s = loop.time() - started
    summary = RunSummary(
        output=options.output,
        run_id=run_id,
        **tally_fields(tally, duration_s, is_priced=price is not None),
        retries=tally.retries,
        pauses=counters.pauses,
        paused_s=round(counters.paused_s, 3),
        exit_code=stages.exit_code(),
        stopped_because=stages.stopped_because,
        http_429s=counters.http_429s,
        retries_by_cause=dict(sorted(counters.retries_by_cause.items())),
        latency_percentiles_s=latency_percentiles(tally.latencies_s),
        spend_usd=round(stages.spent_usd, 6) if price else None,
        recovered_rows=recovered.rows,
        recovered_cost_usd=recovered.cost_usd,
        max_cost_usd=cfg.limits.max_cost_usd,
        endpoints=endpoint_stats(counters.endpoints, duration_s),
    )
    return await finish_run(summary)


async def finish_run(summary: RunSummary) -> RunSummary:
    """Log the run's end and write ``_stats.json`` (a failure to write it is logged, not raised)."""
    stats = summary_as_dict(summary)
    log.info(
        "run %s finished with exit code %d",
        summary.run_id,
        summary.exit_code,
        extra={"event": "run_finished", **stats},
    )
    for line in describe_endpoints(summary.endpoints):
        log.info("%s", line, extra={"event": "endpoint_summary"})
    try:
        await asyncio.to_thread(write_json_atomic, summary.output / STATS_FILE, stats)
    except OSError as err:
        log.error("could not write %s: %s", STATS_FILE, err)
    return summary


async def open_run_output(
    cfg: RunConfig, options: RunOptions, structured: Structured | None, started_at: float
) -> tuple[Recovered, checkpoint.Resume]:
    """Commit what a killed run journalled, then open the output for this run (``checkpoint.open_output``).

    Every engine starts here (the local one, the batch one)."""
    recovered = Recovered()
    if (options.output / JOURNAL_DIR).is_dir():  # a run before this one was killed: commit what it paid for
        recovered = await asyncio.to_thread(recover, options.output)
    resume = await asyncio.to_thread(
        functools.partial(
            checkpoint.open_output,
            options.output,
            cfg,
            options.manifest,
            started_at,
            retry_failed=options.retry_failed,
            new_run=options.new_run,
            answer_format=None if structured is None else structured.fingerprint,
        )
    )
    return recovered, resume


async def _caption_locally(
    cfg: RunConfig,
    options: RunOptions,
    request: tuple[dict[str, str | None], Price | None, Structured | None],  # keys by endpoint, price, format
    skip: IdSet,
    run_id: str,
    stack: contextlib.AsyncExitStack,
    encoding_ready: asyncio.Future[None],
) -> Outcome:
    """The local engine: the captioner in this process's loop (see the module docstring)."""
    keys, price, structured = request
    session = await stack.enter_async_context(open_session(cfg.limits.concurrency))
    budget = Budget(cfg.limits.max_cost_usd, price)
    client = open_pool(cfg, keys, session, budget)
    reuse_freed_image_memory()
    image_pool = ThreadPoolExecutor(image_threads(cfg.images), thread_name_prefix="images")
    stack.callback(image_pool.shutdown, wait=True, cancel_futures=True)
    base_dir = manifest_base_dir(options.manifest)
    captioner = Captioner(
        cfg, client, base_dir=base_dir, image_pool=image_pool, price=price, structured=structured
    )
    typed = () if structured is None else structured.columns
    journal = Journal(options.output, run_id, typed)
    sink = Sink(options.output, cfg.output, run_id, journal=journal, typed_columns=typed)
    stages = _Stages(cfg, options, captioner, budget, sink, skip, encoding_ready)
    try:
        await stages.run()
    finally:  # rows still buffered (the output could not be written) stay journalled for the next run
        await asyncio.to_thread(journal.close, is_all_committed=sink.buffered_rows == 0)
    return Outcome(
        stages.tally, client.counters(), budget.spent_usd, stages.stop_code, stages.stopped_because
    )


def _price_or_none(cfg: RunConfig) -> Price | None:
    try:
        return price_for_run(cfg)
    except ConfigError as err:
        log.warning("costs will not be computed: %s", err)
        return None


class _Stages:
    """One run's producer, workers and sink, and how they stop."""

    def __init__(
        self,
        cfg: RunConfig,
        options: RunOptions,
        captioner: Captioner,
        budget: Budget,
        sink: Sink,
        prior: IdSet,
        encoding_ready: asyncio.Future[None],
    ) -> None:
        self.cfg = cfg
        self.options = options
        self.captioner = captioner
        self.transport = captioner.transport
        self.budget = budget
        self.sink = sink
        self.prior = prior  # ids committed by earlier runs; read by the manifest's thread, never changed
        self.encoding_ready = encoding_ready  # the text encoding the workers' token counts need
        self.taken: set[str] = set()  # ids taken up in this run, to tell duplicates from resumed rows
        self.tally = Tally()
        self.queue: asyncio.Queue[ImageTask | None] = asyncio.Queue(
            QUEUE_ROWS_PER_WORKER * cfg.limits.concurrency
        )
        self.stopping = asyncio.Event()  # a signal came: read no more rows
        self.tasks: list[asyncio.Task[None]] = []
        self.stopped_because: str | None = None
        self.stop_code: int | None = None
        self.started = asyncio.get_running_loop().time()
        self.rows_total: int | None = None  # counted in a thread for the progress display

    def on_budget_reached(self) -> None:
        """The spend cap has no room for the next row: read and send nothing more; what is on the wire
        finishes and is committed."""
        if self.stopping.is_set():
            return
        log.info("spend cap reached: sending no more rows; requests on the wire finish and are committed")
        self.stopping.set()
        self.transport.stop_sending()
        self.stop_code = EXIT_BUDGET

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
                if self.sink.journal is not None:
                    tg.create_task(self.sink.journal.sync_every(workers_done), name="journal-sync")
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
        self.transport.stop_sending()  # rows waiting for the budget or a retry would not finish in time
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
        tally, counters = self.tally, self.transport.counters()
        return RunProgress(
            elapsed_s=asyncio.get_running_loop().time() - self.started,
            rows_total=self.rows_total,
            rows_before=tally.skipped + tally.duplicates,
            rows_limit=self.options.limit,
            ok=tally.counts["ok"],
            filtered=tally.counts["filtered"],
            error=tally.counts["error"],
            refused=tally.counts["refused"],
            invalid_output=tally.counts["invalid_output"],
            prompt_tokens=tally.prompt_tokens,
            completion_tokens=tally.completion_tokens,
            cost_usd=round(tally.cost_usd, 6) if self.captioner.price else None,
            http_429s=counters.http_429s,
            retries=sum(counters.retries_by_cause.values()),
            paused_s=counters.paused_s,
            is_paused=counters.is_paused,
            tokens_per_minute=self.cfg.limits.tokens_per_minute,
            spend_usd=self.budget.spent_usd if self.captioner.price else None,
            max_cost_usd=self.budget.max_cost_usd,
            endpoints=counters.endpoints,
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
        rows = rows_to_send(
            self.options.manifest, self.options.limit, self.cfg, self.prior, self.tally, self.taken
        )
        async for item in rows:
            if self.stopping.is_set():
                break
            if isinstance(item, ManifestError):
                await self.commit(manifest_failure(item, self.cfg))
            else:
                await self.encoding_ready  # counting tokens in a worker would otherwise block the loop
                await self.queue.put(item)  # waits while the workers are busy: back-pressure
        for _ in range(self.cfg.limits.concurrency):
            await self.queue.put(None)

    async def work(self) -> None:
        while (task := await self.queue.get()) is not None:
            if self.stopping.is_set():
                continue  # drain without sending: these rows stay uncommitted for the next run
            try:
                result = await self.captioner.caption(task)
            except NotSent:
                continue  # the run is stopping; the row stays uncommitted for the next run
            except BudgetReached:
                self.on_budget_reached()
                continue  # not sent: the row stays uncommitted for the next run
            await self.commit(result)
