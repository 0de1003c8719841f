"""The captioner: one row from its images to its result, through whichever transport carries requests.

``Captioner.caption(task)`` prepares the row's images, plans its request (``request.py``), sends it
through a ``Transport``, and builds its result (``results.py``). It knows nothing of manifests, output
folders, locks or signals: the local runner, ``--dry-run`` and, later, other engines and transports use it
as it is. A row's failure is its result (status ``error`` with an ``ErrorKind``); only what ends the run
raises: ``RunAborted`` (the endpoint refuses every row), ``NotSent`` (the run is stopping and this row
was not sent: it stays for the next run) and ``BudgetReached`` (the spend cap has no room for it: not
sent either).
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import time
from collections.abc import Sequence
from concurrent.futures import Executor
from pathlib import Path
from typing import Protocol

from pipeline.config import RunConfig
from pipeline.images import check_request_size, prepare_image, prepare_image_bytes
from pipeline.pricing import Price
from pipeline.records import (
    BudgetReached,
    ConfigError,
    Delivery,
    ErrorKind,
    ImageTask,
    NotSent,
    PreparedImage,
    RowError,
    RunAborted,
    TransportCounters,
    VisionResult,
)
from pipeline.refs import is_remote_url
from pipeline.remote import fetch_image, open_session
from pipeline.request import RequestPlan, plan_request
from pipeline.results import answered_result, failed_result
from pipeline.structured import Structured

log = logging.getLogger(__name__)


class Transport(Protocol):
    """How planned requests reach the service: the live client (``client.Client``) or a test double."""

    async def send(self, plan: RequestPlan) -> Delivery:
        """The answer that is the row's result. Raises ApiError (this row failed), RunAborted (every row
        would), NotSent (stopping: not sent), BudgetReached (no room under the spend cap: not sent)."""
        ...

    def stop_sending(self) -> None:
        """Start nothing more; requests already on the wire finish."""
        ...

    def counters(self) -> TransportCounters: ...


# Container objects allocated between two young-generation collections (Python's default: 700). A
# captioning process allocates a few hundred a row (futures, answers, results), so by default the collector
# ran every ~40 rows, ~1.3 ms each time: 8 % of a run's CPU in bench/overhead.py; 10,000 cost 1.5 %.
GC_YOUNG_THRESHOLD = 10_000


def collect_garbage_less_often() -> None:
    """Set this process's collector for captioning: call once, where a process that captions starts."""
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


class Captioner:
    """Captions ImageTasks: prepare images → plan → send through `transport` → result."""

    def __init__(
        self,
        cfg: RunConfig,
        transport: Transport,
        *,
        base_dir: Path,
        image_pool: Executor,
        price: Price | None,
        structured: Structured | None = None,
    ) -> None:
        self.cfg = cfg
        self.transport = transport
        self.base_dir = base_dir  # relative image paths are relative to the manifest's folder
        self.image_pool = image_pool  # decodes and encodes images (Pillow and libvips block)
        self.price = price  # None: the model has no price, cost_usd stays null
        self.structured = structured  # the answer's JSON format, when not text (structured.py)

    async def plan(self, task: ImageTask) -> RequestPlan:
        """The row's images prepared and its request planned, nothing sent. Raises RowError."""
        images = await prepare_images(task, self.base_dir, self.cfg, self.image_pool)
        return plan_request(task, images, self.cfg, self.structured)

    async def caption(self, task: ImageTask) -> VisionResult:
        """The row's result: ok, filtered, or error with its kind and reason; timed and stamped.

        Raises RunAborted, NotSent and BudgetReached only (see the module docstring).
        """
        loop = asyncio.get_running_loop()
        started_at, started = time.time(), loop.time()
        estimated: int | None = None
        try:
            plan = await self.plan(task)
            estimated = plan.estimated_prompt_tokens
            if plan.refusal is not None:
                raise plan.refusal
            delivery = await self.transport.send(plan)
            result = answered_result(task, delivery, self.cfg, estimated, self.price, self.structured)
        except (
            RunAborted,
            NotSent,
            BudgetReached,
            ConfigError,
        ):  # ConfigError: the service refuses a setting
            raise
        except RowError as err:
            result = failed_result(task, err, self.cfg, estimated)
        except Exception as err:  # a surprise fails this row, not the run
            log.exception("row %r: unexpected error", task.row_id)
            surprise = RowError(
                task.row_id, f"unexpected {type(err).__name__}: {err}", kind=ErrorKind.UNEXPECTED
            )
            result = failed_result(task, surprise, self.cfg, estimated)
        return dataclasses.replace(
            result, started_at=started_at, finished_at=time.time(), latency_s=round(loop.time() - started, 4)
        )


async def prepare_images(
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

    prepared: Sequence[PreparedImage]
    if not images.fetch_remote and all(is_remote_url(ref) for ref in task.images):
        # URLs passed through: nothing to decode, so no hop to a thread and back (bench/overhead.py)
        prepared = [prepare(n, ref) for n, ref in enumerate(task.images)]
    else:
        loop = asyncio.get_running_loop()
        jobs = [loop.run_in_executor(pool, prepare, n, ref) for n, ref in enumerate(task.images)]
        prepared = await asyncio.gather(*jobs)  # the images of a row in parallel
    check_request_size(prepared, cfg=images, row_id=row_id)
    return list(prepared)
