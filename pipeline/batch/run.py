"""A batch run's start and end: the output opened, the engine wired and run, signals, the summary.

``run_batch`` is what ``runner.run`` calls for ``endpoint.mode = "batch"``, inside the output lock; the
work itself is ``engine.BatchEngine``. SIGINT/SIGTERM stop the engine where it is (exit 130): jobs already
created keep running at the service, and the next run collects them. A spend cap reached (``spend.py``)
ends the run with exit 5 and live mode's message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import aiohttp

from pipeline import checkpoint
from pipeline.batch.api import BatchApi, surface_for
from pipeline.batch.engine import BatchEngine
from pipeline.config import RunConfig
from pipeline.exits import EXIT_BUDGET, EXIT_INTERRUPTED, EXIT_OK, EXIT_ROW_ERRORS
from pipeline.images import image_threads
from pipeline.pricing import Price
from pipeline.records import FAILED_STATUSES, ConfigError
from pipeline.run_rows import budget_reached
from pipeline.runner import RunOptions, finish_run, open_run_output
from pipeline.sink import Sink
from pipeline.structured import Structured
from pipeline.summary import RunSummary, tally_fields

log = logging.getLogger(__name__)


async def run_batch(
    cfg: RunConfig, options: RunOptions, key: str | None, price: Price | None, structured: Structured | None
) -> RunSummary:
    """Caption the manifest's rows not yet committed through the Batch API (module docstring).

    Raises ConfigError (exit 2) for a setting the service cannot serve, before anything is uploaded.
    """
    if options.no_wait and cfg.endpoint.provider == "emulator":
        raise ConfigError(
            f"{cfg.source}: --no-wait: provider 'emulator' runs inside this process and its "
            "batches end with it; point endpoint.url at a running `vision-pipeline emulator`"
        )
    loop = asyncio.get_running_loop()
    started_at, started = time.time(), loop.time()
    recovered, resume = await open_run_output(cfg, options, structured, started_at)
    async with contextlib.AsyncExitStack() as stack:
        if cfg.endpoint.provider == "emulator":
            from pipeline.emulator.for_run import start_emulators  # only this provider needs the server

            cfg = await start_emulators(cfg, {cfg.endpoint.name: key}, stack)
        session = await stack.enter_async_context(aiohttp.ClientSession())
        pool = ThreadPoolExecutor(image_threads(cfg.images), thread_name_prefix="images")
        stack.callback(pool.shutdown, wait=True, cancel_futures=True)
        api = BatchApi(session, surface_for(cfg.endpoint, key), cfg.limits)
        typed = () if structured is None else structured.columns
        sink = Sink(options.output, cfg.output, resume.run_id, typed_columns=typed)
        engine = BatchEngine(cfg, options, api, sink, resume.skip, resume.run_id, pool, price, structured)
        interrupted = await _run_until_signal(engine, options.handle_signals, cfg.limits.grace_s)
    if resume.retrying:  # --retry-failed: newer rows replace the error rows they retried
        superseded = await asyncio.to_thread(checkpoint.compact, options.output)
        log.info("retried rows replaced %d earlier error rows", superseded)
    tally, duration_s = engine.tally, loop.time() - started
    is_failed = any(tally.counts[status] for status in FAILED_STATUSES)
    spend = engine.spend
    is_cap_reached = engine.is_cap_reached and not interrupted
    if is_cap_reached:
        engine.stopped_because = await budget_reached(cfg, options.manifest, options.output, spend.spent_usd)
    exit_code = EXIT_ROW_ERRORS if is_failed else EXIT_OK
    if is_cap_reached:
        exit_code = EXIT_BUDGET  # wins over 1, as in live mode
    if interrupted:
        exit_code = EXIT_INTERRUPTED
    summary = RunSummary(
        output=options.output,
        run_id=resume.run_id,
        **tally_fields(tally, duration_s, is_priced=price is not None),
        retries=0,
        pauses=0,
        paused_s=0.0,
        exit_code=exit_code,
        stopped_because=engine.stopped_because,
        recovered_rows=recovered.rows,
        recovered_cost_usd=recovered.cost_usd,
        spend_usd=round(spend.spent_usd, 6) if price else None,
        max_cost_usd=cfg.limits.max_cost_usd,
        spend_of_earlier_runs_usd=round(spend.earlier_usd, 6) if price else None,
        held_usd=round(spend.held_usd, 6) if price else None,
    )
    return await finish_run(summary)


async def _run_until_signal(engine: BatchEngine, handle_signals: bool, grace_s: float) -> bool:
    """Run `engine`; SIGINT/SIGTERM stop it where it is. Jobs already created keep running at the service
    and the next run collects them; rows collected so far are committed. Whether a signal stopped it."""
    loop, current = asyncio.get_running_loop(), asyncio.current_task()
    signals = (signal.SIGINT, signal.SIGTERM) if handle_signals else ()
    received: list[str] = []

    def on_signal(name: str) -> None:
        received.append(name)
        if current is not None:
            current.cancel()

    for sig in signals:
        loop.add_signal_handler(sig, on_signal, sig.name)
    try:
        await engine.run()
    except asyncio.CancelledError:
        if not received or current is None:
            raise
        current.uncancel()
        engine.stopped_because = f"interrupted by {received[0]}: created jobs keep running at the service; the next run collects them"
        log.warning("run stopped: %s", engine.stopped_because)
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        async with asyncio.timeout(grace_s):
            await engine.sink.flush()  # what was collected so far; the rest is read again by the next run
    return bool(received)
