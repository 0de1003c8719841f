"""Planning a batch round: manifest rows into JSONL lines, packed into files, with live mode's request plan.

Rows are streamed from the manifest (skipping committed and held ids), their images prepared by the
captioner's preparation (``captioner.prepare_images``: the same data URLs a live run sends) in
``limits.concurrency`` workers, planned by ``request.plan_request``, and their lines packed by
``lines.Packer``. A line goes into a file only if the spend cap has room for its worst case (``admit``,
``spend.BatchSpend.try_hold``); from the first that does not fit, the round plans no more rows (as live
mode starts no request after one that waits for the cap), and those rows stay for a later round or
run. A row that fails here (its image, a refusal of the plan, a line larger than a file
may be) is committed as an error row, as live mode would. With Azure, a GPT-4 Turbo model and a row
with images stop the run before anything is uploaded: Global Batch serves images from gpt-4o on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Container
from concurrent.futures import Executor
from pathlib import Path

from pipeline.batch.lines import PackedFile, PackedRow, Packer, batch_line, custom_id_for
from pipeline.captioner import prepare_images
from pipeline.config import RunConfig
from pipeline.idset import IdSet
from pipeline.manifest import Skipped, manifest_base_dir
from pipeline.records import ConfigError, ErrorKind, ImageTask, ManifestError, RowError, VisionResult
from pipeline.request import plan_request
from pipeline.results import failed_result, manifest_failure
from pipeline.run_rows import stream_manifest
from pipeline.runner import RunOptions
from pipeline.structured import Structured
from pipeline.summary import Tally

log = logging.getLogger(__name__)

TURBO_MODEL_PREFIXES = ("gpt-4-turbo", "gpt-4-vision", "gpt-4-1106-vision")  # no images in Azure Global Batch


def is_turbo_model(model: str) -> bool:
    """Whether `model` names GPT-4 Turbo (with vision), which Azure's Global Batch does not serve images."""
    return model.lower().startswith(TURBO_MODEL_PREFIXES)


class Planner:
    """Plans a round's rows into files; commits the rows that fail through `commit`."""

    def __init__(
        self,
        cfg: RunConfig,
        options: RunOptions,
        folder: Path,
        pool: Executor,
        structured: Structured | None,
        *,
        prior: IdSet,
        commit: Callable[[VisionResult], Awaitable[None]],
        is_committed: Callable[[str], bool],  # by this run
        admit: Callable[[PackedRow], bool],  # holds the line's worst case under the spend cap, if it fits
        tally: Tally,
    ) -> None:
        self.cfg, self.options, self.folder, self.pool, self.structured = (
            cfg,
            options,
            folder,
            pool,
            structured,
        )
        self.commit, self.is_committed, self.admit, self.tally = commit, is_committed, admit, tally
        self.is_cap_full = False  # a line of the last round did not fit under the spend cap
        self.prior = prior  # ids committed before this run
        self.base_dir = manifest_base_dir(options.manifest)  # relative image paths start here

    async def plan_and_pack(
        self, held: Container[str], first_file_no: int, *, first_round: bool
    ) -> list[PackedFile]:
        """Plan every row neither committed nor `held` into closed files on disk, numbered from
        `first_file_no`; rows that fail are committed as errors. Counts skipped and duplicate rows in the
        first round only (later rounds read the manifest again for the rows left over). Sets
        ``is_cap_full`` when a line did not fit under the spend cap (its row and the rest wait)."""
        self.is_cap_full = False
        packer = Packer(self.folder, first_file_no, self.cfg.batch)
        closed: list[PackedFile] = []
        taken: set[str] = set()
        lock = asyncio.Lock()
        queue: asyncio.Queue[ImageTask | None] = asyncio.Queue(2 * self.cfg.limits.concurrency)
        workers = self.cfg.limits.concurrency

        async def produce() -> None:
            limit = self.options.limit
            async for item in stream_manifest(self.options.manifest, self.cfg, self.prior):
                if (limit is not None and len(taken) >= limit) or self.is_cap_full:
                    break
                if isinstance(item, Skipped):  # committed by an earlier run: "already done"
                    self.tally.skipped += item.rows * int(first_round)
                    continue
                if self.is_committed(item.row_id) or item.row_id in held:
                    continue  # committed in this run, or in a live job: counted when collected
                if item.row_id in taken:
                    self.tally.duplicates += int(first_round)
                    continue
                taken.add(item.row_id)
                if isinstance(item, ManifestError):
                    await self.commit(manifest_failure(item, self.cfg))
                    continue
                self.refuse_turbo_images(item)
                await queue.put(item)
            for _ in range(workers):
                await queue.put(None)

        async def work() -> None:
            while (task := await queue.get()) is not None:
                packed = await self.plan_row(task)
                if packed is None:
                    continue
                line, row = packed
                refusal = packer.check(line, row)
                if refusal is not None:
                    await self.commit(failed_result(task, refusal, self.cfg, row.estimated_prompt_tokens))
                    continue
                async with lock:
                    if self.is_cap_full or not self.admit(row):
                        self.is_cap_full = True  # this row and those after it wait for room
                        continue
                    if (full := await asyncio.to_thread(packer.add, line, row)) is not None:
                        closed.append(full)

        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(produce(), name="producer")
                for n in range(workers):
                    tg.create_task(work(), name=f"planner-{n}")
        except* ConfigError as group:
            raise group.exceptions[0] from None
        if (last := await asyncio.to_thread(packer.finish)) is not None:
            closed.append(last)
        return closed

    def refuse_turbo_images(self, task: ImageTask) -> None:
        ep = self.cfg.endpoint
        if ep.provider == "azure" and is_turbo_model(ep.model) and task.images:
            raise ConfigError(
                f"{self.cfg.source}: endpoint.model = {ep.model!r}: Azure's Global Batch does not caption "
                "images with GPT-4 Turbo; deploy gpt-4o or later as a Global-Batch deployment and name it "
                "in endpoint.deployment and endpoint.model (nothing was uploaded)"
            )

    async def plan_row(self, task: ImageTask) -> tuple[bytes, PackedRow] | None:
        """The row's line, as live mode would send it; None when the row failed (committed as error)."""
        estimated: int | None = None
        try:
            images = await prepare_images(task, self.base_dir, self.cfg, self.pool)
            plan = plan_request(task, images, self.cfg, self.structured)
            estimated = plan.estimated_prompt_tokens
            if plan.refusal is not None:
                raise plan.refusal
        except RowError as err:
            await self.commit(failed_result(task, err, self.cfg, estimated))
            return None
        except Exception as err:  # a surprise fails this row, not the run
            log.exception("row %r: unexpected error", task.row_id)
            surprise = RowError(
                task.row_id, f"unexpected {type(err).__name__}: {err}", kind=ErrorKind.UNEXPECTED
            )
            await self.commit(failed_result(task, surprise, self.cfg, estimated))
            return None
        custom_id = custom_id_for(task.row_id)
        line = await asyncio.to_thread(batch_line, plan.body, custom_id, self.cfg.endpoint)
        return line, PackedRow(custom_id, task, plan.estimated_prompt_tokens)
