"""A Ray worker: the captioner over the blocks of rows the driver hands it, each block committed as a part.

``CaptionWorker`` is the body of an asyncio actor (``ray_run.py`` makes it one). It reads and prepares
its rows' images itself, so image CPU scales with the cluster, and sends through the live client under the
shared quota and spend cap (``shared_quota.py``). For each block it:

1. captions the rows, at most ``concurrency`` at once over all its blocks, journalling each answer as it
   comes (``journal.py``: one segment per block, ``_journal/<run_id>-w<NN>-<incarnation>-b<block>-*``,
   fsynced every ``journal.SYNC_EVERY_S`` as the local run's);
2. commits the finished rows as one part, ``part-<run_id>-w<NN>-<incarnation>-<block>.parquet``, with the
   sink's protocol (temp file, fsync, link: an existing name is never replaced). The incarnation is new
   each time Ray starts the actor, so a restarted worker never reuses a name;
3. drops the block's journal and returns what it committed (``BlockDone``).

A row not sent because the run is stopping (``NotSent``) or the cap is reached (``BudgetReached``) is left
out of the part: it is not committed, so the next run sends it. Nothing here imports Ray.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from pipeline.budget import Budget
from pipeline.captioner import Captioner, collect_garbage_less_often
from pipeline.client import open_session
from pipeline.config import RunConfig
from pipeline.images import image_threads
from pipeline.journal import Journal
from pipeline.pool import Pool, open_pool
from pipeline.pricing import Price
from pipeline.records import (
    BudgetReached,
    ConfigError,
    ImageTask,
    NotSent,
    RunAborted,
    TransportCounters,
    VisionResult,
)
from pipeline.shared_quota import SharedBudget, SharedLimits
from pipeline.sink import BASE_COLUMNS, result_to_row, rows_to_table, schema_with_extras, write_new_part
from pipeline.structured import load_structured

log = logging.getLogger(__name__)

KEEP_DONE_BLOCKS = 16  # finished blocks a worker still answers block_result for


@dataclass(frozen=True, slots=True)
class Block:
    """Rows the driver hands one worker, numbered in the run."""

    number: int
    tasks: tuple[ImageTask, ...]


@dataclass(frozen=True, slots=True)
class BlockDone:
    """What a worker did with a block: the part it committed and the rows in it, in order."""

    number: int
    incarnation: str  # of the worker that captioned it
    part: str | None  # None: no row of the block finished
    results: tuple[VisionResult, ...]  # the committed rows
    stop: tuple[str, str] | None = None  # ("refused" | "config" | "budget", why): the run must stop
    counters: TransportCounters = field(default_factory=TransportCounters)  # this worker's, so far


def part_name(run_id: str, worker: int, incarnation: str, block: int) -> str:
    """A part's name, unique to the run, the worker, its incarnation and the block; sorts by run first."""
    return f"part-{run_id}-w{worker:02d}-{incarnation}-{block:06d}.parquet"


def journal_name(run_id: str, worker: int, incarnation: str, block: int) -> str:
    """A block's journal segments are ``<this>-NNNNN.jsonl``; ``dead_block_journal`` finds them again."""
    return f"{run_id}-w{worker:02d}-{incarnation}-b{block:06d}"


def block_journal_pattern(run_id: str, block: int) -> str:
    """The journal segments of `block`, whichever worker and incarnation wrote them."""
    return f"{run_id}-w*-b{block:06d}-*.jsonl"


@dataclass(frozen=True, slots=True)
class WorkerSetup:
    """Everything a worker needs, picklable: Ray hands it to every incarnation."""

    cfg: RunConfig
    output: Path
    run_id: str
    worker: int
    base_dir: Path  # relative image paths are relative to the manifest's folder
    price: Price | None
    concurrency: int  # requests on the wire at once in this worker
    quota: Any  # the QuotaKeeper actor's handle
    budget: Any | None  # the BudgetKeeper actor's handle, with a spend cap
    # The driver's key, travelling in the actor's arguments (never a runtime_env, which Ray shows): a
    # worker node need not hold it in its environment.
    key: str | None = field(default=None, repr=False)


class CaptionWorker:
    """The body of the worker actor. Its aiohttp session and client are made in the actor's loop."""

    def __init__(self, setup: WorkerSetup) -> None:
        self.setup = setup
        self.incarnation = uuid.uuid4().hex[:8]  # new each time Ray starts this actor
        self._captioner: Captioner | None = None
        self._client: Pool | None = None
        self._session: aiohttp.ClientSession | None = None
        self._slots: asyncio.Semaphore | None = None
        self._rows: set[asyncio.Task[None]] = set()
        self._typed: tuple[Any, ...] = ()
        # Blocks running or done lately, for a driver that lost its call to a worker that did not die
        # (Ray's ActorUnavailableError: unreachable for a moment). Done ones are kept KEEP_DONE_BLOCKS deep.
        self._blocks: dict[int, asyncio.Task[BlockDone]] = {}

    def pid(self) -> int:
        """This incarnation's process id (the tests kill it)."""
        return os.getpid()

    async def _ready(self) -> tuple[Captioner, Pool, asyncio.Semaphore]:
        if self._captioner is None:
            collect_garbage_less_often()  # this actor's process captions
            setup, cfg = self.setup, self.setup.cfg
            structured = load_structured(cfg)
            self._typed = () if structured is None else tuple(structured.columns)
            lim = cfg.limits
            budget = (
                Budget(None, setup.price)  # no cap: count only, no round trips
                if setup.budget is None or lim.max_cost_usd is None or setup.price is None
                else SharedBudget(setup.budget, lim.max_cost_usd, setup.price)
            )
            self._session = open_session(setup.concurrency)  # tells the keeper when each request is sent
            self._client = open_pool(
                cfg,
                {cfg.endpoint.name: setup.key},
                self._session,
                budget,
                limits_for=lambda m: SharedLimits(setup.quota, m.tokens_per_minute, m.requests_per_minute),
            )
            pool = ThreadPoolExecutor(image_threads(cfg.images), thread_name_prefix="images")
            self._captioner = Captioner(
                cfg,
                self._client,
                base_dir=setup.base_dir,
                image_pool=pool,
                price=setup.price,
                structured=structured,
            )
            self._slots = asyncio.Semaphore(setup.concurrency)
        assert self._client is not None and self._slots is not None
        return self._captioner, self._client, self._slots

    def stop(self) -> None:
        """The run is stopping: send nothing more; requests on the wire finish and are committed."""
        if self._client is not None:
            self._client.stop_sending()

    async def close(self) -> None:
        """The run is over: close the connections."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    def cancel(self) -> None:
        """The grace is over: cancel the rows in flight (their blocks still commit what finished)."""
        for task in list(self._rows):
            task.cancel()

    async def caption_block(self, block: Block) -> BlockDone:
        """Caption `block`'s rows, commit the finished ones as one part; see the module docstring."""
        running = asyncio.get_running_loop().create_task(self._caption(block), name=f"block-{block.number}")
        self._blocks[block.number] = running
        for number in sorted(n for n, task in self._blocks.items() if task.done())[:-KEEP_DONE_BLOCKS]:
            del self._blocks[number]
        return await asyncio.shield(running)  # a lost call does not cancel the block: see block_result

    async def block_result(self, number: int) -> BlockDone | None:
        """What became of block `number` in this incarnation (waiting for it if it is still running), or
        None when this incarnation never had it: the one that did is dead."""
        running = self._blocks.get(number)
        return None if running is None else await asyncio.shield(running)

    async def _caption(self, block: Block) -> BlockDone:
        captioner, client, slots = await self._ready()
        setup = self.setup
        journal = Journal(
            setup.output,
            setup.run_id,
            self._typed,
            name=journal_name(setup.run_id, setup.worker, self.incarnation, block.number),
        )
        finished: list[VisionResult] = []
        finished_rows: list[dict[str, Any]] = []  # their output rows, journalled and then committed
        stops: list[tuple[str, str]] = []

        async def caption(task: ImageTask) -> None:
            async with slots:
                try:
                    result = await captioner.caption(task)
                except NotSent:
                    return  # the run is stopping: the row stays for the next run
                except BudgetReached:
                    stops.append(("budget", "spend cap reached"))
                    client.stop_sending()
                    return
                except RunAborted as err:
                    stops.append(("refused", str(err)))
                    client.stop_sending()
                    return
                except ConfigError as err:
                    stops.append(("config", str(err)))
                    client.stop_sending()
                    return
            row = result_to_row(result, setup.run_id)
            journal.append(row)  # paid for: a kill from here loses nothing
            finished.append(result)
            finished_rows.append(row)

        rows_done = asyncio.Event()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(journal.sync_every(rows_done), name="journal-sync")  # for a power cut
                rows = [tg.create_task(caption(task), name=f"row-{task.row_id}") for task in block.tasks]
                for row in rows:
                    self._rows.add(row)
                    row.add_done_callback(self._rows.discard)
                await asyncio.wait(rows)
                rows_done.set()
        finally:
            journal.rotate()  # every row written so far is about to be in the part
        part = None
        if finished:
            part = part_name(setup.run_id, setup.worker, self.incarnation, block.number)
            await asyncio.to_thread(self._commit, part, finished, finished_rows)
        journal.committed(len(finished))
        journal.close(is_all_committed=True)
        stop = stops[0] if stops else None
        return BlockDone(block.number, self.incarnation, part, tuple(finished), stop, client.counters())

    def _commit(self, part: str, results: list[VisionResult], rows: list[dict[str, Any]]) -> None:
        extras = dict.fromkeys(k for result in results for k in result.task.extra if k not in BASE_COLUMNS)
        write_new_part(self.setup.output, part, rows_to_table(rows, schema_with_extras(extras, self._typed)))
        log.info("committed %s: %d rows", part, len(rows))


def without(block: Block, row_ids: frozenset[str], number: int) -> Block:
    """`block` renumbered `number`, less `row_ids` (rows a dead worker committed or journalled)."""
    return dataclasses.replace(
        block, number=number, tasks=tuple(t for t in block.tasks if t.row_id not in row_ids)
    )
