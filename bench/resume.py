"""Resume at scale: start-up time to the first request, and peak RSS, with 1,000,000 committed rows.

    python bench/resume.py [--committed 1000000] [--new 100] [--part-rows 5000] [--repeat 3]

Builds (once, cached in the work folder) an output of `--committed` rows written the way the sink writes
them (sink.rows_to_table + sink.write_part, the sink's schema, parts of `--part-rows` rows, ``_run.json``
from checkpoint.open_output), and a manifest of those ids plus `--new` rows that point at small real
images. Then, `--repeat` times on a fresh copy of that output: starts ``vision-pipeline run`` against the
standalone emulator (no latency) and measures

- start-up: from process start to the first request's arrival at the emulator (the request log's ``at``,
  CLOCK_MONOTONIC like this script's clock);
- resume ready: from process start to open_output rewriting ``_run.json`` (the committed ids are read);
- peak RSS: the run's ru_maxrss from wait4 (the kernel's high-water mark of the whole process life);

and prints the median of each. The targets (issue 12) are start-up ≤ 2 s and peak RSS < 250 MB.

The new rows are placed `--new-at end` (the manifest grew: every committed row is read and skipped before
the first new one, the worst case) or `--new-at start`. A breakdown of where the time and memory go is
measured in a fresh interpreter, one step after the other: imports, checkpoint.committed_ids (a sorted
Arrow array), streaming the manifest past the committed rows (grouped, a block at a time, as the run
does), and building the BPE encoding (tokens.load_encoding: bpe-openai's Rust tokenizer), which the run does
in a thread while it reads the output and the manifest.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
from PIL import Image

from pipeline import checkpoint
from pipeline.config import load_config
from pipeline.sink import RUN_FILE, rows_to_table, schema_with_extras, write_part

KEY_ENV = "RESUME_BENCH_KEY"
EMULATOR_KEY = "emulator"
DEPLOYMENT = "gpt-4-vision"
STARTUP_TARGET_S = 2.0
RSS_TARGET_MB = 250.0
RUN_TIMEOUT_S = 300.0
BUILT_MARKER = ".built"
DESCRIPTION_WORDS = ("a", "weathered", "wooden", "boat", "in", "soft", "morning", "light", "beside", "the",
                     "narrow", "canal", "colours", "are", "muted", "and", "warm", "shadows", "fall", "left")  # fmt: skip


@dataclass(frozen=True, slots=True)
class Sample:
    startup_s: float | None  # None: no request reached the emulator
    ready_s: float | None
    peak_rss_mb: float
    total_s: float
    cpu_s: float  # user + system time of the whole run: steadier than wall time on a busy machine
    exit_code: int


def row_id_of(n: int) -> str:
    return f"img-{n:09d}"


def write_run_config(path: Path, url: str) -> Path:
    path.write_text(
        textwrap.dedent(
            f"""\
            [endpoint]
            provider = "azure"
            url = "{url}"
            deployment = "{DEPLOYMENT}"
            api_key_env = "{KEY_ENV}"

            [request]
            detail = "low"
            max_tokens = 60

            [limits]
            tokens_per_minute = 1000000000
            requests_per_minute = 1000000
            concurrency = 16

            [output]
            rows_per_part = 1000
            flush_seconds = 5
            """
        ),
        encoding="utf-8",
    )
    return path


def template_rows(n: int, run_id: str) -> list[dict[str, object]]:
    """`n` rows shaped like the sink's, with varied descriptions; ids are replaced per part."""
    rng = random.Random(n)
    rows = []
    for i in range(n):
        words = rng.choices(DESCRIPTION_WORDS, k=rng.randint(20, 80))
        safe = {"filtered": False, "severity": "safe"}
        filters = {name: safe for name in ("hate", "self_harm", "sexual", "violence")}
        rows.append({
            "id": "", "image": "", "images": [], "prompt": "Describe this image in one paragraph.",
            "detail": "low", "status": "ok" if i % 97 else "error", "description": " ".join(words) + ".",
            "finish_reason": "stop", "model": "gpt-4-turbo", "response_id": f"chatcmpl-{i:029x}",
            "prompt_tokens": 110, "completion_tokens": 40 + i % 40, "total_tokens": 150 + i % 40,
            "estimated_prompt_tokens": 110, "cost_usd": 0.0023, "prompt_filter": filters,
            "completion_filter": filters, "attempts": 1, "latency_s": 1.234, "started_at": 1_764_000_000_000 + i,
            "finished_at": 1_764_000_001_000 + i, "http_status": 200, "error": None, "run_id": run_id,
        })  # fmt: skip
    return rows


def build(workdir: Path, committed: int, new: int, part_rows: int, new_at: str) -> tuple[Path, Path, Path]:
    """The pristine output, the manifest and the config, made once per parameters and then reused."""
    key = f"{committed}-{new}-{part_rows}-{new_at}"
    base = workdir / key
    pristine, manifest, config = base / "output", base / "manifest.csv", base / "run.toml"
    if (base / BUILT_MARKER).exists():
        return pristine, manifest, config
    shutil.rmtree(base, ignore_errors=True)
    (base / "images").mkdir(parents=True)
    began = time.monotonic()
    for n in range(new):
        Image.new("RGB", (48 + n, 32 + n), ((n * 53) % 256, 120, 80)).save(
            base / "images" / f"new{n:03d}.png"
        )
    write_run_config(config, "http://127.0.0.1:9")  # only the settings matter to open_output
    cfg = load_config(config)

    with open(manifest, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "image"])
        new_rows = [[f"new-{n:04d}", f"images/new{n:03d}.png"] for n in range(new)]
        if new_at == "start":
            writer.writerows(new_rows)
        writer.writerows([row_id_of(n), f"images/new{n % max(new, 1):03d}.png"] for n in range(committed))
        if new_at == "end":
            writer.writerows(new_rows)

    resume = checkpoint.open_output(pristine, cfg, manifest, time.time())
    template = rows_to_table(template_rows(part_rows, resume.run_id), schema_with_extras([]))
    for part, start in enumerate(range(0, committed, part_rows), start=1):
        count = min(part_rows, committed - start)
        ids = [row_id_of(n) for n in range(start, start + count)]
        images = [f"images/new{n % max(new, 1):03d}.png" for n in range(start, start + count)]
        table = template.slice(0, count)
        table = table.set_column(table.schema.get_field_index("id"), "id", pa.array(ids, pa.string()))
        table = table.set_column(
            table.schema.get_field_index("image"), "image", pa.array(images, pa.string())
        )
        images_type = table.schema.field("images").type
        table = table.set_column(
            table.schema.get_field_index("images"), "images", pa.array([[i] for i in images], images_type)
        )
        write_part(pristine, f"part-{resume.run_id}-{part:05d}.parquet", table)
    (base / BUILT_MARKER).write_text(f"built in {time.monotonic() - began:.1f} s\n")
    return pristine, manifest, config


def cli_command() -> list[str]:
    script = Path(sys.executable).with_name("vision-pipeline")
    return [str(script)] if script.exists() else [sys.executable, "-m", "pipeline"]


def start_emulator(request_log: Path) -> tuple[subprocess.Popen[str], str]:
    args = [*cli_command(), "emulator", "--port", "0", "--api-key", EMULATOR_KEY, "--deployment", DEPLOYMENT,
            "--request-log", str(request_log)]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line.startswith("listening on http://"):
        proc.kill()
        raise RuntimeError(f"the emulator did not start: {line!r}")
    return proc, line.removeprefix("listening on ")


def first_arrival_since(log: Path, since: float) -> float | None:
    with open(log, encoding="utf-8") as f:
        arrivals = [at for line in f if line.strip() and (at := json.loads(line)["at"]) >= since]
    return min(arrivals, default=None)


def ready_after(output: Path, started_wall: float) -> float | None:
    """Seconds from `started_wall` until open_output wrote ``_run.json`` (its last step before the skip
    set is handed to the runner); None if the run never got that far. Read from the file, not the logs."""
    try:
        ready_s = (output / RUN_FILE).stat().st_mtime - started_wall
    except FileNotFoundError:
        return None
    return ready_s if ready_s >= 0 else None  # still the pristine copy's file


def measure_once(
    cli: list[str], config: Path, manifest: Path, pristine: Path, output: Path, log: Path
) -> Sample:
    """One resumed run of `cli` on a fresh copy of the pristine output."""
    shutil.rmtree(output, ignore_errors=True)
    shutil.copytree(pristine, output)
    env = {**os.environ, KEY_ENV: EMULATOR_KEY}
    args = [*cli, "run", str(config), "--manifest", str(manifest), "--output", str(output)]
    stderr_path = output.parent / "run.stderr"
    with open(stderr_path, "wb") as err:
        started, started_wall = time.monotonic(), time.time()
        proc = subprocess.Popen(args, env=env, stdout=err, stderr=err)
        deadline = started + RUN_TIMEOUT_S
        while True:  # wait4 gives the child's peak RSS, which Popen.wait throws away
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.send_signal(signal.SIGKILL)
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)
    total_s = time.monotonic() - started
    arrival = first_arrival_since(log, started)
    return Sample(
        startup_s=None if arrival is None else arrival - started,
        ready_s=ready_after(output, started_wall),
        peak_rss_mb=usage.ru_maxrss / 1024,  # Linux reports kilobytes
        total_s=total_s,
        cpu_s=usage.ru_utime + usage.ru_stime,
        exit_code=proc.returncode,
    )


BREAKDOWN = r"""
import gc, sys, time
from pathlib import Path

def status_mb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024

def rss_mb():
    return status_mb("VmRSS:")

def peak_mb():
    return status_mb("VmHWM:")

def step(name, fn):
    before, started = rss_mb(), time.perf_counter()
    value = fn()
    print(f"  {name:50s} {time.perf_counter() - started:6.2f} s  RSS {before:4.0f} -> {rss_mb():4.0f} MB (peak {peak_mb():4.0f})", flush=True)
    return value

output, manifest, config = map(Path, sys.argv[1:4])
step("import pyarrow(.parquet, .dataset), aiohttp, PIL", lambda: [__import__(m) for m in
     ("pyarrow.parquet", "pyarrow.dataset", "aiohttp", "PIL.Image")])
step("import pipeline.runner (the rest; no tokenizer yet)", lambda: __import__("pipeline.runner"))
from pipeline import checkpoint
from pipeline.config import load_config
from pipeline.manifest import Skipped, read_manifest
from pipeline.tokens import load_encoding
cfg = load_config(config)
ids = step("checkpoint.committed_ids (a sorted Arrow array)", lambda: checkpoint.committed_ids(output))
def scan():
    return sum(1 for item in read_manifest(manifest, cfg.request, ids, group_skipped=True)
               if not isinstance(item, Skipped))
step("read_manifest: committed rows skipped a block at a time", scan)
step("tokens.load_encoding (the run does it in a thread meanwhile)", lambda: load_encoding(cfg.endpoint.model))
"""


def format_sample(sample: Sample) -> str:
    startup = "no request" if sample.startup_s is None else f"{sample.startup_s:.2f} s"
    ready = "not logged" if sample.ready_s is None else f"{sample.ready_s:.2f} s"
    return (
        f"start-up {startup}, resume ready {ready}, peak RSS {sample.peak_rss_mb:.0f} MB, "
        f"whole run {sample.total_s:.1f} s ({sample.cpu_s:.1f} s CPU), exit {sample.exit_code}"
    )


def verdict(is_met: bool) -> str:
    return "met" if is_met else "MISSED"


def breakdown(pristine: Path, manifest: Path, config: Path) -> str:
    """Where start-up time and memory go, step by step, in a fresh interpreter."""
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", BREAKDOWN, str(pristine), str(manifest), str(config)],
        capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False,
    )  # fmt: skip
    tail = f"  (interpreter total {time.monotonic() - started:.1f} s)"
    return done.stdout + (done.stderr[-2000:] if done.returncode else "") + tail


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--committed", type=int, default=1_000_000)
    parser.add_argument("--new", type=int, default=100)
    parser.add_argument("--part-rows", type=int, default=5000, help="rows per committed part file")
    parser.add_argument("--new-at", choices=("end", "start"), default="end")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("out/bench-resume"))
    parser.add_argument("--no-breakdown", action="store_true")
    parser.add_argument(
        "--cli", help="the command to measure instead of vision-pipeline, e.g. a candidate fix"
    )
    args = parser.parse_args(argv)

    began = time.monotonic()
    workdir = args.workdir.absolute()
    cli = shlex.split(args.cli) if args.cli else cli_command()
    pristine, manifest, config = build(workdir, args.committed, args.new, args.part_rows, args.new_at)
    print(
        f"output: {args.committed} committed rows in {len(checkpoint.part_files(pristine))} parts "
        f"({sum(p.stat().st_size for p in pristine.iterdir()) / 1e6:.0f} MB); manifest: "
        f"{args.committed + args.new} rows, {args.new} new at the {args.new_at} "
        f"({manifest.stat().st_size / 1e6:.0f} MB); ready in {time.monotonic() - began:.1f} s",
        flush=True,
    )
    log = workdir / "requests.jsonl"
    emulator, url = start_emulator(log)
    samples: list[Sample] = []
    try:
        write_run_config(config, url)  # same settings; only the URL changes
        for n in range(1, args.repeat + 1):
            sample = measure_once(cli, config, manifest, pristine, workdir / "run" / "output", log)
            samples.append(sample)
            print(f"  run {n}: {format_sample(sample)}", flush=True)
    finally:
        emulator.send_signal(signal.SIGINT)
        try:
            emulator.wait(timeout=5)
        except subprocess.TimeoutExpired:
            emulator.kill()
            emulator.wait()
    startups = [s.startup_s for s in samples if s.startup_s is not None]
    readies = [s.ready_s for s in samples if s.ready_s is not None]
    startup_s = statistics.median(startups) if len(startups) == len(samples) else None
    peak_mb = statistics.median(s.peak_rss_mb for s in samples)
    is_fast = startup_s is not None and startup_s <= STARTUP_TARGET_S
    is_small = peak_mb < RSS_TARGET_MB
    print(f"resume with {args.committed} committed rows (median of {len(samples)}):")
    shown_startup = "no request reached the emulator" if startup_s is None else f"{startup_s:.2f} s"
    print(
        f"  start-up to first request  {shown_startup} (target ≤ {STARTUP_TARGET_S:g} s: {verdict(is_fast)})"
    )
    if readies:
        print(
            f"  of which resume ready      {statistics.median(readies):.2f} s (open_output wrote _run.json)"
        )
    cpu_s = statistics.median(s.cpu_s for s in samples)
    print(f"  CPU time, whole run        {cpu_s:.2f} s (user + system; steadier than wall time when busy)")
    print(
        f"  peak RSS                   {peak_mb:.0f} MB (target < {RSS_TARGET_MB:g} MB: {verdict(is_small)})"
    )
    if not args.no_breakdown:
        print("where it goes (fresh interpreter, warm page cache):")
        print(breakdown(pristine, manifest, config))
    return 0 if is_fast and is_small else 1


if __name__ == "__main__":
    sys.exit(main())
