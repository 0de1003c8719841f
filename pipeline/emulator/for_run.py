"""The embedded default: an in-process emulator for each endpoint of a run whose provider is "emulator"."""

from __future__ import annotations

import contextlib
import dataclasses
import logging

from pipeline.config import EndpointConfig, RunConfig
from pipeline.emulator.server import Emulator

log = logging.getLogger(__name__)


async def start_emulators(
    cfg: RunConfig, keys: dict[str, str | None], stack: contextlib.AsyncExitStack
) -> RunConfig:
    """`cfg` with each endpoint of provider "emulator" pointed at an emulator of its own, started on a
    loopback port and stopped by `stack`; `keys` by endpoint name (the key each emulator accepts)."""
    started: list[EndpointConfig] = []
    for member in cfg.pool:
        endpoint = member.endpoint
        if endpoint.provider == "emulator":
            deployment = endpoint.deployment or "gpt-4-vision"
            emulator = await stack.enter_async_context(
                Emulator(
                    cfg.emulator,
                    api_key=keys[member.name] or "",
                    deployment=deployment,
                    model=endpoint.model,
                    keep_requests=False,
                )
            )
            log.info("emulator for endpoint %r listening on %s", member.name, emulator.url)
            endpoint = dataclasses.replace(endpoint, url=emulator.url, deployment=deployment)
        started.append(endpoint)
    if not cfg.endpoints:
        return dataclasses.replace(cfg, endpoint=started[0])
    members = tuple(dataclasses.replace(m, endpoint=e) for m, e in zip(cfg.endpoints, started, strict=True))
    return dataclasses.replace(cfg, endpoint=started[0], endpoints=members)
