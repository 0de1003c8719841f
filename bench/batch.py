"""Batch mode, measured: a large run through the emulator's Batch API, then SIGKILLs across every step.

    python bench/batch.py [--rows 20000] [--delay 120] [--chaos-rows 5000] [--kills 20] [--part both|size|chaos]

Part 1 (size): `--rows` rows of local photos (1600×1200 JPEGs, 100 distinct files, each row prepared on its
own) at detail high through the real CLI against the emulator's Batch API, which waits `--delay` seconds
before answering a job. Reported: plan + pack + upload time (from the run's start to the ledger's last
``uploaded``), the files' sizes and line counts (from the ledger), the total time to a committed dataset,
and the cost of the committed rows against the same usage at the live price (should be 50 %).

Part 2 (chaos): `--chaos-rows` rows of small images at detail low, files of 100 lines, a 3-s processing
delay; the CLI is SIGKILLed `--kills` times, each at a moment picked from the ledger: while a file uploads
(after ``packed``), while a job is created (after ``creating``), while it is polled (after ``created``), while
it is collected (after ``ended``) or at a random time; then one run finishes. Nothing trusts the pipeline:
committed rows are read with pyarrow, and the emulator (in this process) counts what it billed per
custom_id and every custom_id submitted while another live job held it. Exit 1 if any check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from PIL import Image, ImageFilter

from pipeline.config import EmulatorConfig
from pipeline.emulator import Emulator

KEY_ENV = "BATCH_BENCH_KEY"
KEY = "bench-key"
PHOTO_SIZE = (1600, 1200)
DISTINCT_PHOTOS = 100
CHAOS_FILE_LINES = 100
CHAOS_DELAY_S = 3.0
KILL_MOMENTS = ("packed", "creating", "created", "ended", "random")
RUN_TIMEOUT_S = 3600.0
LIVE_INPUT_PER_1M, LIVE_OUTPUT_PER_1M = 2.50, 10.00  # gpt-4o in configs/prices.toml


@contextmanager
def emulator_thread(cfg: EmulatorConfig) -> Iterator[Emulator]:
    """The emulator on its own event loop in a thread of this process: its counters stay readable here."""
    loop = asyncio.new_event_loop()
    emulator = Emulator(cfg, api_key=KEY, deployment="gpt-4o-batch", model="gpt-4o", keep_requests=False)
    started = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(emulator.start())
        started.set()
        loop.run_forever()
        loop.run_until_complete(emulator.stop())

    thread = threading.Thread(target=serve, name="emulator", daemon=True)
    thread.start()
    started.wait()
    try:
        yield emulator
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)


def make_photo(path: Path, seed: int) -> None:
    rng = random.Random(seed)
    field = Image.frombytes("RGB", (40, 30), rng.randbytes(40 * 30 * 3))
    base = field.resize(PHOTO_SIZE, Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(6))
    grain = Image.effect_noise(PHOTO_SIZE, 18).convert("RGB")
    Image.blend(base, grain, 0.18).save(path, "JPEG", quality=90)


def write_manifest(work: Path, rows: int, *, photos: bool) -> Path:
    images = work / "images"
    images.mkdir(parents=True, exist_ok=True)
    names = []
    for n in range(DISTINCT_PHOTOS):
        path = images / (f"photo-{n:03d}.jpg" if photos else f"small-{n:03d}.png")
        if not path.exists():
            if photos:
                make_photo(path, n)
            else:
                Image.new("RGB", (64 + n, 48 + n), (n * 2, 100, 200 - n)).save(path)
        names.append(f"images/{path.name}")
    manifest = work / "manifest.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "image"])
        writer.writerows([f"row-{i:06d}", names[i % DISTINCT_PHOTOS]] for i in range(rows))
    return manifest


def write_config(work: Path, url: str, *, detail: str, poll_s: float, file_lines: int) -> Path:
    config = work / "batch.toml"
    config.write_text(
        f'[endpoint]\nprovider = "openai"\nurl = "{url}/v1"\napi_key_env = "{KEY_ENV}"\nmodel = "gpt-4o"\n'
        f'mode = "batch"\n[request]\ndetail = "{detail}"\nmax_tokens = 100\n'
        f"[batch]\npoll_s = {poll_s}\nmax_file_requests = {file_lines}\n"
        "[limits]\nconcurrency = 4\nbackoff_initial_s = 0.1\n[output]\nrows_per_part = 1000\n"
    )
    return config


def cli(config: Path, manifest: Path, output: Path) -> list[str]:
    vision = Path(sys.executable).parent / "vision-pipeline"
    return [str(vision), "run", str(config), "--manifest", str(manifest), "--output", str(output), "-q"]


def committed_ids(output: Path) -> list[str]:
    ids: list[str] = []
    for part in sorted(output.glob("part-*.parquet")):
        ids += pq.read_table(part, columns=["id"]).column("id").to_pylist()
    return ids


def ledger(output: Path) -> list[dict[str, Any]]:
    path = output / "_batches.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_bytes().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            pass
    return records


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def size_part(args: argparse.Namespace, work: Path) -> bool:
    print(f"== {args.rows} rows, detail high, processing delay {args.delay:g} s (load {load()})", flush=True)
    manifest = write_manifest(work, args.rows, photos=True)
    output = work / "out"
    shutil.rmtree(output, ignore_errors=True)
    with emulator_thread(EmulatorConfig(batch_delay_s=args.delay)) as emu:
        config = write_config(work, emu.url, detail="high", poll_s=5.0, file_lines=50_000)
        started_at = time.time()
        done = subprocess.run(
            cli(config, manifest, output),
            check=False,
            env={**os.environ, KEY_ENV: KEY},
            stdout=subprocess.DEVNULL,
            timeout=RUN_TIMEOUT_S,
        )
        total_s = time.time() - started_at
    records = ledger(output)
    uploads = [r["at"] for r in records if r["event"] == "uploaded"]
    packed = [r for r in records if r["event"] == "packed"]
    table = pq.ParquetDataset(sorted(output.glob("part-*.parquet"))).read(
        columns=["id", "status", "prompt_tokens", "completion_tokens", "cost_usd"]
    )
    rows = table.to_pylist()
    batch_cost = sum(r["cost_usd"] or 0 for r in rows)
    live_cost = sum(
        ((r["prompt_tokens"] or 0) * LIVE_INPUT_PER_1M + (r["completion_tokens"] or 0) * LIVE_OUTPUT_PER_1M)
        / 1e6
        for r in rows
    )
    statuses = Counter(r["status"] for r in rows)
    print(f"exit code {done.returncode}; rows committed {len(rows)} ({dict(statuses)}), distinct ids "
          f"{len({r['id'] for r in rows})}")  # fmt: skip
    print(f"plan + pack + upload: {max(uploads) - started_at:.1f} s" if uploads else "nothing uploaded")
    for record in packed:
        print(f"  file {record['file_no']}: {len(record['rows'])} lines, {record['bytes'] / 1e6:.1f} MB, "
              f"~{record['tokens']:,} tokens")  # fmt: skip
    print(f"total to a committed dataset: {total_s:.1f} s (of which {args.delay:g} s the emulator's delay)")
    print(f"cost ${batch_cost:.4f} at the batch price vs ${live_cost:.4f} live: {batch_cost / live_cost:.1%}")
    return done.returncode == 0 and len(rows) == args.rows and abs(batch_cost / live_cost - 0.5) < 1e-6


def wait_for_event(output: Path, event: str, deadline: float, process: subprocess.Popen[bytes]) -> bool:
    seen = sum(1 for r in ledger(output) if r["event"] == event)
    while time.monotonic() < deadline and process.poll() is None:
        if sum(1 for r in ledger(output) if r["event"] == event) > seen:
            return True
        time.sleep(0.005)
    return False


def chaos_part(args: argparse.Namespace, work: Path) -> bool:
    print(f"== chaos: {args.chaos_rows} rows, {args.kills} SIGKILLs (load {load()})", flush=True)
    manifest = write_manifest(work / "chaos", args.chaos_rows, photos=False)
    output = work / "chaos" / "out"
    shutil.rmtree(output, ignore_errors=True)
    rng = random.Random(args.seed)
    moments: Counter[str] = Counter()
    with emulator_thread(EmulatorConfig(batch_delay_s=CHAOS_DELAY_S)) as emu:
        config = write_config(work / "chaos", emu.url, detail="low", poll_s=0.5, file_lines=CHAOS_FILE_LINES)
        command, env = cli(config, manifest, output), {**os.environ, KEY_ENV: KEY}
        log_path = work / "chaos" / "runs.log"
        log_file = log_path.open("w")
        for kill in range(args.kills):
            moment = rng.choice(KILL_MOMENTS)
            process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=log_file)
            deadline = time.monotonic() + 120
            if moment == "random":
                time.sleep(rng.uniform(0.5, 6.0))
                hit = process.poll() is None
            else:
                hit = wait_for_event(output, moment, deadline, process)
                time.sleep(rng.uniform(0.0, 0.05))
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
            process.wait()
            moments[moment if hit else f"{moment} (run ended first)"] += 1
            print(
                f"  kill {kill + 1}: after {moment}; {len(committed_ids(output))} rows committed", flush=True
            )
        final = subprocess.run(
            command, check=False, env=env, stdout=subprocess.DEVNULL, stderr=log_file, timeout=RUN_TIMEOUT_S
        )
        log_file.close()
        stats = emu.batches.stats
        billed_twice = sum(1 for n in stats.billed.values() if n > 1)
        overlaps, created = stats.overlaps, stats.created
    ids = committed_ids(output)
    expected = {f"row-{i:06d}" for i in range(args.chaos_rows)}
    duplicates = len(ids) - len(set(ids))
    missing = len(expected - set(ids))
    temp_left = list(output.glob(".tmp-*"))
    print(f"kills by moment: {dict(moments)}; final run exit code {final.returncode}; jobs created {created}")
    adopted = log_path.read_text().count("adopting it")
    print(f"jobs adopted by a later run (created, then killed before the ledger said so): {adopted}")
    print(f"rows submitted while another live job held them: {overlaps}")
    print(
        f"duplicates {duplicates}, missing {missing}, unknown {len(set(ids) - expected)}, temp files {len(temp_left)}"
    )
    print(f"rows billed twice by the emulator: {billed_twice}")
    return final.returncode == 0 and overlaps == 0 and duplicates == 0 and missing == 0 and not temp_left


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--delay", type=float, default=120.0)
    parser.add_argument("--chaos-rows", type=int, default=5000)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--part", choices=("both", "size", "chaos"), default="both")
    parser.add_argument("--workdir", type=Path, default=Path("out/bench-batch"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"machine: {os.cpu_count()} cores, load average {load()}", flush=True)
    ok = True
    if args.part in ("both", "size"):
        ok &= size_part(args, args.workdir)
    if args.part in ("both", "chaos"):
        ok &= chaos_part(args, args.workdir)
    print("all checks passed" if ok else "A CHECK FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
