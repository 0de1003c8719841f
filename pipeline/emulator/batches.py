"""The emulator's Files and Batches APIs: upload, create, retrieve, list, cancel, file content.

Routes under three prefixes: ``/v1`` (OpenAI, ``Authorization: Bearer``), ``/openai/v1`` (Azure v1) and
``/openai`` (Azure dated, ``api-version`` of 2024-07-01-preview or later), both Azure ones with ``api-key``.
Files live in a temporary folder (input files may be gigabytes); batches in memory.

A batch is validated when created (refusing a byte-order mark, lines that are not JSON, duplicate
``custom_id``\\ s, more than one ``body.model``, a ``url`` other than the batch's endpoint; and, with
``batch_enqueued_tokens`` set, more estimated prompt tokens enqueued than that: ``token_limit_exceeded``),
then waits ``batch_delay_s`` and answers each line as the chat route would (``wire.inspect_body`` and
``wire.completion_body``: the same bill to the token). It can expire part-way (``expire_after_lines``:
the rest get ``batch_expired`` error lines), stall until cancelled (``stall_after_lines``), and fail
every Nth line (``batch_fail_every``); uploads over ``batch_max_file_bytes`` are refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import tempfile
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import BodyPartReader, web

from pipeline.config import EmulatorConfig, is_batch_api_version
from pipeline.emulator.wire import (
    FILTER_MARKER,
    Invalid,
    Prompt,
    completion_body,
    error_body,
    filtered_prompt_body,
    inspect_body,
)

PREFIXES = ("/v1", "/openai/v1", "/openai")
LINES_PER_STEP = 100  # lines answered between looks at cancellation
LIVE_STATUSES = frozenset({"validating", "in_progress", "finalizing", "cancelling"})
MAX_LIST_LIMIT = 100
_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True, slots=True)
class BatchScript:
    """How the next batch created behaves, overriding the config (tests script faults with these)."""

    expire_after_lines: int | None = None  # answer this many lines, then expire
    stall_after_lines: int | None = None  # answer this many lines, then wait to be cancelled
    fail_create: dict[str, Any] | None = None  # answer the create call with this error body (HTTP 400)


@dataclass(slots=True)
class BatchStats:
    """What the emulator billed and saw across every batch, for tests and benchmarks."""

    billed: Counter[str] = field(default_factory=Counter)  # custom_id → lines answered 200 (billed)
    overlaps: int = 0  # custom_ids submitted while another live batch held them
    prompt_tokens: int = 0
    completion_tokens: int = 0
    created: int = 0


class BatchService:
    """The Files and Batches routes of one Emulator."""

    def __init__(self, cfg: EmulatorConfig, *, api_key: str, deployment: str, model: str) -> None:
        self.cfg, self.api_key, self.deployment, self.model = cfg, api_key, deployment, model
        self.files: dict[str, dict[str, Any]] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.stats = BatchStats()
        self.scripts: deque[BatchScript] = deque()
        self._folder: tempfile.TemporaryDirectory[str] | None = None
        self._cancelled: dict[str, asyncio.Event] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._held: dict[str, set[str]] = {}  # live batch id → its custom_ids
        self._tokens: dict[str, int] = {}  # live batch id → its lines' prompt tokens (enqueued)

    def add_routes(self, app: web.Application) -> None:
        for prefix in PREFIXES:
            route = self._guarded
            app.router.add_route("POST", f"{prefix}/files", route(self.upload))
            app.router.add_route("GET", f"{prefix}/files", route(self.list_files))
            app.router.add_route("GET", f"{prefix}/files/{{file_id}}", route(self.get_file))
            app.router.add_route("DELETE", f"{prefix}/files/{{file_id}}", route(self.delete_file))
            app.router.add_route("GET", f"{prefix}/files/{{file_id}}/content", route(self.content))
            app.router.add_route("POST", f"{prefix}/batches", route(self.create))
            app.router.add_route("GET", f"{prefix}/batches", route(self.list_batches))
            app.router.add_route("GET", f"{prefix}/batches/{{batch_id}}", route(self.retrieve))
            app.router.add_route("POST", f"{prefix}/batches/{{batch_id}}/cancel", route(self.cancel))

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None

    def _guarded(self, handler: Callable[[web.Request], Any]) -> Callable[[web.Request], Any]:
        async def check(request: web.Request) -> web.StreamResponse:
            path = request.path
            if path.startswith("/v1/"):
                is_allowed = secrets.compare_digest(
                    request.headers.get("Authorization", ""), f"Bearer {self.api_key}"
                )
            else:
                is_allowed = secrets.compare_digest(request.headers.get("api-key", ""), self.api_key)
            if not is_allowed:
                return web.json_response(error_body("401", "Access denied: invalid key."), status=401)
            if not path.startswith(("/v1/", "/openai/v1/")):
                version = request.query.get("api-version", "")
                if not is_batch_api_version(version) or version == "v1":
                    return web.json_response(error_body("404", "Resource not found"), status=404)
            response: web.StreamResponse = await handler(request)
            return response

        return check

    def _path(self) -> Path:
        if self._folder is None:
            self._folder = tempfile.TemporaryDirectory(prefix="emulator-files-")
        return Path(self._folder.name)

    # ---- files -------------------------------------------------------------------------------------

    async def upload(self, request: web.Request) -> web.Response:
        reader = await request.multipart()
        purpose, file_id, size, name = "", f"file-{secrets.token_hex(12)}", 0, "upload.jsonl"
        dest = self._path() / file_id
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                continue
            if part.name == "purpose":
                purpose = (await part.text()).strip()
            elif part.name == "file":
                name = part.filename or name
                with dest.open("wb") as f:
                    while chunk := await part.read_chunk(1 << 20):
                        size += len(chunk)
                        if size > self.cfg.batch_max_file_bytes:
                            break
                        await asyncio.to_thread(f.write, chunk)
        if size > self.cfg.batch_max_file_bytes:
            dest.unlink(missing_ok=True)
            message = f"File is too large: the limit is {self.cfg.batch_max_file_bytes} bytes."
            return web.json_response(error_body("file_too_large", message, param="file"), status=400)
        if purpose != "batch":
            dest.unlink(missing_ok=True)
            return web.json_response(
                error_body("invalid_value", "purpose must be 'batch'", param="purpose"), status=400
            )
        self.files[file_id] = self._file_object(file_id, size, name, "batch")
        return web.json_response(self.files[file_id])

    @staticmethod
    def _file_object(file_id: str, size: int, name: str, purpose: str) -> dict[str, Any]:
        return {
            "id": file_id,
            "object": "file",
            "bytes": size,
            "created_at": int(time.time()),
            "filename": name,
            "purpose": purpose,
            "status": "processed",
        }

    async def list_files(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": list(self.files.values()), "has_more": False})

    async def get_file(self, request: web.Request) -> web.Response:
        found = self.files.get(request.match_info["file_id"])
        return web.json_response(found) if found else _not_found("file")

    async def delete_file(self, request: web.Request) -> web.Response:
        file_id = request.match_info["file_id"]
        if self.files.pop(file_id, None) is None:
            return _not_found("file")
        (self._path() / file_id).unlink(missing_ok=True)
        return web.json_response({"id": file_id, "object": "file", "deleted": True})

    async def content(self, request: web.Request) -> web.StreamResponse:
        file_id = request.match_info["file_id"]
        if file_id not in self.files:
            return _not_found("file")
        return web.FileResponse(self._path() / file_id, headers={"Content-Type": "application/octet-stream"})

    # ---- batches -----------------------------------------------------------------------------------

    async def create(self, request: web.Request) -> web.Response:
        body = await request.json()
        script = self.scripts.popleft() if self.scripts else BatchScript()
        if script.fail_create is not None:
            return web.json_response(script.fail_create, status=400)
        file_id = body.get("input_file_id") if isinstance(body, dict) else None
        if file_id not in self.files:
            return web.json_response(
                error_body("invalid_value", "input_file_id not found", param="input_file_id"), status=400
            )
        if body.get("completion_window") != "24h":
            return web.json_response(
                error_body("invalid_value", "completion_window must be 24h", param="completion_window"),
                status=400,
            )
        now = int(time.time())
        batch_id = f"batch_{secrets.token_hex(12)}"
        batch = {
            "id": batch_id,
            "object": "batch",
            "endpoint": body.get("endpoint"),
            "errors": None,
            "input_file_id": file_id,
            "completion_window": "24h",
            "status": "validating",
            "output_file_id": None,
            "error_file_id": None,
            "created_at": now,
            "in_progress_at": None,
            "expires_at": now + 86_400,
            "finalizing_at": None,
            "completed_at": None,
            "failed_at": None,
            "expired_at": None,
            "cancelling_at": None,
            "cancelled_at": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "metadata": dict(body.get("metadata") or {}),
        }
        self.batches[batch_id] = batch
        self.stats.created += 1
        self._cancelled[batch_id] = asyncio.Event()
        task = asyncio.get_running_loop().create_task(
            self._process(batch_id, script), name=f"batch-{batch_id}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return web.json_response(batch)

    async def retrieve(self, request: web.Request) -> web.Response:
        found = self.batches.get(request.match_info["batch_id"])
        return web.json_response(found) if found else _not_found("batch")

    async def list_batches(self, request: web.Request) -> web.Response:
        newest_first = list(reversed(self.batches.values()))
        after = request.query.get("after")
        if after:
            ids = [b["id"] for b in newest_first]
            newest_first = newest_first[ids.index(after) + 1 :] if after in ids else []
        limit = max(1, min(MAX_LIST_LIMIT, int(request.query.get("limit", "20"))))
        page = newest_first[:limit]
        return web.json_response(
            {
                "object": "list",
                "data": page,
                "has_more": len(newest_first) > limit,
                "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None,
            }
        )

    async def cancel(self, request: web.Request) -> web.Response:
        batch = self.batches.get(request.match_info["batch_id"])
        if batch is None:
            return _not_found("batch")
        if batch["status"] in LIVE_STATUSES and batch["status"] != "cancelling":
            batch["status"], batch["cancelling_at"] = "cancelling", int(time.time())
            self._cancelled[batch["id"]].set()
        return web.json_response(batch)

    # ---- processing ----------------------------------------------------------------------------------

    async def _process(self, batch_id: str, script: BatchScript) -> None:
        batch = self.batches[batch_id]
        lines, errors = await asyncio.to_thread(self._read_input, batch)
        ids = {line.custom_id for line in lines}
        tokens = sum(line.prompt.prompt_tokens for line in lines if isinstance(line.prompt, Prompt))
        quota = self.cfg.batch_enqueued_tokens
        if not errors and quota and sum(self._tokens.values()) + tokens > quota:
            message = (
                f"The number of enqueued tokens has surpassed the configured limit of {quota} for the "
                f"deployment '{self.deployment}'. Please either increase the limit or try again once "
                "the current jobs have finished."
            )
            errors = [{"code": "token_limit_exceeded", "message": message, "line": None, "param": None}]
        if errors:
            batch.update(
                status="failed", failed_at=int(time.time()), errors={"object": "list", "data": errors}
            )
            return
        self.stats.overlaps += sum(len(ids & held) for held in self._held.values())
        self._held[batch_id] = ids
        self._tokens[batch_id] = tokens
        try:
            await self._answer_all(batch, lines, script)
        finally:
            self._held.pop(batch_id, None)
            self._tokens.pop(batch_id, None)

    def _read_input(self, batch: dict[str, Any]) -> tuple[list[_Line], list[dict[str, Any]]]:
        """Validate the input file as the service does, line by line; each line's prompt (or why it is
        invalid). Bodies are not kept: a file may hold gigabytes of images. Blocking."""
        lines: list[_Line] = []
        errors: list[dict[str, Any]] = []
        seen: set[str] = set()
        models: set[str] = set()

        def refuse(code: str, message: str, n: int | None) -> None:
            errors.append({"code": code, "message": message, "line": n, "param": None})

        with (self._path() / batch["input_file_id"]).open("rb") as f:
            for n, raw in enumerate(f, 1):
                if n == 1 and raw.startswith(_BOM):
                    refuse(
                        "invalid_json_line",
                        "The file starts with a byte-order mark (BOM); use UTF-8 without one.",
                        1,
                    )
                    break
                if not raw.strip():
                    continue
                try:
                    line = json.loads(raw)
                except ValueError:
                    refuse("invalid_json_line", f"Line {n} is not valid JSON.", n)
                    continue
                custom_id = str(line.get("custom_id") or "") if isinstance(line, dict) else ""
                if not custom_id:
                    refuse("missing_required_parameter", f"Line {n} has no custom_id.", n)
                    continue
                if custom_id in seen:
                    refuse("duplicate_custom_id", f"The custom_id {custom_id!r} appears more than once.", n)
                seen.add(custom_id)
                if line.get("url") != batch["endpoint"]:
                    refuse(
                        "invalid_url", f"Line {n}: url must be the batch's endpoint {batch['endpoint']}.", n
                    )
                body = line.get("body")
                model = body.get("model") if isinstance(body, dict) else None
                models.add(str(model))
                if len(models) > 1:
                    refuse("model_mismatch", f"Line {n}: every line must use the same model.", n)
                    break
                try:
                    prompt: Prompt | Invalid = inspect_body(
                        body, self.model if model == self.deployment else None
                    )
                except Invalid as err:
                    prompt = err
                lines.append(_Line(custom_id, prompt))
        if len(lines) > self.cfg.batch_max_file_requests:
            refuse(
                "too_many_requests",
                f"The file has {len(lines)} requests; the limit is {self.cfg.batch_max_file_requests}.",
                None,
            )
        return lines, errors[:MAX_ERRORS]

    async def _answer_all(self, batch: dict[str, Any], lines: list[_Line], script: BatchScript) -> None:
        batch_id, cancelled = batch["id"], self._cancelled[batch["id"]]
        batch.update(status="in_progress", in_progress_at=int(time.time()))
        batch["request_counts"]["total"] = len(lines)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(cancelled.wait(), timeout=self.cfg.batch_delay_s)
        expire_after = (
            script.expire_after_lines
            if script.expire_after_lines is not None
            else (self.cfg.batch_expire_after_lines or None)
        )
        output: list[str] = []
        failures: list[str] = []
        end_code: str | None = None
        for n, line in enumerate(lines):
            if cancelled.is_set():
                end_code = "batch_cancelled"
            elif expire_after is not None and n >= expire_after:
                end_code = "batch_expired"
            elif script.stall_after_lines is not None and n >= script.stall_after_lines:
                await cancelled.wait()
                end_code = "batch_cancelled"
            if end_code is not None:
                failures += [
                    _error_line(rest.custom_id, end_code, "The batch ended before this request ran.")
                    for rest in lines[n:]
                ]
                break
            text, is_ok = self._answer(batch_id, n, line)
            (output if is_ok else failures).append(text)
            batch["request_counts"]["completed" if is_ok else "failed"] += 1
            if n % LINES_PER_STEP == LINES_PER_STEP - 1:
                await asyncio.sleep(0)  # let retrieve and cancel calls in
        batch.update(status="finalizing", finalizing_at=int(time.time()))
        for key, texts, purpose in (
            ("output_file_id", output, "batch_output"),
            ("error_file_id", failures, "batch_output"),
        ):
            if texts:
                file_id = f"file-{secrets.token_hex(12)}"
                data = "".join(texts).encode("utf-8")
                await asyncio.to_thread((self._path() / file_id).write_bytes, data)
                self.files[file_id] = self._file_object(
                    file_id, len(data), f"{batch_id}_{key}.jsonl", purpose
                )
                batch[key] = file_id
        final = {"batch_cancelled": "cancelled", "batch_expired": "expired"}.get(end_code or "", "completed")
        batch.update(status=final, **{f"{final}_at": int(time.time())})

    def _answer(self, batch_id: str, n: int, line: _Line) -> tuple[str, bool]:
        """One line's answer as the chat route gives it; (JSONL text, whether it goes to the output file)."""
        prompt, request_id = line.prompt, f"req_{secrets.token_hex(8)}"
        fail_every = self.cfg.batch_fail_every
        if isinstance(prompt, Invalid):
            body = error_body(prompt.code, prompt.message, param=prompt.param, type="invalid_request_error")
            return _response_line(line.custom_id, 400, body, request_id), False
        if fail_every and n % fail_every == fail_every - 1:
            return _error_line(
                line.custom_id, "server_error", "The server had an error processing this request."
            ), False
        if FILTER_MARKER in prompt.prompt_text:
            return _response_line(line.custom_id, 400, filtered_prompt_body(), request_id), True
        body = completion_body(prompt, f"chatcmpl-{prompt.seed:016x}{n:08x}")
        usage = body["usage"]
        self.stats.billed[line.custom_id] += 1
        self.stats.prompt_tokens += usage["prompt_tokens"]
        self.stats.completion_tokens += usage["completion_tokens"]
        return _response_line(line.custom_id, 200, body, request_id), True


MAX_ERRORS = 20  # a failed batch lists at most this many errors


@dataclass(frozen=True, slots=True)
class _Line:
    custom_id: str
    prompt: Prompt | Invalid


def _response_line(custom_id: str, status: int, body: dict[str, Any], request_id: str) -> str:
    line = {
        "id": f"batch_req_{secrets.token_hex(8)}",
        "custom_id": custom_id,
        "response": {"status_code": status, "request_id": request_id, "body": body},
        "error": None,
    }
    return json.dumps(line, ensure_ascii=False) + "\n"


def _error_line(custom_id: str, code: str, message: str) -> str:
    line = {
        "id": f"batch_req_{secrets.token_hex(8)}",
        "custom_id": custom_id,
        "response": None,
        "error": {"code": code, "message": message},
    }
    return json.dumps(line, ensure_ascii=False) + "\n"


def _not_found(what: str) -> web.Response:
    return web.json_response(error_body("not_found", f"No such {what}."), status=404)
