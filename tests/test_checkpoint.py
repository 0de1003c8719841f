"""Resume rules: skip what is committed, retry what failed, refuse mixed settings, compact superseded rows."""

from __future__ import annotations

import pyarrow.dataset as ds
from conftest import azure_config, make_image, write_csv

from pipeline.checkpoint import compact
from pipeline.config import OutputConfig
from pipeline.emulator import Fault
from pipeline.exits import EXIT_OK
from pipeline.records import ImageTask, VisionResult
from pipeline.runner import RunOptions, run
from pipeline.sink import Sink
from pipeline.status import read_status


def ids_in(output) -> list[str]:
    return sorted(ds.dataset(output).to_table(columns=["id"]).column("id").to_pylist())


async def test_a_grown_manifest_sends_only_the_new_rows(tmp_path, emulator, images_manifest, key_in_env):
    cfg = azure_config(emulator)
    await run(cfg, RunOptions(images_manifest(3), tmp_path / "out", handle_signals=False))

    summary = await run(cfg, RunOptions(images_manifest(5), tmp_path / "out", handle_signals=False))

    assert summary.skipped == 3 and summary.counts["ok"] == 2
    assert len(emulator.requests) == 5
    assert ids_in(tmp_path / "out") == [f"row-{i}" for i in range(5)]


async def test_retry_failed_replaces_failed_rows_and_keeps_one_row_per_id(
    tmp_path, emulator, images_manifest, key_in_env
):
    cfg = azure_config(emulator, limits={"max_attempts": 1, "concurrency": 1})
    manifest = images_manifest(3)
    emulator.script(Fault(status=500))
    first = await run(cfg, RunOptions(manifest, tmp_path / "out", handle_signals=False))
    plain_rerun = await run(cfg, RunOptions(manifest, tmp_path / "out", handle_signals=False))

    retried = await run(cfg, RunOptions(manifest, tmp_path / "out", retry_failed=True, handle_signals=False))

    assert first.counts["error"] == 1 and plain_rerun.rows == 0
    assert retried.counts == {"ok": 1, "filtered": 0, "error": 0} and retried.exit_code == EXIT_OK
    rows = ds.dataset(tmp_path / "out").to_table().to_pylist()
    assert sorted(r["id"] for r in rows) == ["row-0", "row-1", "row-2"]
    assert {r["status"] for r in rows} == {"ok"}


async def test_new_run_sets_the_old_rows_aside_and_starts_afresh(
    tmp_path, emulator, images_manifest, key_in_env
):
    manifest = images_manifest(2)
    await run(azure_config(emulator), RunOptions(manifest, tmp_path / "out", handle_signals=False))

    summary = await run(
        azure_config(emulator, request={"prompt": "List the colours."}),
        RunOptions(manifest, tmp_path / "out", new_run=True, handle_signals=False),
    )

    assert summary.counts["ok"] == 2
    rows = ds.dataset(tmp_path / "out").to_table().to_pylist()
    assert {r["prompt"] for r in rows} == {"List the colours."} and len(rows) == 2
    assert list((tmp_path / "out" / "_generations").glob("*/part-*.parquet"))


def result(row_id: str, status: str) -> VisionResult:
    return VisionResult(
        ImageTask(row_id, ("a.png",), "p", "low", 1), status, "gpt-4", error=f"{row_id} failed"
    )


async def test_compact_keeps_the_newest_row_of_each_id(tmp_path):
    old, new = Sink(tmp_path, OutputConfig(), "run1"), Sink(tmp_path, OutputConfig(), "run2")
    for row_id in ("a", "b", "c"):
        await old.put(result(row_id, "error" if row_id == "b" else "ok"))
    await old.flush()
    await new.put(result("b", "ok"))
    await new.flush()

    removed = compact(tmp_path)

    rows = {r["id"]: r["status"] for r in ds.dataset(tmp_path).to_table().to_pylist()}
    assert removed == 1 and rows == {"a": "ok", "b": "ok", "c": "ok"}
    assert compact(tmp_path) == 0


async def test_status_lists_counts_and_failed_rows_with_reasons(tmp_path, emulator, key_in_env):
    make_image(tmp_path / "a.png")
    manifest = write_csv(
        tmp_path / "m.csv",
        [
            {"id": "good", "image": "a.png"},
            {"id": "gone", "image": "missing.png"},
            {"id": "f", "image": "a.png", "prompt": "[[filter]]"},
        ],
    )
    await run(azure_config(emulator), RunOptions(manifest, tmp_path / "out", handle_signals=False))

    status = read_status(tmp_path / "out")

    assert status.by_status == {"ok": 1, "filtered": 1, "error": 1}
    assert [(f.row_id, "missing.png" in (f.error or "")) for f in status.failed] == [("gone", True)]
    assert status.prompt_tokens > 0 and status.cost_usd > 0
    assert status.last_run["exit_code"] == 1


async def test_a_second_run_on_the_same_output_is_refused_while_the_first_holds_it(
    tmp_path, emulator, images_manifest, key_in_env
):
    import pytest

    from pipeline.checkpoint import output_lock
    from pipeline.records import ConfigError

    with output_lock(tmp_path / "out"), pytest.raises(ConfigError, match="another run is writing to it"):
        await run(
            azure_config(emulator), RunOptions(images_manifest(1), tmp_path / "out", handle_signals=False)
        )
