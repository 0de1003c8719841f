"""The Ray engine's driver: the run's rows handed to ``CaptionWorker`` actors in blocks, exactly once.

``runner.run`` does what every run does (the output lock, the journal's recovery, ``_run.json``, the
emulator, the summary); with ``--engine ray`` it calls ``caption_on_ray`` in place of the local engine:

- **Actors.** One ``QuotaKeeper`` for the endpoint and, with a spend cap, one ``BudgetKeeper``
  (``shared_quota.py``); ``options.workers`` ``CaptionWorker`` actors (``ray_worker.py``), each asking Ray
  for ``options.worker_cpus`` of a CPU and restarted by Ray when its process dies.
- **Rows.** The driver streams the manifest as the local engine does (committed ids and duplicates
  skipped, bad rows committed as errors) and hands out blocks of at most ``MAX_BLOCK_ROWS`` rows, at most
  ``BLOCKS_PER_WORKER`` per worker at a time: the driver holds a few blocks, whatever the manifest's size.
- **A dead worker.** Its block's call fails. The driver commits what the block's journal holds (answers
  paid for, not yet in a part), reads this run's parts it has not been told of for the block's ids (the
  worker may have committed its part and died before answering), and hands the other rows out again.
  A row is in one block at a time, so it is never committed twice.
- **Stopping.** SIGINT/SIGTERM, a refused endpoint, an unwritable output or the spend cap: no more blocks;
  every worker stops sending; requests on the wire get ``limits.grace_s``, their rows are committed, the
  rest stay for the next run; a second signal cancels them at once. Exit codes are the local run's.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import signal
import warnings
from collections import Counter, deque
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import pyarrow.parquet as pq

from pipeline.checkpoint import fingerprint
from pipeline.config import RunConfig
from pipeline.exits import EXIT_BUDGET, EXIT_INTERRUPTED, EXIT_OUTPUT_FAILED, EXIT_REFUSED, EXIT_USAGE
from pipeline.idset import IdSet
from pipeline.journal import JOURNAL_DIR, recover
from pipeline.manifest import manifest_base_dir
from pipeline.pricing import Price
from pipeline.ray_cluster import connected, import_ray
from pipeline.ray_worker import Block, BlockDone, CaptionWorker, WorkerSetup, block_journal_pattern, without
from pipeline.records import ImageTask, ManifestError, TransportCounters
from pipeline.results import manifest_failure
from pipeline.run_rows import rows_to_send
from pipeline.runner import RunOptions
from pipeline.shared_quota import BudgetKeeper, QuotaKeeper
from pipeline.sink import result_to_row, rows_to_table, schema_with_extras, write_new_part
from pipeline.summary import Outcome, Tally

log = logging.getLogger(__name__)

MAX_BLOCK_ROWS = 64  # rows in a block, and so in a Ray part (fewer when output.rows_per_part is smaller)
CLOSE_WAIT_S = 5.0  # how long workers get to close their connections at the end
RESTART_WAIT_S = 120.0  # how long a lost block waits for its worker to answer again before it counts as dead
RESTART_POLL_S = 0.2  # how often a dead worker is asked whether Ray has restarted it
BLOCKS_PER_WORKER = 2  # blocks handed to a worker at once: one captioned while the other waits
STOP_CODES = {
    "refused": EXIT_REFUSED,
    "config": EXIT_USAGE,
    "budget": EXIT_BUDGET,
    "output": EXIT_OUTPUT_FAILED,
}


async def caption_on_ray(
    cfg: RunConfig,
    options: RunOptions,
    run_id: str,
    key: str | None,
    skip: IdSet,
    price: Price | None,
) -> Outcome:
    """Caption the rows not in `skip` on Ray (see the module docstring). Raises ConfigError without Ray."""
    with connected(options.ray_address, options.output):
        driver = _Driver(cfg, options, run_id, key, skip, price)
        try:
            await driver.run()
            return await driver.outcome()
        finally:
            await driver.release()


def _actor_classes(ray: Any) -> tuple[Any, Any, Any]:
    """The quota keeper, budget keeper and worker as Ray actor classes."""

    class QuotaActor(QuotaKeeper):
        def __init__(self, tokens_per_minute: int, requests_per_minute: int) -> None:
            with warnings.catch_warnings():  # Ray 2.60 warns about its own use of a deprecated API here
                warnings.simplefilter("ignore", DeprecationWarning)
                restarted = bool(ray.get_runtime_context().was_current_actor_reconstructed)
            super().__init__(tokens_per_minute, requests_per_minute, is_restart=restarted)

    quota = ray.remote(QuotaActor).options(num_cpus=0, max_restarts=-1, max_task_retries=-1)
    budget = ray.remote(BudgetKeeper).options(num_cpus=0, max_restarts=0)
    return quota, budget, ray.remote(CaptionWorker)


class _Driver:
    """One Ray run's dispatch loop and how it stops."""

    def __init__(
        self,
        cfg: RunConfig,
        options: RunOptions,
        run_id: str,
        key: str | None,
        skip: IdSet,
        price: Price | None,
    ) -> None:
        ray = self.ray = import_ray()
        self.cfg, self.options, self.run_id, self.skip = cfg, options, run_id, skip
        self.tally = Tally()
        self.stop_code: int | None = None
        self.stopped_because: str | None = None
        self.stopping = asyncio.Event()
        self.cancelled_at: float | None = None
        self.failure: BaseException | None = None
        quota_class, budget_class, worker_class = _actor_classes(ray)
        self.quota = quota_class.remote(cfg.limits.tokens_per_minute, cfg.requests_per_minute)
        capped = cfg.limits.max_cost_usd is not None and price is not None
        self.budget = budget_class.remote(cfg.limits.max_cost_usd, price) if capped else None
        concurrency = math.ceil(cfg.limits.concurrency / options.workers)
        # unique on a shared cluster: two outputs may start a run in the same second
        name = f"vision-pipeline-{fingerprint(str(options.output.resolve()))[:8]}-{run_id}"
        self.workers = [
            worker_class.options(
                name=f"{name}-worker-{n}", num_cpus=options.worker_cpus, max_restarts=-1, max_task_retries=0
            ).remote(
                WorkerSetup(
                    cfg,
                    options.output,
                    run_id,
                    n,
                    manifest_base_dir(options.manifest),
                    price,
                    concurrency,
                    self.quota,
                    self.budget,
                    key,
                )
            )
            for n in range(options.workers)
        ]
        self.block_rows = max(1, min(MAX_BLOCK_ROWS, cfg.output.rows_per_part))
        self.numbers = itertools.count(1)
        self.in_flight: dict[asyncio.Future[Any], tuple[int, Block]] = {}
        self.redo: deque[Block] = deque()  # rows of dead workers' blocks, handed out first
        self.known_parts: set[str] = set()  # parts the workers reported: their ids need no reading
        self.counters: dict[tuple[int, str], TransportCounters] = {}
        self.taken: set[str] = set()
        self.failures: list[dict[str, Any]] = []  # bad manifest rows, committed by the driver
        self.recovering = asyncio.Lock()
        self.restarting: dict[int, asyncio.Task[None]] = {}  # dead workers, until Ray has restarted them
        self.recoveries: set[asyncio.Task[None]] = set()  # blocks whose call failed, being looked into
        self.deaths = 0

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        signals = (signal.SIGINT, signal.SIGTERM) if self.options.handle_signals else ()
        for sig in signals:
            loop.add_signal_handler(sig, self.on_signal, sig.name)
        rows = self.rows()
        try:
            is_exhausted = False
            while True:
                if not self.stopping.is_set():
                    is_exhausted = await self.hand_out(rows, is_exhausted)
                is_waiting_for_restart = bool(self.redo and self.restarting) and not self.stopping.is_set()
                if not self.in_flight and not self.recoveries and not is_waiting_for_restart:
                    break
                stop_wait = loop.create_task(self.stopping.wait(), name="stop-wait")
                timeout = None if self.cancelled_at is None else self.cancelled_at + self.cfg.limits.grace_s
                try:
                    done, _ = await asyncio.wait(
                        [*self.in_flight, *self.restarting.values(), *self.recoveries, stop_wait],
                        timeout=None if timeout is None else max(0.0, timeout - loop.time()),
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                finally:
                    stop_wait.cancel()
                if not done:
                    log.error(
                        "%d blocks did not end after they were cancelled: left to the next run",
                        len(self.in_flight),
                    )
                    break
                for worker, probe in list(self.restarting.items()):
                    if probe.done():
                        del self.restarting[worker]
                for future in [f for f in done if f in self.in_flight]:
                    await self.finished(future)
                for lost in [task for task in self.recoveries if task.done()]:
                    self.recoveries.discard(lost)
                    lost.result()  # a fault while recovering ends the run
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)
            for probe in [*self.restarting.values(), *self.recoveries]:
                probe.cancel()
            await rows.aclose()
            await asyncio.to_thread(self.commit_failures)
        if self.failure is not None:
            raise self.failure

    async def hand_out(self, rows: AsyncIterator[ImageTask], is_exhausted: bool) -> bool:
        """Give every live worker blocks up to BLOCKS_PER_WORKER, rows of dead workers' blocks first;
        returns whether the manifest has no rows left."""
        load = Counter(n for n, _ in self.in_flight.values())
        ready = [n for n in range(len(self.workers)) if n not in self.restarting]
        for worker in sorted(ready, key=lambda n: load[n]):
            while load[worker] < BLOCKS_PER_WORKER:
                if self.redo:
                    block = self.redo.popleft()
                elif is_exhausted:
                    return True
                else:
                    tasks = [task async for task in _take(rows, self.block_rows)]
                    if not tasks:
                        return True
                    block = Block(next(self.numbers), tuple(tasks))
                ref = self.workers[worker].caption_block.remote(block)
                self.in_flight[asyncio.wrap_future(ref.future())] = (worker, block)
                load[worker] += 1
        return is_exhausted

    async def wait_restarted(self, worker: int) -> None:
        """Until Ray has restarted `worker` (it answers again): no block is handed to it meanwhile."""
        while True:
            try:
                await asyncio.wrap_future(self.workers[worker].pid.remote().future())
                return
            except self.ray.exceptions.RayActorError:
                await asyncio.sleep(RESTART_POLL_S)  # Ray tells no one when the actor is back

    async def rows(self) -> AsyncGenerator[ImageTask, None]:
        """The rows to send (as the local engine's); bad rows are committed by the driver."""
        rows = rows_to_send(
            self.options.manifest, self.options.limit, self.cfg, self.skip, self.tally, self.taken
        )
        async for item in rows:
            if isinstance(item, ManifestError):
                result = manifest_failure(item, self.cfg)
                self.tally.add(result)
                self.failures.append(result_to_row(result, self.run_id))
                if len(self.failures) >= self.block_rows:
                    await asyncio.to_thread(self.commit_failures)
            else:
                yield item

    def commit_failures(self) -> None:
        """Commit the bad manifest rows gathered so far in a part of the driver's. Blocking."""
        if not self.failures:
            return
        rows, self.failures = self.failures, []
        extras = dict.fromkeys(key for row in rows for key in row)
        name = f"part-{self.run_id}-m{next(self.numbers):06d}.parquet"
        write_new_part(self.options.output, name, rows_to_table(rows, schema_with_extras(extras)))

    async def finished(self, future: asyncio.Future[Any]) -> None:
        worker, block = self.in_flight.pop(future)
        try:
            done: BlockDone = future.result()
        except self.ray.exceptions.RayActorError as err:
            if worker not in self.restarting:
                probe = asyncio.get_running_loop().create_task(
                    self.wait_restarted(worker), name=f"restart-{worker}"
                )
                self.restarting[worker] = probe
            lost = asyncio.get_running_loop().create_task(
                self.lost(worker, block, err), name=f"lost-block-{block.number}"
            )
            self.recoveries.add(lost)
            return
        except self.ray.exceptions.RayTaskError as err:  # a fault in the worker's code: stop, then raise it
            if self.failure is None:
                self.failure = err
            self.stop("failed", f"worker {worker}: {type(err).__name__}")
            return
        self.accept(worker, done)

    def accept(self, worker: int, done: BlockDone) -> None:
        for result in done.results:
            self.tally.add(result)
        if done.part is not None:
            self.known_parts.add(done.part)
        self.counters[worker, done.incarnation] = done.counters  # a restarted worker counts from 0
        if done.stop is not None:
            self.stop(*done.stop)

    async def lost(self, worker: int, block: Block, err: BaseException) -> None:
        """The call for `block` failed: once the worker answers again, it says what became of the block if
        it still has it (it was only unreachable); if not, the process that had it is dead."""
        probe = self.restarting.get(worker)
        done: BlockDone | None = None
        try:
            async with asyncio.timeout(RESTART_WAIT_S):
                if probe is not None:
                    await asyncio.shield(probe)
                done = await asyncio.wrap_future(
                    self.workers[worker].block_result.remote(block.number).future()
                )
        except (TimeoutError, self.ray.exceptions.RayActorError):
            done = None  # not back in time, or dead again: the process that had the block is gone
        if done is not None:
            log.warning("worker %d was unreachable for a while; its block %d finished", worker, block.number)
            self.accept(worker, done)
        else:
            await self.worker_died(worker, block, err)

    async def worker_died(self, worker: int, block: Block, err: BaseException) -> None:
        """Commit what `block`'s journal holds, find what the dead worker committed, hand out the rest."""
        self.deaths += 1
        async with self.recovering:
            committed = await asyncio.to_thread(self.committed_of, block)
        for status, prompt_tokens, completion_tokens, cost in committed.values():
            self.tally.counts[status] += 1
            self.tally.prompt_tokens += prompt_tokens or 0
            self.tally.completion_tokens += completion_tokens or 0
            self.tally.cost_usd += cost or 0.0
        left = without(block, frozenset(committed), next(self.numbers))
        log.warning(
            "worker %d died (%s): %d rows of block %d committed, %d handed out again",
            worker, type(err).__name__, len(committed), block.number, len(left.tasks),
            extra={"event": "worker_died", "worker": worker, "block": block.number},
        )  # fmt: skip
        if left.tasks and not self.stopping.is_set():
            self.redo.append(left)

    def committed_of(self, block: Block) -> dict[str, tuple[str, int | None, int | None, float | None]]:
        """The rows of a dead worker's block now committed, its journal's first. Blocking."""
        output = self.options.output
        if (output / JOURNAL_DIR).is_dir():
            recover(output, block_journal_pattern(self.run_id, block.number))
        wanted = {task.row_id for task in block.tasks}
        found: dict[str, tuple[str, int | None, int | None, float | None]] = {}
        columns = ["id", "status", "prompt_tokens", "completion_tokens", "cost_usd"]
        for path in sorted(output.glob(f"part-{self.run_id}-*.parquet")):
            if path.name in self.known_parts:
                continue
            table = pq.read_table(path, columns=columns).to_pydict()
            for row_id, *values in zip(*(table[c] for c in columns), strict=True):
                if row_id in wanted:
                    found[row_id] = (values[0], values[1], values[2], values[3])
        return found

    def stop(self, why: str, message: str) -> None:
        """Hand out nothing more; workers stop sending and commit what is on the wire within the grace."""
        if self.stop_code is None:
            self.stop_code = STOP_CODES.get(why, EXIT_USAGE)
            self.stopped_because = message
            if why != "budget":
                log.error(
                    "run stopped: %s", message, extra={"event": "run_stopped", "exit_code": self.stop_code}
                )
        if self.stopping.is_set():
            return
        self.stopping.set()
        self.redo.clear()
        self.quota.close.remote()
        for worker in self.workers:
            worker.stop.remote()
        asyncio.get_running_loop().call_later(self.cfg.limits.grace_s, self.cancel)

    def on_signal(self, signame: str) -> None:
        if self.stopping.is_set():
            log.warning("%s again: cancelling in-flight rows now", signame)
            self.cancel()
            return
        log.warning(
            "%s: handing out no more rows; requests on the wire get %g s to finish, then commit",
            signame,
            self.cfg.limits.grace_s,
        )
        self.stop_code, self.stopped_because = EXIT_INTERRUPTED, f"interrupted by {signame}"
        self.stop("interrupted", self.stopped_because)

    def cancel(self) -> None:
        if self.cancelled_at is None and self.in_flight:
            self.cancelled_at = asyncio.get_running_loop().time()
            for worker in self.workers:
                worker.cancel.remote()

    async def release(self) -> None:
        """End the actors (their connections closed first): a local Ray is shut down next, a cluster keeps
        running."""
        closing = [asyncio.wrap_future(worker.close.remote().future()) for worker in self.workers]
        await asyncio.wait(closing, timeout=CLOSE_WAIT_S)
        for actor in [*self.workers, self.quota, *([] if self.budget is None else [self.budget])]:
            self.ray.kill(actor, no_restart=True)

    async def outcome(self) -> Outcome:
        pauses, paused_s = 0, 0.0
        spent_usd = self.tally.cost_usd
        try:
            pauses, paused_s, _ = await asyncio.wrap_future(self.quota.counters.remote().future())
            if self.budget is not None:
                spent_usd = await asyncio.wrap_future(self.budget.spent_usd.remote().future())
        except self.ray.exceptions.RayActorError:
            pass  # already killed: counters are a summary's detail
        causes: Counter[str] = Counter()
        for counters in self.counters.values():
            causes.update(counters.retries_by_cause)
        counters = TransportCounters(
            http_429s=sum(c.http_429s for c in self.counters.values()),
            retries_by_cause=dict(causes),
            pauses=pauses,
            paused_s=paused_s,
        )
        return Outcome(self.tally, counters, spent_usd, self.stop_code, self.stopped_because)


async def _take(rows: AsyncIterator[ImageTask], n: int) -> AsyncIterator[ImageTask]:
    """Up to `n` rows from `rows`."""
    for _ in range(n):
        try:
            yield await anext(rows)
        except StopAsyncIteration:
            return
