"""A local aiohttp server that answers like Azure OpenAI "GPT-4 Turbo with Vision", plus the OpenAI route.

For demos, tests, benchmarks and quota rehearsals. A request meets these steps in order; the first that
answers wins:

1. route: Azure ``POST /openai/deployments/{deployment}/chat/completions`` with ``api-key``, or OpenAI
   ``POST /v1/chat/completions`` with ``Authorization: Bearer``; anything else is 404;
2. the key (401 in the route's shape), then a scripted ``Fault`` if one is queued;
3. Azure only: ``api-version`` present and the deployment known, else 404 as Azure answers;
4. the body, validated like the service (400); its prompt tokens are counted by
   ``pipeline.tokens.count_prompt_tokens``, so a bill and an estimate agree to the token;
5. quota, when configured: charged at arrival with prompt tokens + max_tokens over a sliding 10 s window,
   else 429 with ``retry-after-ms`` and ``retry-after`` (a 429 is not charged);
6. seeded latency, then the filter marker (400 ``content_filter``), seeded faults (500 or a dropped
   connection), and finally a 200 whose description is deterministic for the request.

Image sizes come from the data URL's header (Pillow, no full decode). An http(s) image is never fetched:
its size is unknown, so it is billed at the most an image of its detail can cost.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import http
import json
import math
import random
import re
import secrets
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from io import BytesIO
from pathlib import Path
from typing import IO, Any, Literal, TypeVar

import bpe_openai
from aiohttp import web
from PIL import Image

from pipeline import tokens
from pipeline.config import EmulatorConfig
from pipeline.records import DETAILS, FILTER_CATEGORIES

FILTER_MARKER = "[[filter]]"  # a prompt holding it is refused: HTTP 400, error.code "content_filter"
COMPLETION_FILTER_MARKER = "[[filter-completion]]"  # 200 with finish_reason "content_filter", no content
FINISH_OBJECT_MARKER = "[[finish-object]]"  # finish_reason as an object, as some Azure deployments send it

MAX_IMAGES_PER_REQUEST = 10  # reference: "a limit of 10 images per chat request"
DEFAULT_MAX_TOKENS = 16  # reference: without max_tokens "the return output will be cut off"
QUOTA_WINDOW_S = 10.0  # Azure enforces a per-minute quota over 10 s windows, a sixth of it each
WINDOWS_PER_MINUTE = 6
RPM_PER_1000_TPM = 6  # Azure's default ratio when only a token quota is set
LATENCY_JITTER = 0.2  # latency varies ±20% around EmulatorConfig.latency_s
DESCRIPTION_WORDS = (20, 80)
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "WEBP")  # what the service accepts
MAX_BODY_BYTES = 64 * 1024 * 1024  # the emulator's own limit; aiohttp answers 413 above it
INLINE_BODY_BYTES = 256 * 1024  # larger bodies are parsed and their images read in a thread
SHUTDOWN_TIMEOUT_S = 1.0  # stop() gives answers still sleeping this long
DROPPED = 0  # the status recorded for a connection closed without an answer

Route = Literal["azure", "openai", "other"]
T = TypeVar("T")

_AZURE_PATH = re.compile(r"/openai/deployments/([^/]+)/chat/completions/?")
_OPENAI_PATH = re.compile(r"/v1/chat/completions/?")
_DATA_URL = re.compile(r"data:image/[A-Za-z0-9.+-]+;base64,(.*)", re.DOTALL)
_SECRET_HEADERS = ("api-key", "authorization")
_SAFE = {category: {"filtered": False, "severity": "safe"} for category in FILTER_CATEGORIES}
_PHRASES = {status.value: status.phrase for status in http.HTTPStatus}
_NOT_JSON = object()  # the body of a request that could not be parsed

# The services' own words, so that a client's error messages read as they will in production.
_AZURE_401 = (
    "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid key "
    "for an active subscription and use a correct regional API endpoint for your resource."
)
_OPENAI_401 = (
    "Incorrect API key provided. You can find your API key at https://platform.openai.com/account/api-keys."
)
_DEPLOYMENT_404 = (
    "The API deployment for this resource does not exist. If you created the deployment within the last 5 "
    "minutes, please wait a moment and try again."
)
_FILTERED_400 = (
    "The response was filtered due to the prompt triggering Azure OpenAI's content management policy. "
    "Please modify your prompt and retry."
)
_QUOTA_429 = (
    "Requests to the ChatCompletions_Create Operation under Azure OpenAI API version 2024-02-15-preview have "
    "exceeded {limit} rate limit of your current OpenAI S0 pricing tier. Please retry after {wait_s} "
    "seconds. Please go here: https://aka.ms/oai/quotaincrease if you would like to further increase the "
    "default rate limit."
)
_SERVER_500 = "The server had an error while processing your request. Sorry about that!"


@dataclass(frozen=True, slots=True)
class Fault:
    """One scripted answer for the next request (after its key is checked)."""

    status: int = 500
    headers: Mapping[str, str] = field(default_factory=dict)  # e.g. {"retry-after-ms": "1500"}
    body: object | None = None  # JSON body; an Azure-shaped error body when None
    delay_s: float = 0.0  # answer after this long (a slow answer)
    drop: bool = False  # close the connection without answering


@dataclass(frozen=True, slots=True)
class ReceivedRequest:
    """What the emulator saw and answered, for tests and benchmarks."""

    at: float  # loop time of arrival
    route: Route  # "other" for a path that is neither API route (answered 404)
    headers: Mapping[str, str]  # api-key and Authorization values replaced by "<redacted>"
    body: object | None  # the parsed JSON body; None when not JSON or keep_bodies=False
    prompt_text: str  # the text parts of the user messages, joined with "\n"
    status: int  # DROPPED (0) when the connection was closed without an answer
    prompt_tokens: int | None  # billed, 200s only
    completion_tokens: int | None


@dataclass(slots=True)
class EmulatorStats:
    """Live counters of every request since the emulator was made."""

    requests: int = 0
    by_status: Counter[int] = field(default_factory=Counter)
    prompt_tokens: int = 0  # billed, 200s only
    completion_tokens: int = 0


@dataclass(frozen=True, slots=True)
class _Prompt:
    """A valid request, as much of it as the answer needs."""

    model: str  # for token accounting
    prompt_text: str
    image_sizes: tuple[tuple[int, int] | None, ...]
    prompt_tokens: int
    max_tokens: int
    seed: int  # from the prompt text and image URLs: the same request gets the same description


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    body: object = None
    headers: Mapping[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    drop: bool = False
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class _Invalid(Exception):
    """The body breaks a rule of the API: a 400 naming the parameter."""

    def __init__(self, message: str, param: str | None, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


class _Window:
    """Per-minute budgets enforced as Azure does: a sixth of each over a sliding 10 s window.

    Pure: the caller passes the loop time. A request bigger than the whole window can never fit; it is
    told to wait a full window, so a client honouring retry-after is slowed rather than spun.
    """

    def __init__(self, tokens_per_minute: int, requests_per_minute: int) -> None:
        if requests_per_minute <= 0 < tokens_per_minute:
            requests_per_minute = max(1, tokens_per_minute * RPM_PER_1000_TPM // 1000)
        self.token_limit = tokens_per_minute / WINDOWS_PER_MINUTE if tokens_per_minute > 0 else math.inf
        # at least one request per window, or a small RPM would refuse everything
        self.request_limit = max(1.0, requests_per_minute / WINDOWS_PER_MINUTE)
        self._charges: deque[tuple[float, int]] = deque()  # (loop time, tokens), oldest first
        self._tokens = 0

    def _expire(self, now: float) -> None:
        while self._charges and self._charges[0][0] <= now - QUOTA_WINDOW_S:
            self._tokens -= self._charges.popleft()[1]

    def try_charge(self, now: float, cost_tokens: int) -> tuple[float, str] | None:
        """Charge one request: None when it fits, else (seconds to wait, "token" or "call")."""
        self._expire(now)
        over_tokens = self._tokens + cost_tokens - self.token_limit
        over_requests = len(self._charges) + 1 - self.request_limit
        if over_tokens <= 0 and over_requests <= 0:
            self._charges.append((now, cost_tokens))
            self._tokens += cost_tokens
            return None
        limit = "token" if over_tokens > 0 else "call"
        freed_tokens = freed_requests = 0
        for at, charged in self._charges:  # wait until enough of the oldest charges leave the window
            freed_tokens, freed_requests = freed_tokens + charged, freed_requests + 1
            if freed_tokens >= over_tokens and freed_requests >= over_requests:
                return at + QUOTA_WINDOW_S - now, limit
        return QUOTA_WINDOW_S, limit

    def remaining_headers(self, now: float) -> dict[str, str]:
        """What is left in the window, scaled per minute as Azure reports it."""
        self._expire(now)
        left = {"x-ratelimit-remaining-requests": self.request_limit - len(self._charges),
                "x-ratelimit-remaining-tokens": self.token_limit - self._tokens}
        return {name: str(max(0, int(n * WINDOWS_PER_MINUTE))) for name, n in left.items() if n != math.inf}


def _parse_json(raw: bytes) -> object:
    try:
        return json.loads(raw)
    except ValueError:  # UnicodeDecodeError included
        return _NOT_JSON


def _user_text(body: object) -> str:
    """The text parts of the user messages joined with newlines; tolerant of any body."""
    messages = body.get("messages") if isinstance(body, dict) else None
    texts: list[str] = []
    for message in messages if isinstance(messages, list) else ():
        is_user = isinstance(message, dict) and message.get("role") == "user"
        content = message.get("content") if is_user else None
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts += [p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
    return "\n".join(texts)


def _image_size(url: str, param: str) -> tuple[int, int] | None:
    """The size of a data-URL image, read from its header; None for an http(s) URL (never fetched)."""
    if url.startswith(("http://", "https://")):
        return None
    if (match := _DATA_URL.fullmatch(url)) is None:
        raise _Invalid("Invalid image URL: use http(s) or data:image/<format>;base64,<data>.", param)
    try:
        with Image.open(BytesIO(base64.b64decode(match.group(1), validate=True))) as image:
            image_format, size = image.format, image.size
    except (binascii.Error, OSError, ValueError, Image.DecompressionBombError) as err:
        raise _Invalid(f"Invalid image data ({type(err).__name__}).", param, "BadRequest") from None
    if image_format not in IMAGE_FORMATS:
        raise _Invalid(f"Unsupported image format {image_format}: use {', '.join(IMAGE_FORMATS)}.", param)
    return size


def _image_parts(content: object, role: str, where: str) -> list[tuple[str, str]]:
    """Validate one message's content; return its images as (url, param) pairs."""
    if isinstance(content, str):
        return []
    if not isinstance(content, list):
        raise _Invalid("content must be a string or an array of parts.", f"{where}.content", "invalid_type")
    images = []
    for n, part in enumerate(content):
        param = f"{where}.content.[{n}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            continue
        image_url = part.get("image_url") if kind == "image_url" else None
        if not isinstance(image_url, dict) or not isinstance(image_url.get("url"), str):
            raise _Invalid("A part is {type: text, text} or {type: image_url, image_url: {url}}.", param)
        if role != "user":
            raise _Invalid("Image URLs are only allowed for messages with role 'user'.", param)
        if image_url.get("detail", "auto") not in DETAILS:
            raise _Invalid("Invalid detail: use 'low', 'high' or 'auto'.", f"{param}.image_url.detail")
        images.append((image_url["url"], f"{param}.image_url.url"))
    return images


def _inspect(body: object, default_model: str | None) -> _Prompt:
    """Validate a chat body as the service does and count its prompt tokens; raises _Invalid.

    `default_model` is the deployment's model (Azure); None means the body must name one (OpenAI).
    """
    if not isinstance(body, dict):
        raise _Invalid("The body must be a JSON object.", None, "invalid_type")
    model = body.get("model") if default_model is None else default_model
    if not isinstance(model, str) or not model:
        raise _Invalid("You must provide a model parameter.", "model", "missing_required_parameter")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        code = "missing_required_parameter" if messages is None else "invalid_type"
        raise _Invalid("'messages' must be a non-empty array.", "messages", code)
    images: list[tuple[str, str]] = []
    for n, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("system", "user", "assistant"):
            raise _Invalid(f"Invalid role {role!r}: use system, user or assistant.", f"messages.[{n}].role")
        images += _image_parts(message.get("content"), role, f"messages.[{n}]")
    if len(images) > MAX_IMAGES_PER_REQUEST:
        message = f"Too many images in request. Max is {MAX_IMAGES_PER_REQUEST}."
        raise _Invalid(message, "messages", "BadRequest")
    max_tokens = body.get("max_tokens", DEFAULT_MAX_TOKENS)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise _Invalid(f"Invalid max_tokens {max_tokens!r}: must be an integer of at least 1.", "max_tokens")
    sizes = tuple(_image_size(url, param) for url, param in images)
    try:
        prompt_tokens = tokens.count_prompt_tokens(messages, sizes, model)
    except ValueError as err:  # text the encoder refuses, such as a special token
        raise _Invalid(str(err).splitlines()[0], "messages") from None
    text = _user_text(body)
    digest = hashlib.sha256(text.encode())
    for url, _ in images:
        digest.update(url.encode())
    return _Prompt(model, text, sizes, prompt_tokens, max_tokens, int.from_bytes(digest.digest()[:8], "big"))


_SUBJECTS = ("a weathered wooden boat", "two children on bicycles", "a tabby cat asleep on a windowsill",
             "an old stone bridge", "a bowl of ripe lemons", "a lighthouse", "a crowded market stall",
             "a red tram", "a field of sunflowers", "a kitchen table set for breakfast")
_SETTINGS = ("in soft morning light", "under a grey sky", "beside a narrow canal", "at dusk",
             "against a plain white wall", "on a quiet street", "after the rain")
_REMARKS = ("The colours are muted and warm.", "Shadows fall to the left, suggesting late afternoon.",
            "The focus is sharp in the centre and softens toward the edges.",
            "Nothing in the frame appears to be moving.", "A few details are too small to make out.",
            "The composition leaves generous empty space at the top.",
            "Textures of wood, stone and fabric are clearly visible.", "There is no visible text.")


def _describe(prompt: _Prompt) -> str:
    """A plausible description, the same for the same request: 20 to 80 words naming each image's size."""
    rng = random.Random(prompt.seed)
    wanted = rng.randint(*DESCRIPTION_WORDS)
    sentences = ["The request holds no image, so there is nothing to see."] if not prompt.image_sizes else []
    for n, size in enumerate(prompt.image_sizes, start=1):
        name = "The image" if len(prompt.image_sizes) == 1 else f"Image {n}"
        seen = f"{size[0]}x{size[1]} pixels" if size else "a remote image, not fetched"
        sentences.append(f"{name} ({seen}) shows {rng.choice(_SUBJECTS)} {rng.choice(_SETTINGS)}.")
    while len(" ".join(sentences).split()) < wanted:
        sentences.append(rng.choice(_REMARKS))
    return " ".join(" ".join(sentences).split()[:wanted]).rstrip(".,;") + "."


@lru_cache(maxsize=None)
def _encoding(name: str) -> Any:
    return bpe_openai.get_encoding(name)


def _completion(prompt: _Prompt, response_id: str) -> dict[str, Any]:
    """The reference's 200 body, cut at max_tokens (finish_reason "length") as the service cuts it."""
    content: str | None = _describe(prompt)
    completion_tokens = tokens.text_tokens(content, prompt.model)
    finish_reason: object = "stop"
    if completion_tokens > prompt.max_tokens:
        encoding = _encoding(tokens.model_family(prompt.model).encoding)
        content = encoding.decode(encoding.encode(content)[: prompt.max_tokens])
        completion_tokens, finish_reason = prompt.max_tokens, "length"
    completion_filter: dict[str, Any] = dict(_SAFE)
    if COMPLETION_FILTER_MARKER in prompt.prompt_text:  # generated, billed, then withheld
        content, finish_reason = None, "content_filter"
        completion_filter["violence"] = {"filtered": True, "severity": "medium"}
    elif FINISH_OBJECT_MARKER in prompt.prompt_text and finish_reason == "stop":  # the reference's 2nd sample
        finish_reason = {"type": "stop", "stop": "<|fim_suffix|>"}
    message = {"role": "assistant", "content": content}
    choice = {"index": 0, "finish_reason": finish_reason, "message": message,
              "content_filter_results": completion_filter}
    return {
        "id": response_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": prompt.model,
        "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": dict(_SAFE)}],
        "choices": [choice],
        "usage": {"prompt_tokens": prompt.prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt.prompt_tokens + completion_tokens},
    }


def _error(code: str, message: str, **extra: object) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, **extra}}


def _fault_body(status: int) -> dict[str, Any]:
    if status >= 500:
        return _error("InternalServerError", _SERVER_500)
    return _error(str(status), _PHRASES.get(status, f"HTTP {status}"))


def _filtered_prompt_body() -> dict[str, Any]:
    """Azure's 400 for a prompt its content filter rejects."""
    result: dict[str, Any] = {**_SAFE, "violence": {"filtered": True, "severity": "high"}}
    inner = {"code": "ResponsibleAIPolicyViolation", "content_filter_result": result}
    return _error("content_filter", _FILTERED_400, type=None, param="prompt", status=400, innererror=inner)


async def _maybe_in_thread(in_thread: bool, fn: Callable[..., T], *args: object) -> T:
    """Run CPU work for a large body in a thread; a small one costs less than the hop."""
    return await asyncio.to_thread(fn, *args) if in_thread else fn(*args)


class Emulator:
    """The Azure OpenAI / OpenAI chat-completions API on a local port, billing as pipeline.tokens counts.

    ``async with Emulator() as emu:`` (or start/stop). ``emu.url`` is the Azure endpoint, ``emu.url + "/v1"``
    the OpenAI base URL. Random faults and latency jitter are drawn from ``random.Random(cfg.seed)``.
    """

    def __init__(
        self,
        cfg: EmulatorConfig = EmulatorConfig(),
        *,
        api_key: str = "emulator",
        deployment: str = "gpt-4-vision",
        model: str = "gpt-4-turbo",
        request_log: str | Path | None = None,
        keep_bodies: bool = True,
    ) -> None:
        self.cfg, self.api_key, self.deployment, self.model = cfg, api_key, deployment, model
        self.keep_bodies = keep_bodies
        self.url = ""
        self.requests: list[ReceivedRequest] = []
        self.stats = EmulatorStats()
        self._request_log_path = None if request_log is None else Path(request_log)
        self._request_log: IO[str] | None = None
        self._script: deque[Fault] = deque()
        self._rng = random.Random(cfg.seed)
        is_quota = cfg.tokens_per_minute > 0 or cfg.requests_per_minute > 0
        self._window = _Window(cfg.tokens_per_minute, cfg.requests_per_minute) if is_quota else None
        self._runner: web.AppRunner | None = None
        self._answered = 0

    def script(self, *faults: Fault) -> None:
        """Answer the next len(faults) requests with these, in order, once their key has been checked."""
        self._script.extend(faults)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on host:port (port 0: any free one) and return the URL. Raises OSError if it cannot bind."""
        if self._runner is not None:
            raise RuntimeError("the emulator is already started")
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_route("*", "/{path:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        if self._request_log_path is not None:
            self._request_log = self._request_log_path.open("a", encoding="utf-8")
        shown_host = "127.0.0.1" if host in ("", "0.0.0.0") else host  # "everywhere" includes loopback
        self.url = f"http://{shown_host}:{runner.addresses[0][1]}"
        return self.url

    async def stop(self) -> None:
        """Stop listening; answers still sleeping get SHUTDOWN_TIMEOUT_S to finish. Safe to call twice."""
        runner, self._runner = self._runner, None
        try:
            if runner is not None:
                await runner.cleanup()
        finally:
            if self._request_log is not None:
                self._request_log.close()
                self._request_log = None

    async def __aenter__(self) -> Emulator:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        at = loop.time()
        raw = await request.read()
        in_thread = len(raw) > INLINE_BODY_BYTES
        body = await _maybe_in_thread(in_thread, _parse_json, raw)
        azure = _AZURE_PATH.fullmatch(request.path) if request.method == "POST" else None
        is_openai = request.method == "POST" and _OPENAI_PATH.fullmatch(request.path) is not None
        route: Route = "azure" if azure else "openai" if is_openai else "other"
        answer = await self._answer(request, route, azure.group(1) if azure else "", body, in_thread)
        if answer.delay_s > 0:
            await asyncio.sleep(answer.delay_s)  # other requests go on meanwhile
        self._record(request, at, route, body, answer)
        if answer.drop:
            if request.transport is not None:
                request.transport.close()
            return web.Response(status=500)  # never sent: the client sees the connection close
        headers = dict(answer.headers)
        if self._window is not None:
            headers.update(self._window.remaining_headers(loop.time()))
        return web.json_response(answer.body, status=answer.status, headers=headers)

    async def _answer(
        self, request: web.Request, route: Route, deployment: str, body: object, in_thread: bool
    ) -> _Answer:
        """Decide the answer, in the order the module docstring lists."""
        if route == "other":
            return _Answer(404, _error("404", "Resource not found"))
        if route == "azure" and not secrets.compare_digest(request.headers.get("api-key", ""), self.api_key):
            return _Answer(401, _error("401", _AZURE_401))
        bearer = request.headers.get("Authorization", "")
        if route == "openai" and not secrets.compare_digest(bearer, f"Bearer {self.api_key}"):
            refusal = _error("invalid_api_key", _OPENAI_401, type="invalid_request_error", param=None)
            return _Answer(401, refusal)
        if self._script:
            fault = self._script.popleft()
            fault_body = _fault_body(fault.status) if fault.body is None else fault.body
            return _Answer(fault.status, fault_body, fault.headers, delay_s=fault.delay_s, drop=fault.drop)
        if route == "azure" and "api-version" not in request.query:
            return _Answer(404, _error("404", "Resource not found"))  # Azure's answer without api-version
        if route == "azure" and deployment != self.deployment:
            return _Answer(404, _error("DeploymentNotFound", _DEPLOYMENT_404))
        try:
            if body is _NOT_JSON:
                raise _Invalid("We could not parse the JSON body of your request.", None, "invalid_json")
            model = self.model if route == "azure" else None  # OpenAI: the body names the model
            prompt = await _maybe_in_thread(in_thread, _inspect, body, model)
        except _Invalid as err:
            return _Answer(400, _error(err.code, err.message, param=err.param, type="invalid_request_error"))
        if self._window is not None:
            now = asyncio.get_running_loop().time()
            if refused := self._window.try_charge(now, prompt.prompt_tokens + prompt.max_tokens):
                wait_s, limit = refused
                message = _QUOTA_429.format(limit=limit, wait_s=math.ceil(wait_s))
                headers = {"retry-after-ms": str(math.ceil(wait_s * 1000)),
                           "retry-after": str(math.ceil(wait_s))}
                return _Answer(429, _error("429", message), headers)
        # Two draws per request in a fixed order, so a seed replays the same faults for the same arrivals.
        delay_s = self.cfg.latency_s * self._rng.uniform(1 - LATENCY_JITTER, 1 + LATENCY_JITTER)
        roll = self._rng.random()
        if FILTER_MARKER in prompt.prompt_text:
            return _Answer(400, _filtered_prompt_body(), delay_s=delay_s)
        if roll < self.cfg.drop_rate:
            return _Answer(DROPPED, delay_s=delay_s, drop=True)
        if roll < self.cfg.drop_rate + self.cfg.fault_rate:
            return _Answer(500, _fault_body(500), delay_s=delay_s)
        self._answered += 1
        completion = _completion(prompt, f"chatcmpl-{prompt.seed:016x}{self._answered:013x}")
        usage = completion["usage"]
        return _Answer(200, completion, delay_s=delay_s, prompt_tokens=usage["prompt_tokens"],
                       completion_tokens=usage["completion_tokens"])

    def _record(self, request: web.Request, at: float, route: Route, body: object, answer: _Answer) -> None:
        """Keep what was seen, count it, and log it before the answer leaves."""
        status = DROPPED if answer.drop else answer.status
        headers = {k: "<redacted>" if k.lower() in _SECRET_HEADERS else v for k, v in request.headers.items()}
        kept_body = body if self.keep_bodies and body is not _NOT_JSON else None
        seen = ReceivedRequest(at, route, headers, kept_body, _user_text(body), status,
                               answer.prompt_tokens, answer.completion_tokens)
        self.requests.append(seen)
        self.stats.requests += 1
        self.stats.by_status[status] += 1
        self.stats.prompt_tokens += answer.prompt_tokens or 0
        self.stats.completion_tokens += answer.completion_tokens or 0
        if self._request_log is not None:
            # Written in the loop on purpose: a short append that must reach the OS before the answer
            # leaves, so a client killed after reading an answer never finds that answer unlogged.
            line = {"at": at, "route": route, "status": status, "prompt_text": seen.prompt_text,
                    "prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens}
            self._request_log.write(json.dumps(line) + "\n")
            self._request_log.flush()


async def serve_forever(emulator: Emulator, host: str, port: int) -> None:
    """Start, print "listening on URL" as the first stdout line, serve until cancelled, then stop."""
    await emulator.start(host, port)
    try:
        print(f"listening on {emulator.url}", flush=True)
        await asyncio.Event().wait()
    finally:
        await emulator.stop()
