"""Batch input files: one JSONL line per row, its ``custom_id``, and files packed under the services' limits.

A line is ``{"custom_id", "method": "POST", "url", "body"}`` where ``body`` is the row's request exactly
as live mode plans it (``request.plan_request``), with ``model`` set: the Azure deployment, or the OpenAI
model. Every line of a file has the same ``model`` by construction (one config, one run). Files are UTF-8
without a byte-order mark, and each stays under ``batch.max_file_bytes`` (measured, not estimated),
``batch.max_file_requests`` lines and, when ``batch.enqueued_tokens`` is set, that many estimated tokens.

``custom_id`` is the row's id when it is short and plain (at most 64 characters of letters, digits and
``_.:-``); otherwise a digest of it prefixed with ``~``, which no plain id contains, so a mapped id never
equals another row's own id. The ledger records the row id beside every custom_id.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from pipeline.config import BatchConfig, EndpointConfig
from pipeline.records import ErrorKind, ImageTask, RowError

CUSTOM_ID_MAX_CHARS = 64
MAPPED_PREFIX = "~"  # outside the plain set below: a mapped id never collides with a plain row id
_PLAIN_ID = re.compile(r"[A-Za-z0-9_.:\-]{1,64}")
_DIGEST_CHARS = 40


def custom_id_for(row_id: str) -> str:
    """The row's custom_id: the id itself when plain and short, else ``~`` + a SHA-256 digest of it."""
    if _PLAIN_ID.fullmatch(row_id):
        return row_id
    return MAPPED_PREFIX + hashlib.sha256(row_id.encode("utf-8")).hexdigest()[:_DIGEST_CHARS]


def uses_v1_surface(endpoint: EndpointConfig) -> bool:
    """Whether the service is reached at its v1 surface (OpenAI, the emulator, Azure api_version "v1")
    rather than Azure's dated ``/openai/...?api-version=`` one."""
    return endpoint.provider != "azure" or endpoint.api_version == "v1"


def line_url(endpoint: EndpointConfig) -> str:
    """The ``url`` of every line and the ``endpoint`` of the batch: Azure's dated surface omits ``/v1``."""
    return "/v1/chat/completions" if uses_v1_surface(endpoint) else "/chat/completions"


def line_model(endpoint: EndpointConfig) -> str:
    """``body.model`` on every line: Azure names its Global-Batch deployment there, others the model."""
    return endpoint.deployment if endpoint.provider == "azure" else endpoint.model


def batch_line(body: Mapping[str, Any], custom_id: str, endpoint: EndpointConfig) -> bytes:
    """One JSONL line, UTF-8, newline-terminated. Pure."""
    line = {
        "custom_id": custom_id,
        "method": "POST",
        "url": line_url(endpoint),
        "body": {**body, "model": line_model(endpoint)},
    }
    return (json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")


@dataclass(frozen=True, slots=True)
class PackedRow:
    """A row in a batch file: enough to build its result when its answer comes back, in any later run."""

    custom_id: str
    task: ImageTask
    estimated_prompt_tokens: int


@dataclass(frozen=True, slots=True)
class PackedFile:
    """A closed input file on disk, ready to upload."""

    file_no: int  # counts the output's files from 1, across runs
    path: Path
    rows: tuple[PackedRow, ...]
    size_bytes: int
    tokens: int  # the lines' estimated prompt tokens: what the file adds to the enqueued-token quota


@dataclass(slots=True)
class _OpenFile:
    file_no: int
    path: Path
    handle: IO[bytes]
    rows: list[PackedRow] = field(default_factory=list)
    size_bytes: int = 0
    tokens: int = 0


class Packer:
    """Writes lines into numbered files in `folder`, starting a new file before one would pass a limit.

    Blocking (it writes files): call it from a thread. Refuses a custom_id already in the open file.
    """

    def __init__(self, folder: Path, first_file_no: int, cfg: BatchConfig) -> None:
        self.folder, self.cfg = folder, cfg
        self._next_no = first_file_no
        self._open: _OpenFile | None = None
        self._ids: set[str] = set()

    def check(self, line: bytes, row: PackedRow) -> RowError | None:
        """Why this line can never go into a file (too large alone), or None."""
        tokens_cap = self.cfg.enqueued_tokens
        if len(line) > self.cfg.max_file_bytes:
            reason = f"its batch line is {len(line):,} bytes, over batch.max_file_bytes = {self.cfg.max_file_bytes:,}"
            return RowError(row.task.row_id, f"{reason}; not sent", kind=ErrorKind.TOO_LARGE)
        if tokens_cap and row.estimated_prompt_tokens > tokens_cap:
            reason = f"{row.estimated_prompt_tokens:,} tokens, over batch.enqueued_tokens = {tokens_cap:,}"
            return RowError(row.task.row_id, f"{reason}; not sent", kind=ErrorKind.OVER_BUDGET)
        return None

    def add(self, line: bytes, row: PackedRow) -> PackedFile | None:
        """Append `line` (checked with `check` first); returns the file it closed to make room, if any."""
        closed = None
        current = self._open
        if current is not None and not self._fits(current, line, row):
            closed = self._close()
        if self._open is None:
            path = self.folder / f"input-{self._next_no:06d}.jsonl"
            self._open = _OpenFile(self._next_no, path, open(path, "wb"))  # noqa: SIM115  # closed in _close
            self._next_no += 1
            self._ids.clear()
        current = self._open
        if row.custom_id in self._ids:
            raise ValueError(f"custom_id {row.custom_id!r} twice in {current.path.name}")  # never by design
        self._ids.add(row.custom_id)
        current.handle.write(line)
        current.rows.append(row)
        current.size_bytes += len(line)
        current.tokens += row.estimated_prompt_tokens
        return closed

    def finish(self) -> PackedFile | None:
        """Close the open file, if any rows went in."""
        return self._close() if self._open is not None else None

    def _fits(self, current: _OpenFile, line: bytes, row: PackedRow) -> bool:
        cfg = self.cfg
        tokens_ok = (
            not cfg.enqueued_tokens or current.tokens + row.estimated_prompt_tokens <= cfg.enqueued_tokens
        )
        return (
            current.size_bytes + len(line) <= cfg.max_file_bytes
            and len(current.rows) < cfg.max_file_requests
            and tokens_ok
        )

    def _close(self) -> PackedFile:
        current, self._open = self._open, None
        assert current is not None
        current.handle.flush()
        current.handle.close()
        return PackedFile(
            current.file_no, current.path, tuple(current.rows), current.size_bytes, current.tokens
        )
