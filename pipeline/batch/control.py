"""Acting on an output's batch jobs from outside a run: ``vision-pipeline batches cancel OUT``."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp

from pipeline.batch.api import BatchApi, surface_for
from pipeline.batch.ledger import Ledger
from pipeline.config import RunConfig
from pipeline.records import ConfigError
from pipeline.sink import RUN_FILE


async def cancel_batches(cfg: RunConfig, output: Path, key: str | None) -> list[tuple[str, str]]:
    """Ask the service to cancel every job of `output` not yet collected; (batch id, status) of each.

    Lines a cancelled job finished are still in its output file: the next run collects them, and submits
    the rest again. Raises RunAborted when the service refuses the key or the route."""
    ledger = await asyncio.to_thread(Ledger, output)
    answers = []
    async with aiohttp.ClientSession() as session:
        api = BatchApi(session, surface_for(cfg.endpoint, key), cfg.limits)
        for entry in ledger.state.uncollected():
            batch = await api.cancel(entry.batch_id)
            answers.append((entry.batch_id, str(batch.get("status"))))
    return answers


def last_run_config(output: Path) -> Path:
    """The config file of `output`'s last run, from ``_run.json``. Raises ConfigError when none is recorded."""
    try:
        runs = json.loads((output / RUN_FILE).read_text(encoding="utf-8")).get("runs") or []
        return Path(runs[-1]["config"])
    except (OSError, ValueError, LookupError, TypeError):
        raise ConfigError(f"{output}: no run recorded in {RUN_FILE}; name the config with --config") from None
