"""Batch mode end to end: the real Files and Batches client against the emulator, real Parquet read back."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pyarrow.dataset as ds
import pytest
from conftest import KEY_ENV, ROOT, TEST_KEY, make_image, write_csv

from pipeline.batch.control import cancel_batches
from pipeline.batch.ledger import LEDGER_FILE, read_records
from pipeline.config import EmulatorConfig, RunConfig, config_from_mapping, load_config
from pipeline.emulator import FILTER_MARKER, Emulator
from pipeline.emulator.batches import BatchScript
from pipeline.estimate import EstimateOptions, estimate
from pipeline.estimate_text import estimate_as_json, format_estimate
from pipeline.exits import EXIT_BUDGET, EXIT_OK, EXIT_ROW_ERRORS, EXIT_USAGE
from pipeline.pricing import cost_usd, price_for_run, usage_cost_usd
from pipeline.records import ConfigError, Usage
from pipeline.runner import RunOptions, run
from pipeline.status import format_status, read_status


def rows_by_id(output: Path) -> dict[str, dict[str, Any]]:
    rows = ds.dataset(output).to_table().to_pylist()
    assert len(rows) == len({r["id"] for r in rows}), "an id was committed twice"
    return {r["id"]: r for r in rows}


def batch_config(emulator: Emulator, **sections: dict[str, Any]) -> RunConfig:
    """A batch config for the emulator's OpenAI surface, polling fast; `sections` override."""
    raw: dict[str, dict[str, Any]] = {
        "endpoint": {"provider": "openai", "url": emulator.url + "/v1", "api_key_env": KEY_ENV,
                     "model": "gpt-4o", "mode": "batch"},
        "batch": {"poll_s": 0.02},
        "limits": {"backoff_initial_s": 0.0, "concurrency": 4},
        "output": {"rows_per_part": 3},
    }  # fmt: skip
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return config_from_mapping(raw, source="batch.toml")


def manifest_of(tmp_path: Path, n: int, **columns: Any) -> Path:
    rows = []
    for i in range(n):
        make_image(tmp_path / "images" / f"img{i}.png", (64 + 8 * i, 48 + 4 * i))
        rows.append({"id": f"row-{i}", "image": f"images/img{i}.png", **columns})
    return write_csv(tmp_path / "manifest.csv", rows)


@pytest.fixture
async def batch_emulator() -> Any:
    async with Emulator(EmulatorConfig(), api_key=TEST_KEY, deployment="batch-4o", model="gpt-4o") as emu:
        yield emu


def options(tmp_path: Path, manifest: Path, **values: Any) -> RunOptions:
    return RunOptions(manifest, tmp_path / "out", handle_signals=False, **values)


async def test_a_batch_run_commits_every_row_once_at_half_the_live_price(
    tmp_path, batch_emulator, key_in_env
):
    manifest = manifest_of(tmp_path, 7)
    cfg = batch_config(batch_emulator, batch={"max_file_requests": 3})

    summary = await run(cfg, options(tmp_path, manifest))

    rows = rows_by_id(tmp_path / "out")
    assert (
        summary.exit_code == EXIT_OK
        and summary.counts["ok"] == 7
        and set(rows) == {f"row-{i}" for i in range(7)}
    )
    row = rows["row-0"]
    assert (
        row["mode"] == "batch"
        and row["description"]
        and row["prompt_tokens"] == row["estimated_prompt_tokens"]
    )
    assert row["prompt_filter"]["violence"] == {"filtered": False, "severity": "safe"}
    live = usage_cost_usd(Usage(row["prompt_tokens"], row["completion_tokens"], 0), price_for_run(cfg))
    assert row["cost_usd"] == pytest.approx(live / 2)
    assert batch_emulator.batches.stats.created == 3  # 7 rows, 3 lines a file
    assert set(batch_emulator.batches.stats.billed.values()) == {1}


async def test_no_wait_submits_and_exits_0_and_a_later_run_collects(tmp_path, batch_emulator, key_in_env):
    manifest = manifest_of(tmp_path, 5)
    cfg = batch_config(batch_emulator)

    first = await run(cfg, options(tmp_path, manifest, no_wait=True))
    status = read_status(tmp_path / "out")
    second = await run(cfg, options(tmp_path, manifest))

    assert (
        first.exit_code == EXIT_OK
        and first.rows == 0
        and "later run collects" in (first.stopped_because or "")
    )
    assert [b.rows for b in status.batches] == [5] and status.batches[0].batch_id in format_status(status)
    assert second.counts["ok"] == 5 and second.skipped == 0 and len(rows_by_id(tmp_path / "out")) == 5
    assert batch_emulator.batches.stats.created == 1  # collected, not submitted again
    assert read_status(tmp_path / "out").batches[0].state == "collected"


async def test_an_expired_batch_keeps_its_finished_lines_and_resubmits_the_rest(
    tmp_path, batch_emulator, key_in_env
):
    manifest = manifest_of(tmp_path, 6)
    batch_emulator.batches.scripts.append(BatchScript(expire_after_lines=2))

    summary = await run(batch_config(batch_emulator), options(tmp_path, manifest))

    assert summary.counts["ok"] == 6 and len(rows_by_id(tmp_path / "out")) == 6
    stats = batch_emulator.batches.stats
    assert stats.created == 2 and sorted(stats.billed.values()) == [1] * 6  # each row answered (paid) once
    collected = [r for r in read_records(tmp_path / "out" / LEDGER_FILE) if r["event"] == "collected"]
    assert [(r["status"], r["committed"], r["left"]) for r in collected] == [
        ("expired", 2, 4),
        ("completed", 4, 0),
    ]


async def test_rows_still_left_after_max_rounds_are_named_and_stay_uncommitted(
    tmp_path, batch_emulator, key_in_env
):
    manifest = manifest_of(tmp_path, 4)
    batch_emulator.batches.scripts.extend(
        [BatchScript(expire_after_lines=1), BatchScript(expire_after_lines=1)]
    )

    summary = await run(batch_config(batch_emulator, batch={"max_rounds": 2}), options(tmp_path, manifest))

    assert summary.exit_code == EXIT_OK and summary.stopped_because == "2 rows left for the next run"
    assert len(rows_by_id(tmp_path / "out")) == 2


async def test_a_cancelled_batch_keeps_its_finished_lines_and_the_next_run_submits_the_rest(
    tmp_path, batch_emulator, key_in_env
):
    manifest = manifest_of(tmp_path, 5)
    cfg = batch_config(batch_emulator)
    batch_emulator.batches.scripts.append(BatchScript(stall_after_lines=2))
    await run(cfg, options(tmp_path, manifest, no_wait=True))

    answers = await cancel_batches(cfg, tmp_path / "out", TEST_KEY)
    summary = await run(cfg, options(tmp_path, manifest))

    assert [status for _, status in answers] == ["cancelling"]
    assert summary.counts["ok"] == 5 and len(rows_by_id(tmp_path / "out")) == 5
    assert batch_emulator.batches.stats.created == 2 and set(
        batch_emulator.batches.stats.billed.values()
    ) == {1}


async def test_a_run_killed_between_create_and_its_ledger_line_adopts_the_batch_and_creates_no_second(
    tmp_path, batch_emulator, key_in_env
):
    """The job exists at the service, the ledger has `creating` but no `created`: as after a SIGKILL there."""
    manifest = manifest_of(tmp_path, 4)
    cfg = batch_config(batch_emulator)
    await run(cfg, options(tmp_path, manifest, no_wait=True))
    ledger = tmp_path / "out" / LEDGER_FILE
    kept = [line for line in ledger.read_text().splitlines() if json.loads(line)["event"] != "created"]
    ledger.write_text("\n".join(kept) + "\n")

    summary = await run(cfg, options(tmp_path, manifest))

    assert summary.counts["ok"] == 4 and len(rows_by_id(tmp_path / "out")) == 4
    stats = batch_emulator.batches.stats
    assert stats.created == 1 and stats.overlaps == 0 and set(stats.billed.values()) == {1}


async def test_error_lines_are_error_rows_with_their_code_and_filtered_prompts_are_filtered(
    tmp_path, key_in_env
):
    rows = [{"id": f"row-{i}", "image": f"images/img{i}.png", "prompt": "Describe."} for i in range(3)]
    rows[1]["prompt"] = f"Describe. {FILTER_MARKER}"
    for i in range(3):
        make_image(tmp_path / "images" / f"img{i}.png")
    manifest = write_csv(tmp_path / "manifest.csv", rows)
    emulator_cfg = EmulatorConfig(batch_fail_every=3)  # the third line fails

    async with Emulator(emulator_cfg, api_key=TEST_KEY, model="gpt-4o") as emu:
        one_planner = batch_config(emu, limits={"concurrency": 1})  # lines in manifest order
        summary = await run(one_planner, options(tmp_path, manifest))

    out = rows_by_id(tmp_path / "out")
    assert summary.exit_code == EXIT_ROW_ERRORS
    assert out["row-1"]["status"] == "filtered" and out["row-1"]["prompt_filter"]["violence"]["filtered"]
    assert out["row-2"]["status"] == "error" and out["row-2"]["error_kind"] == "batch_line_failed"
    assert "server_error" in out["row-2"]["error"] and out["row-2"]["mode"] == "batch"


async def test_with_enqueued_tokens_set_no_more_is_ever_enqueued(tmp_path, key_in_env):
    manifest = manifest_of(tmp_path, 6)
    async with Emulator(
        EmulatorConfig(batch_enqueued_tokens=700, batch_delay_s=0.2), api_key=TEST_KEY, model="gpt-4o"
    ) as emu:
        cfg = batch_config(emu, batch={"enqueued_tokens": 700})

        summary = await run(cfg, options(tmp_path, manifest))

    assert summary.counts["ok"] == 6
    assert emu.batches.stats.created == 3  # ~281 tokens a row: two rows a file, one job at a time
    assert all(b["status"] == "completed" for b in emu.batches.batches.values())


async def test_token_limit_exceeded_is_waited_out_and_the_file_submitted_again(tmp_path, key_in_env, caplog):
    manifest = manifest_of(tmp_path, 4)
    async with Emulator(
        EmulatorConfig(batch_enqueued_tokens=600, batch_delay_s=0.3), api_key=TEST_KEY, model="gpt-4o"
    ) as emu:
        cfg = batch_config(emu, batch={"max_file_requests": 2})

        summary = await run(cfg, options(tmp_path, manifest))

    statuses = sorted(b["status"] for b in emu.batches.batches.values())
    assert summary.counts["ok"] == 4 and len(rows_by_id(tmp_path / "out")) == 4
    assert "failed" in statuses and statuses.count("completed") == 2
    assert "token_limit_exceeded" in caplog.text


async def test_live_and_batch_runs_alternate_on_one_output_and_the_mode_column_says_which(
    tmp_path, batch_emulator, key_in_env
):
    manifest = manifest_of(tmp_path, 4)
    batch = batch_config(batch_emulator)
    live = batch_config(batch_emulator, endpoint={"mode": "live"})

    await run(live, options(tmp_path, manifest, limit=2))
    await run(batch, options(tmp_path, manifest))

    modes = sorted(r["mode"] for r in rows_by_id(tmp_path / "out").values())
    assert modes == ["batch", "batch", "live", "live"]
    assert sum(batch_emulator.batches.stats.billed.values()) == 2


@pytest.mark.parametrize("api_version", ["v1", "2024-10-21"])
async def test_azure_surfaces_run_a_batch(tmp_path, batch_emulator, key_in_env, api_version):
    manifest = manifest_of(tmp_path, 2)
    endpoint = {"provider": "azure", "url": batch_emulator.url, "deployment": "batch-4o",
                "api_version": api_version, "model": "gpt-4o"}  # fmt: skip

    summary = await run(batch_config(batch_emulator, endpoint=endpoint), options(tmp_path, manifest))

    (job,) = batch_emulator.batches.batches.values()
    assert summary.counts["ok"] == 2
    assert job["endpoint"] == ("/v1/chat/completions" if api_version == "v1" else "/chat/completions")


def test_an_azure_api_version_before_2024_07_01_preview_is_refused_in_batch_mode():
    endpoint = {"provider": "azure", "url": "https://x.openai.azure.com", "deployment": "d", "api_key_env": "K",
                "mode": "batch", "api_version": "2024-02-15-preview"}  # fmt: skip

    with pytest.raises(ConfigError, match=r"endpoint\.api_version = '2024-02-15-preview'"):
        config_from_mapping({"endpoint": endpoint})


async def test_azure_gpt_4_turbo_with_images_in_batch_mode_exits_2_before_uploading(tmp_path, key_in_env):
    manifest = manifest_of(tmp_path, 2)
    config = tmp_path / "azure-batch.toml"

    async with Emulator(api_key=TEST_KEY, deployment="turbo-batch") as emu:
        config.write_text(
            f'[endpoint]\nprovider = "azure"\nurl = "{emu.url}"\ndeployment = "turbo-batch"\n'
            f'api_key_env = "{KEY_ENV}"\napi_version = "2024-10-21"\nmode = "batch"\n'
            'model = "gpt-4-turbo-2024-04-09"\n'
        )
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pipeline", "run", str(config), "--manifest", str(manifest),
            "--output", str(tmp_path / "out"), stderr=asyncio.subprocess.PIPE, cwd=ROOT,
        )  # fmt: skip
        _, stderr = await process.communicate()

    assert process.returncode == EXIT_USAGE and emu.batches.files == {}
    assert "gpt-4-turbo-2024-04-09" in stderr.decode() and "gpt-4o" in stderr.decode()


async def test_the_shipped_emulator_batch_config_runs_the_whole_flow_in_process(tmp_path):
    manifest = manifest_of(tmp_path, 3)
    cfg = load_config(ROOT / "configs" / "emulator-batch.toml")

    summary = await run(cfg, options(tmp_path, manifest))

    assert summary.counts["ok"] == 3 and {r["mode"] for r in rows_by_id(tmp_path / "out").values()} == {
        "batch"
    }


async def test_the_estimate_of_a_batch_config_shows_the_batch_cost_and_up_to_24_hours(
    tmp_path, batch_emulator
):
    manifest = manifest_of(tmp_path, 3)

    result = await estimate(batch_config(batch_emulator), EstimateOptions(manifest))

    assert "duration up to 24 h" in format_estimate(result)
    assert estimate_as_json(result)["mode"] == "batch" and estimate_as_json(result)["batch_duration_h"] == 24


async def test_retry_failed_in_batch_mode_replaces_the_error_row(tmp_path, key_in_env):
    manifest = manifest_of(tmp_path, 3)
    async with Emulator(EmulatorConfig(batch_fail_every=3), api_key=TEST_KEY, model="gpt-4o") as emu:
        await run(batch_config(emu, limits={"concurrency": 1}), options(tmp_path, manifest))
    async with Emulator(api_key=TEST_KEY, model="gpt-4o") as emu:
        summary = await run(batch_config(emu), options(tmp_path, manifest, retry_failed=True))

    rows = rows_by_id(tmp_path / "out")
    assert summary.counts["ok"] == 1 and [r["status"] for r in rows.values()] == ["ok"] * 3


async def test_sigterm_stops_a_batch_run_with_130_and_the_next_run_collects_its_job(tmp_path, key_in_env):
    manifest = manifest_of(tmp_path, 3)
    config, output = tmp_path / "batch.toml", tmp_path / "out"
    async with Emulator(EmulatorConfig(batch_delay_s=2.0), api_key=TEST_KEY, model="gpt-4o") as emu:
        config.write_text(
            f'[endpoint]\nprovider = "openai"\nurl = "{emu.url}/v1"\napi_key_env = "{KEY_ENV}"\n'
            'model = "gpt-4o"\nmode = "batch"\n[batch]\npoll_s = 0.05\n'
        )
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pipeline", "run", str(config), "--manifest", str(manifest),
            "--output", str(output), "-q", stdout=asyncio.subprocess.DEVNULL, cwd=ROOT,
        )  # fmt: skip
        while not any(r["event"] == "created" for r in read_records(output / LEDGER_FILE)):
            await asyncio.sleep(0.02)
        process.terminate()
        code = await process.wait()

        summary = await run(batch_config(emu), options(tmp_path, manifest))

    assert code == 130
    assert summary.counts["ok"] == 3 and emu.batches.stats.created == 1


async def test_the_batches_cancel_command_cancels_the_outputs_running_jobs(
    tmp_path, batch_emulator, key_in_env
):
    manifest, config = manifest_of(tmp_path, 3), tmp_path / "batch.toml"
    config.write_text(
        f'[endpoint]\nprovider = "openai"\nurl = "{batch_emulator.url}/v1"\napi_key_env = "{KEY_ENV}"\n'
        'model = "gpt-4o"\nmode = "batch"\n'
    )
    batch_emulator.batches.scripts.append(BatchScript(stall_after_lines=1))
    await run(batch_config(batch_emulator), options(tmp_path, manifest, no_wait=True))

    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pipeline", "batches", "cancel", str(tmp_path / "out"), "--config", str(config),
        stdout=asyncio.subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    stdout, _ = await process.communicate()

    (job,) = batch_emulator.batches.batches.values()
    assert process.returncode == 0 and f"{job['id']}: cancelling" in stdout.decode()
    assert job["status"] in ("cancelling", "cancelled")


# ---- the spend cap ---------------------------------------------------------------------------------------


def emulator_bill_usd(emulator: Emulator, cfg: RunConfig) -> float:
    """What the emulator billed across every batch line it answered, at the batch price."""
    stats = emulator.batches.stats
    return cost_usd(stats.prompt_tokens, stats.completion_tokens, price_for_run(cfg), batch=True)


def line_worst_usd(output: Path, cfg: RunConfig) -> float:
    """One line's worst case at the batch price (every test row has the same estimated prompt tokens)."""
    tokens = {r["estimated_prompt_tokens"] for r in rows_by_id(output).values()}
    assert len(tokens) == 1
    return cost_usd(tokens.pop(), cfg.request.max_tokens, price_for_run(cfg), batch=True)


async def test_a_spend_cap_submits_only_the_rows_that_fit_commits_them_and_exits_5_naming_the_rows_left(
    tmp_path, batch_emulator, key_in_env
):
    manifest = manifest_of(tmp_path, 8)
    cap = 0.0045  # two lines' worst case (~$0.00185 each at half price), about five lines' bill
    cfg = batch_config(batch_emulator, limits={"max_cost_usd": cap})

    summary = await run(cfg, options(tmp_path, manifest))

    rows, bill = rows_by_id(tmp_path / "out"), emulator_bill_usd(batch_emulator, cfg)
    assert summary.exit_code == EXIT_BUDGET and 0 < len(rows) < 8
    assert set(batch_emulator.batches.stats.billed) == set(rows)  # only committed rows were submitted
    assert bill <= cap and bill > cap - line_worst_usd(tmp_path / "out", cfg)
    assert summary.stopped_because == (
        f"budget reached: spent ${summary.spend_usd:.4f} of ${cap:.4f}; {8 - len(rows)} rows left for the next run"
    )
    stats = json.loads((tmp_path / "out" / "_stats.json").read_text())
    assert stats["max_cost_usd"] == cap and stats["spend_usd"] == pytest.approx(bill, abs=1e-6)
    assert stats["stopped_because"] == summary.stopped_because and stats["exit_code"] == EXIT_BUDGET


async def test_a_rerun_with_a_higher_cap_finishes_the_rest_without_sending_any_row_again(
    tmp_path, batch_emulator, key_in_env
):
    manifest = manifest_of(tmp_path, 8)
    low = batch_config(batch_emulator, limits={"max_cost_usd": 0.0045})
    first = await run(low, options(tmp_path, manifest))
    first_bill = emulator_bill_usd(batch_emulator, low)

    second = await run(
        batch_config(batch_emulator, limits={"max_cost_usd": 0.05}), options(tmp_path, manifest)
    )

    assert first.exit_code == EXIT_BUDGET and second.exit_code == EXIT_OK
    assert (
        second.skipped == first.rows
        and second.rows == 8 - first.rows
        and len(rows_by_id(tmp_path / "out")) == 8
    )
    billed = batch_emulator.batches.stats.billed
    assert len(billed) == 8 and set(billed.values()) == {1}  # no row answered (paid) twice
    assert second.spend_usd == pytest.approx(emulator_bill_usd(batch_emulator, low) - first_bill, abs=1e-6)


async def test_rows_an_expired_batch_left_over_are_submitted_again_within_the_cap(
    tmp_path, batch_emulator, key_in_env
):
    """Expired lines are not billed: their holds are freed, and the resubmission holds again."""
    manifest = manifest_of(tmp_path, 8)
    batch_emulator.batches.scripts.append(BatchScript(expire_after_lines=1))
    cap = 0.0045
    cfg = batch_config(batch_emulator, limits={"max_cost_usd": cap})

    summary = await run(cfg, options(tmp_path, manifest))

    assert summary.exit_code == EXIT_BUDGET and emulator_bill_usd(batch_emulator, cfg) <= cap
    assert set(batch_emulator.batches.stats.billed.values()) == {1}
    collected = [r for r in read_records(tmp_path / "out" / LEDGER_FILE) if r["event"] == "collected"]
    assert collected[0]["status"] == "expired" and collected[0]["left"] >= 1
    assert summary.rows > collected[0]["committed"]  # its left-over rows went again, under the cap


async def test_jobs_an_earlier_run_left_running_count_against_the_cap_of_the_run_that_collects_them(
    tmp_path, key_in_env
):
    """Their worst case is held until they are collected, and their bill is this run's spend."""
    manifest = manifest_of(tmp_path, 10)
    async with Emulator(EmulatorConfig(batch_delay_s=0.3), api_key=TEST_KEY, model="gpt-4o") as emu:
        await run(batch_config(emu), options(tmp_path, manifest, no_wait=True, limit=3))
        cap = 0.006  # the three earlier lines' worst case (~$0.0056) leaves no room for a fourth
        cfg = batch_config(emu, limits={"max_cost_usd": cap})

        summary = await run(cfg, options(tmp_path, manifest))

    bill, records = emulator_bill_usd(emu, cfg), list(read_records(tmp_path / "out" / LEDGER_FILE))
    events = [r["event"] for r in records]
    assert summary.exit_code == EXIT_BUDGET and 3 < len(rows_by_id(tmp_path / "out")) < 10
    assert events.index("collected") < events.index("packed", events.index("created") + 1)  # waited for room
    assert summary.spend_usd == pytest.approx(bill, abs=1e-6) and bill <= cap
    earlier = [r for r in rows_by_id(tmp_path / "out").values() if r["id"] in {"row-0", "row-1", "row-2"}]
    assert summary.spend_of_earlier_runs_usd == pytest.approx(sum(r["cost_usd"] for r in earlier), abs=1e-6)
    assert set(emu.batches.stats.billed.values()) == {1}


async def test_a_no_wait_run_under_a_cap_submits_what_fits_and_says_what_it_holds(
    tmp_path, batch_emulator, key_in_env
):
    manifest = manifest_of(tmp_path, 8)
    cfg = batch_config(batch_emulator, limits={"max_cost_usd": 0.0045})  # two lines' worst case

    summary = await run(cfg, options(tmp_path, manifest, no_wait=True))

    (job,) = batch_emulator.batches.batches.values()
    stats = json.loads((tmp_path / "out" / "_stats.json").read_text())
    assert summary.exit_code == EXIT_OK and job["request_counts"]["total"] == 2
    assert f"holding ${stats['held_usd']:.4f} of the spend cap" in (summary.stopped_because or "")
    assert "did not fit the spend cap" in (summary.stopped_because or "") and stats["spend_usd"] == 0


async def test_the_estimate_of_a_capped_batch_config_fits_rows_at_the_batch_price(tmp_path, batch_emulator):
    manifest, cap = manifest_of(tmp_path, 8), 0.0045
    live = batch_config(batch_emulator, endpoint={"mode": "live"}, limits={"max_cost_usd": cap})

    in_batch = await estimate(
        batch_config(batch_emulator, limits={"max_cost_usd": cap}), EstimateOptions(manifest)
    )
    in_live = await estimate(live, EstimateOptions(manifest))

    assert in_batch.cap is not None and in_live.cap is not None
    assert in_batch.cap.rows_within_at_most == 2 and in_live.cap.rows_within_at_most == 1
    assert in_batch.cap.rows_within_expected > in_live.cap.rows_within_expected


@pytest.mark.parametrize(
    ("model", "flag", "says"),
    [("gpt-4o", "0", "--max-cost"), ("gpt-4o", "-1", "--max-cost"), ("llava-1.5", "5", "prices.toml")],
)
async def test_a_cap_of_zero_or_below_or_for_an_unpriced_model_is_exit_2_in_batch_mode(
    tmp_path, batch_emulator, model, flag, says
):
    manifest, config = manifest_of(tmp_path, 2), tmp_path / "batch.toml"
    config.write_text(
        f'[endpoint]\nprovider = "openai"\nurl = "{batch_emulator.url}/v1"\napi_key_env = "{KEY_ENV}"\n'
        f'model = "{model}"\nmode = "batch"\n'
    )

    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pipeline", "run", str(config), "--manifest", str(manifest),
        "--output", str(tmp_path / "out"), f"--max-cost={flag}", stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, cwd=ROOT, env={"PATH": "/usr/bin", KEY_ENV: TEST_KEY},
    )  # fmt: skip
    stdout, _ = await process.communicate()

    assert process.returncode == EXIT_USAGE and says in stdout.decode()
    assert batch_emulator.batches.files == {}
