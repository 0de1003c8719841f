"""The captioner seam: one row from images to result through any transport, and the one request plan
that run, --dry-run and estimate share."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import KEY_ENV, TEST_KEY, azure_config, make_image, write_csv
from PIL import Image

from pipeline.captioner import Captioner
from pipeline.config import config_from_mapping
from pipeline.emulator import Fault
from pipeline.estimate import EstimateOptions, estimate
from pipeline.exits import EXIT_OK, EXIT_ROW_ERRORS
from pipeline.preview import preview_first_request, shorten_body
from pipeline.records import ApiError, Delivery, ErrorKind, ImageTask, TransportCounters
from pipeline.request import RequestPlan
from pipeline.runner import RunOptions, run
from pipeline.sink import read_output

COMPLETION = {
    "id": "chatcmpl-double",
    "model": "gpt-4o",
    "choices": [
        {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "A teal square."}}
    ],
    "usage": {"prompt_tokens": 111, "completion_tokens": 5, "total_tokens": 116},
}


class FunctionTransport:
    """A transport that answers with a function of the plan: nothing goes over the network."""

    def __init__(self, answer):
        self.answer, self.plans = answer, []

    async def send(self, plan: RequestPlan) -> Delivery:
        self.plans.append(plan)
        return self.answer(plan)

    def stop_sending(self) -> None:
        pass

    def counters(self) -> TransportCounters:
        return TransportCounters()


def bare_config(**sections):
    return config_from_mapping({"endpoint": {"model": "gpt-4o"}, **sections}, source="t.toml")


async def test_a_task_is_captioned_through_any_transport_without_a_manifest_or_an_output(tmp_path):
    make_image(tmp_path / "a.png", (64, 48))
    transport = FunctionTransport(lambda plan: Delivery(200, COMPLETION, attempts=1))
    task = ImageTask("a", ("a.png",), "Describe", "high", 1)

    with ThreadPoolExecutor(2) as pool:
        captioner = Captioner(bare_config(), transport, base_dir=tmp_path, image_pool=pool, price=None)
        result = await captioner.caption(task)

    (plan,) = transport.plans
    assert plan.body["messages"][-1]["content"][1]["image_url"]["url"].startswith("data:image/")
    assert (result.status, result.description, result.usage.total_tokens) == ("ok", "A teal square.", 116)
    assert result.estimated_prompt_tokens == plan.estimated_prompt_tokens and result.latency_s is not None


async def test_a_transports_row_error_becomes_an_error_result_with_its_kind(tmp_path):
    make_image(tmp_path / "a.png")

    def refuse(plan: RequestPlan) -> Delivery:
        raise ApiError(
            plan.task.row_id, "HTTP 400: bad image", status=400, kind=ErrorKind.HTTP_4XX, attempts=1
        )

    with ThreadPoolExecutor(1) as pool:
        captioner = Captioner(
            bare_config(), FunctionTransport(refuse), base_dir=tmp_path, image_pool=pool, price=None
        )
        result = await captioner.caption(ImageTask("a", ("a.png",), "Describe", "low", 1))

    assert (result.status, result.error_kind, result.http_status) == ("error", ErrorKind.HTTP_4XX, 400)


async def test_a_refused_row_never_reaches_the_transport(tmp_path):
    transport = FunctionTransport(lambda plan: Delivery(200, COMPLETION, attempts=1))
    make_image(tmp_path / "a.png", (8, 8))

    with ThreadPoolExecutor(1) as pool:
        captioner = Captioner(bare_config(), transport, base_dir=tmp_path, image_pool=pool, price=None)
        result = await captioner.caption(ImageTask("a", ("a.png",) * 11, "Describe", "low", 1))

    assert transport.plans == []
    assert result.status == "error" and result.error_kind is ErrorKind.TOO_MANY_IMAGES


# ---- run, --dry-run and estimate agree ------------------------------------------------------------------


def jpeg(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.linear_gradient("L").resize(size).convert("RGB").save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture
async def photos() -> AsyncIterator[TestServer]:
    """An image server on 127.0.0.1: /photo.jpg is 1600×1200."""
    photo = jpeg((1600, 1200))

    async def serve(request: web.Request) -> web.Response:
        return web.Response(body=photo, content_type="image/jpeg")

    app = web.Application()
    app.router.add_get("/photo.jpg", serve)
    async with TestServer(app, host="127.0.0.1") as server:
        yield server


CASES = {
    "local": ({"image": "images/a.jpg", "detail": "high"}, False),
    "remote": ({"image": "{photo}", "detail": "auto"}, False),
    "remote-fetched": ({"image": "{photo}", "detail": "high"}, True),
    "multi-image": (
        {"images": json.dumps(["images/a.jpg", "{photo}", "images/b.png"]), "detail": "low"},
        False,
    ),
}


@pytest.mark.parametrize("case", CASES)
async def test_run_dry_run_and_estimate_plan_the_same_request(case, tmp_path, emulator, photos, key_in_env):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.jpg").write_bytes(jpeg((3000, 2000)))
    make_image(tmp_path / "images" / "b.png", (300, 900))
    columns, fetch_remote = CASES[case]
    photo_url = str(photos.make_url("/photo.jpg"))
    row = {
        "id": case,
        "prompt": f"Describe ({case})",
        **{k: v.format(photo=photo_url) for k, v in columns.items()},
    }
    manifest = write_csv(tmp_path / "m.csv", [row])
    cfg = azure_config(emulator, images={"fetch_remote": fetch_remote, "allow_private_urls": True})

    preview = await preview_first_request(cfg, manifest, tmp_path / "out", environ={KEY_ENV: TEST_KEY})
    estimated = await estimate(cfg, EstimateOptions(manifest, probe_urls=fetch_remote))
    summary = await run(cfg, RunOptions(manifest, tmp_path / "out", handle_signals=False))

    (sent,) = emulator.requests
    (committed,) = read_output(tmp_path / "out").to_pylist()
    assert summary.exit_code == EXIT_OK
    assert shorten_body(sent.body) == preview.body
    assert (
        committed["estimated_prompt_tokens"]
        == preview.estimated_prompt_tokens
        == estimated.tally.prompt_tokens
    )
    if case != "remote":  # a URL's size is unknown to the run: reserved and estimated at its most
        assert committed["prompt_tokens"] == committed["estimated_prompt_tokens"]


# ---- hostile inputs and recorded Azure answers, against the emulator -------------------------------------


async def test_a_one_mib_prompt_is_one_error_row_over_the_context_never_sent_and_no_traceback(
    tmp_path, emulator, key_in_env, caplog
):
    make_image(tmp_path / "a.png")
    manifest = write_csv(
        tmp_path / "m.csv",
        [
            {"id": "novel", "image": "a.png", "prompt": "lorem ipsum " * 90_000},
            {"id": "fine", "image": "a.png"},
        ],
    )
    cfg = azure_config(emulator, limits={"tokens_per_minute": 100_000_000})

    with caplog.at_level(logging.DEBUG):
        summary = await run(cfg, RunOptions(manifest, tmp_path / "out", handle_signals=False))

    rows = {r["id"]: r for r in read_output(tmp_path / "out").to_pylist()}
    assert summary.exit_code == EXIT_ROW_ERRORS and len(emulator.requests) == 1
    assert rows["novel"]["status"] == "error" and rows["novel"]["error_kind"] == "over_context"
    assert "context" in rows["novel"]["error"] and "\n" not in rows["novel"]["error"]
    assert rows["fine"]["status"] == "ok"
    assert not any(record.exc_info for record in caplog.records)
    assert "Traceback" not in caplog.text and "unexpected" not in caplog.text


async def test_a_content_filter_400_in_the_rest_spec_spelling_keeps_its_categories(
    tmp_path, emulator, key_in_env
):
    make_image(tmp_path / "a.png")
    manifest = write_csv(tmp_path / "m.csv", [{"id": "x", "image": "a.png"}])
    refusal = {
        "error": {
            "code": "content_filter",
            "message": "The response was filtered due to the prompt triggering Azure OpenAI's content management policy.",
            "status": 400,
            "inner_error": {
                "code": "ResponsibleAIPolicyViolation",
                "content_filter_results": {
                    "hate": {"filtered": False, "severity": "safe"},
                    "self_harm": {"filtered": False, "severity": "safe"},
                    "sexual": {"filtered": False, "severity": "safe"},
                    "violence": {"filtered": True, "severity": "high"},
                },
            },
        }
    }
    emulator.script(Fault(status=400, body=refusal))

    summary = await run(azure_config(emulator), RunOptions(manifest, tmp_path / "out", handle_signals=False))

    (row,) = read_output(tmp_path / "out").to_pylist()
    assert summary.exit_code == EXIT_OK and row["status"] == "filtered"
    assert row["prompt_filter"]["violence"] == {"filtered": True, "severity": "high"}
    assert row["prompt_filter"]["hate"] == {"filtered": False, "severity": "safe"}


async def test_what_azure_adds_to_an_answer_is_kept_in_response_extra(tmp_path, emulator, key_in_env):
    """A vision-enhanced deployment's grounding and finish_details, and a system_fingerprint."""
    make_image(tmp_path / "a.png")
    manifest = write_csv(tmp_path / "m.csv", [{"id": "x", "image": "a.png"}])
    enhancements = {
        "grounding": {"lines": [{"text": "EXIT", "spans": [{"text": "EXIT", "length": 4, "offset": 0}]}]}
    }
    answer = {
        "id": "chatcmpl-enh",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "gpt-4",
        "system_fingerprint": "fp_2f57f81c11",
        "choices": [
            {
                "index": 0,
                "finish_details": {"type": "stop", "stop": "<|fim_suffix|>"},
                "message": {"role": "assistant", "content": "A green exit sign."},
                "enhancements": enhancements,
            }
        ],
        "usage": {"prompt_tokens": 120, "completion_tokens": 6, "total_tokens": 126},
    }
    emulator.script(Fault(status=200, body=answer))

    await run(azure_config(emulator), RunOptions(manifest, tmp_path / "out", handle_signals=False))

    (row,) = read_output(tmp_path / "out").to_pylist()
    extra = json.loads(row["response_extra"])
    assert (row["status"], row["finish_reason"], row["description"]) == ("ok", "stop", "A green exit sign.")
    assert extra["choice"]["enhancements"] == enhancements and extra["system_fingerprint"] == "fp_2f57f81c11"
