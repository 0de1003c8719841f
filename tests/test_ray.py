"""The Ray engine on a local Ray: the same dataset as the local engine, exactly once across a killed worker
and across engines, one quota for every worker. Skipped when the Ray extra is not installed."""

from __future__ import annotations

import asyncio
import os
import signal
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import TEST_KEY, azure_config, make_image, write_csv

from pipeline.config import EmulatorConfig
from pipeline.emulator import Emulator
from pipeline.exits import EXIT_OK
from pipeline.runner import RunOptions, run
from pipeline.sink import part_files, read_output

ray = pytest.importorskip("ray", reason="the Ray extra is not installed (make ray-demo installs it)")

RAY_CPUS = 2


@pytest.fixture(scope="session", autouse=True)
def local_ray() -> Iterator[None]:
    """One local Ray for every test of this file: starting one takes seconds."""
    ray.init(num_cpus=RAY_CPUS, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    yield
    ray.shutdown()


def on_ray(manifest: Path, output: Path, workers: int = 3, **options: object) -> RunOptions:
    return RunOptions(manifest, output, handle_signals=False, engine="ray", workers=workers, **options)  # type: ignore[arg-type]


def photo_manifest(folder: Path, n: int) -> Path:
    rows = []
    for i in range(n):
        make_image(folder / "images" / f"img{i}.png", (64 + 8 * (i % 7), 48 + 4 * (i % 5)))
        rows.append({"id": f"row-{i}", "image": f"images/img{i}.png", "album": f"a{i % 3}"})
    return write_csv(folder / "manifest.csv", rows)


def ids_in(output: Path) -> Counter[str]:
    return Counter(read_output(output, ["id"]).column("id").to_pylist())


async def test_a_ray_run_writes_the_same_dataset_as_the_local_engine(tmp_path, emulator, key_in_env):
    manifest = photo_manifest(tmp_path, 12)
    cfg = azure_config(emulator, output={"rows_per_part": 3})

    local = await run(cfg, RunOptions(manifest, tmp_path / "local", handle_signals=False))
    on = await run(cfg, on_ray(manifest, tmp_path / "ray"))

    assert local.exit_code == on.exit_code == EXIT_OK
    assert on.counts == local.counts
    want = read_output(tmp_path / "local").sort_by("id")
    got = read_output(tmp_path / "ray").sort_by("id")
    assert got.schema.names == want.schema.names
    for column in ("id", "status", "description", "prompt_tokens", "album", "image"):
        assert got.column(column).to_pylist() == want.column(column).to_pylist()
    assert len({part.name for part in part_files(tmp_path / "ray")}) >= 3  # the rows went to several workers
    assert not (tmp_path / "ray" / "_ray.json").exists()  # the test's Ray is not the run's to record


async def test_a_killed_worker_s_rows_are_committed_exactly_once(tmp_path, key_in_env):
    """SIGKILL a worker's process mid-run: Ray restarts it, the driver hands out what the dead one did not
    commit, and every row ends in the output once."""
    manifest = photo_manifest(tmp_path, 48)
    async with Emulator(
        EmulatorConfig(latency_s=0.15), api_key=TEST_KEY, deployment="vision", model="gpt-4-turbo"
    ) as emulator:
        cfg = azure_config(emulator, output={"rows_per_part": 4}, limits={"concurrency": 4})
        output = tmp_path / "out"
        running = asyncio.create_task(run(cfg, on_ray(manifest, output, workers=2)))
        pid = await _worker_pid_once_a_part_is_committed(output)

        os.kill(pid, signal.SIGKILL)
        summary = await running

    assert summary.exit_code == EXIT_OK
    committed = ids_in(output)
    assert set(committed) == {f"row-{i}" for i in range(48)}
    assert max(committed.values()) == 1
    assert sum(summary.counts.values()) == 48


async def _worker_pid_once_a_part_is_committed(output: Path) -> int:
    """The process id of worker 0 of the run writing `output`, once the run has committed a part."""
    async with asyncio.timeout(60):
        while not part_files(output):
            await asyncio.sleep(0.05)  # another process's files: nothing to await
    names = [name for name in ray.util.list_named_actors() if name.endswith("-worker-0")]
    return int(await ray.get_actor(names[-1]).pid.remote())


async def test_a_run_resumed_across_engines_sends_only_the_missing_rows(tmp_path, emulator, key_in_env):
    manifest = photo_manifest(tmp_path, 10)
    cfg = azure_config(emulator, output={"rows_per_part": 2})
    output = tmp_path / "out"
    await run(cfg, RunOptions(manifest, output, limit=4, handle_signals=False))
    sent_locally = len(emulator.requests)

    first = await run(cfg, on_ray(manifest, output, limit=3))
    second = await run(cfg, RunOptions(manifest, output, handle_signals=False))

    assert sent_locally == 4
    assert len(emulator.requests) == 10  # 4 locally, 3 on Ray, 3 locally again: none twice
    assert (first.skipped, second.skipped) == (4, 7)
    assert ids_in(output) == Counter({f"row-{i}": 1 for i in range(10)})


async def test_workers_together_never_exceed_the_quota_of_a_window(tmp_path, key_in_env):
    """Three workers, one quota of 500 tokens and 3 requests per 10 s: without the shared keeper each would
    send its own rows at once and the emulator would answer 429."""
    manifest = photo_manifest(tmp_path, 6)
    async with Emulator(
        EmulatorConfig(tokens_per_minute=3000), api_key=TEST_KEY, deployment="vision", model="gpt-4-turbo"
    ) as emulator:
        cfg = azure_config(
            emulator,
            limits={"tokens_per_minute": 3000, "concurrency": 6},
            request={"detail": "low", "max_tokens": 20},
            output={"rows_per_part": 1},
        )

        summary = await run(cfg, on_ray(manifest, tmp_path / "out", workers=3))

    assert summary.exit_code == EXIT_OK and summary.counts["ok"] == 6
    assert summary.http_429s == 0
    charged = [(r.at, (r.prompt_tokens or 0) + 20) for r in emulator.requests if r.status == 200]
    assert len(charged) == 6
    for start, _ in charged:
        in_window = [tokens for at, tokens in charged if start <= at < start + 10.0]
        assert len(in_window) <= 3 and sum(in_window) <= 500
