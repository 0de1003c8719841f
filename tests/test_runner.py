"""End to end: the real client against the real emulator on 127.0.0.1, real Parquet read back."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from pathlib import Path

import pyarrow.dataset as ds
import pytest
from conftest import KEY_ENV, TEST_KEY, azure_config, make_image, with_limits, write_csv

import pipeline.captioner
import pipeline.runner
from pipeline.emulator import FILTER_MARKER, FINISH_OBJECT_MARKER, Fault
from pipeline.exits import EXIT_INTERRUPTED, EXIT_OK, EXIT_REFUSED, EXIT_ROW_ERRORS
from pipeline.images import prepare_image
from pipeline.runner import RunOptions, run
from pipeline.sink import read_output


def rows_by_id(output: Path) -> dict[str, dict]:
    rows = ds.dataset(output).to_table().to_pylist()
    assert len(rows) == len({r["id"] for r in rows}), "an id was committed twice"
    return {r["id"]: r for r in rows}


async def test_every_row_is_captioned_once_with_usage_and_filter_results(
    tmp_path, emulator, images_manifest, key_in_env
):
    manifest = images_manifest(6, license="cc-by")

    summary = await run(azure_config(emulator), RunOptions(manifest, tmp_path / "out", handle_signals=False))

    rows = rows_by_id(tmp_path / "out")
    assert summary.exit_code == EXIT_OK and summary.counts["ok"] == 6
    assert set(rows) == {f"row-{i}" for i in range(6)}
    row = rows["row-0"]
    assert row["status"] == "ok" and row["description"] and row["finish_reason"] == "stop"
    assert row["prompt_tokens"] == row["estimated_prompt_tokens"] > 85
    assert row["total_tokens"] == row["prompt_tokens"] + row["completion_tokens"]
    assert row["prompt_filter"]["violence"] == {"filtered": False, "severity": "safe"}
    assert row["image"] == "images/img0.png" and row["license"] == "cc-by"
    assert row["cost_usd"] > 0 and row["attempts"] == 1 and row["http_status"] == 200


async def test_the_openai_route_sends_the_model_and_a_bearer_key(
    tmp_path, emulator, images_manifest, key_in_env
):
    manifest = images_manifest(1)
    cfg = azure_config(
        emulator, endpoint={"provider": "openai", "url": emulator.url + "/v1", "model": "gpt-4o"}
    )

    summary = await run(cfg, RunOptions(manifest, tmp_path / "out", handle_signals=False))

    assert summary.counts["ok"] == 1
    (request,) = emulator.requests
    assert request.route == "openai" and request.body["model"] == "gpt-4o"
    content = request.body["messages"][-1]["content"]
    assert content[1]["image_url"]["url"].startswith("data:image/")
    assert content[1]["image_url"]["detail"] == "auto"


async def test_a_filtered_prompt_is_recorded_as_filtered_and_not_retried(
    tmp_path, emulator, images_manifest, key_in_env
):
    manifest = images_manifest(1, prompt=f"Describe {FILTER_MARKER}")

    summary = await run(azure_config(emulator), RunOptions(manifest, tmp_path / "out", handle_signals=False))

    row = rows_by_id(tmp_path / "out")["row-0"]
    assert summary.exit_code == EXIT_OK
    assert row["status"] == "filtered" and row["finish_reason"] == "content_filter"
    assert any(c and c["filtered"] for c in row["prompt_filter"].values())
    assert len(emulator.requests) == 1


async def test_finish_reason_in_object_form_is_stored_as_a_string(
    tmp_path, emulator, images_manifest, key_in_env
):
    manifest = images_manifest(1, prompt=f"Describe {FINISH_OBJECT_MARKER}")

    await run(azure_config(emulator), RunOptions(manifest, tmp_path / "out", handle_signals=False))

    assert rows_by_id(tmp_path / "out")["row-0"]["finish_reason"] == "stop"


async def test_a_5xx_is_retried_then_the_row_is_ok(tmp_path, emulator, images_manifest, key_in_env):
    manifest = images_manifest(1)
    emulator.script(Fault(status=500), Fault(status=503), Fault(drop=True))

    await run(azure_config(emulator), RunOptions(manifest, tmp_path / "out", handle_signals=False))

    row = rows_by_id(tmp_path / "out")["row-0"]
    assert row["status"] == "ok" and row["attempts"] == 4


async def test_a_row_out_of_attempts_is_an_error_with_the_last_reason(
    tmp_path, emulator, images_manifest, key_in_env
):
    manifest = images_manifest(1)
    emulator.script(*[Fault(status=500)] * 4)

    summary = await run(azure_config(emulator), RunOptions(manifest, tmp_path / "out", handle_signals=False))

    row = rows_by_id(tmp_path / "out")["row-0"]
    assert summary.exit_code == EXIT_ROW_ERRORS
    assert row["status"] == "error" and row["attempts"] == 4 and row["http_status"] == 500
    assert "gave up after 4 attempts" in row["error"]


async def test_a_bad_image_is_an_error_row_while_the_rest_succeed(tmp_path, emulator, key_in_env):
    make_image(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    rows = [
        {"id": "good", "image": "good.png"},
        {"id": "broken", "image": "broken.png"},
        {"id": "missing", "image": "nowhere.png"},
        {"id": "", "image": "", "note": "a row with no image"},
    ]
    manifest = write_csv(tmp_path / "m.csv", rows)

    summary = await run(azure_config(emulator), RunOptions(manifest, tmp_path / "out", handle_signals=False))

    out = rows_by_id(tmp_path / "out")
    assert summary.counts == {"ok": 1, "filtered": 0, "error": 3}
    assert out["good"]["status"] == "ok"
    for row_id in ("broken", "missing"):
        assert out[row_id]["status"] == "error" and row_id in out[row_id]["error"]
    assert len(emulator.requests) == 1


async def test_images_are_prepared_in_the_runs_image_threads_never_on_the_event_loop(
    tmp_path, emulator, images_manifest, key_in_env, monkeypatch
):
    threads: list[str] = []

    def prepare_and_note_the_thread(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return prepare_image(*args, **kwargs)

    monkeypatch.setattr(pipeline.captioner, "prepare_image", prepare_and_note_the_thread)
    cfg = azure_config(emulator, images={"threads": 2})

    summary = await run(cfg, RunOptions(images_manifest(6), tmp_path / "out", handle_signals=False))

    assert summary.counts["ok"] == 6 and len(threads) == 6
    assert all(name.startswith("images_") for name in threads) and len(set(threads)) <= 2


async def test_duplicate_ids_keep_the_first_row_only(tmp_path, emulator, key_in_env):
    make_image(tmp_path / "a.png")
    make_image(tmp_path / "b.png")
    manifest = write_csv(tmp_path / "m.csv", [{"id": "x", "image": "a.png"}, {"id": "x", "image": "b.png"}])

    summary = await run(azure_config(emulator), RunOptions(manifest, tmp_path / "out", handle_signals=False))

    assert summary.duplicates == 1
    assert rows_by_id(tmp_path / "out")["x"]["image"] == "a.png"


async def test_a_rerun_sends_nothing_for_committed_rows(tmp_path, emulator, images_manifest, key_in_env):
    manifest = images_manifest(5)
    cfg = azure_config(emulator)
    await run(cfg, RunOptions(manifest, tmp_path / "out", handle_signals=False))
    sent = len(emulator.requests)

    summary = await run(cfg, RunOptions(manifest, tmp_path / "out", handle_signals=False))

    assert len(emulator.requests) == sent == 5
    assert summary.skipped == 5 and summary.rows == 0
    assert len(rows_by_id(tmp_path / "out")) == 5


async def test_limit_sends_at_most_that_many_new_rows(tmp_path, emulator, images_manifest, key_in_env):
    manifest = images_manifest(5)

    await run(azure_config(emulator), RunOptions(manifest, tmp_path / "out", limit=2, handle_signals=False))
    await run(azure_config(emulator), RunOptions(manifest, tmp_path / "out", limit=2, handle_signals=False))

    assert len(rows_by_id(tmp_path / "out")) == 4


async def test_sigterm_stops_commits_and_a_rerun_completes_every_row_once(
    tmp_path, images_manifest, key_in_env
):
    from pipeline.config import EmulatorConfig
    from pipeline.emulator import Emulator

    manifest = images_manifest(12)
    async with Emulator(EmulatorConfig(latency_s=0.2), api_key=TEST_KEY, deployment="vision") as slow:
        cfg = with_limits(azure_config(slow), concurrency=2)
        loop = asyncio.get_running_loop()
        loop.call_later(0.5, os.kill, os.getpid(), signal.SIGTERM)

        first = await run(cfg, RunOptions(manifest, tmp_path / "out"))
        second = await run(cfg, RunOptions(manifest, tmp_path / "out", handle_signals=False))

    assert first.exit_code == EXIT_INTERRUPTED and 0 < first.rows < 12
    assert second.exit_code == EXIT_OK and second.skipped == first.rows
    assert len(rows_by_id(tmp_path / "out")) == 12


async def test_after_sigterm_no_request_is_started_and_rows_waiting_for_the_quota_stay_for_the_rerun(
    tmp_path, images_manifest, key_in_env
):
    """Rows waiting for the budget would be sent at the quota's pace, long after the signal: paid for, and
    cut off by the grace before their answer is committed. They are not sent at all."""
    from pipeline.config import EmulatorConfig
    from pipeline.emulator import Emulator

    manifest = images_manifest(8)
    async with Emulator(EmulatorConfig(latency_s=0.2), api_key=TEST_KEY, deployment="vision") as slow:
        cfg = with_limits(azure_config(slow), concurrency=4, requests_per_minute=12)  # 2 per 10 s window
        loop = asyncio.get_running_loop()
        signalled = loop.time() + 1.0
        loop.call_at(signalled, os.kill, os.getpid(), signal.SIGTERM)

        first = await run(cfg, RunOptions(manifest, tmp_path / "out"))
        stopped = loop.time()
        sent_before_rerun = len(slow.requests)
        second = await run(
            with_limits(cfg, requests_per_minute=6000),
            RunOptions(manifest, tmp_path / "out", handle_signals=False),
        )

    assert first.exit_code == EXIT_INTERRUPTED and first.rows >= 1 and stopped - signalled < 1.0
    assert all(request.at < signalled for request in slow.requests[:sent_before_rerun])
    assert sent_before_rerun == first.rows  # every request sent was answered and committed
    assert second.exit_code == EXIT_OK and second.skipped == first.rows
    assert len(rows_by_id(tmp_path / "out")) == 8


async def test_a_row_waiting_to_retry_when_sigterm_comes_is_left_for_the_rerun_at_once(
    tmp_path, images_manifest, key_in_env
):
    from pipeline.emulator import Emulator

    manifest = images_manifest(1)
    async with Emulator(api_key=TEST_KEY, deployment="vision") as emu:
        emu.script(Fault(status=503, headers={"retry-after": "8"}))
        cfg = azure_config(emu)
        loop = asyncio.get_running_loop()
        signalled = loop.time() + 1.0
        loop.call_at(signalled, os.kill, os.getpid(), signal.SIGTERM)

        first = await run(cfg, RunOptions(manifest, tmp_path / "out"))
        stopped = loop.time()
        second = await run(cfg, RunOptions(manifest, tmp_path / "out", handle_signals=False))

    assert first.exit_code == EXIT_INTERRUPTED and first.rows == 0 and stopped - signalled < 1.0
    assert first.retries_by_cause == {}  # the retry was never sent
    assert second.exit_code == EXIT_OK and len(rows_by_id(tmp_path / "out")) == 1


async def test_a_refused_key_stops_the_run_naming_the_setting(
    tmp_path, emulator, images_manifest, monkeypatch
):
    monkeypatch.setenv(KEY_ENV, "wrong-key")
    manifest = images_manifest(20)

    summary = await run(azure_config(emulator), RunOptions(manifest, tmp_path / "out", handle_signals=False))

    assert summary.exit_code == EXIT_REFUSED
    assert KEY_ENV in summary.stopped_because and "wrong-key" not in summary.stopped_because
    assert len(emulator.requests) <= 4  # one per worker at most, then the run stops


async def test_a_wrong_deployment_stops_the_run(tmp_path, emulator, images_manifest, key_in_env):
    cfg = azure_config(emulator, endpoint={"deployment": "nope"})

    summary = await run(cfg, RunOptions(images_manifest(3), tmp_path / "out", handle_signals=False))

    assert summary.exit_code == EXIT_REFUSED and "endpoint.deployment" in summary.stopped_because


async def test_the_key_appears_in_no_output_file(tmp_path, emulator, images_manifest, key_in_env, caplog):
    caplog.set_level("DEBUG")
    emulator.script(Fault(status=500))

    await run(azure_config(emulator), RunOptions(images_manifest(3), tmp_path / "out", handle_signals=False))

    assert TEST_KEY not in caplog.text
    for path in (tmp_path / "out").iterdir():
        assert TEST_KEY.encode() not in path.read_bytes(), path.name
    assert b"base64," not in b"".join(p.read_bytes() for p in (tmp_path / "out").iterdir())


async def test_a_429_with_retry_after_ms_pauses_every_worker_that_long(
    tmp_path, emulator, images_manifest, key_in_env
):
    manifest = images_manifest(6)
    emulator.script(Fault(status=429, headers={"retry-after-ms": "1500"}))

    summary = await run(azure_config(emulator), RunOptions(manifest, tmp_path / "out", handle_signals=False))

    assert summary.counts["ok"] == 6 and summary.pauses == 1
    first_429 = next(r.at for r in emulator.requests if r.status == 429)
    after = [r.at - first_429 for r in emulator.requests if r.at > first_429]
    in_flight_already = [t for t in after if t < 0.1]  # sent before the 429 reached the client
    assert all(t >= 1.5 for t in after if t not in in_flight_already)
    assert len(after) > len(in_flight_already)


async def test_a_429_asking_for_a_day_stops_the_run_without_spinning(
    tmp_path, emulator, images_manifest, key_in_env
):
    emulator.script(*[Fault(status=429, headers={"retry-after": "86400"})] * 4)

    summary = await run(
        azure_config(emulator), RunOptions(images_manifest(10), tmp_path / "out", handle_signals=False)
    )

    assert summary.exit_code == EXIT_REFUSED and "max_retry_after_s" in summary.stopped_because
    assert len(emulator.requests) <= 4


async def test_a_request_above_the_minute_budget_is_never_sent(
    tmp_path, emulator, images_manifest, key_in_env
):
    cfg = azure_config(emulator, limits={"tokens_per_minute": 300}, request={"max_tokens": 300})

    summary = await run(cfg, RunOptions(images_manifest(2), tmp_path / "out", handle_signals=False))

    assert summary.counts["error"] == 2 and emulator.requests == []
    assert "limits.tokens_per_minute" in rows_by_id(tmp_path / "out")["row-0"]["error"]


SIZES = [(1, 1), (512, 512), (513, 513), (1024, 1024), (2048, 4096), (600, 900), (1, 4000), (10000, 20)]


async def test_estimated_prompt_tokens_equal_the_billed_ones(tmp_path, emulator, key_in_env):
    rows = []
    for w, h in SIZES:
        make_image(tmp_path / f"{w}x{h}.png", (w, h))
        for detail in ("low", "high", "auto"):
            rows.append({"id": f"{w}x{h}-{detail}", "image": f"{w}x{h}.png", "detail": detail})
    manifest = write_csv(tmp_path / "m.csv", rows)

    await run(azure_config(emulator), RunOptions(manifest, tmp_path / "out", handle_signals=False))

    table = read_output(
        tmp_path / "out", ["id", "status", "prompt_tokens", "estimated_prompt_tokens"]
    ).to_pylist()
    assert len(table) == len(rows)
    for row in table:
        assert row["status"] == "ok", row
        assert row["estimated_prompt_tokens"] == row["prompt_tokens"], row["id"]


async def test_a_changed_prompt_against_an_existing_output_is_refused(
    tmp_path, emulator, images_manifest, key_in_env
):
    from pipeline.records import ConfigError

    manifest = images_manifest(1)
    await run(azure_config(emulator), RunOptions(manifest, tmp_path / "out", handle_signals=False))

    with pytest.raises(ConfigError, match="prompt"):
        await run(
            azure_config(emulator, request={"prompt": "Other"}),
            RunOptions(manifest, tmp_path / "out", handle_signals=False),
        )


async def test_a_manifest_that_turns_out_unreadable_stops_the_run_with_exit_2(tmp_path, emulator, key_in_env):
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,image\nrow-0,images/img0.png\n", encoding="utf-16")  # with its byte-order mark

    summary = await run(azure_config(emulator), RunOptions(manifest, tmp_path / "out", handle_signals=False))

    assert summary.exit_code == 2 and "m.csv" in summary.stopped_because


async def test_stats_json_matches_the_parquet_and_counts_retries_by_cause(tmp_path, emulator, key_in_env):
    """_stats.json is the run's summary: its figures must be what the committed rows of the run add up to."""
    import json

    import pyarrow.compute as pc

    from pipeline.emulator import Fault
    from pipeline.sink import STATS_FILE

    for i in range(8):
        make_image(tmp_path / "images" / f"img{i}.png")
    rows = [
        *({"id": f"row-{i}", "image": f"images/img{i}.png"} for i in range(8)),
        {"id": "missing", "image": "gone.png"},
    ]
    manifest = write_csv(tmp_path / "manifest.csv", rows)
    emulator.script(
        Fault(status=429, headers={"retry-after-ms": "10"}), Fault(status=500), Fault(drop=True),
        Fault(delay_s=1.0), Fault(status=200, body={"unexpected": True}),
    )  # fmt: skip
    cfg = azure_config(emulator, limits={"concurrency": 1, "timeout_s": 0.3, "max_attempts": 8})

    summary = await run(cfg, RunOptions(manifest, tmp_path / "out", handle_signals=False))

    stats = json.loads((tmp_path / "out" / STATS_FILE).read_text())
    table = read_output(tmp_path / "out")
    rows = table.to_pylist()
    assert stats["exit_code"] == summary.exit_code == EXIT_ROW_ERRORS
    assert stats["counts"] == {s: sum(r["status"] == s for r in rows) for s in ("ok", "filtered", "error")}
    assert stats["rows"] == len(rows) == 9
    assert stats["prompt_tokens"] == sum(r["prompt_tokens"] or 0 for r in rows)
    assert stats["completion_tokens"] == sum(r["completion_tokens"] or 0 for r in rows)
    assert stats["cost_usd"] == pytest.approx(sum(r["cost_usd"] or 0 for r in rows), abs=1e-6)
    assert stats["retries"] == sum(max(0, r["attempts"] - 1) for r in rows) == 5
    assert stats["retries_by_cause"] == {
        "bad_body": 1,
        "connection": 1,
        "http_429": 1,
        "http_5xx": 1,
        "timeout": 1,
    }
    assert stats["http_429s"] == 1 and stats["pauses"] == 1 and stats["paused_s"] > 0
    assert stats["rows_per_s"] == pytest.approx(len(rows) / stats["duration_s"], rel=0.01)
    quantiles = pc.quantile(table.column("latency_s"), q=[0.5, 0.9, 0.99]).to_pylist()
    assert [stats["latency_percentiles_s"][p] for p in ("p50", "p90", "p99")] == pytest.approx(
        quantiles, abs=1e-4
    )
    assert (
        stats["latency_percentiles_s"]["p99"] > stats["latency_percentiles_s"]["p50"] + 0.2
    )  # the timed-out row


async def test_prices_set_in_the_config_price_the_rows(tmp_path, emulator, images_manifest, key_in_env):
    cfg = azure_config(emulator, pricing={"input_per_1m": 1_000_000.0, "output_per_1m": 0.0})

    await run(cfg, RunOptions(images_manifest(1), tmp_path / "out", handle_signals=False))

    row = rows_by_id(tmp_path / "out")["row-0"]
    assert row["cost_usd"] == pytest.approx(row["prompt_tokens"])  # a dollar a token


async def test_a_csv_line_that_is_not_utf8_is_committed_as_one_error_row_and_the_rest_is_served(
    tmp_path, emulator, key_in_env
):
    """A nightly run does not lose the night for one Latin-1 line; a rerun sends nothing again."""
    for i in range(3):
        make_image(tmp_path / "images" / f"img{i}.png")
    manifest = tmp_path / "m.csv"
    lines = [
        b"id,image,prompt",
        b"row-0,images/img0.png,",
        b"row-1,images/img1.png,d\xe9crire",
        b"row-2,images/img2.png,",
    ]
    manifest.write_bytes(b"\n".join(lines) + b"\n")
    offset = manifest.read_bytes().index(b"\xe9")

    first = await run(azure_config(emulator), RunOptions(manifest, tmp_path / "out", handle_signals=False))
    sent = len(emulator.requests)
    again = await run(azure_config(emulator), RunOptions(manifest, tmp_path / "out", handle_signals=False))

    rows = rows_by_id(tmp_path / "out")
    assert first.exit_code == EXIT_ROW_ERRORS and first.counts["ok"] == 2 and first.counts["error"] == 1
    assert rows["row-1"]["status"] == "error" and rows["row-1"]["error_kind"] == "bad_manifest_row"
    assert f"line 3: not UTF-8 text: byte 0xe9 at byte offset {offset}" in rows["row-1"]["error"]
    assert rows["row-0"]["status"] == rows["row-2"]["status"] == "ok"
    assert sent == 2 and len(emulator.requests) == 2
    assert again.skipped == 3 and sum(again.counts.values()) == 0
