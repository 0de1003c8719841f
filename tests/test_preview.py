"""`run --dry-run`: the first request a run would send, shown exactly, sent never, the output untouched."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import KEY_ENV, TEST_KEY, azure_config, make_image, write_csv

from pipeline.emulator import Fault
from pipeline.preview import preview_as_json, preview_first_request, shorten_body
from pipeline.runner import RunOptions, run
from pipeline.sink import read_output

CLI = [sys.executable, "-m", "pipeline"]


async def test_the_preview_is_the_first_uncommitted_row_and_its_estimate_is_what_the_run_is_billed(
    tmp_path, emulator, images_manifest, key_in_env
):
    manifest, output = images_manifest(4), tmp_path / "out"
    cfg = azure_config(emulator)
    await run(cfg, RunOptions(manifest, output, limit=2, handle_signals=False))
    sent_before = len(emulator.requests)

    preview = await preview_first_request(cfg, manifest, output, environ={KEY_ENV: TEST_KEY})

    assert len(emulator.requests) == sent_before  # nothing sent
    assert preview.row_id == "row-2" and preview.rows_committed == 2
    image_url = preview.body["messages"][-1]["content"][1]["image_url"]["url"]
    assert image_url.startswith("data:image/jpeg;base64,<") and len(image_url) < 60
    await run(cfg, RunOptions(manifest, output, limit=1, handle_signals=False))
    billed = {r["id"]: r["prompt_tokens"] for r in read_output(output, ["id", "prompt_tokens"]).to_pylist()}
    assert preview.estimated_prompt_tokens == billed["row-2"]


async def test_rows_that_would_fail_before_sending_are_passed_over_and_counted(tmp_path):
    make_image(tmp_path / "ok.png")
    manifest = write_csv(
        tmp_path / "m.csv",
        [{"id": "gone", "image": "gone.png"}, {"id": "fine", "image": "ok.png", "detail": "low"}],
    )
    cfg = azure_config_for("http://127.0.0.1:9")

    preview = await preview_first_request(cfg, manifest, tmp_path / "out", environ={})

    assert preview.row_id == "fine" and preview.rows_failing == 1 and "gone" in preview.first_failure
    assert preview.estimated_prompt_tokens is not None and preview.estimated_prompt_tokens > 85
    assert "NOT SET" in preview.auth and KEY_ENV in preview.auth
    assert not (tmp_path / "out").exists()


async def test_with_retry_failed_the_preview_is_a_failed_row(tmp_path, emulator, images_manifest, key_in_env):
    manifest, output = images_manifest(2), tmp_path / "out"
    cfg = azure_config(emulator)
    emulator.script(*[Fault(status=400)] * 1)
    await run(cfg, RunOptions(manifest, output, handle_signals=False))
    failed = [r["id"] for r in read_output(output, ["id", "status"]).to_pylist() if r["status"] == "error"]

    plain = await preview_first_request(cfg, manifest, output)
    retrying = await preview_first_request(cfg, manifest, output, retry_failed=True)

    assert len(failed) == 1
    assert plain.row_id is None and preview_as_json(plain)["note"].startswith("no row")
    assert retrying.row_id == failed[0]


def test_shortening_keeps_the_body_shape_and_drops_payloads_and_query_strings():
    body = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "Describe"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 800, "detail": "low"}},
        {"type": "image_url", "image_url": {"url": "https://acct.blob.core.windows.net/c/a.jpg?sig=SECRET"}},
    ]}], "max_tokens": 300}  # fmt: skip

    short = shorten_body(body)

    parts = short["messages"][0]["content"]
    assert parts[0] == {"type": "text", "text": "Describe"} and short["max_tokens"] == 300
    assert parts[1]["image_url"] == {"url": "data:image/png;base64,<600 B>", "detail": "low"}
    assert "SECRET" not in json.dumps(short)
    assert body["messages"][0]["content"][1]["image_url"]["url"].endswith(
        "A" * 800
    )  # the original is untouched


def test_the_cli_dry_run_prints_one_json_object_without_the_key_and_exits_0(tmp_path):
    make_image(tmp_path / "a.png", (1024, 1024))
    manifest = write_csv(tmp_path / "m.csv", [{"id": "a", "image": "a.png", "detail": "high"}])
    config = tmp_path / "run.toml"
    config.write_text(
        '[endpoint]\nprovider = "azure"\nurl = "http://127.0.0.1:9"\ndeployment = "vision"\n'
        f'api_key_env = "{KEY_ENV}"\n'
    )

    done = subprocess.run(
        [*CLI, "run", str(config), "--manifest", str(manifest), "--output", str(tmp_path / "out"), "--dry-run"],
        env={**os.environ, KEY_ENV: TEST_KEY}, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip

    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert shown["sent"] is False and shown["row"] == {
        "id": "a",
        "manifest_line": 2,
    }  # the file line, after the header
    assert shown["endpoint"].startswith("http://127.0.0.1:9/openai/deployments/vision/chat/completions")
    assert shown["tokens"] == {
        "estimated_prompt": shown["tokens"]["estimated_prompt"],
        "max_tokens": 300,
        "reserved": shown["tokens"]["estimated_prompt"] + 300,
        "fits_tokens_per_minute": True,
    }
    assert shown["tokens"]["estimated_prompt"] > 765  # the published 1024×1024 high-detail figure, plus text
    assert TEST_KEY not in done.stdout + done.stderr and "(set)" in shown["auth"]
    assert not (tmp_path / "out").exists()


def azure_config_for(url: str):
    from pipeline.config import config_from_mapping

    return config_from_mapping(
        {"endpoint": {"provider": "azure", "url": url, "deployment": "vision", "api_key_env": KEY_ENV}},
        source="t.toml",
    )
