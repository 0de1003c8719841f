"""The rows a run sends, taken the same way by every engine (local, Ray, batch): the manifest streamed in a
thread a batch at a time, committed ids and duplicates skipped, ``--limit`` kept; and how many are left
when the spend cap stops a run (``budget_reached``: the one line every engine ends with).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from itertools import islice
from pathlib import Path

from pipeline import checkpoint
from pipeline.config import RunConfig
from pipeline.exits import EXIT_BUDGET
from pipeline.idset import IdSet
from pipeline.manifest import Skipped, read_manifest
from pipeline.records import ImageTask, ManifestError
from pipeline.summary import Tally

log = logging.getLogger(__name__)

MANIFEST_BATCH_ROWS = 256  # rows read per thread hop


async def stream_manifest(
    path: Path, cfg: RunConfig, skip: IdSet
) -> AsyncIterator[ImageTask | ManifestError | Skipped]:
    """The manifest's rows, read in a thread a batch at a time so the loop never waits on the disk."""
    rows = read_manifest(path, cfg.request, skip, group_skipped=True)
    while batch := await asyncio.to_thread(lambda: list(islice(rows, MANIFEST_BATCH_ROWS))):
        for item in batch:
            yield item


async def rows_to_send(
    manifest: Path, limit: int | None, cfg: RunConfig, prior: IdSet, tally: Tally, taken: set[str]
) -> AsyncIterator[ImageTask | ManifestError]:
    """The rows of `manifest` that are neither committed (`prior`) nor taken up already in this run, at most
    `limit`; each taken up is added to `taken`, skipped ones and duplicates counted in `tally`. A bad row
    comes as its ManifestError (logged), to be committed as an error row."""
    async for item in stream_manifest(manifest, cfg, prior):
        if limit is not None and len(taken) >= limit:
            return
        if isinstance(item, Skipped):  # the reader looked every id up in `prior`
            tally.skipped += item.rows
            continue
        if item.row_id in taken:
            tally.duplicates += 1
            log.warning("row %r: duplicate id again at manifest line %d, ignored", item.row_id, item.line)
            continue
        taken.add(item.row_id)
        if isinstance(item, ManifestError):
            log.warning("%s", item)
        yield item


def rows_left(cfg: RunConfig, manifest: Path, output: Path) -> int:
    """Manifest rows not committed in the output (each id once), for the budget's stop message. Blocking."""
    committed = checkpoint.committed_ids(output)
    seen: set[str] = set()
    for item in read_manifest(manifest, cfg.request, committed, group_skipped=True):
        if not isinstance(item, Skipped):
            seen.add(item.row_id)
    return len(seen)


async def budget_reached(cfg: RunConfig, manifest: Path, output: Path, spent_usd: float) -> str:
    """The spend cap's stop in one line, logged: what was spent and how many rows are left (every engine)."""
    left = await asyncio.to_thread(rows_left, cfg, manifest, output)
    because = f"budget reached: spent ${spent_usd:.4f} of ${cfg.limits.max_cost_usd:.4f}; {left} rows left for the next run"
    log.warning("run stopped: %s", because, extra={"event": "run_stopped", "exit_code": EXIT_BUDGET})
    return because
