"""The emulator's Files and Batches APIs refuse what the services refuse, and list with pagination."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
from conftest import TEST_KEY

from pipeline.config import EmulatorConfig
from pipeline.emulator import Emulator

HEADERS = {"Authorization": f"Bearer {TEST_KEY}"}


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def chat_line(custom_id: str, model: str = "gpt-4o") -> dict[str, Any]:
    body = {"model": model, "max_tokens": 20, "messages": [{"role": "user", "content": "Describe."}]}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


async def upload(session: aiohttp.ClientSession, url: str, data: bytes) -> tuple[int, dict[str, Any]]:
    form = aiohttp.FormData()
    form.add_field("purpose", "batch")
    form.add_field("file", data, filename="in.jsonl")
    async with session.post(f"{url}/v1/files", data=form, headers=HEADERS) as resp:
        return resp.status, await resp.json()


async def submit_and_wait(emu: Emulator, data: bytes) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session:
        _, file = await upload(session, emu.url, data)
        payload = {
            "input_file_id": file["id"],
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        }
        async with session.post(f"{emu.url}/v1/batches", json=payload, headers=HEADERS) as resp:
            batch = await resp.json()
        while batch["status"] not in ("completed", "failed", "expired", "cancelled"):
            await asyncio.sleep(0.01)
            async with session.get(f"{emu.url}/v1/batches/{batch['id']}", headers=HEADERS) as resp:
                batch = await resp.json()
    return batch


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"\xef\xbb\xbf" + jsonl([chat_line("a")]), "invalid_json_line"),
        (jsonl([chat_line("a"), chat_line("a")]), "duplicate_custom_id"),
        (jsonl([chat_line("a"), chat_line("b", model="gpt-4o-mini")]), "model_mismatch"),
        (b"{not json\n", "invalid_json_line"),
    ],
    ids=["bom", "duplicate-custom-id", "mixed-models", "not-json"],
)
async def test_a_file_the_service_would_refuse_fails_validation_with_its_code_and_line(data, code):
    async with Emulator(api_key=TEST_KEY) as emu:
        batch = await submit_and_wait(emu, data)

    assert batch["status"] == "failed"
    assert batch["errors"]["data"][0]["code"] == code and batch["errors"]["data"][0]["line"] in (1, 2)


async def test_an_upload_over_the_size_limit_is_refused():
    emulator = Emulator(EmulatorConfig(batch_max_file_bytes=100), api_key=TEST_KEY)
    async with emulator as emu, aiohttp.ClientSession() as session:
        status, body = await upload(session, emu.url, jsonl([chat_line("a"), chat_line("b")]))

    assert status == 400 and body["error"]["code"] == "file_too_large" and emu.batches.files == {}


async def test_a_batch_answers_each_line_as_the_chat_route_would_and_bills_it_once():
    async with Emulator(api_key=TEST_KEY) as emu:
        batch = await submit_and_wait(emu, jsonl([chat_line("a"), chat_line("b")]))
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{emu.url}/v1/files/{batch['output_file_id']}/content", headers=HEADERS) as resp,
        ):
            lines = [json.loads(line) for line in (await resp.read()).splitlines()]

    assert batch["status"] == "completed" and batch["request_counts"] == {
        "total": 2,
        "completed": 2,
        "failed": 0,
    }
    assert [line["custom_id"] for line in lines] == ["a", "b"]
    assert (
        lines[0]["response"]["status_code"] == 200
        and lines[0]["response"]["body"]["usage"]["prompt_tokens"] > 0
    )
    assert dict(emu.batches.stats.billed) == {"a": 1, "b": 1}


async def test_batches_are_listed_newest_first_page_by_page_with_their_metadata():
    emulator = Emulator(EmulatorConfig(batch_delay_s=60), api_key=TEST_KEY)
    async with emulator as emu, aiohttp.ClientSession() as session:
        _, file = await upload(session, emu.url, jsonl([chat_line("a")]))
        for n in range(3):
            payload = {"input_file_id": file["id"], "endpoint": "/v1/chat/completions",
                       "completion_window": "24h", "metadata": {"n": str(n)}}  # fmt: skip
            async with session.post(f"{emu.url}/v1/batches", json=payload, headers=HEADERS):
                pass
        async with session.get(f"{emu.url}/v1/batches?limit=2", headers=HEADERS) as resp:
            first = await resp.json()
        params = {"limit": "2", "after": first["last_id"]}
        async with session.get(f"{emu.url}/v1/batches", params=params, headers=HEADERS) as resp:
            second = await resp.json()

    assert [b["metadata"]["n"] for b in first["data"]] == ["2", "1"] and first["has_more"]
    assert [b["metadata"]["n"] for b in second["data"]] == ["0"] and not second["has_more"]


async def test_the_azure_dated_surface_needs_a_batch_api_version():
    async with Emulator(api_key=TEST_KEY) as emu, aiohttp.ClientSession() as session:
        headers = {"api-key": TEST_KEY}
        async with session.get(
            f"{emu.url}/openai/batches?api-version=2024-02-15-preview", headers=headers
        ) as old:
            old_status = old.status
        async with session.get(f"{emu.url}/openai/batches?api-version=2024-10-21", headers=headers) as new:
            new_status = new.status

    assert (old_status, new_status) == (404, 200)
