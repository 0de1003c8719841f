"""Image preparation on 12-megapixel photos: bytes sent, images prepared per second, end-to-end rows/s.

    python bench/images_bench.py [--images 200] [--repeat 3] [--work out/bench-images]

Generates once (cached in the work folder) `--images` photo-like JPEGs of 4000×3000 at quality 92: smooth
colour fields under sensor-like grain, about 2.7 MB each (a phone's are 2-5 MB). Then prints, each rate the
median of `--repeat` runs, after one untimed pass that puts the files in the page cache:

- bytes per image: the file, and what ``images.prepare_image`` sends at low and at high detail (the JPEG
  and the data URL that carries it), with the share of the original;
- images prepared per second at high and at low detail: in one thread, in a thread pool of 2 and of the
  loop's default size (what ``asyncio.to_thread`` uses), and in a process pool of 2 (forkserver, started
  and warmed before timing, so its start-up cost is not counted against it), taking turns; with the CPU
  time per image of the in-process ones, which the machine's other load does not change;
- end to end: ``pipeline.runner.run`` over a manifest of the photos at detail high against the in-process
  emulator with no latency, concurrency 16, tokens_per_minute 10^9: rows per second over the run's
  duration, and CPU time per row. The target (issue 7) is at least 50 high-detail rows/s on 2 cores.

The machine's cores, how many of them two spinning processes actually get, and the load average are printed
first and last: other work on a 2-core machine shows there, and every rate above depends on it.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import csv
import logging
import multiprocessing
import os
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

from PIL import Image, ImageFilter

from pipeline.config import ImagesConfig, config_from_mapping
from pipeline.images import prepare_image
from pipeline.records import PreparedImage
from pipeline.runner import RunOptions, run

PHOTO_SIZE = (4000, 3000)
PHOTO_QUALITY = 92
GRAIN_SIGMA = 18  # luminance noise: what keeps a photo at megabytes instead of a few hundred kB
COLOUR_FIELD_PX = (40, 30)  # the colour layout, upscaled smoothly to the photo's size
TARGET_ROWS_PER_S = 50.0
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


def end_to_end(paths: list[Path], work: Path, repeat: int) -> tuple[float, list[float], float]:
    """Median rows/s of full runs (manifest → prepare → emulator → Parquet), each run's figure, and the
    median CPU ms per row of this process (client and in-process emulator together)."""
    manifest = work / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "image", "detail"])
        writer.writerows([path.stem, f"photos/{path.name}", "high"] for path in paths)
    cfg = config_from_mapping(
        {
            "endpoint": {"provider": "emulator"},
            "limits": {"concurrency": 16, "tokens_per_minute": 1_000_000_000},
            "emulator": {"latency_s": 0.0},
            "output": {"rows_per_part": 1000},
        },
        source="bench",
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
    return statistics.median(rates), rates, statistics.median(cpu_ms)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("out/bench-images"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
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

    default_threads = min(32, cores + 4)  # ThreadPoolExecutor's default, as asyncio.to_thread uses it
    print(f"\nimages prepared per second (median of {args.repeat}, the pools taking turns)")
    forkserver = multiprocessing.get_context("forkserver")  # a fork of a threaded process can deadlock
    with (
        concurrent.futures.ThreadPoolExecutor(2) as threads_2,
        concurrent.futures.ThreadPoolExecutor(default_threads) as threads_default,
        concurrent.futures.ProcessPoolExecutor(2, mp_context=forkserver) as processes_2,
    ):
        list(processes_2.map(prepare, paths[:4], ["low"] * 4))  # start and warm both workers
        pools: list[tuple[str, concurrent.futures.Executor | None]] = [
            ("1 thread", None),
            ("thread pool of 2", threads_2),
            (f"thread pool of {default_threads} (asyncio's default)", threads_default),
            ("process pool of 2", processes_2),
        ]
        for detail in ("high", "low"):
            for name, (rate, cpu_ms) in rates_of(pools, paths, detail, args.repeat).items():
                cpu = "" if cpu_ms is None else f"  ({cpu_ms:.1f} ms CPU per image)"
                print(f"  {detail:<4} {name:<38} {rate:7.1f} images/s{cpu}", flush=True)

    print(
        f"\nend to end: runner.run, emulator latency 0, concurrency 16, detail high (median of {args.repeat})"
    )
    median, each, cpu_ms = end_to_end(paths, args.work, args.repeat)
    verdict = "meets" if median >= TARGET_ROWS_PER_S else "MISSES"
    runs = ", ".join(f"{rate:.1f}" for rate in each)
    print(f"  {median:.1f} rows/s (runs: {runs}); {verdict} the target of {TARGET_ROWS_PER_S:.0f} rows/s")
    print(f"  {cpu_ms:.1f} ms CPU per row (client and emulator): at most {cores * 1000 / cpu_ms:.0f} rows/s "
          f"on {cores} idle cores")  # fmt: skip
    print(f"at the end: {describe_machine(cores)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
