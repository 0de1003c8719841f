"""The speed of the client itself: rows/s and peak RSS of a run against an emulator that answers at once.

    python bench/overhead.py [--rows 100000 20000] [--repeat 3] [--concurrency 64] [--profile FILE]

Starts the standalone emulator in its own process (no latency, no quota), writes a manifest of `--rows`
rows, each one http(s) image URL (sent as the URL: ``images.fetch_remote`` is off, nothing is
downloaded), detail low, and runs ``vision-pipeline run`` in a subprocess `--repeat` times per size
with concurrency 64 and ``rows_per_part = 5000``, each into a fresh output. Per run: rows/s from the
run's own ``duration_s`` in ``_stats.json`` (interpreter start-up excluded) and the process's peak RSS
(``ru_maxrss`` from wait4, the kernel's high-water mark of the whole process).

The floor, measured in the same benchmark against the same emulator: a bare aiohttp loop (one session,
`--concurrency` connections and as many tasks) posting the same bodies (``request.build_body``) and
reading each answer, no limiter, no tokenizer, no output. Issue 12's goal: the run makes at least half
the floor's rows/s at 100,000 rows, with a peak RSS under 250 MB that stays flat from 20,000 rows.

rows/s moves with whatever else runs on the machine (the run, the emulator and the floor share its
cores). Steadier: CPU time. Printed too: the floor's CPU a row (the benchmark's own process time while
it runs) and the run's CPU a row beyond start-up (the difference between the two sizes' CPU times).

``--profile FILE`` runs the pipeline once per size under cProfile instead (``FILE.<rows>``), for
``python -m pstats``: the figures of a profiled run are not the run's speed.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from progress_overhead import DEPLOYMENT, KEY, start_emulator  # the same standalone emulator, no latency

from pipeline.config import load_config
from pipeline.records import ImageTask, PreparedImage
from pipeline.request import build_body

KEY_ENV = "OVERHEAD_BENCH_KEY"
ROWS_PER_PART = 5000
TARGET_SHARE = 0.5  # of the bare loop's rows/s
TARGET_RSS_MB = 250.0
CLI = [sys.executable, "-m", "pipeline"]


def image_url(n: int) -> str:
    return f"https://images.example.com/photos/{n:07d}.jpg"


def write_config(work: Path, url: str, concurrency: int) -> Path:
    config = work / "run.toml"
    config.write_text(
        f'[endpoint]\nprovider = "azure"\nurl = "{url}"\ndeployment = "{DEPLOYMENT}"\napi_key_env = "{KEY_ENV}"\n'
        f'[request]\ndetail = "low"\nmax_tokens = 100\n'
        f"[limits]\ntokens_per_minute = 1000000000\nrequests_per_minute = 100000000\nconcurrency = {concurrency}\n"
        f"[output]\nrows_per_part = {ROWS_PER_PART}\nflush_seconds = 30\n"
        "[images]\nfetch_remote = false\n"
    )
    return config


def write_manifest(work: Path, rows: int) -> Path:
    manifest = work / f"manifest-{rows}.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "image"])
        writer.writerows([f"row-{n:07d}", image_url(n)] for n in range(rows))
    return manifest


@dataclass(frozen=True, slots=True)
class Sample:
    rows_per_s: float  # from the run's own duration_s
    peak_rss_mb: float
    cpu_s: float  # user + system time of the run's process, start-up included


def run_pipeline(
    config: Path, manifest: Path, output: Path, rows: int, profile: Path | None = None
) -> Sample:
    prefix = [sys.executable, "-m", "cProfile", "-o", str(profile), "-m", "pipeline"] if profile else CLI
    proc = subprocess.Popen(
        [*prefix, "run", str(config), "--manifest", str(manifest), "--output", str(output), "--no-progress"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, KEY_ENV: KEY},
    )  # fmt: skip
    _, status, usage = os.wait4(proc.pid, 0)  # the run's own peak RSS, which Popen.wait throws away
    if (code := os.waitstatus_to_exitcode(status)) != 0:
        raise SystemExit(f"run of {rows} rows exited {code}")
    stats = json.loads((output / "_stats.json").read_text())
    if (done := stats["counts"].get("ok", 0)) != rows:
        raise SystemExit(f"run of {rows} rows: {done} ok, expected all of them (_stats.json: {stats})")
    return Sample(rows / stats["duration_s"], usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime)


async def bare_loop(config: Path, rows: int, concurrency: int) -> tuple[float, float]:
    """rows/s of a bare aiohttp loop posting the run's bodies to the same emulator, and its CPU seconds."""
    cfg = load_config(config, {KEY_ENV: KEY})
    url = f"{cfg.endpoint.url}/openai/deployments/{DEPLOYMENT}/chat/completions?api-version={cfg.endpoint.api_version}"
    headers = {"api-key": KEY}

    def body(n: int) -> dict[str, object]:
        task = ImageTask(f"row-{n:07d}", (image_url(n),), cfg.request.prompt, cfg.request.detail, n + 1)
        return build_body(task, [PreparedImage(image_url(n), None, None)], cfg)

    rows_left = iter(range(rows))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:

        async def worker() -> None:
            for n in rows_left:
                async with session.post(url, json=body(n), headers=headers) as response:
                    await response.read()
                    if response.status != 200:
                        raise SystemExit(f"bare loop: HTTP {response.status}")

        started, cpu_started = time.perf_counter(), time.process_time()
        async with asyncio.TaskGroup() as group:
            for n in range(concurrency):
                group.create_task(worker(), name=f"bare-{n}")
        return rows / (time.perf_counter() - started), time.process_time() - cpu_started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 20_000])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--profile", type=Path, help="run once per size under cProfile into FILE.<rows>")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="overhead-bench-"))
    emulator, url = start_emulator()
    runs: dict[int, list[Sample]] = {rows: [] for rows in args.rows}
    floors: list[float] = []
    floor_cpu_s: list[float] = []
    try:
        config = write_config(work, url, args.concurrency)
        manifests = {rows: write_manifest(work, rows) for rows in args.rows}
        if args.profile is not None:
            for rows in args.rows:
                path = Path(f"{args.profile}.{rows}")
                run_pipeline(config, manifests[rows], work / f"out-profile-{rows}", rows, profile=path)
                print(f"{rows} rows profiled into {path}", flush=True)
            return
        for n in range(args.repeat):
            rate, cpu_s = asyncio.run(bare_loop(config, max(args.rows), args.concurrency))
            floors.append(rate)
            floor_cpu_s.append(cpu_s)
            print(f"run {n + 1} bare loop      : {rate:7.0f} rows/s, CPU {cpu_s:6.1f} s", flush=True)
            for rows in args.rows:
                output = work / f"out-{rows}-{n}"
                sample = run_pipeline(config, manifests[rows], output, rows)
                shutil.rmtree(output, ignore_errors=True)
                runs[rows].append(sample)
                print(f"run {n + 1} {rows:7d} rows: {sample.rows_per_s:7.0f} rows/s, peak RSS "
                      f"{sample.peak_rss_mb:5.0f} MB, CPU {sample.cpu_s:6.1f} s", flush=True)  # fmt: skip
    finally:
        emulator.terminate()
        emulator.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)
    floor = statistics.median(floors)
    print(f"\nmedian of {args.repeat}, concurrency {args.concurrency}, zero-latency emulator, detail low, "
          f"URLs passed through (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs):")  # fmt: skip
    floor_ms = statistics.median(floor_cpu_s) / max(args.rows) * 1000
    print(f"  bare aiohttp loop ({max(args.rows)} rows): {floor:7.0f} rows/s, {floor_ms:.3f} ms of CPU a row")
    for rows in args.rows:
        rate = statistics.median(s.rows_per_s for s in runs[rows])
        rss = statistics.median(s.peak_rss_mb for s in runs[rows])
        share = rate / floor
        verdict = "met" if share >= TARGET_SHARE and rss < TARGET_RSS_MB else "NOT met"
        print(f"  vision-pipeline run ({rows} rows): {rate:7.0f} rows/s ({share:.0%} of the bare loop), "
              f"peak RSS {rss:.0f} MB: goal (>= {TARGET_SHARE:.0%}, < {TARGET_RSS_MB:g} MB) {verdict}")  # fmt: skip
    if (
        len(args.rows) > 1
    ):  # CPU a row beyond start-up, from the two sizes: steadier than rows/s on a busy machine
        (large, cpu_large), (small, cpu_small) = [
            (rows, statistics.median(s.cpu_s for s in runs[rows])) for rows in sorted(args.rows)[::-1][:2]
        ]
        run_ms = (cpu_large - cpu_small) / (large - small) * 1000
        print(f"  CPU a row of the run, from {small} to {large} rows: {run_ms:.3f} ms ({run_ms / floor_ms:.1f}× "
              f"the bare loop's)")  # fmt: skip


if __name__ == "__main__":
    main()
