"""Image preparation on 12-megapixel photos: bytes sent, images prepared per second, end-to-end rows/s.

    python bench/images_bench.py [--images 200] [--repeat 3] [--work out/bench-images]

Generates once (cached in the work folder) `--images` photo-like JPEGs of 4000×3000 at quality 92: smooth
colour fields under sensor-like grain, about 2.7 MB each (a phone's are 2-5 MB). Then prints, each rate the
median of `--repeat` runs, after one untimed pass that puts the files in the page cache:

- bytes per image: the file, and what ``images.prepare_image`` sends at low and at high detail (the JPEG
  and the data URL that carries it), with the share of the original;
- images prepared per second at high and at low detail: in one thread; in thread pools of one thread
  per core, of the run's size (``images.image_threads``: one more) and of the loop's default size (what
  ``asyncio.to_thread`` uses); and in a process pool of one process per core (forkserver, started and
  warmed before timing, so its start-up cost is not counted against it), taking turns; with the CPU time
  per image of the in-process ones, which the machine's other load does not change;
- end to end: ``pipeline.runner.run`` over a manifest of the photos at detail high against the emulator
  with no latency, concurrency 16, tokens_per_minute 10^9: rows per second over the run's duration, with
  the emulator inside the run's process and then in a process of its own (as a remote service would be,
  though here it shares the same cores), and the CPU time per row of the client and of the emulator. The
  target (issue 7) is at least 50 high-detail rows/s from the client on 2 cores.

The run, the thread pools and the process pool's workers all call ``images.reuse_freed_image_memory``
first, as ``runner.run`` does.

The machine's cores, how many of them two spinning processes actually get, and the load average are printed
first and last: other work on a 2-core machine shows there, and every rate above depends on it.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import csv
import logging
import multiprocessing
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageFilter

from pipeline.config import ImagesConfig, config_from_mapping
from pipeline.images import image_threads, prepare_image, reuse_freed_image_memory
from pipeline.records import PreparedImage
from pipeline.runner import RunOptions, run

PHOTO_SIZE = (4000, 3000)
PHOTO_QUALITY = 92
GRAIN_SIGMA = 18  # luminance noise: what keeps a photo at megabytes instead of a few hundred kB
COLOUR_FIELD_PX = (40, 30)  # the colour layout, upscaled smoothly to the photo's size
TARGET_ROWS_PER_S = 50.0
KEY_ENV = "VISION_PIPELINE_BENCH_KEY"
BUILT_MARKER = ".built"
CFG = ImagesConfig()


def make_photo(path: Path, seed: int) -> None:
    rng = random.Random(seed)
    field = Image.frombytes(
        "RGB", COLOUR_FIELD_PX, rng.randbytes(COLOUR_FIELD_PX[0] * COLOUR_FIELD_PX[1] * 3)
    )
    base = field.resize(PHOTO_SIZE, Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(6))
    grain = Image.effect_noise(PHOTO_SIZE, GRAIN_SIGMA).convert("RGB")
    Image.blend(base, grain, 0.18).save(path, "JPEG", quality=PHOTO_QUALITY)


def spin(seconds: float) -> float:
    """CPU seconds this process gets while trying to use one core for `seconds`."""
    started, cpu = time.perf_counter(), time.process_time()
    while time.perf_counter() - started < seconds:
        pass
    return time.process_time() - cpu


def free_cores(cores: int, seconds: float = 1.0) -> float:
    """How many cores this benchmark can have now: other work on a small machine shows here."""
    with concurrent.futures.ProcessPoolExecutor(cores) as pool:
        return sum(pool.map(spin, [seconds] * cores)) / seconds


def describe_machine(cores: int) -> str:
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{cores} cores, {free_cores(cores):.1f} of them free for this benchmark, load average {load}"


def build_photos(folder: Path, count: int) -> list[Path]:
    """`count` photos in `folder`, made once: a folder built for at least as many is reused."""
    marker = folder / BUILT_MARKER
    paths = [folder / f"photo-{n:04d}.jpg" for n in range(count)]
    if marker.exists() and int(marker.read_text()) >= count:
        return paths
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    print(f"generating {count} photos of {PHOTO_SIZE[0]}×{PHOTO_SIZE[1]} in {folder} (once) …", flush=True)
    with concurrent.futures.ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(make_photo, paths, range(count)))
    marker.write_text(str(count))
    return paths


def prepare(path: Path, detail: str) -> PreparedImage:
    return prepare_image(path.name, base_dir=path.parent, detail=detail, cfg=CFG, row_id=path.stem)  # type: ignore[arg-type]


def rates_of(
    pools: list[tuple[str, concurrent.futures.Executor | None]], paths: list[Path], detail: str, repeat: int
) -> dict[str, tuple[float, float | None]]:
    """Median images/s of each pool, taking turns so that a change in the machine's load hits all alike,
    and this process's CPU ms per image (None for a process pool, whose CPU is spent elsewhere)."""
    rates: dict[str, list[float]] = {name: [] for name, _ in pools}
    cpu_ms: dict[str, list[float]] = {name: [] for name, _ in pools}
    for _ in range(repeat):
        for name, pool in pools:
            cpu, started = time.process_time(), time.perf_counter()
            if pool is None:
                for path in paths:
                    prepare(path, detail)
            else:  # the prepared image, data URL included, comes back to this process as the runner needs it
                list(pool.map(prepare, paths, [detail] * len(paths)))
            rates[name].append(len(paths) / (time.perf_counter() - started))
            cpu_ms[name].append((time.process_time() - cpu) * 1000 / len(paths))
    return {
        name: (
            statistics.median(rates[name]),
            None
            if isinstance(pool, concurrent.futures.ProcessPoolExecutor)
            else statistics.median(cpu_ms[name]),
        )
        for name, pool in pools
    }


def end_to_end(paths: list[Path], work: Path, repeat: int, emulator_url: str | None) -> EndToEnd:
    """Full runs (manifest → prepare → emulator → Parquet) at detail high: median rows/s, each run's
    figure, and the median CPU ms per row of this process (the client, plus the emulator when in-process).

    `emulator_url`: a separate emulator process to send to; None runs the emulator inside the run.
    """
    manifest = work / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "image", "detail"])
        writer.writerows([path.stem, f"photos/{path.name}", "high"] for path in paths)
    endpoint = (
        {"provider": "emulator"}
        if emulator_url is None
        else {"provider": "azure", "url": emulator_url, "deployment": "gpt-4-vision", "api_key_env": KEY_ENV}
    )
    cfg = config_from_mapping(
        {
            "endpoint": endpoint,
            "limits": {
                "concurrency": 16,
                "tokens_per_minute": 1_000_000_000,
                "requests_per_minute": 1_000_000,
            },
            "emulator": {"latency_s": 0.0},
            "output": {"rows_per_part": 1000},
        },
        source="bench",
        environ=os.environ,  # VISION_PIPELINE_IMAGES_THREADS=4 and the like apply, as they do to a run
    )
    rates, cpu_ms = [], []
    for n in range(repeat):
        output = work / f"out-{n}"
        shutil.rmtree(output, ignore_errors=True)
        cpu = time.process_time()
        summary = asyncio.run(run(cfg, RunOptions(manifest, output, handle_signals=False)))
        cpu_ms.append((time.process_time() - cpu) * 1000 / summary.rows)
        assert summary.counts["ok"] == len(paths), summary
        rates.append(summary.rows / summary.duration_s)
    return EndToEnd(statistics.median(rates), rates, statistics.median(cpu_ms))


@dataclass
class EndToEnd:
    rows_per_s: float
    each: list[float]
    cpu_ms_per_row: float


@contextlib.contextmanager
def emulator_process() -> Iterator[tuple[str, int]]:
    """`vision-pipeline emulator` in a process of its own, as a remote service would be: its URL and pid."""
    os.environ[KEY_ENV] = "bench"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "emulator", "--api-key", "bench"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        yield proc.stdout.readline().split()[-1], proc.pid  # "listening on http://127.0.0.1:PORT"
    finally:
        proc.terminate()
        proc.wait(10)


def cpu_seconds_of(pid: int) -> float:
    """User and system CPU seconds a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def print_end_to_end(paths: list[Path], work: Path, repeat: int, cores: int) -> None:
    print(f"\nend to end: runner.run, emulator latency 0, concurrency 16, detail high (median of {repeat})")
    inside = end_to_end(paths, work, repeat, None)
    with emulator_process() as (url, pid):
        emulator_cpu = cpu_seconds_of(pid)
        apart = end_to_end(paths, work, repeat, url)
        emulator_ms = (cpu_seconds_of(pid) - emulator_cpu) * 1000 / (repeat * len(paths))
    for name, result in (
        ("emulator in the run's process", inside),
        ("emulator in a process of its own", apart),
    ):
        verdict = "meets" if result.rows_per_s >= TARGET_ROWS_PER_S else "MISSES"
        runs = ", ".join(f"{rate:.1f}" for rate in result.each)
        print(
            f"  {name}: {result.rows_per_s:.1f} rows/s (runs: {runs}); {verdict} {TARGET_ROWS_PER_S:.0f} rows/s"
        )
    client_ms = apart.cpu_ms_per_row
    print(f"  CPU per row: client {client_ms:.1f} ms, emulator {emulator_ms:.1f} ms "
          f"(in one process: {inside.cpu_ms_per_row:.1f} ms)")  # fmt: skip
    print(
        f"  the client alone could serve at most {cores * 1000 / client_ms:.0f} rows/s on {cores} idle cores"
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("out/bench-images"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    reuse_freed_image_memory()  # as runner.run does
    paths = build_photos(args.work / "photos", args.images)[: args.images]
    cores = os.cpu_count() or 1
    print(f"{describe_machine(cores)}; Python {sys.version.split()[0]}")
    for path in paths:  # into the page cache: the rates below are the CPU's, not the disk's
        path.read_bytes()

    source = statistics.mean(path.stat().st_size for path in paths)
    print(
        f"\nbytes per image ({len(paths)} photos of {PHOTO_SIZE[0]}×{PHOTO_SIZE[1]}, JPEG q{PHOTO_QUALITY})"
    )
    print(f"  original file         {source / 1e6:8.2f} MB  (data URL {source * 4 / 3 / 1e6:.2f} MB)")
    for detail in ("low", "high"):
        prepared = [prepare(path, detail) for path in paths]
        sent = statistics.mean(p.sent_bytes or 0 for p in prepared)
        url = statistics.mean(len(p.url) for p in prepared)
        size = f"{prepared[0].width}×{prepared[0].height}"
        print(f"  sent at {detail:<4} {size:>9}  {sent / 1e3:8.1f} kB  (data URL {url / 1e3:.1f} kB, "
              f"{sent / source:.1%} of the original)")  # fmt: skip

    runner_threads = image_threads(CFG)  # what runner.run prepares images with
    default_threads = min(32, cores + 4)  # ThreadPoolExecutor's default, as asyncio.to_thread uses it
    print(f"\nimages prepared per second (median of {args.repeat}, the pools taking turns)")
    forkserver = multiprocessing.get_context("forkserver")  # a fork of a threaded process can deadlock
    with (
        concurrent.futures.ThreadPoolExecutor(cores) as threads_cores,
        concurrent.futures.ThreadPoolExecutor(runner_threads) as threads_runner,
        concurrent.futures.ThreadPoolExecutor(default_threads) as threads_default,
        concurrent.futures.ProcessPoolExecutor(
            cores, mp_context=forkserver, initializer=reuse_freed_image_memory
        ) as processes,
    ):
        list(processes.map(prepare, paths[:4], ["low"] * 4))  # start and warm the workers
        pools: list[tuple[str, concurrent.futures.Executor | None]] = [
            ("1 thread", None),
            (f"thread pool of {cores} (one per core)", threads_cores),
            (f"thread pool of {runner_threads} (the run's: cores + 1)", threads_runner),
            (f"thread pool of {default_threads} (asyncio's default)", threads_default),
            (f"process pool of {cores}", processes),
        ]
        for detail in ("high", "low"):
            for name, (rate, cpu_ms) in rates_of(pools, paths, detail, args.repeat).items():
                cpu = "" if cpu_ms is None else f"  ({cpu_ms:.1f} ms CPU per image)"
                print(f"  {detail:<4} {name:<40} {rate:7.1f} images/s{cpu}", flush=True)

    print_end_to_end(paths, args.work, args.repeat, cores)
    print(f"at the end: {describe_machine(cores)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
