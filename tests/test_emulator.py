"""The emulator, spoken to by a real aiohttp client on 127.0.0.1: the wire, the bill, faults and quota."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import re
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from PIL import Image

from pipeline import tokens
from pipeline.config import EmulatorConfig
from pipeline.emulator import (
    COMPLETION_FILTER_MARKER,
    FILTER_MARKER,
    FINISH_OBJECT_MARKER,
    Emulator,
    Fault,
    serve_forever,
)
from pipeline.emulator.server import DROPPED, QUOTA_WINDOW_S
from pipeline.records import FILTER_CATEGORIES

KEY = "emulator"
DEPLOYMENT = "gpt-4-vision"
API_VERSION = {"api-version": "2024-02-15-preview"}
SAFE = {"filtered": False, "severity": "safe"}


def png_data_url(width: int, height: int, *, noise: bool = False) -> str:
    """A PNG data URL; 1-bit images stay tiny even at 4096×8192, noise makes a large body."""
    if noise:
        image = Image.frombytes("RGB", (width, height), os.urandom(width * height * 3))
    else:
        image = Image.new("1", (width, height))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def chat_body(*urls: str, prompt: str = "Describe this picture:", detail: str = "high", **extra: Any) -> dict:
    """The reference's sample request, with one image part per URL."""
    parts: list[dict] = [{"type": "text", "text": prompt}]
    parts += [{"type": "image_url", "image_url": {"url": url, "detail": detail}} for url in urls]
    system = {"role": "system", "content": "You are a helpful assistant."}
    return {"messages": [system, {"role": "user", "content": parts}], "max_tokens": 100, **extra}


def text_only(body: dict) -> list[dict]:
    """The body's messages without their image parts: what the text alone costs."""
    system, user = body["messages"]
    return [system, {"role": "user", "content": [p for p in user["content"] if p["type"] == "text"]}]


@pytest.fixture
async def emu() -> AsyncIterator[Emulator]:
    async with Emulator() as emulator:
        yield emulator


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


@pytest.fixture
async def advance_clock(monkeypatch) -> Callable[[float], None]:
    """Move the running loop's clock forward, as aiolimiter's tests do: the window expires without a sleep."""
    loop = asyncio.get_running_loop()
    real_time, skipped_s = loop.time, [0.0]
    monkeypatch.setattr(loop, "time", lambda: real_time() + skipped_s[0])

    def advance(seconds: float) -> None:
        skipped_s[0] += seconds

    return advance


async def post_azure(
    session: aiohttp.ClientSession,
    emulator: Emulator,
    body: object,
    *,
    key: str | None = KEY,
    deployment: str = DEPLOYMENT,
    params: dict | None = None,
) -> tuple[int, Any, Any]:
    """POST to the Azure route; returns (status, parsed body, headers)."""
    url = f"{emulator.url}/openai/deployments/{deployment}/chat/completions"
    headers = {"Content-Type": "application/json"} | ({} if key is None else {"api-key": key})
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    params = API_VERSION if params is None else params
    async with session.post(url, data=data, headers=headers, params=params) as response:
        return response.status, await response.json(), response.headers


async def post_openai(
    session: aiohttp.ClientSession, emulator: Emulator, body: object, *, key: str = KEY
) -> tuple[int, Any, Any]:
    """POST to the OpenAI route with a bearer key; returns (status, parsed body, headers)."""
    headers = {"Authorization": f"Bearer {key}"}
    async with session.post(f"{emulator.url}/v1/chat/completions", json=body, headers=headers) as response:
        return response.status, await response.json(), response.headers


# The wire


async def test_azure_route_with_the_right_key_answers_the_reference_shape(emu, session):
    body = chat_body(png_data_url(64, 48))

    status, answer, _ = await post_azure(session, emu, body)

    assert status == 200
    assert answer["id"].startswith("chatcmpl-") and answer["object"] == "chat.completion"
    assert isinstance(answer["created"], int) and answer["model"] == "gpt-4-turbo"
    (prompt_filter,) = answer["prompt_filter_results"]
    assert prompt_filter["prompt_index"] == 0
    assert prompt_filter["content_filter_results"] == dict.fromkeys(FILTER_CATEGORIES, SAFE)
    (choice,) = answer["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "stop"
    assert choice["message"]["role"] == "assistant" and "64x48" in choice["message"]["content"]
    assert choice["content_filter_results"]["violence"] == SAFE
    usage = answer["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["completion_tokens"] == tokens.text_tokens(choice["message"]["content"])


@pytest.mark.parametrize("key", ["wrong", None])
async def test_a_wrong_or_missing_api_key_is_refused_with_azures_401(emu, session, key):
    status, answer, _ = await post_azure(session, emu, chat_body(), key=key)

    assert status == 401
    assert answer["error"]["code"] == "401"
    assert answer["error"]["message"].startswith("Access denied due to invalid subscription key")


async def test_an_unknown_deployment_is_404_deployment_not_found(emu, session):
    status, answer, _ = await post_azure(session, emu, chat_body(), deployment="gpt-5-nowhere")

    assert status == 404 and answer["error"]["code"] == "DeploymentNotFound"


async def test_a_missing_api_version_is_404_as_azure_answers(emu, session):
    status, answer, _ = await post_azure(session, emu, chat_body(), params={})

    assert status == 404 and answer["error"]["message"] == "Resource not found"


@pytest.mark.parametrize(("method", "path"), [("POST", "/chat/completions"), ("GET", "/v1/chat/completions")])
async def test_any_other_route_is_404(emu, session, method, path):
    async with session.request(method, emu.url + path, headers={"api-key": KEY}) as response:
        status = response.status

    assert status == 404
    assert emu.requests[-1].route == "other"


async def test_openai_route_takes_a_bearer_key_and_bills_with_the_bodys_model(emu, session):
    body = chat_body(png_data_url(1024, 1024), model="gpt-4o")

    status, answer, _ = await post_openai(session, emu, body)

    assert status == 200 and answer["model"] == "gpt-4o"
    expected = tokens.count_prompt_tokens(body["messages"], [(1024, 1024)], "gpt-4o")
    assert answer["usage"]["prompt_tokens"] == expected
    assert emu.requests[-1].route == "openai"


async def test_openai_route_refuses_a_wrong_bearer_with_invalid_api_key(emu, session):
    status, answer, _ = await post_openai(session, emu, chat_body(model="gpt-4o"), key="wrong")

    assert status == 401 and answer["error"]["code"] == "invalid_api_key"


async def test_openai_route_requires_the_model(emu, session):
    status, answer, _ = await post_openai(session, emu, chat_body())

    assert status == 400 and answer["error"]["param"] == "model"


# Billing: what pipeline.tokens computes, to the token


@pytest.mark.parametrize(
    ("width", "height", "detail", "image_tokens"),
    [
        (1024, 1024, "high", 765),  # published checks
        (2048, 4096, "high", 1105),
        (640, 480, "high", 425),
        (4096, 8192, "low", 85),
        (1024, 1024, "auto", 765),  # auto is counted as high, the upper bound
        (300, 200, "low", 85),
    ],
)
async def test_prompt_tokens_are_the_text_plus_the_published_image_tokens(
    emu, session, width, height, detail, image_tokens
):
    body = chat_body(png_data_url(width, height), detail=detail)

    status, answer, _ = await post_azure(session, emu, body)

    billed = answer["usage"]["prompt_tokens"]
    assert status == 200
    assert billed == tokens.count_prompt_tokens(body["messages"], [(width, height)])
    assert billed == tokens.count_prompt_tokens(text_only(body), []) + image_tokens


async def test_image_sizes_are_billed_in_the_order_of_the_parts(emu, session):
    body = chat_body(png_data_url(2048, 4096), png_data_url(640, 480))
    body["messages"][1]["content"][2]["image_url"]["detail"] = "low"

    _, answer, _ = await post_azure(session, emu, body)

    assert answer["usage"]["prompt_tokens"] == tokens.count_prompt_tokens(text_only(body), []) + 1105 + 85


@pytest.mark.parametrize("detail", ["low", "high"])
async def test_a_remote_image_is_not_fetched_and_billed_at_the_most_its_detail_can_cost(emu, session, detail):
    body = chat_body("https://example.invalid/cat.jpg", detail=detail)

    status, answer, _ = await post_azure(session, emu, body)

    text_tokens = tokens.count_prompt_tokens(text_only(body), [])
    assert status == 200
    assert answer["usage"]["prompt_tokens"] == text_tokens + tokens.max_image_tokens(detail)
    assert "remote image" in answer["choices"][0]["message"]["content"]


async def test_a_large_body_is_billed_like_a_small_one(emu, session):
    """Bodies past INLINE_BODY_BYTES are read in a thread; the bill must not change."""
    body = chat_body(png_data_url(400, 400, noise=True))

    status, answer, _ = await post_azure(session, emu, body)

    assert len(json.dumps(body)) > 256 * 1024
    assert status == 200  # 400×400 at high: one tile, 85 + 170
    assert answer["usage"]["prompt_tokens"] == tokens.count_prompt_tokens(text_only(body), []) + 255


# Validation


async def test_eleven_images_are_refused_with_400(emu, session):
    image = png_data_url(8, 8)

    status, answer, _ = await post_azure(session, emu, chat_body(*[image] * 11))

    assert status == 400 and "Max is 10" in answer["error"]["message"]


def _with(body: dict, path: tuple, value: object) -> dict:
    target = body
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    return body


IMAGE_PART = {"type": "image_url", "image_url": {"url": "https://x/a.png"}}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"max_tokens": 10}, "messages"),
        (_with(chat_body(), ("messages", 1, "role"), "robot"), "messages.[1].role"),
        (
            _with(
                chat_body("https://x/a.png"), ("messages", 1, "content", 1, "image_url", "detail"), "medium"
            ),
            "messages.[1].content.[1].image_url.detail",
        ),
        (_with(chat_body(), ("max_tokens",), 0), "max_tokens"),
        (_with(chat_body(), ("max_tokens",), "100"), "max_tokens"),
        (chat_body("ftp://x/a.png"), "messages.[1].content.[1].image_url.url"),
        (chat_body("data:image/png;base64,aGVsbG8="), "messages.[1].content.[1].image_url.url"),
        (chat_body("data:image/png;base64,not base64!"), "messages.[1].content.[1].image_url.url"),
        (_with(chat_body(), ("messages", 0, "content"), [IMAGE_PART]), "messages.[0].content.[0]"),
        (_with(chat_body(), ("messages", 1, "content"), 42), "messages.[1].content"),
    ],
    ids=[
        "no-messages",
        "bad-role",
        "bad-detail",
        "zero-max-tokens",
        "string-max-tokens",
        "ftp-url",
        "not-an-image",
        "bad-base64",
        "image-in-system",
        "content-not-a-list",
    ],
)
async def test_a_body_the_service_would_refuse_is_400_naming_the_parameter(emu, session, body, param):
    status, answer, _ = await post_azure(session, emu, body)

    assert status == 400
    assert answer["error"]["param"] == param and answer["error"]["type"] == "invalid_request_error"


async def test_a_body_that_is_not_json_is_400(emu, session):
    status, answer, _ = await post_azure(session, emu, b"{not json")

    assert status == 400 and answer["error"]["code"] == "invalid_json"


# Answers


async def test_the_filter_marker_is_refused_with_azures_content_filter_400(emu, session):
    status, answer, _ = await post_azure(session, emu, chat_body(prompt=f"Describe {FILTER_MARKER}"))

    error = answer["error"]
    assert status == 400 and error["code"] == "content_filter" and error["param"] == "prompt"
    assert error["innererror"]["code"] == "ResponsibleAIPolicyViolation"
    flagged = [c for c, v in error["innererror"]["content_filter_result"].items() if v["filtered"]]
    assert flagged and error["innererror"]["content_filter_result"][flagged[0]]["severity"] == "high"


async def test_the_completion_filter_marker_answers_200_with_finish_reason_content_filter(emu, session):
    body = chat_body(prompt=f"Describe {COMPLETION_FILTER_MARKER}")

    status, answer, _ = await post_azure(session, emu, body)

    (choice,) = answer["choices"]
    assert status == 200 and choice["finish_reason"] == "content_filter"
    assert not choice["message"]["content"]
    assert any(v["filtered"] for v in choice["content_filter_results"].values())


async def test_the_finish_object_marker_sends_finish_reason_as_an_object(emu, session):
    status, answer, _ = await post_azure(session, emu, chat_body(prompt=f"Describe {FINISH_OBJECT_MARKER}"))

    assert status == 200
    assert answer["choices"][0]["finish_reason"] == {"type": "stop", "stop": "<|fim_suffix|>"}


async def test_a_small_max_tokens_cuts_the_answer_with_finish_reason_length(emu, session):
    image = png_data_url(1024, 768)
    _, full, _ = await post_azure(session, emu, chat_body(image, max_tokens=300))

    status, cut, _ = await post_azure(session, emu, chat_body(image, max_tokens=5))

    content = cut["choices"][0]["message"]["content"]
    assert status == 200 and cut["choices"][0]["finish_reason"] == "length"
    assert cut["usage"]["completion_tokens"] == 5
    assert full["choices"][0]["message"]["content"].startswith(content) and tokens.text_tokens(content) <= 5


async def test_without_max_tokens_the_answer_is_cut_at_16_tokens(emu, session):
    body = chat_body(png_data_url(64, 64))
    del body["max_tokens"]

    _, answer, _ = await post_azure(session, emu, body)

    assert answer["choices"][0]["finish_reason"] == "length" and answer["usage"]["completion_tokens"] == 16


async def test_the_description_is_deterministic_and_20_to_80_words_naming_the_size(emu, session):
    body = chat_body(png_data_url(1024, 768))

    first = (await post_azure(session, emu, body))[1]["choices"][0]["message"]["content"]
    second = (await post_azure(session, emu, body))[1]["choices"][0]["message"]["content"]

    assert first == second and "1024x768" in first
    assert 20 <= len(first.split()) <= 80


# Faults


async def test_a_scripted_500_is_answered_once_then_requests_are_normal(emu, session):
    emu.script(Fault(status=500))

    first = await post_azure(session, emu, chat_body())
    second = await post_azure(session, emu, chat_body())

    assert first[0] == 500 and first[1]["error"]["code"] == "InternalServerError"
    assert second[0] == 200


async def test_a_scripted_fault_sends_its_headers_and_body(emu, session):
    emu.script(Fault(status=429, headers={"retry-after-ms": "1500"}, body={"error": {"code": "429"}}))

    status, answer, headers = await post_azure(session, emu, chat_body())

    assert status == 429 and headers["retry-after-ms"] == "1500" and answer == {"error": {"code": "429"}}


async def test_the_key_is_checked_before_a_scripted_fault_is_used(emu, session):
    emu.script(Fault(status=503))

    refused = await post_azure(session, emu, chat_body(), key="wrong")
    scripted = await post_azure(session, emu, chat_body())

    assert (refused[0], scripted[0]) == (401, 503)


async def test_a_scripted_drop_closes_the_connection_without_an_answer(emu, session):
    emu.script(Fault(drop=True))

    with pytest.raises((aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
        await post_azure(session, emu, chat_body(prompt="row-7"))
    after = await post_azure(session, emu, chat_body())

    assert emu.requests[0].status == DROPPED and emu.requests[0].prompt_text == "row-7"
    assert after[0] == 200


async def test_a_slow_answer_does_not_hold_up_other_requests(session):
    async with Emulator(EmulatorConfig(latency_s=0.2)) as emu:
        loop = asyncio.get_running_loop()
        started = loop.time()

        requests = [post_azure(session, emu, chat_body(prompt=f"row-{n}")) for n in range(5)]
        answers = await asyncio.gather(*requests)

        elapsed = loop.time() - started
    assert [status for status, _, _ in answers] == [200] * 5
    assert 0.16 <= elapsed < 0.5  # five answers of 0.2 s ± 20% in about the time of one


@pytest.mark.parametrize(
    ("cfg", "expected"), [(EmulatorConfig(fault_rate=1.0), 500), (EmulatorConfig(drop_rate=1.0), DROPPED)]
)
async def test_random_faults_answer_500_or_drop_at_their_rate(session, cfg, expected):
    async with Emulator(cfg) as emu:
        with contextlib.suppress(aiohttp.ServerDisconnectedError):  # the dropped one
            await post_azure(session, emu, chat_body())

    assert emu.requests[-1].status == expected


async def test_random_faults_replay_the_same_under_the_same_seed(session):
    async def statuses(seed: int) -> list[int]:
        async with Emulator(EmulatorConfig(fault_rate=0.5, seed=seed)) as emu:
            return [(await post_azure(session, emu, chat_body()))[0] for _ in range(16)]

    first, second = await statuses(7), await statuses(7)

    assert first == second and set(first) == {200, 500}


# Quota


async def test_quota_refuses_with_429_and_retry_after_ms_once_the_10s_window_is_full(session):
    """6000 TPM is 1000 tokens per 10 s window; each request is charged its prompt + max_tokens (400)."""
    async with Emulator(EmulatorConfig(tokens_per_minute=6000)) as emu:
        body = chat_body(max_tokens=400)

        answers = [await post_azure(session, emu, body) for _ in range(3)]

    (s1, _, _), (s2, _, _), (s3, refusal, headers) = answers
    assert (s1, s2, s3) == (200, 200, 429)
    assert 9000 < int(headers["retry-after-ms"]) <= 10_000 and headers["retry-after"] == "10"
    assert "exceeded token rate limit" in refusal["error"]["message"]
    assert "Please retry after 10 seconds" in refusal["error"]["message"]


async def test_a_refused_request_is_not_charged(session):
    async with Emulator(EmulatorConfig(tokens_per_minute=6000)) as emu:
        for _ in range(2):
            await post_azure(session, emu, chat_body(max_tokens=400))
        refused = await post_azure(session, emu, chat_body(max_tokens=400))

        small = await post_azure(session, emu, chat_body(max_tokens=50))

    assert refused[0] == 429 and small[0] == 200


async def test_retry_after_is_the_time_until_enough_of_the_window_expires(session, advance_clock):
    """The first charge leaving the window makes room: 10 s after it, which is 6 s after the second."""
    async with Emulator(EmulatorConfig(tokens_per_minute=6000)) as emu:
        await post_azure(session, emu, chat_body(max_tokens=400))
        advance_clock(4.0)
        await post_azure(session, emu, chat_body(max_tokens=400))

        status, _, headers = await post_azure(session, emu, chat_body(max_tokens=400))

    assert status == 429
    assert 5900 < int(headers["retry-after-ms"]) <= 6000 and headers["retry-after"] == "6"


async def test_the_quota_window_frees_once_10_seconds_have_passed(session, advance_clock):
    async with Emulator(EmulatorConfig(tokens_per_minute=6000)) as emu:
        for _ in range(2):
            await post_azure(session, emu, chat_body(max_tokens=400))
        advance_clock(QUOTA_WINDOW_S)

        status, _, _ = await post_azure(session, emu, chat_body(max_tokens=400))

    assert status == 200


async def test_rpm_defaults_to_6_per_1000_tpm(session):
    """1000 TPM gives 6 RPM: one request per 10 s window, whatever its tokens."""
    async with Emulator(EmulatorConfig(tokens_per_minute=1000)) as emu:
        first = await post_azure(session, emu, chat_body(max_tokens=10))

        second = await post_azure(session, emu, chat_body(max_tokens=10))

    assert first[0] == 200 and second[0] == 429
    assert "exceeded call rate limit" in second[1]["error"]["message"]


async def test_quota_answers_report_what_is_left_per_minute(session):
    async with Emulator(EmulatorConfig(tokens_per_minute=6000, requests_per_minute=60)) as emu:
        body = chat_body(max_tokens=100)

        _, answer, headers = await post_azure(session, emu, body)

    charged = answer["usage"]["prompt_tokens"] + 100
    assert headers["x-ratelimit-remaining-tokens"] == str((1000 - charged) * 6)
    assert headers["x-ratelimit-remaining-requests"] == str((10 - 1) * 6)


# What the emulator keeps


async def test_the_request_log_has_one_flushed_json_line_per_request(tmp_path, session):
    log = tmp_path / "requests.jsonl"
    async with Emulator(request_log=log) as emu:
        emu.script(Fault(status=500))
        await post_azure(session, emu, chat_body(prompt="row-1"))
        _, answer, _ = await post_azure(session, emu, chat_body(prompt="row-1"))

        lines = [json.loads(line) for line in log.read_text().splitlines()]  # read while still running

    assert [(line["status"], line["prompt_text"], line["route"]) for line in lines] == [
        (500, "row-1", "azure"),
        (200, "row-1", "azure"),
    ]
    assert lines[0]["prompt_tokens"] is None
    assert lines[1]["prompt_tokens"] == answer["usage"]["prompt_tokens"]
    assert lines[1]["completion_tokens"] == answer["usage"]["completion_tokens"]


async def test_received_requests_redact_the_key_and_drop_bodies_when_asked(session):
    async with Emulator(keep_bodies=False) as emu:
        await post_azure(session, emu, chat_body(prompt="row-3"))
        await post_openai(session, emu, chat_body(prompt="row-4", model="gpt-4o"))

    azure, openai = emu.requests
    assert azure.headers["api-key"] == "<redacted>" and openai.headers["Authorization"] == "<redacted>"
    assert azure.body is None and (azure.prompt_text, openai.prompt_text) == ("row-3", "row-4")


async def test_a_long_lived_emulator_keeps_counters_but_no_requests(session):
    async with Emulator(keep_requests=False) as emu:
        for n in range(3):
            await post_azure(session, emu, chat_body(prompt=f"row-{n}"))

    assert emu.requests == [] and emu.stats.requests == 3 and emu.stats.by_status == {200: 3}


async def test_stats_count_requests_by_status_and_the_tokens_served(emu, session):
    await post_azure(session, emu, chat_body(), key="wrong")

    _, answer, _ = await post_azure(session, emu, chat_body())

    assert emu.stats.requests == 2 and emu.stats.by_status == {401: 1, 200: 1}
    assert emu.stats.prompt_tokens == answer["usage"]["prompt_tokens"]
    assert emu.stats.completion_tokens == answer["usage"]["completion_tokens"]


class SignallingStdout(io.StringIO):
    """A stdout that sets an event on the first write, so a test awaits the line instead of sleeping."""

    def __init__(self) -> None:
        super().__init__()
        self.written = asyncio.Event()

    def write(self, text: str) -> int:
        self.written.set()
        return super().write(text)


async def test_serve_forever_prints_the_url_first_serves_and_stops_when_cancelled(session, monkeypatch):
    stdout = SignallingStdout()
    monkeypatch.setattr(sys, "stdout", stdout)
    emulator = Emulator()

    async with asyncio.TaskGroup() as tg:
        serving = tg.create_task(serve_forever(emulator, "127.0.0.1", 0), name="emulator")
        async with asyncio.timeout(1):
            await stdout.written.wait()
        status, _, _ = await post_azure(session, emulator, chat_body())
        serving.cancel()

    first_line = stdout.getvalue().splitlines()[0]
    assert re.fullmatch(r"listening on http://127\.0\.0\.1:\d+", first_line)
    assert first_line == f"listening on {emulator.url}"
    assert status == 200 and serving.cancelled()
    with pytest.raises(aiohttp.ClientConnectionError):  # stopped: nothing listens any more
        await post_azure(session, emulator, chat_body())
