"""What the live progress display costs: a 5000-row run against a zero-latency emulator, with and without it.

    python bench/progress_overhead.py [--rows 5000] [--repeat 3] [--concurrency 16]

Starts the standalone emulator (no latency, no quota), writes a manifest of `--rows` rows pointing at one
small image, then runs ``vision-pipeline run`` `--repeat` times with ``--progress`` and as many times with
``--no-progress``, alternately, each into a fresh output. Both kinds run with stderr on a pseudo-terminal
(so the only difference is the display, which then really draws) and text logs. Two figures are
compared, median with the display against median without, as a slowdown in %: the run's own
``duration_s`` from ``_stats.json`` (interpreter start-up excluded), and the CPU time of the run's process
(from wait4), which other load on the machine disturbs far less than a duration. The target (issue 8)
is at most 5 %.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import fcntl
import json
import os
import pty
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from pipeline.progress import REFRESH_S

KEY_ENV = "PROGRESS_BENCH_KEY"
KEY = "progress-bench"
DEPLOYMENT = "vision"
TARGET_PCT = 5.0
TERMINAL_COLUMNS, TERMINAL_ROWS = 120, 40
CLI = [sys.executable, "-m", "pipeline"]


def start_emulator() -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [*CLI, "emulator", "--port", "0", "--api-key", KEY, "--deployment", DEPLOYMENT, "--latency", "0"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line.startswith("listening on "):
        proc.kill()
        raise SystemExit(f"the emulator did not start: {line!r}")
    return proc, line.removeprefix("listening on ")


def write_inputs(work: Path, url: str, rows: int, concurrency: int) -> tuple[Path, Path]:
    Image.new("RGB", (320, 240), "teal").save(work / "a.png")
    manifest = work / "manifest.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "image"])
        writer.writerows([f"row-{n:06d}", "a.png"] for n in range(rows))
    config = work / "run.toml"
    config.write_text(
        f'[endpoint]\nprovider = "azure"\nurl = "{url}"\ndeployment = "{DEPLOYMENT}"\napi_key_env = "{KEY_ENV}"\n'
        f'[request]\ndetail = "low"\nmax_tokens = 100\n'
        f"[limits]\ntokens_per_minute = 1000000000\nrequests_per_minute = 100000000\nconcurrency = {concurrency}\n"
        "[output]\nrows_per_part = 1000\nflush_seconds = 30\n"
    )
    return manifest, config


@dataclass(frozen=True, slots=True)
class Sample:
    duration_s: float  # the run's own figure in _stats.json
    cpu_s: float  # user + system time of the run's process, start-up included
    wall_s: float
    drawn_bytes: int  # what reached the terminal


def run_on_a_terminal(config: Path, manifest: Path, output: Path, progress: bool) -> Sample:
    """One run with stderr on a pseudo-terminal."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", TERMINAL_ROWS, TERMINAL_COLUMNS, 0, 0))
    drawn = 0

    def drain() -> None:  # a terminal that nobody reads fills up and blocks the writer
        nonlocal drawn
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the run closed its end
                return
            if not chunk:
                return
            drawn += len(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    flag = "--progress" if progress else "--no-progress"
    started = time.monotonic()
    proc = subprocess.Popen(
        [*CLI, "run", str(config), "--manifest", str(manifest), "--output", str(output), flag, "--log-format", "text"],
        stdout=subprocess.DEVNULL, stderr=follower, env={**os.environ, KEY_ENV: KEY},
    )  # fmt: skip
    _, status, usage = os.wait4(
        proc.pid, 0
    )  # the run's own CPU time: steadier than wall time on a busy machine
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall_s = time.monotonic() - started
    os.close(follower)
    reader.join(timeout=5)
    os.close(leader)
    if proc.returncode != 0:
        raise SystemExit(f"run exited {proc.returncode}")
    stats = json.loads((output / "_stats.json").read_text())
    return Sample(stats["duration_s"], usage.ru_utime + usage.ru_stime, wall_s, drawn)


def redraw_cost_s(redraws: int = 2000) -> float:
    """CPU seconds of one redraw (reading the figures aside), drawn into a terminal console that discards it."""
    from rich.console import Console

    from pipeline.progress import LiveDisplay
    from pipeline.records import RunProgress

    console = Console(file=open(os.devnull, "w"), force_terminal=True, width=TERMINAL_COLUMNS)  # noqa: SIM115
    progress = RunProgress(
        elapsed_s=0.0, rows_total=5000, rows_before=0, rows_limit=None, ok=0, filtered=0, error=0,
        prompt_tokens=0, completion_tokens=0, cost_usd=0.0, http_429s=0, retries=0, paused_s=0.0,
        is_paused=False, tokens_per_minute=30_000,
    )  # fmt: skip
    with LiveDisplay(console) as display:
        started = time.process_time()
        for n in range(redraws):
            display.update(dataclasses.replace(progress, elapsed_s=n * 0.5, ok=n, prompt_tokens=900 * n))
        cost_s = (time.process_time() - started) / redraws
    console.file.close()
    return cost_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="progress-bench-"))
    emulator, url = start_emulator()
    try:
        manifest, config = write_inputs(work, url, args.rows, args.concurrency)
        results: dict[bool, list[Sample]] = {False: [], True: []}
        for n in range(args.repeat):
            for progress in (False, True):
                output = work / f"out-{n}-{'on' if progress else 'off'}"
                sample = run_on_a_terminal(config, manifest, output, progress)
                results[progress].append(sample)
                print(f"run {n + 1} progress {'on ' if progress else 'off'}: {sample.duration_s:6.2f} s "
                      f"({args.rows / sample.duration_s:6.0f} rows/s), CPU {sample.cpu_s:6.2f} s, "
                      f"wall {sample.wall_s:6.2f} s, {sample.drawn_bytes:,} bytes to the terminal", flush=True)  # fmt: skip
    finally:
        emulator.terminate()
        emulator.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)
    per_redraw_s = redraw_cost_s()
    print(f"\none redraw costs {per_redraw_s * 1000:.2f} ms of CPU: at {1 / REFRESH_S:g} redraws/s, "
          f"{per_redraw_s / REFRESH_S * 100:.2f} % of one core, whatever the row rate")  # fmt: skip
    print(f"{args.rows} rows, zero-latency emulator, concurrency {args.concurrency}, median of {args.repeat} "
          f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs):")  # fmt: skip
    for label, figure in (("run duration", "duration_s"), ("CPU time", "cpu_s")):
        off = statistics.median(getattr(s, figure) for s in results[False])
        on = statistics.median(getattr(s, figure) for s in results[True])
        slowdown_pct = (on - off) / off * 100
        verdict = "within" if slowdown_pct <= TARGET_PCT else "OVER"
        print(f"  {label:12s}: {off:6.2f} s without the display, {on:6.2f} s with it: "
              f"{slowdown_pct:+.1f} % ({verdict} the {TARGET_PCT:g} % target)")  # fmt: skip


if __name__ == "__main__":
    main()
