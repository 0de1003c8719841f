"""A batch run: plan rows into JSONL files, upload, create jobs, poll, and commit every answer once.

``BatchEngine.run`` is the work of a batch run (``run.run_batch`` opens the output and wires it). In
order: settle the ledger (a job whose ``created`` line a kill
cut off is found by listing the service's batches and matching its input file); collect every job
that ended; then, in rounds, plan the rows neither committed nor held by a job
(``ledger.LedgerState.held_row_ids``) with the same request plan as live mode, pack, upload, create,
poll every ``batch.poll_s`` and collect each job as it ends. Rows a job left over (expired, cancelled,
timed out, missing) are planned again in the next round, each submitted at most ``batch.max_rounds``
times in a run; those still left are named in one line. ``--no-wait`` stops after creating the jobs: a
later run collects them.

The spend cap (``spend.py``): lines of live jobs are held from the start, each new line is packed only if
its worst case fits, and collecting a job settles its lines to their bill. A round that stopped at the cap
is followed by another once its jobs are collected; when a round can pack nothing and no job is live, the
cap is reached (``is_cap_reached``: exit 5).

Exactly once: an answer is committed only for a row whose id is not committed, each job's files are
collected once (``collected`` in the ledger after the sink's flush; a kill in between re-reads the files
and skips the committed ids), and a row is never planned while a job holding it is alive.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.batch.api import BatchApi, BatchApiError
from pipeline.batch.collect import collect_files
from pipeline.batch.ledger import (
    BATCH_FILES_DIR,
    BATCH_STATUS_FILE,
    TERMINAL_STATUSES,
    BatchEntry,
    FileEntry,
    Ledger,
    read_batch_status,
    rows_by_custom_id,
)
from pipeline.batch.lines import PackedFile, PackedRow, line_url
from pipeline.batch.planner import Planner
from pipeline.batch.spend import BatchSpend
from pipeline.client import backoff_s
from pipeline.config import RunConfig
from pipeline.idset import IdSet
from pipeline.pricing import Price
from pipeline.records import (
    VisionResult,
)
from pipeline.runner import RunOptions
from pipeline.sink import Sink, write_json_atomic
from pipeline.structured import Structured
from pipeline.summary import Tally

log = logging.getLogger(__name__)

QUOTA_CODE = "token_limit_exceeded"
METADATA_RUN, METADATA_FILE = "vision_pipeline_run", "vision_pipeline_file"
ADOPT_MARGIN_S = 3600.0  # list jobs created this long before the oldest unmatched upload: clocks differ


class BatchEngine:
    """One batch run's state: the ledger, the sink, and what this run committed and left over."""

    def __init__(
        self,
        cfg: RunConfig,
        options: RunOptions,
        api: BatchApi,
        sink: Sink,
        prior: IdSet,
        run_id: str,
        pool: ThreadPoolExecutor,
        price: Price | None,
        structured: Structured | None,
    ) -> None:
        self.cfg, self.options, self.api, self.sink = cfg, options, api, sink
        self.prior = prior  # ids committed before this run (a Container)
        self.run_id, self.pool, self.price, self.structured = run_id, pool, price, structured
        self.ledger = Ledger(options.output)
        self.folder = options.output / BATCH_FILES_DIR
        self.committed: set[str] = set()  # ids committed by this run
        self.left: set[str] = set()  # ids a job of this run's rounds left over
        self.not_again: set[str] = set()  # ids of a job the service refused whole: for a later run
        self.submissions = Counter[str]()  # row id → times this run packed it
        self.tally = Tally()
        self.spend = BatchSpend(cfg.limits.max_cost_usd, price, cfg.request.max_tokens)
        self.is_cap_reached = False
        self.stopped_because: str | None = None
        self.quota_attempt = 0
        self.quota_retry_at = 0.0  # loop time before which no job is created (token_limit_exceeded)
        self.last_seen: dict[str, dict[str, Any]] = read_batch_status(options.output)  # id → Batch object
        self.rng = random.Random()

    def uncommitted(self, rows: Sequence[PackedRow]) -> list[PackedRow]:
        """`rows` committed neither before this run nor by it; the ids committed before are looked up in
        one call for all of them (a lookup of one id in the IdSet costs as much as of a block)."""
        ids = pa.array([row.task.row_id for row in rows], pa.string())
        in_prior = self.prior.contains_each(ids).to_pylist()
        return [
            row
            for row, is_prior in zip(rows, in_prior, strict=True)
            if not is_prior and row.task.row_id not in self.committed
        ]

    async def run(self) -> None:
        await asyncio.to_thread(_fresh_folder, self.folder)
        planner = Planner(
            self.cfg,
            self.options,
            self.folder,
            self.pool,
            self.structured,
            prior=self.prior,
            commit=self.commit,
            is_committed=self.committed.__contains__,
            admit=self.spend.try_hold,
            tally=self.tally,
        )
        await self.adopt_orphans()
        self.hold_earlier()
        await self.refresh()  # jobs of earlier runs that ended: collected before anything is planned
        round_no = 0
        while True:
            round_no += 1
            state = self.ledger.state
            excluded = state.held_row_ids() | self.not_again | self.tried_out()
            files = await planner.plan_and_pack(excluded, state.next_file_no(), first_round=round_no == 1)
            await self.sink.flush()  # rows that failed planning
            for packed in files:
                self.submissions.update(row.task.row_id for row in packed.rows)
                await self.upload(packed)
                await self.create_waiting()  # its job starts while the next file uploads
            state = self.ledger.state
            if planner.is_cap_full and not files and not (state.uncollected() or state.waiting_files()):
                self.is_cap_reached = True  # nothing fits and no job is left to make room
                return
            if self.options.no_wait:
                waiting, live = state.waiting_files(), state.uncollected()
                held = f", holding ${self.spend.held_usd:.4f} of the spend cap" if self.spend.held_usd else ""
                wait = (
                    "; rows that did not fit the spend cap wait for a later run"
                    if planner.is_cap_full
                    else ""
                )
                self.stopped_because = (
                    f"--no-wait: {len(live)} batch jobs running, {len(waiting)} files waiting for quota{held}; "
                    f"a later run collects them{wait}"
                )
                log.info(
                    "submitted; %d jobs running, %d files waiting for quota: a later run collects",
                    len(self.ledger.state.uncollected()),
                    len(waiting),
                )
                return
            await self.drive()
            again = self.left - self.committed - self.not_again - self.tried_out()
            if not again and not planner.is_cap_full:
                break
            if again:
                log.info("round %d: %d rows left over; submitting them again", round_no, len(again))
            else:
                log.info(
                    "round %d: jobs collected; planning the rows that did not fit the spend cap", round_no
                )
        still = self.left - self.committed
        if still:
            self.stopped_because = f"{len(still)} rows left for the next run"
            log.warning("%s (batches expired, were cancelled or refused)", self.stopped_because)

    # ---- planning ------------------------------------------------------------------------------------

    def tried_out(self) -> set[str]:
        """Rows this run submitted ``batch.max_rounds`` times: left for the next run."""
        return {row_id for row_id, n in self.submissions.items() if n >= self.cfg.batch.max_rounds}

    def hold_earlier(self) -> None:
        """Hold the worst case of every line an earlier run left in a live job or a waiting file."""
        state = self.ledger.state
        for entry in state.files.values():
            if state.is_holding(entry):
                self.spend.hold_earlier(self.uncommitted(entry.rows))
        if self.spend.held_usd and self.cfg.limits.max_cost_usd is not None:
            log.info(
                "jobs submitted by an earlier run hold $%.4f of the $%.4f spend cap until collected",
                self.spend.held_usd,
                self.cfg.limits.max_cost_usd,
            )

    async def commit(self, result: VisionResult) -> None:
        result = dataclasses.replace(result, mode="batch")
        self.committed.add(result.task.row_id)
        self.tally.add(result)
        await self.sink.put(result)

    # ---- submitting ----------------------------------------------------------------------------------

    async def upload(self, packed: PackedFile) -> None:
        """Ledger ``packed``, upload, ledger ``uploaded``; the local copy is removed once the service has it."""
        await asyncio.to_thread(self.ledger.packed, packed, self.run_id, time.time())
        file_id = await self.api.upload(packed.path)
        record = {"event": "uploaded", "at": time.time(), "file_no": packed.file_no, "file_id": file_id}
        await asyncio.to_thread(self.ledger.append, record)
        log.info(
            "uploaded file %d: %d rows, %d bytes, ~%d tokens (%s)",
            packed.file_no,
            len(packed.rows),
            packed.size_bytes,
            packed.tokens,
            file_id,
        )
        await asyncio.to_thread(packed.path.unlink, missing_ok=True)

    def enqueued_tokens(self) -> int:
        state = self.ledger.state
        return sum(state.file_of(b.batch_id).tokens for b in state.uncollected() if b.status is None)

    async def create_waiting(self) -> None:
        """Create a job for each uploaded file waiting for one, as far as the enqueued-token quota allows."""
        quota = self.cfg.batch.enqueued_tokens
        for entry in sorted(self.ledger.state.waiting_files(), key=lambda f: f.file_no):
            if asyncio.get_running_loop().time() < self.quota_retry_at:
                return
            if quota and self.enqueued_tokens() + entry.tokens > quota:
                log.info(
                    "file %d waits: %d tokens enqueued + its %d would pass batch.enqueued_tokens = %d",
                    entry.file_no,
                    self.enqueued_tokens(),
                    entry.tokens,
                    quota,
                )
                return
            await self.create(entry)

    async def create(self, entry: FileEntry) -> None:
        assert entry.file_id is not None
        metadata = {METADATA_RUN: self.run_id, METADATA_FILE: str(entry.file_no)}
        await asyncio.to_thread(
            self.ledger.append,
            {"event": "creating", "at": time.time(), "file_no": entry.file_no, "file_id": entry.file_id},
        )
        try:
            batch = await self.api.create(
                entry.file_id, line_url(self.cfg.endpoint), self.cfg.batch.completion_window, metadata
            )
        except BatchApiError as err:
            if err.code == QUOTA_CODE:
                self.quota_full(f"creating a job for file {entry.file_no}")
                return
            log.error(
                "file %d: the service refused to create its job: %s; its rows go to a later run",
                entry.file_no,
                err,
            )
            await asyncio.to_thread(
                self.ledger.append, {"event": "dropped", "file_no": entry.file_no, "why": str(err)}
            )
            for row in entry.rows:
                self.spend.settle(row.task.row_id, 0.0)  # never a job: nothing billed
            self.not_again.update(row.task.row_id for row in entry.rows)
            self.left.update(row.task.row_id for row in entry.rows)
            return
        await self.record_created(entry, batch)
        self.quota_attempt = 0

    async def record_created(self, entry: FileEntry, batch: dict[str, Any]) -> None:
        record = {
            "event": "created",
            "at": time.time(),
            "file_no": entry.file_no,
            "batch_id": batch["id"],
            "rows": len(entry.rows),
        }
        await asyncio.to_thread(self.ledger.append, record)
        self.last_seen[str(batch["id"])] = batch
        log.info("batch %s created for file %d (%d rows)", batch["id"], entry.file_no, len(entry.rows))

    def quota_full(self, doing: str) -> None:
        """The enqueued-token quota refused us: wait, longer each time, then try again."""
        self.quota_attempt += 1
        limits = dataclasses.replace(
            self.cfg.limits,
            backoff_initial_s=self.cfg.batch.poll_s,
            backoff_max_s=max(self.cfg.batch.poll_s, 32 * self.cfg.batch.poll_s),
        )
        wait_s = backoff_s(self.quota_attempt, limits, self.rng) + self.cfg.batch.poll_s / 2
        self.quota_retry_at = asyncio.get_running_loop().time() + wait_s
        log.warning(
            "%s: %s (the deployment's enqueued-token quota is full); trying again in %.0f s",
            doing,
            QUOTA_CODE,
            wait_s,
        )

    async def adopt_orphans(self) -> None:
        """Files whose job may have been created by a run killed before writing ``created``: find it."""
        waiting = self.ledger.state.waiting_files()
        if not waiting:
            return
        by_file_id = {entry.file_id: entry for entry in waiting}
        oldest = min(e.uploaded_at for e in waiting) - ADOPT_MARGIN_S
        for batch in await self.api.list_since(oldest):
            entry = by_file_id.get(batch.get("input_file_id"))
            if entry is not None and str(batch["id"]) not in self.ledger.state.batches:
                log.warning(
                    "batch %s of file %d was created by a run that stopped before recording it; adopting it",
                    batch["id"],
                    entry.file_no,
                )
                await self.record_created(entry, batch)

    # ---- waiting and collecting ----------------------------------------------------------------------

    async def drive(self) -> None:
        """Create waiting jobs and poll until no job of this output is alive and no file waits."""
        while True:
            await self.create_waiting()
            state = self.ledger.state
            if not state.uncollected() and not state.waiting_files():
                return
            await asyncio.sleep(self.cfg.batch.poll_s)
            await self.refresh()

    async def refresh(self) -> None:
        """Retrieve every job not yet collected; collect those that ended; log progress in one line."""
        for entry in list(self.ledger.state.uncollected()):
            batch = await self.api.retrieve(entry.batch_id)
            if batch is None:  # the service no longer knows it (deleted, or an emulator that restarted)
                log.warning(
                    "batch %s is gone from the service; its rows will be planned again", entry.batch_id
                )
                batch = {"id": entry.batch_id, "status": "gone"}
                await asyncio.to_thread(
                    self.ledger.append,
                    {"event": "ended", "at": time.time(), "batch_id": entry.batch_id, "status": "gone"},
                )
                await self.collect(entry, batch)
                continue
            self.last_seen[entry.batch_id] = batch
            status = str(batch.get("status"))
            if status in TERMINAL_STATUSES:
                if entry.status is None:
                    await asyncio.to_thread(
                        self.ledger.append,
                        {"event": "ended", "at": time.time(), "batch_id": entry.batch_id, "status": status},
                    )
                await self.collect(entry, batch)
        self.log_progress()
        await asyncio.to_thread(
            write_json_atomic,
            self.options.output / BATCH_STATUS_FILE,
            {"at": time.time(), "batches": self.last_seen},
        )

    def log_progress(self) -> None:
        live = [
            self.last_seen[b.batch_id]
            for b in self.ledger.state.uncollected()
            if b.batch_id in self.last_seen
        ]
        if not live:
            return
        states = Counter(str(b.get("status")) for b in live)
        counts = Counter[str]()
        for b in live:
            counts.update({k: int(v or 0) for k, v in (b.get("request_counts") or {}).items()})
        log.info(
            "batches: %s; requests %d of %d done, %d failed",
            ", ".join(f"{n} {s}" for s, n in sorted(states.items())),
            counts["completed"],
            counts["total"],
            counts["failed"],
        )

    async def collect(self, entry: BatchEntry, batch: dict[str, Any]) -> None:
        """Commit a finished job's answers (each row once), then ledger ``collected``."""
        file_entry = self.ledger.state.file_of(entry.batch_id)
        status = str(batch.get("status"))
        errors = (batch.get("errors") or {}).get("data") or []
        for error in errors:
            log.error(
                "batch %s: line %s: %s: %s",
                entry.batch_id,
                error.get("line"),
                error.get("code"),
                error.get("message"),
            )
        if status == "failed" and any(e.get("code") == QUOTA_CODE for e in errors):
            await asyncio.to_thread(
                self.ledger.append, {"event": "collected", "batch_id": entry.batch_id, "left": 0}
            )
            await asyncio.to_thread(self.ledger.append, {"event": "requeued", "file_no": file_entry.file_no})
            self.quota_full(f"batch {entry.batch_id}")
            return
        downloads = []
        for key in ("output_file_id", "error_file_id"):
            if file_id := batch.get(key):
                dest = self.folder / f"{entry.batch_id}-{key.removesuffix('_file_id')}.jsonl"
                await self.api.download(str(file_id), dest)
                downloads.append(dest)
        rows = rows_by_custom_id(self.uncommitted(file_entry.rows))
        collected = await asyncio.to_thread(
            collect_files, downloads, rows, self.cfg, self.price, self.structured
        )
        for result in collected.results:
            await self.commit(result)
        self.spend.settle_results(collected.results)
        unknown = set(collected.unknown_cost) if status != "failed" else set()  # failed validation: unbilled
        for row_id in collected.left:
            self.spend.settle(row_id, None if row_id in unknown else 0.0)
        await self.sink.flush()
        await asyncio.to_thread(
            self.ledger.append,
            {
                "event": "collected",
                "at": time.time(),
                "batch_id": entry.batch_id,
                "status": status,
                "committed": len(collected.results),
                "left": len(collected.left),
            },
        )
        self.left.update(collected.left)
        if status == "failed":
            self.not_again.update(collected.left)  # the service refused the file: fix the cause, run again
        for path in downloads:
            await asyncio.to_thread(path.unlink, missing_ok=True)
        log.info(
            "batch %s %s: %d rows committed, %d left over",
            entry.batch_id,
            status,
            len(collected.results),
            len(collected.left),
        )


def _fresh_folder(folder: Path) -> None:
    """The working folder, emptied: what is in it belongs to a run that stopped (uploaded files live on at
    the service, un-uploaded ones are planned again)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
