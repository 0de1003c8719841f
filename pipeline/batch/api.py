"""The Files and Batches APIs over aiohttp: upload, create, retrieve, list, cancel, download.

Surfaces (the config's provider and ``api_version`` pick one):

- OpenAI: ``{url}/files``, ``{url}/batches`` with ``Authorization: Bearer`` (``url`` is the ``…/v1`` base);
- the emulator: the same under ``{url}/v1``;
- Azure ``api_version = "v1"``: ``{url}/openai/v1/files`` … with ``api-key``;
- Azure dated versions: ``{url}/openai/files?api-version=…`` … with ``api-key``.

429, 5xx, 408/409 and dropped connections are retried with the live client's backoff settings (a server's
``retry-after`` is honoured up to ``limits.max_retry_after_s``); 401, 403 and 404 end the run
(``RunAborted``: key, resource or route is wrong); any other refusal is a ``BatchApiError`` carrying the
service's error ``code``, which callers read (``token_limit_exceeded``), never the message.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from pipeline.batch.lines import uses_v1_surface
from pipeline.client import backoff_s, error_code, error_message, retry_after_s
from pipeline.config import EndpointConfig, LimitsConfig
from pipeline.records import RunAborted

log = logging.getLogger(__name__)

LIST_PAGE_SIZE = 100  # the most the services return per page
DOWNLOAD_CHUNK_BYTES = 1 << 20
_RETRY_STATUSES = frozenset({408, 409, 429})
_FATAL_STATUSES = frozenset({401, 403, 404})


class BatchApiError(Exception):
    """The service refused a Files or Batches call; `code` is its error code when it sent one."""

    def __init__(self, what: str, status: int, code: str | None, message: str) -> None:
        super().__init__(f"{what}: HTTP {status} {code or ''}: {message}".replace("  ", " "))
        self.status, self.code = status, code


class _Missing(Exception):
    """A 404 where the caller expects one: the object is gone."""


@dataclass(frozen=True, slots=True)
class Surface:
    """Where the Files and Batches APIs are and how to authenticate; `headers` hold the key: never log."""

    base: str
    params: Mapping[str, str]
    headers: Mapping[str, str]


def surface_for(endpoint: EndpointConfig, api_key: str | None) -> Surface:
    """The API surface of a provider (module docstring)."""
    url = endpoint.url.rstrip("/")
    if endpoint.provider == "azure":
        headers = {"api-key": api_key or ""}
        if uses_v1_surface(endpoint):
            return Surface(f"{url}/openai/v1", {}, headers)
        return Surface(f"{url}/openai", {"api-version": endpoint.api_version}, headers)
    bearer = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return Surface(url if endpoint.provider == "openai" else f"{url}/v1", {}, bearer)


class BatchApi:
    """One run's client of the Files and Batches APIs, over the run's session."""

    def __init__(self, session: aiohttp.ClientSession, surface: Surface, limits: LimitsConfig) -> None:
        self.session, self.surface, self.limits = session, surface, limits
        self._rng = random.Random()

    async def upload(self, path: Path) -> str:
        """Upload a JSONL input file (purpose "batch"); its file id."""

        def form() -> aiohttp.FormData:
            data = aiohttp.FormData()
            data.add_field("purpose", "batch")
            data.add_field("file", path.open("rb"), filename=path.name, content_type="application/jsonl")
            return data

        body = await self._call("POST", "/files", f"upload {path.name}", form=form)
        return str(body["id"])

    async def create(
        self, file_id: str, endpoint: str, window: str, metadata: Mapping[str, str]
    ) -> dict[str, Any]:
        """Create a batch from an uploaded file; the Batch object."""
        payload = {
            "input_file_id": file_id,
            "endpoint": endpoint,
            "completion_window": window,
            "metadata": dict(metadata),
        }
        return await self._call("POST", "/batches", f"create a batch from {file_id}", json_body=payload)

    async def retrieve(self, batch_id: str) -> dict[str, Any] | None:
        """The Batch object, or None when the service answers 404 (it no longer knows the batch)."""
        try:
            return await self._call("GET", f"/batches/{batch_id}", f"retrieve {batch_id}", missing_ok=True)
        except _Missing:
            return None

    async def cancel(self, batch_id: str) -> dict[str, Any]:
        return await self._call("POST", f"/batches/{batch_id}/cancel", f"cancel {batch_id}")

    async def list_since(self, since: float) -> list[dict[str, Any]]:
        """Every batch created at or after `since` (epoch seconds), newest first, page by page."""
        found: list[dict[str, Any]] = []
        after: str | None = None
        while True:
            params = {"limit": str(LIST_PAGE_SIZE), **({"after": after} if after else {})}
            page = await self._call("GET", "/batches", "list batches", params=params)
            data = [b for b in page.get("data") or [] if isinstance(b, dict)]
            found += [b for b in data if float(b.get("created_at") or 0) >= since]
            if not page.get("has_more") or not data or float(data[-1].get("created_at") or 0) < since:
                return found
            after = str(data[-1]["id"])

    async def download(self, file_id: str, dest: Path) -> None:
        """Write a file's content to `dest` (written in chunks off the loop)."""
        url = f"{self.surface.base}/files/{file_id}/content"
        for attempt in range(1, self.limits.max_attempts + 1):
            try:
                async with self.session.get(
                    url, params=self.surface.params, headers=self.surface.headers, timeout=self._timeout()
                ) as resp:
                    if resp.status != 200:
                        body = await resp.json(content_type=None)
                        self._raise_or_retry(resp.status, body, f"download {file_id}", attempt)
                    else:
                        with dest.open("wb") as f:
                            async for chunk in resp.content.iter_chunked(DOWNLOAD_CHUNK_BYTES):
                                await asyncio.to_thread(f.write, chunk)
                        return
            except (
                aiohttp.ClientError,
                TimeoutError,
                ValueError,
            ) as err:  # ValueError: an error body not JSON
                self._retry_or_raise_connection(err, f"download {file_id}", attempt)
            await self._sleep(attempt, None)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _call(
        self,
        method: str,
        path: str,
        what: str,
        *,
        json_body: object = None,
        params: Mapping[str, str] | None = None,
        form: Any = None,
        missing_ok: bool = False,
    ) -> dict[str, Any]:
        url = f"{self.surface.base}{path}"
        query = {**self.surface.params, **(params or {})}
        for attempt in range(1, self.limits.max_attempts + 1):
            wait_s: float | None = None
            try:
                async with self.session.request(
                    method,
                    url,
                    params=query,
                    headers=self.surface.headers,
                    json=json_body,
                    data=None if form is None else form(),
                    timeout=self._timeout(),
                ) as resp:
                    body = await resp.json(content_type=None)
                    if resp.status == 200 and isinstance(body, dict):
                        return body
                    if resp.status == 404 and missing_ok:
                        raise _Missing
                    wait_s = retry_after_s(resp.headers, now=time.time())
                    self._raise_or_retry(resp.status, body, what, attempt)
            except (aiohttp.ClientError, TimeoutError, ValueError) as err:  # ValueError: a body not JSON
                self._retry_or_raise_connection(err, what, attempt)
            await self._sleep(attempt, wait_s)
        raise AssertionError("unreachable")  # pragma: no cover

    def _raise_or_retry(self, status: int, body: object, what: str, attempt: int) -> None:
        code, message = error_code(body), error_message(body, f"HTTP {status}")
        if status in _FATAL_STATUSES:
            raise RunAborted(f"{what}: HTTP {status} {code or ''} {message}".strip(), http_status=status)
        is_retryable = status in _RETRY_STATUSES or status >= 500
        if not is_retryable or attempt >= self.limits.max_attempts:
            raise BatchApiError(what, status, code, message)
        log.info("%s: HTTP %d, attempt %d of %d; retrying", what, status, attempt, self.limits.max_attempts)

    def _retry_or_raise_connection(self, err: Exception, what: str, attempt: int) -> None:
        if attempt >= self.limits.max_attempts:
            raise BatchApiError(what, 0, None, f"{type(err).__name__}: {err}") from err
        log.info(
            "%s: %s, attempt %d of %d; retrying", what, type(err).__name__, attempt, self.limits.max_attempts
        )

    async def _sleep(self, attempt: int, wait_s: float | None) -> None:
        if wait_s is not None and wait_s <= self.limits.max_retry_after_s:
            await asyncio.sleep(wait_s)
            return
        await asyncio.sleep(backoff_s(attempt, self.limits, self._rng))

    def _timeout(self) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(
            total=None, sock_connect=self.limits.timeout_s, sock_read=self.limits.timeout_s
        )
