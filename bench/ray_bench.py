"""The Ray engine on a local 2-CPU Ray (``make bench-ray``): one shared quota, image-bound speed, kills.

    python bench/ray_bench.py [--only quota|images|kill] [--minutes 3] [--runs 1] [--photos 100]
                              [--work out/bench-ray]

Starts one local Ray with 2 CPUs for every part (``ray.init(num_cpus=2)``, as the tests do), and runs
``pipeline.runner.run`` with ``engine="ray"`` against the in-process emulator:

- **quota**: 3 workers (half a CPU each) against one emulator in quota mode, TPM 60,000, 0.5 s latency,
  for ``--minutes``, then the SIGTERM stop; the manifest and the figures are ``bench/quota.py``'s
  (served/quota goal ≥ 97 %, 429s ≤ 1 %, the largest 10-s window against a sixth of the quota ≤ 100 %),
  measured as it measures the local run, from the run's first request to the stop, so they compare with
  ``make bench-quota``'s; "1st req" says how long Ray took to start its workers before that. With
  ``--runs`` N, the median of N runs (each with a fresh emulator, on the same Ray) meets the goals.
- **images**: 2,000 rows of 4000×3000 photos at detail high against an emulator with no latency: the
  local engine, then Ray with 2 workers of 1 CPU each; rows/s over each run. The photos are
  ``bench/images_bench.py``'s, ``--photos`` of them made once (2.7 MB and ~3 s of CPU each to make), each
  listed 2000 / ``--photos`` times under its own id: every row still decodes and shrinks its own copy.
- **kill**: 3,000 rows (``bench/quota.py``'s small mixed images), 2 workers, 0.1 s latency; one worker's
  process SIGKILLed 5 times, a few seconds apart, while the run goes on. Then: ids committed twice, ids
  missing, and rows paid twice (answered 200 more than once by the emulator: requests on the wire
  when the worker died; answers it had journalled are committed by the driver, not bought again).

The machine's cores and load average are printed first and last: the machine is shared.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import logging
import os
import re
import shutil
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import ray
from images_bench import build_photos, describe_machine
from quota import HEADER as QUOTA_HEADER
from quota import (
    LATENCY_S,
    MAX_TOKENS,
    Figures,
    format_row,
    make_manifest,
    measure,
    median_figures,
    print_goals,
    quota_goals,
)

from pipeline.config import EmulatorConfig, RunConfig, config_from_mapping
from pipeline.emulator import Emulator
from pipeline.runner import RunOptions, run
from pipeline.sink import read_output

KEY_ENV = "VISION_PIPELINE_BENCH_KEY"
KEY = "bench-ray-key"  # the emulator's; never a real secret
DEPLOYMENT = "gpt-4-vision"
RAY_CPUS = 2
QUOTA_TPM = 60_000
QUOTA_WORKERS = 3
QUOTA_CONCURRENCY = 24
IMAGE_ROWS = 2000
KILL_ROWS = 3000
KILLS = 5
KILL_EVERY_S = 4.0
KILL_LATENCY_S = 0.1
PROMPT_ROW = re.compile(r"Describe image (\d+) in one paragraph\.")


def azure(url: str, **sections: dict[str, object]) -> RunConfig:
    raw: dict[str, dict[str, object]] = {
        "endpoint": {"provider": "azure", "url": url, "deployment": DEPLOYMENT, "api_key_env": KEY_ENV},
        "request": {"max_tokens": MAX_TOKENS},
    }
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return config_from_mapping(raw, source="bench/ray_bench.py")


async def quota_run(manifest: Path, output: Path, seconds: float) -> Figures:
    """One run of `seconds` against a fresh quota-mode emulator, measured as ``bench/quota.py`` does."""
    shutil.rmtree(output, ignore_errors=True)
    emulator_cfg = EmulatorConfig(latency_s=LATENCY_S, tokens_per_minute=QUOTA_TPM)
    async with Emulator(emulator_cfg, api_key=KEY, deployment=DEPLOYMENT, keep_bodies=False) as emulator:
        cfg = azure(emulator.url, limits={"tokens_per_minute": QUOTA_TPM, "concurrency": QUOTA_CONCURRENCY})
        loop = asyncio.get_running_loop()
        started = loop.time()
        stop = loop.call_later(seconds, os.kill, os.getpid(), signal.SIGTERM)  # the driver's own stop
        try:
            options = RunOptions(manifest, output, engine="ray", workers=QUOTA_WORKERS, worker_cpus=0.5)
            summary = await run(cfg, options)
        finally:
            stop.cancel()
    rows = read_output(output).to_pylist()
    return measure(emulator.requests, rows, summary, started, seconds, QUOTA_TPM)


async def quota_part(work: Path, minutes: float, runs: int) -> bool:
    print(f"\nquota: Ray, {QUOTA_WORKERS} workers, TPM {QUOTA_TPM}, latency {LATENCY_S} s, {minutes:g} min")
    manifest = await asyncio.to_thread(make_manifest, work / "quota-data", 2000)
    print(QUOTA_HEADER, flush=True)
    measured = []
    for n in range(1, runs + 1):
        measured.append(await quota_run(manifest, work / "quota-out", minutes * 60))
        print(format_row(str(n), measured[-1]), flush=True)
    figures = median_figures(measured)
    print(format_row("median", figures), flush=True)
    return print_goals(quota_goals(figures)) == 0


def photo_manifest(path: Path, photos: list[Path]) -> Path:
    """IMAGE_ROWS rows at detail high, each its own id, the photos taking turns."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "image", "detail"])
        writer.writerows(
            [f"row-{n:05d}", f"photos/{photos[n % len(photos)].name}", "high"] for n in range(IMAGE_ROWS)
        )
    return path


async def images_part(work: Path, photos: int) -> None:
    paths = await asyncio.to_thread(build_photos, work / "photos", photos)
    manifest = await asyncio.to_thread(photo_manifest, work / "photos.csv", paths)
    print(f"\nimages: {IMAGE_ROWS} rows of 4000×3000 photos ({photos} files), detail high, latency 0")
    async with Emulator(
        EmulatorConfig(), api_key=KEY, deployment=DEPLOYMENT, keep_requests=False
    ) as emulator:
        cfg = azure(
            emulator.url,
            limits={"tokens_per_minute": 10**9, "requests_per_minute": 10**6, "concurrency": 16},
            output={"rows_per_part": 1000},
        )
        engines = {
            "local engine": RunOptions(manifest, work / "images-local", handle_signals=False),
            "Ray, 2 workers of 1 CPU": RunOptions(
                manifest, work / "images-ray", handle_signals=False, engine="ray", workers=2, worker_cpus=1.0
            ),
        }
        for name, options in engines.items():
            shutil.rmtree(options.output, ignore_errors=True)
            summary = await run(cfg, options)
            assert summary.counts["ok"] == IMAGE_ROWS, summary
            print(f"  {name}: {summary.rows / summary.duration_s:.1f} rows/s ({summary.duration_s:.1f} s)")


async def kill_part(work: Path) -> bool:
    print(
        f"\nkill: {KILL_ROWS} rows, 2 workers, latency {KILL_LATENCY_S} s, one worker SIGKILLed {KILLS} times"
    )
    manifest = await asyncio.to_thread(make_manifest, work / "kill-data", KILL_ROWS)
    output = work / "kill-out"
    shutil.rmtree(output, ignore_errors=True)
    async with Emulator(
        EmulatorConfig(latency_s=KILL_LATENCY_S), api_key=KEY, deployment=DEPLOYMENT, keep_bodies=False
    ) as emulator:
        cfg = azure(emulator.url, limits={"tokens_per_minute": 10**9, "concurrency": 16})
        options = RunOptions(manifest, output, handle_signals=False, engine="ray", workers=2)
        running = asyncio.get_running_loop().create_task(run(cfg, options), name="run")
        kills = 0
        while kills < KILLS and not running.done():
            await asyncio.sleep(KILL_EVERY_S)
            names = [name for name in ray.util.list_named_actors() if name.endswith("-worker-0")]
            try:
                pid = await ray.get_actor(names[-1]).pid.remote()
            except ray.exceptions.RayActorError:
                continue  # still restarting from the last kill
            os.kill(pid, signal.SIGKILL)
            kills += 1
            print(f"  killed worker 0 (pid {pid}) at {time.strftime('%H:%M:%S')}", flush=True)
        summary = await running
    ids = Counter(read_output(output, ["id"]).column("id").to_pylist())
    answered = Counter(
        match.group(1)
        for r in emulator.requests
        if r.status == 200 and (match := PROMPT_ROW.search(r.prompt_text))
    )
    duplicates = sum(n - 1 for n in ids.values() if n > 1)
    missing = KILL_ROWS - len(ids)
    paid_twice = sum(1 for n in answered.values() if n > 1)
    print(
        f"  kills {kills}, exit code {summary.exit_code}, committed {sum(ids.values())}, duplicates {duplicates}, "
        f"missing {missing}, rows paid twice {paid_twice}, requests {len(emulator.requests)}"
    )
    return kills == KILLS and duplicates == 0 and missing == 0


async def main(args: argparse.Namespace) -> int:
    os.environ[KEY_ENV] = KEY
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {describe_machine(os.cpu_count() or 1)}", flush=True)
    ray.init(num_cpus=RAY_CPUS, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    ok = True
    try:
        if args.only in (None, "quota"):
            ok &= await quota_part(work, args.minutes, args.runs)
        if args.only in (None, "images"):
            await images_part(work, args.photos)
        if args.only in (None, "kill"):
            ok &= await kill_part(work)
    finally:
        ray.shutdown()
    print(f"\nmachine: {describe_machine(os.cpu_count() or 1)}")
    return 0 if ok else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("quota", "images", "kill"), help="one part only")
    parser.add_argument("--minutes", type=float, default=3.0, help="the quota part's length (default 3)")
    parser.add_argument(
        "--runs", type=int, default=1, help="quota runs; with more than 1 the goals apply to the median"
    )
    parser.add_argument("--photos", type=int, default=100, help="distinct photos to make once (default 100)")
    parser.add_argument("--work", default="out/bench-ray", help="work folder; photos are kept there")
    return parser.parse_args(argv)


if __name__ == "__main__":
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(asyncio.run(main(parse_args())))
