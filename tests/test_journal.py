"""The journal of paid answers: a kill after answers arrived costs none of them again."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import KEY_ENV, TEST_KEY, azure_config, make_image, write_csv

from pipeline.config import EmulatorConfig
from pipeline.emulator import Emulator, Fault
from pipeline.exits import EXIT_OK
from pipeline.journal import JOURNAL_DIR, Journal, pending_rows, recover
from pipeline.runner import RunOptions, run
from pipeline.sink import part_files, read_output
from pipeline.status import format_status, read_status

ANSWERED = 12
ROWS = 40  # more than are answered before the kill, whatever the machine's speed
WAIT_LIMIT_S = 60.0


def config_file(tmp_path: Path, url: str) -> Path:
    """One worker, and parts written only at the end: every answer waits in the buffer until then."""
    path = tmp_path / "run.toml"
    path.write_text(
        f'[endpoint]\nprovider = "azure"\nurl = "{url}"\ndeployment = "vision"\napi_key_env = "{KEY_ENV}"\n'
        "[limits]\nconcurrency = 1\nbackoff_initial_s = 0\ntokens_per_minute = 10000000\n"
        "[output]\nrows_per_part = 1000\nflush_seconds = 3600\n"
    )
    return path


async def until(condition, what: str) -> None:
    """Wait for the process under test to reach a state only it can bring about (it runs on its own clock)."""
    deadline = asyncio.get_running_loop().time() + WAIT_LIMIT_S
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def kill_after_answers(tmp_path: Path, emulator: Emulator) -> tuple[Path, int]:
    """Run the CLI until at least ANSWERED rows are answered and one more is on the wire, then SIGKILL it.

    Returns the manifest and how many rows were answered (paid for) before the kill."""
    for i in range(ROWS):
        make_image(tmp_path / f"img{i}.png", (40 + i, 30))
    manifest = write_csv(
        tmp_path / "m.csv", [{"id": f"r{i:02d}", "image": f"img{i}.png"} for i in range(ROWS)]
    )
    hang = Fault(status=500, delay_s=WAIT_LIMIT_S)  # the row on the wire when the kill comes

    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pipeline", "run", config_file(tmp_path, emulator.url), "--manifest", manifest,
        "--output", tmp_path / "out", "--log-format", "json", "-q",
        env={**os.environ, KEY_ENV: TEST_KEY}, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        await until(lambda: emulator.stats.by_status[200] >= ANSWERED, f"{ANSWERED} answers")
        emulator.script(hang)
        await until(lambda: emulator.scripted_left == 0, "the next request")
    finally:
        process.send_signal(signal.SIGKILL)
        await process.wait()
    return manifest, emulator.stats.by_status[200]


@pytest.fixture
async def slow_emulator() -> AsyncIterator[Emulator]:
    """50 ms an answer: the run is still going when the test has counted ANSWERED answers."""
    async with Emulator(EmulatorConfig(latency_s=0.05), api_key=TEST_KEY, deployment="vision") as emulator:
        yield emulator


async def test_a_kill_after_answers_arrived_resends_none_of_them_and_commits_each_row_once(
    tmp_path, slow_emulator, key_in_env
):
    emulator = slow_emulator
    manifest, answered = await kill_after_answers(tmp_path, emulator)
    sent_before = emulator.stats.requests
    assert not part_files(tmp_path / "out")  # nothing was committed in a part before the kill

    summary = await run(azure_config(emulator), RunOptions(manifest, tmp_path / "out", handle_signals=False))

    ids = [row["id"] for row in read_output(tmp_path / "out").to_pylist()]
    resent = emulator.stats.requests - sent_before
    assert summary.exit_code == EXIT_OK and summary.recovered_rows == answered
    assert summary.recovered_cost_usd > 0
    assert resent == ROWS - answered  # the row on the wire and those never sent; no answered one
    assert sorted(ids) == [f"r{i:02d}" for i in range(ROWS)]
    assert not (tmp_path / "out" / JOURNAL_DIR).exists()


async def test_status_shows_the_rows_a_killed_run_journalled(tmp_path, slow_emulator):
    _, answered = await kill_after_answers(tmp_path, slow_emulator)

    status = read_status(tmp_path / "out")

    assert status.journalled == answered >= ANSWERED
    assert f"journalled: {answered} rows answered but not yet in a part" in format_status(status)


def journal_rows(n: int, run_id: str = "000001-x") -> list[dict[str, object]]:
    return [
        {"id": f"j{i}", "run_id": run_id, "status": "ok", "description": f"row {i}", "cost_usd": 0.01}
        for i in range(n)
    ]


def test_a_torn_last_record_is_skipped_and_the_rest_committed(tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    journal = Journal(output, "000001-x")
    for row in journal_rows(3):
        journal.append(row)
    journal.close(is_all_committed=False)
    segment = next((output / JOURNAL_DIR).glob("*.jsonl"))
    with open(segment, "ab") as f:
        f.write(b'{"id": "j3", "run_id": "000001-x", "descr')  # the kill came mid-write

    recovered = recover(output)

    rows = read_output(output).to_pylist()
    assert (recovered.rows, recovered.torn_lines) == (3, 1)
    assert sorted(row["id"] for row in rows) == ["j0", "j1", "j2"]
    assert recovered.cost_usd == 0.03 and not (output / JOURNAL_DIR).exists()


def test_rows_already_committed_by_their_run_are_not_committed_twice(tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    journal = Journal(output, "000001-x")
    for row in journal_rows(4):
        journal.append(row)
    journal.close(is_all_committed=False)
    first = recover(output)  # as if the part of j0..j3 was committed but the journal not yet removed
    journal = Journal(output, "000001-x")
    for row in journal_rows(4):
        journal.append(row)
    journal.close(is_all_committed=False)

    pending, _ = pending_rows(output)
    again = recover(output)

    assert first.rows == 4 and pending == [] and again.rows == 0
    assert len(read_output(output).to_pylist()) == 4


def test_the_journal_holds_no_key_and_no_data_url(tmp_path):
    """The journal holds output rows: a data URL given in the manifest is kept as its type and size."""
    from pipeline.config import config_from_mapping
    from pipeline.records import ImageTask, VisionResult
    from pipeline.sink import result_to_row

    data_url = "data:image/png;base64," + "A" * 4000
    task = ImageTask("x", (data_url,), "Describe", "low", 1)
    row = result_to_row(VisionResult(task, "ok", config_from_mapping({}).endpoint.model), "000001-x")
    output = tmp_path / "out"
    output.mkdir()
    journal = Journal(output, "000001-x")

    journal.append(row)

    text = next((output / JOURNAL_DIR).glob("*.jsonl")).read_text()
    image = json.loads(text)["image"]
    assert "AAAA" not in text and image.startswith("data:image/png;base64,<") and image.endswith(" kB>")
    assert TEST_KEY not in text
