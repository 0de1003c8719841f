"""The estimate's speed and accuracy (issue 6).

    python bench/estimate_speed.py [--images 20000] [--repeat 3] [--cores 2] [--skip-speed] [--skip-accuracy]

Speed: writes `--images` small JPEG and PNG files (half each, 40 to 400 px a side) into a temporary
folder, then, pinned to `--cores` CPUs, measures `--repeat` times and prints the medians of

- header-only sizing: ``estimate.measure_local`` over every file, in ``estimate.SIZING_THREADS`` threads,
  as the estimate sizes a chunk (target: at least 5000 images/s on 2 cores);
- the whole ``estimate`` of the folder as a manifest: walking it, sizing, counting tokens, tallying.

The page cache is warm (the files were just written): the figures are CPU-bound, not disk-bound.

Accuracy: for detail low, high and auto, runs the real pipeline (``runner.run``, the in-process emulator
of ``configs/emulator.toml``) over ``sample_data/manifest.csv`` and over a set of images of varied sizes
(1×1 to 4000×3000, both orientations, JPEG and PNG), then ``estimate`` with that output as ``observed``,
and prints the rows compared, how many differ between estimated and billed prompt tokens (target 0),
and the estimated against the billed cost (target within 1 %).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import dataclasses
import os
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from pipeline.config import RunConfig, load_config
from pipeline.estimate import SIZING_THREADS, EstimateOptions, estimate, measure_local
from pipeline.estimate_text import estimate_as_json
from pipeline.runner import RunOptions, run

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_MANIFEST = ROOT / "sample_data" / "manifest.csv"
EMULATOR_CONFIG = ROOT / "configs" / "emulator.toml"
SPEED_TARGET_PER_S = 5000
COST_TARGET_PCT = 1.0
VARIED_SIZES = [(1, 1), (64, 48), (300, 200), (511, 513), (512, 512), (640, 480), (767, 1025), (768, 768),
                (1024, 1024), (1500, 400), (2048, 4096), (3000, 4000), (4000, 3000), (300, 2000), (2000, 30),
                (4096, 1024), (1080, 1920), (1920, 1080)]  # fmt: skip


def write_images(folder: Path, count: int, seed: int = 6) -> list[str]:
    """`count` small JPEG and PNG files of random sizes; returns their names."""
    rng = random.Random(seed)
    names = []
    for n in range(count):
        fmt, suffix = ("JPEG", "jpg") if n % 2 else ("PNG", "png")
        size = (rng.randint(40, 400), rng.randint(40, 400))
        name = f"{n // 1000:03d}/img{n:06d}.{suffix}"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, (n % 256, (n // 256) % 256, 128)).save(folder / name, fmt)
        names.append(name)
    return names


def sizing_rate(folder: Path, names: list[str], cfg: RunConfig) -> tuple[float, float]:
    """Images per wall second and per CPU second (steadier on a busy machine) for header-only sizing of
    every file, split over the estimate's sizing threads."""
    pairs = [(name, name) for name in names]
    slices = [pairs[n::SIZING_THREADS] for n in range(SIZING_THREADS)]
    with ThreadPoolExecutor(SIZING_THREADS) as pool:
        started, cpu_started = time.perf_counter(), time.process_time()
        results = [
            size for part in pool.map(lambda part: measure_local(part, folder, cfg), slices) for size in part
        ]
        took, cpu_s = time.perf_counter() - started, time.process_time() - cpu_started
    failures = [r for r in results if isinstance(r, Exception)]
    assert not failures and len(results) == len(names), failures[:3]
    return len(names) / took, len(names) / cpu_s


def estimate_rate(folder: Path, cfg: RunConfig) -> tuple[float, int]:
    started = time.perf_counter()
    result = asyncio.run(estimate(cfg, EstimateOptions(folder)))
    return result.tally.to_send / (time.perf_counter() - started), result.tally.to_send


def speed(count: int, repeat: int, cores: int) -> None:
    available = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, available[:cores])
    cfg = load_config(EMULATOR_CONFIG)
    with tempfile.TemporaryDirectory(prefix="estimate-speed-") as tmp:
        folder = Path(tmp)
        started = time.perf_counter()
        names = write_images(folder, count)
        print(
            f"wrote {count:,} JPEG/PNG files in {time.perf_counter() - started:.1f} s; "
            f"measuring on {len(os.sched_getaffinity(0))} of {len(available)} CPUs, {SIZING_THREADS} threads "
            f"(load average {os.getloadavg()[0]:.1f})"
        )
        sizing = [sizing_rate(folder, names, cfg) for _ in range(repeat)]
        whole = [estimate_rate(folder, cfg) for _ in range(repeat)]
    wall = [rate for rate, _ in sizing]
    print(
        f"header-only sizing: {statistics.median(wall):,.0f} images/s (median of {repeat}: "
        f"{', '.join(f'{r:,.0f}' for r in wall)}); target >= {SPEED_TARGET_PER_S:,}: "
        f"{'met' if statistics.median(wall) >= SPEED_TARGET_PER_S else 'MISSED'}; "
        f"{statistics.median(cpu for _, cpu in sizing):,.0f} images per CPU second"
    )
    rates = [rate for rate, _ in whole]
    print(
        f"whole estimate of the folder ({whole[0][1]:,} rows): {statistics.median(rates):,.0f} rows/s "
        f"(median of {repeat}: {', '.join(f'{r:,.0f}' for r in rates)})"
    )


def varied_manifest(folder: Path) -> Path:
    rows = []
    for n, (w, h) in enumerate(VARIED_SIZES):
        for fmt, suffix in (("JPEG", "jpg"), ("PNG", "png")):
            name = f"varied/{w}x{h}.{suffix}"
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (w, h), (n * 13 % 256, 90, 160)).save(folder / name, fmt)
            rows.append({"id": f"{w}x{h}-{suffix}", "image": name})
    path = folder / "varied.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "image"])
        writer.writeheader()
        writer.writerows(rows)
    return path


async def accuracy_of(cfg: RunConfig, manifest: Path, output: Path) -> dict:
    await run(cfg, RunOptions(manifest, output, handle_signals=False))
    result = await estimate(cfg, EstimateOptions(manifest, observed=output))
    return estimate_as_json(result)["observed"]


def accuracy() -> bool:
    base = load_config(EMULATOR_CONFIG)
    held = True
    with tempfile.TemporaryDirectory(prefix="estimate-accuracy-") as tmp:
        varied = varied_manifest(Path(tmp))
        for manifest in (SAMPLE_MANIFEST, varied):
            for detail in ("low", "high", "auto"):
                cfg = dataclasses.replace(base, request=dataclasses.replace(base.request, detail=detail))
                o = asyncio.run(accuracy_of(cfg, manifest, Path(tmp) / f"out-{manifest.stem}-{detail}"))
                ok = o["differing_rows"] == 0 and abs(o["cost_difference_pct"]) <= COST_TARGET_PCT
                held &= ok
                print(
                    f"{manifest.name:>12} detail {detail:<4}: {o['rows']:>3} rows compared, "
                    f"{o['differing_rows']} differ; prompt tokens {o['estimated_prompt_tokens']:,} "
                    f"estimated, {o['billed_prompt_tokens']:,} billed; cost ${o['estimated_cost_usd']:.6f} "
                    f"estimated, ${o['billed_cost_usd']:.6f} billed ({o['cost_difference_pct']:+.4f} %) "
                    f"{'ok' if ok else 'MISSED'}"
                )
    return held


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-accuracy", action="store_true")
    args = parser.parse_args()
    if not args.skip_speed:
        speed(args.images, args.repeat, args.cores)
    if not args.skip_accuracy and not accuracy():
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
