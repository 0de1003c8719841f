"""Kill the pipeline for real, many times, and prove that no row is lost, duplicated or paid for twice.

    python bench/chaos.py [--rows 5000] [--kills 50] [--seed 1] [--workdir out/chaos]

Generates a manifest whose per-row prompt names the row ("Describe image row-00042."), starts the
standalone emulator on 127.0.0.1 with latency, 500s and dropped connections and a request log, then
runs the real CLI again and again, SIGKILLing it at random moments (during start-up, mid-run, and the
instant a temp file shows a part being written: with the default 1000 rows per part and a 30-s flush
that is nearly always the part a run writes at start-up from the journal of the run killed before it),
and finally lets one run finish. The defaults are the output section's defaults (rows_per_part 1000,
flush_seconds 30), concurrency 8, 0.1 s of latency, 2 % of 500s and 0.5 % of dropped connections.

Nothing here trusts the pipeline. What is committed is read with pyarrow from the part files a reader
would open; what was paid for is read from the emulator's request log (one line per request, appended
and flushed just before its answer leaves). After every kill the committed ids are read again, and the
ids in the journal's complete lines (``OUTPUT/_journal/``), so each paid request can be placed in the
run that sent it and compared with what was committed and journalled before and after that run. At each
kill the request log's size is noted just before the SIGKILL: a line past that size is an answer that
left the emulator after the kill, so the request was still on the wire when the kill came.

Checks, each printed as a figure; the script exits 1 if any fails:
- every manifest id is committed exactly once (duplicates 0, missing 0, no unknown id) and no temp file
  is left; no kill ever made a committed row disappear;
- no row is paid for twice within one run, nor after it was committed;
- no row is paid for more than 1 + (number of kills that hit it while it was in flight or buffered);
- no row that was in the journal when a run was killed is sent again;
- the goal of the journal: answered requests (200) whose row is sent again by a later run, in all, at
  most kills × concurrency (what was on the wire at the kills). Before the journal every row answered
  but not yet in a part was sent again: about 34 per kill at the default settings.
"""

from __future__ import annotations

import argparse
import bisect
import csv
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from PIL import Image

KEY_ENV = "CHAOS_EMULATOR_KEY"
EMULATOR_KEY = "emulator"
DEPLOYMENT = "gpt-4-vision"
PROMPT_TEMPLATE = "Describe image {row_id}."
PROMPT_ROW_ID = re.compile(r"Describe image (\S+)\.")
DISTINCT_IMAGES = 50  # rows share these small images; each row still has its own id and prompt
PAID_STATUSES = frozenset({200, 400})  # an answer or a filter refusal: both are billed
TEMP_PREFIX = ".tmp-"  # what a half-written file of a killed run is called (DESIGN.md, sink)
JOURNAL_DIR = "_journal"  # the paid answers a run has not yet committed (README, "What a kill costs")
ANSWERED = 200
HOST = "127.0.0.1"  # the emulator listens on loopback only
WRITE_POLL_S = 0.0005  # how often a "during a part write" kill looks for a temp file
WRITE_WATCH_S = 2.0  # how long it looks before killing anyway
RUN_TIMEOUT_S = 600.0  # the final run; a hang is a failure, not a wait
KILL_MODES = ("start-up", "mid-run", "part-write")
KILL_MODE_WEIGHTS = (0.2, 0.5, 0.3)


@dataclass(frozen=True, slots=True)
class ChaosConfig:
    rows: int = 5000
    kills: int = 50
    latency_s: float = 0.1
    fault_rate: float = 0.02
    drop_rate: float = 0.005
    concurrency: int = 8
    rows_per_part: int = 1000  # the output section's defaults (config.py)
    flush_seconds: float = 30.0
    max_attempts: int = 4
    seed: int = 1


@dataclass(frozen=True, slots=True)
class KillMoment:
    at: float  # time.monotonic() just before the SIGKILL
    log_bytes: int  # the request log's size then: a line past it was answered after the kill


@dataclass(slots=True)
class Invocation:
    """One start of `vision-pipeline run`, as this script saw it."""

    number: int
    started: float  # time.monotonic(); the emulator's request log uses the same clock (loop.time())
    ended: float = 0.0
    kill_mode: str | None = None  # None: left to finish
    was_killed: bool = False  # SIGKILL reached a live process
    killed: KillMoment | None = None  # when it did
    exit_code: int | None = None
    temp_files_after: tuple[str, ...] = ()  # what the kill left behind, before the next start removes it
    committed_after: frozenset[str] = frozenset()
    journalled_after: frozenset[str] = frozenset()  # ids in the journal's complete lines after the run


@dataclass(frozen=True, slots=True)
class Logged:
    """One line of the emulator's request log."""

    at: float  # arrival, emulator loop time (CLOCK_MONOTONIC)
    status: int  # 0: the connection was dropped
    row_id: str | None  # from the prompt
    end: int  # the log's size once this line was written: it was answered when the log reached it

    @property
    def is_paid(self) -> bool:
        return self.status in PAID_STATUSES and self.row_id is not None


@dataclass(slots=True)
class Figures:
    rows: int = 0
    runs: int = 0
    kills: int = 0
    kills_by_mode: Counter[str] = field(default_factory=Counter)
    kills_leaving_temp: int = 0
    kills_hitting_rows: int = 0  # kills after which some paid row was not committed
    committed: int = 0
    by_status: Counter[str] = field(default_factory=Counter)
    duplicates: int = 0
    missing: int = 0
    unknown_ids: int = 0
    temp_files_left: int = 0
    rows_lost_by_a_kill: int = 0  # committed before a kill, gone after it
    duplicates_seen_mid_run: int = 0
    requests: int = 0
    requests_by_status: Counter[int] = field(default_factory=Counter)
    paid: int = 0
    extra_paid: int = 0  # paid requests beyond one per row
    rows_paid_more_than_once: int = 0
    max_paid_per_row: int = 0
    max_kills_hitting_a_row: int = 0
    rows_over_bound: int = 0  # paid more than 1 + kills that hit the row
    paid_twice_in_one_run: int = 0
    paid_after_commit: int = 0
    uncommitted_per_kill: list[int] = field(default_factory=list)  # paid in the run, in no part at its kill
    journalled_per_kill: list[int] = field(default_factory=list)  # ids in the journal after the kill
    in_flight_per_kill: list[int] = field(default_factory=list)  # arrived before the kill, answered after
    in_flight_while_sending: list[int] = field(default_factory=list)  # kills after the run's first request
    answered_sent_again: int = 0  # 200s whose row a later run sent again
    answered_sent_again_per_kill: list[int] = field(default_factory=list)  # by the run that was answered
    answered_after_kill_sent_again: int = 0  # of which answered after the SIGKILL: on the wire at the kill
    answered_before_kill_sent_again: int = 0  # answered before it (or in a run not killed)
    lines_from_answer_to_kill: list[int] = field(default_factory=list)  # for those: answers logged in between
    journalled_sent_again: int = 0  # rows in the journal at a kill, sent again by a later run
    paid_again: int = 0  # of those, rows paid by the next run that sent them
    concurrency: int = 0
    final_exit_code: int | None = None
    runtime_s: float = 0.0

    @property
    def failures(self) -> list[str]:
        """What broke a promise, one line each; empty when the run proved it."""
        checks = {
            "duplicates": self.duplicates,
            "missing": self.missing,
            "ids not in the manifest": self.unknown_ids,
            "temp files left": self.temp_files_left,
            "committed rows lost by a kill": self.rows_lost_by_a_kill,
            "duplicates seen between kills": self.duplicates_seen_mid_run,
            "rows paid over 1 + kills that hit them": self.rows_over_bound,
            "rows paid twice in one run": self.paid_twice_in_one_run,
            "paid requests for already committed rows": self.paid_after_commit,
            "journalled rows sent again": self.journalled_sent_again,
        }
        failed = [f"{name}: {count}" for name, count in checks.items() if count]
        if not self.meets_goal:
            failed.append(
                f"answered requests sent again: {self.answered_sent_again} > kills × concurrency = "
                f"{self.kills * self.concurrency}"
            )
        if self.final_exit_code not in (0, 1):
            failed.append(f"the final run exited {self.final_exit_code} (0 or 1 expected)")
        return failed

    @property
    def meets_goal(self) -> bool:
        """A kill re-pays at most what was on the wire: answered requests sent again ≤ kills × concurrency."""
        return self.answered_sent_again <= self.kills * self.concurrency


def row_id_of(n: int) -> str:
    return f"row-{n:05d}"


def write_manifest(folder: Path, rows: int) -> tuple[Path, list[str]]:
    """A CSV manifest of `rows` rows over small generated PNGs; each row's prompt names its id."""
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    for n in range(DISTINCT_IMAGES):
        Image.new("RGB", (32 + n, 24 + n), ((n * 37) % 256, 90, 160)).save(images / f"img{n:02d}.png")
    ids = [row_id_of(n) for n in range(rows)]
    manifest = folder / "manifest.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "image", "prompt"])
        for n, row_id in enumerate(ids):
            writer.writerow(
                [row_id, f"images/img{n % DISTINCT_IMAGES:02d}.png", PROMPT_TEMPLATE.format(row_id=row_id)]
            )
    return manifest, ids


def cli_command() -> list[str]:
    """The installed console script beside this interpreter, else the package as a module."""
    script = Path(sys.executable).with_name("vision-pipeline")
    return [str(script)] if script.exists() else [sys.executable, "-m", "pipeline"]


def start_emulator(
    cfg: ChaosConfig, request_log: Path, stderr: Path, extra_args: Sequence[str] = ()
) -> tuple[subprocess.Popen[str], str]:
    """The standalone emulator on a free loopback port (`extra_args`: more options, e.g. a quota); returns
    the process and its URL."""
    args = [
        *cli_command(), "emulator", "--host", HOST, "--port", "0", "--api-key", EMULATOR_KEY,
        "--deployment", DEPLOYMENT,
        "--latency", str(cfg.latency_s), "--fault-rate", str(cfg.fault_rate), "--drop-rate", str(cfg.drop_rate),
        "--seed", str(cfg.seed), "--request-log", str(request_log), *extra_args,
    ]  # fmt: skip
    with open(stderr, "ab") as err:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line.startswith("listening on http://"):
        proc.kill()
        raise RuntimeError(f"the emulator did not start: {line!r} (see {stderr})")
    return proc, line.removeprefix("listening on ")


def stop(proc: subprocess.Popen[str] | subprocess.Popen[bytes]) -> None:
    """End a process this script started, however it is doing."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)  # the emulator closes its request log on SIGINT
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def write_run_config(path: Path, url: str, cfg: ChaosConfig) -> Path:
    path.write_text(
        f"""[endpoint]
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
concurrency = {cfg.concurrency}
max_attempts = {cfg.max_attempts}
backoff_initial_s = 0.05
backoff_max_s = 0.5
timeout_s = 10
grace_s = 5

[output]
rows_per_part = {cfg.rows_per_part}
flush_seconds = {cfg.flush_seconds}
""",
        encoding="utf-8",
    )
    return path


def start_run(config: Path, manifest: Path, output: Path, stderr: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, KEY_ENV: EMULATOR_KEY}
    args = [*cli_command(), "run", str(config), "--manifest", str(manifest), "--output", str(output)]
    with open(stderr, "ab") as err:
        return subprocess.Popen(args, env=env, stdout=err, stderr=err)


# --- the reader that never trusts the pipeline -------------------------------------------------------


def visible_parquet_files(output: Path) -> list[Path]:
    """The Parquet files a reader opens: pyarrow.dataset and DuckDB skip names starting with "." or "_"."""
    if not output.exists():
        return []
    return sorted(p for p in output.glob("*.parquet") if not p.name.startswith((".", "_")))


def committed_id_counts(output: Path) -> Counter[str]:
    """How many times each id appears across the visible part files (the id column only)."""
    counts: Counter[str] = Counter()
    for path in visible_parquet_files(output):
        counts.update(pq.read_table(path, columns=["id"]).column("id").to_pylist())
    return counts


def committed_statuses(output: Path) -> Counter[str]:
    statuses: Counter[str] = Counter()
    for path in visible_parquet_files(output):
        statuses.update(pq.read_table(path, columns=["status"]).column("status").to_pylist())
    return statuses


def temp_files(output: Path) -> list[str]:
    if not output.exists():
        return []
    return sorted(p.name for p in output.iterdir() if p.name.startswith(TEMP_PREFIX))


def journalled_ids(output: Path) -> frozenset[str]:
    """The ids in the journal's complete lines: the answers a killed run leaves for the next run."""
    ids: set[str] = set()
    for segment in sorted((output / JOURNAL_DIR).glob("*.jsonl")):
        with open(segment, "rb") as f:
            for line in f:
                record = _json_line(line)
                if record is not None and isinstance(record.get("id"), str):
                    ids.add(record["id"])
    return frozenset(ids)


def _json_line(line: bytes) -> dict[str, Any] | None:
    """A complete JSON object line, or None for a line cut short by a kill."""
    if not line.endswith(b"\n"):
        return None
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def read_request_log(path: Path) -> list[Logged]:
    """Every request the emulator answered or dropped, in the order its answer left."""
    logged: list[Logged] = []
    end = 0
    with open(path, "rb") as f:
        for line in f:
            end += len(line)
            if not line.strip():
                continue
            entry = json.loads(line)
            match = PROMPT_ROW_ID.search(entry.get("prompt_text") or "")
            logged.append(Logged(entry["at"], entry["status"], match.group(1) if match else None, end))
    return logged


# --- killing -------------------------------------------------------------------------------------------


def wait_for_temp_file(
    output: Path, proc: subprocess.Popen[bytes], watch_s: float, stale: Iterable[str] = ()
) -> None:
    """Return the moment a new temp file appears in `output` (a part being written), or after `watch_s`.

    `stale` names what an earlier kill left, which this run's start-up has not removed yet.
    """
    ignored = set(stale)
    deadline = time.monotonic() + watch_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with os.scandir(output) as entries:
                if any(e.name.startswith(TEMP_PREFIX) and e.name not in ignored for e in entries):
                    return
        except FileNotFoundError:
            pass
        time.sleep(WRITE_POLL_S)


def kill_after(proc: subprocess.Popen[bytes], delay_s: float, log: Path) -> KillMoment | None:
    """SIGKILL `proc` after `delay_s` unless it ended first; the moment, when the kill reached a live process.

    The request log's size is read just before the signal: what the emulator logs after it was answered
    after the kill.
    """
    try:
        proc.wait(timeout=delay_s)
        return None
    except subprocess.TimeoutExpired:
        pass
    moment = KillMoment(time.monotonic(), log.stat().st_size if log.exists() else 0)
    proc.send_signal(signal.SIGKILL)
    return moment if proc.wait() == -signal.SIGKILL else None  # not a run that ended on its own just before


@dataclass(slots=True)
class Pace:
    """Spreads the kills over the manifest: what one run costs to start, and how fast it sends rows."""

    startup_s: float = 0.8
    rows_per_s: float = 50.0
    startups: list[float] = field(default_factory=list)

    def observe(self, startup_s: float | None, requests: int, alive_s: float) -> None:
        """Learn from one run: seconds to its first request, and requests sent over its working time."""
        if startup_s is not None:
            self.startups.append(startup_s)
            self.startup_s = statistics.median(self.startups)
            working_s = alive_s - startup_s
            if working_s > 0.3 and requests > 0:
                self.rows_per_s = 0.5 * self.rows_per_s + 0.5 * requests / working_s

    def work_slot_s(self, rows_left: int, kills_left: int) -> float:
        """Seconds of work per run that leave about as much for each remaining kill as for the last run."""
        return min(3.0, max(0.1, rows_left / self.rows_per_s / (kills_left + 1)))


def arrivals_since(log: Path, since: float) -> list[float]:
    """Arrival times (monotonic) of the requests logged at or after `since`.

    The emulator is still serving: the last line may be half written, and is left for the next reading.
    """
    if not log.exists():
        return []
    with open(log, encoding="utf-8") as f:
        return [at for line in f if line.endswith("\n") and (at := json.loads(line)["at"]) >= since]


def chaos(cfg: ChaosConfig, workdir: Path, *, say: bool = True) -> Figures:
    """Run the whole experiment in `workdir` (emptied first) and return its figures."""
    rng = random.Random(cfg.seed)
    began = time.monotonic()
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    manifest, ids = write_manifest(workdir, cfg.rows)
    output, log, runs_log = workdir / "output", workdir / "requests.jsonl", workdir / "runs.log"
    emulator, url = start_emulator(cfg, log, workdir / "emulator.log")
    invocations: list[Invocation] = []
    pace = Pace()
    proc: subprocess.Popen[bytes] | None = None
    try:
        config = write_run_config(workdir / "run.toml", url, cfg)
        kills = 0
        for number in range(1, 3 * cfg.kills + 1):  # bounded even if runs keep ending on their own
            if kills >= cfg.kills:
                break
            committed = invocations[-1].committed_after if invocations else frozenset()
            stale = invocations[-1].temp_files_after if invocations else ()
            mode = rng.choices(KILL_MODES, KILL_MODE_WEIGHTS)[0]
            slot_s = pace.work_slot_s(cfg.rows - len(committed), cfg.kills - kills)
            run = Invocation(number, time.monotonic(), kill_mode=mode)
            proc = start_run(config, manifest, output, runs_log)
            if mode == "start-up":
                run.killed = kill_after(proc, rng.uniform(0.0, 1.2 * pace.startup_s), log)
            elif mode == "mid-run":
                run.killed = kill_after(proc, pace.startup_s + rng.uniform(0.0, 2 * slot_s), log)
            else:  # the first part written: the journal's rows at start-up, or a part of the run's own
                watch_s = pace.startup_s + rng.uniform(0.0, 2 * slot_s) + WRITE_WATCH_S
                wait_for_temp_file(output, proc, watch_s, stale)
                run.killed = kill_after(proc, 0.0, log)
            run.was_killed = run.killed is not None
            run.ended, run.exit_code = time.monotonic(), proc.returncode
            run.temp_files_after = tuple(temp_files(output))
            counts = committed_id_counts(output)
            run.committed_after = frozenset(counts)
            run.journalled_after = journalled_ids(output)
            invocations.append(run)
            kills += run.was_killed
            arrivals = arrivals_since(log, run.started)
            startup_s = arrivals[0] - run.started if arrivals else None
            pace.observe(startup_s, len(arrivals), run.ended - run.started)
            if say:
                print(
                    f"run {number:3d}: {mode:10s} {'killed' if run.was_killed else f'exit {run.exit_code}':8s}"
                    f" after {run.ended - run.started:5.2f} s; {len(counts):5d} rows committed,"
                    f" {len(run.journalled_after):4d} journalled"
                    f"{'; left ' + ', '.join(run.temp_files_after) if run.temp_files_after else ''}",
                    flush=True,
                )
        final = Invocation(len(invocations) + 1, time.monotonic())
        proc = start_run(config, manifest, output, runs_log)
        try:
            final.exit_code = proc.wait(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            final.exit_code = proc.wait()
        final.ended = time.monotonic()
        final.committed_after = frozenset(committed_id_counts(output))
        invocations.append(final)
    finally:
        if proc is not None and proc.poll() is None:  # interrupted between a start and its kill
            proc.kill()
            proc.wait()
        stop(emulator)
    figures = verify(ids, invocations, output, log)
    figures.concurrency = cfg.concurrency
    figures.runtime_s = time.monotonic() - began
    return figures


# --- verdict -------------------------------------------------------------------------------------------


def verify(ids: Sequence[str], invocations: Sequence[Invocation], output: Path, log: Path) -> Figures:
    """Compare what the manifest asked for, what the part files hold, and what the emulator was paid."""
    figures = Figures(rows=len(ids), runs=len(invocations))
    killed = [run for run in invocations if run.was_killed]
    figures.kills = len(killed)
    figures.kills_by_mode = Counter(run.kill_mode or "" for run in killed)
    left_before: set[str] = set()
    for run in invocations:  # a kill before the next start's clean-up leaves the same file again
        figures.kills_leaving_temp += run.was_killed and bool(set(run.temp_files_after) - left_before)
        left_before = set(run.temp_files_after)
    figures.final_exit_code = invocations[-1].exit_code

    counts = committed_id_counts(output)
    wanted = set(ids)
    figures.committed = sum(counts.values())
    figures.by_status = committed_statuses(output)
    figures.duplicates = sum(n - 1 for n in counts.values() if n > 1)
    figures.missing = len(wanted - counts.keys())
    figures.unknown_ids = len(counts.keys() - wanted)
    figures.temp_files_left = len(temp_files(output))
    before: frozenset[str] = frozenset()
    for run in invocations:
        figures.rows_lost_by_a_kill += len(before - run.committed_after)
        before = run.committed_after

    logged = read_request_log(log)
    figures.requests_by_status = Counter(entry.status for entry in logged)
    figures.requests = len(logged)
    paid = [entry for entry in logged if entry.is_paid]
    figures.paid = len(paid)
    starts = [run.started for run in invocations]

    def run_of(entry: Logged) -> int:
        return max(bisect.bisect_right(starts, entry.at) - 1, 0)

    paid_in_run: dict[str, Counter[int]] = defaultdict(Counter)  # row id -> run index -> paid requests
    for request in paid:
        assert request.row_id is not None
        paid_in_run[request.row_id][run_of(request)] += 1

    hits: Counter[str] = Counter()  # row id -> kills that caught it paid but not yet committed
    resent: Counter[int] = Counter()  # run index -> rows paid in it and lost to its kill
    for row_id, per_run in paid_in_run.items():
        for index, n in per_run.items():
            run = invocations[index]
            already = invocations[index - 1].committed_after if index > 0 else frozenset()
            figures.paid_twice_in_one_run += n > 1
            figures.paid_after_commit += row_id in already
            if run.was_killed and row_id not in run.committed_after:
                hits[row_id] += 1
                resent[index] += 1
        total = sum(per_run.values())
        figures.max_paid_per_row = max(figures.max_paid_per_row, total)
        figures.rows_paid_more_than_once += total > 1
        figures.rows_over_bound += total > 1 + hits[row_id]
    figures.extra_paid = figures.paid - len(paid_in_run)
    figures.max_kills_hitting_a_row = max(hits.values(), default=0)
    figures.kills_hitting_rows = len(resent)
    figures.uncommitted_per_kill = [resent[i] for i, run in enumerate(invocations) if run.was_killed]
    count_sent_again(figures, invocations, logged, run_of)
    return figures


def count_sent_again(
    figures: Figures,
    invocations: Sequence[Invocation],
    logged: Sequence[Logged],
    run_of: Callable[[Logged], int],
) -> None:
    """What each kill cost again: answered requests whose row a later run sent, and what was on the wire."""
    runs_sending: dict[str, set[int]] = defaultdict(set)  # row id -> runs that sent it, whatever the answer
    paid_runs: dict[str, Counter[int]] = defaultdict(Counter)
    in_flight: Counter[int] = Counter()
    sending: set[int] = set()  # killed runs that had sent a request when the kill came
    for entry in logged:
        index = run_of(entry)
        killed = invocations[index].killed
        if killed is not None and entry.at < killed.at:
            sending.add(index)
            in_flight[index] += entry.end > killed.log_bytes
        if entry.row_id is not None:
            runs_sending[entry.row_id].add(index)
            paid_runs[entry.row_id][index] += entry.is_paid

    sent_again: Counter[int] = Counter()  # run index -> its 200s whose row a later run sent
    ends = [entry.end for entry in logged]
    for position, entry in enumerate(logged):
        if entry.status != ANSWERED or entry.row_id is None:
            continue
        index = run_of(entry)
        later = [j for j in runs_sending[entry.row_id] if j > index]
        if not later:
            continue
        sent_again[index] += 1
        figures.paid_again += paid_runs[entry.row_id][min(later)] > 0
        killed = invocations[index].killed
        if killed is not None and entry.end > killed.log_bytes:
            figures.answered_after_kill_sent_again += 1
        else:
            figures.answered_before_kill_sent_again += 1
            if killed is not None:  # how close to the kill: 0 when it was the last answer before it
                figures.lines_from_answer_to_kill.append(
                    bisect.bisect_right(ends, killed.log_bytes) - 1 - position
                )

    for row_id, indexes in runs_sending.items():
        figures.journalled_sent_again += any(
            row_id in run.journalled_after and any(j > i for j in indexes)
            for i, run in enumerate(invocations)
            if run.was_killed
        )
    figures.answered_sent_again = sum(sent_again.values())
    killed_runs = [i for i, run in enumerate(invocations) if run.was_killed]
    figures.answered_sent_again_per_kill = [sent_again[i] for i in killed_runs]
    figures.in_flight_per_kill = [in_flight[i] for i in killed_runs]
    figures.in_flight_while_sending = [in_flight[i] for i in killed_runs if i in sending]
    figures.journalled_per_kill = [len(invocations[i].journalled_after) for i in killed_runs]


def spread(values: Sequence[int]) -> str:
    return f"median {statistics.median(values):g}, mean {statistics.fmean(values):.1f}, max {max(values)}"


def format_figures(f: Figures, cfg: ChaosConfig) -> str:
    """The figures block: one aligned line per figure, the verdict last."""
    modes = ", ".join(f"{f.kills_by_mode[m]} {m}" for m in KILL_MODES)
    statuses = ", ".join(f"{n} {s}" for s, n in sorted(f.by_status.items()))
    codes = ", ".join(f"{n}×{s}" for s, n in sorted(f.requests_by_status.items()))
    uncommitted = f.uncommitted_per_kill or [0]
    journalled = f.journalled_per_kill or [0]
    in_flight = f.in_flight_per_kill or [0]
    sending = f.in_flight_while_sending or [0]
    close_to_kill = (
        f" (answers the emulator logged after each, before the SIGKILL: {f.lines_from_answer_to_kill})"
        if f.lines_from_answer_to_kill
        else ""
    )
    again = f.answered_sent_again_per_kill or [0]
    bound = f"{f.kills} × {cfg.concurrency} = {f.kills * cfg.concurrency}"
    goal = f"{f.answered_sent_again}, {'PASS' if f.meets_goal else 'FAIL'}"
    figures = [
        ("kills", f"{f.kills} ({modes}) over {f.runs} runs"),
        ("kills during a write", f"{f.kills_leaving_temp} (left a temp file; the next start removed it)"),
        ("kills that hit paid rows", f"{f.kills_hitting_rows} (paid rows not in a part after the kill)"),
        ("rows", f"{f.rows}"),
        ("committed rows", f"{f.committed} ({statuses})"),
        ("duplicates", f"{f.duplicates}"),
        ("missing", f"{f.missing}"),
        ("ids not in the manifest", f"{f.unknown_ids}"),
        ("temp files left", f"{f.temp_files_left}"),
        ("committed rows lost", f"{f.rows_lost_by_a_kill} (checked after every kill)"),
        ("requests", f"{f.requests} ({codes}; status 0 = dropped)"),
        ("paid requests", f"{f.paid}"),
        ("extra paid", f"{f.extra_paid} (paid requests beyond one per row)"),
        ("rows paid more than once", f"{f.rows_paid_more_than_once}"),
        (
            "max paid per row",
            f"{f.max_paid_per_row} (most kills that hit one row: {f.max_kills_hitting_a_row})",
        ),
        ("rows over 1 + kills", f"{f.rows_over_bound}"),
        ("paid twice in one run", f"{f.paid_twice_in_one_run}"),
        ("paid after commit", f"{f.paid_after_commit}"),
        ("paid, not in a part", f"{spread(uncommitted)} per kill (all sent again before the journal)"),
        ("in the journal", f"{spread(journalled)} per kill (ids in complete lines after the kill)"),
        ("in flight at a kill", f"{spread(in_flight)} (arrived before the SIGKILL, answered after it)"),
        ("  kills while sending", f"{len(f.in_flight_while_sending)}: in flight {spread(sending)}"),
        ("answered, sent again", f"{f.answered_sent_again} in all; {spread(again)} per kill"),
        ("  answered after the kill", f"{f.answered_after_kill_sent_again} (on the wire when it came)"),
        ("  answered before it", f"{f.answered_before_kill_sent_again}{close_to_kill}"),
        ("  paid again", f"{f.paid_again} (by the next run that sent the row)"),
        ("journalled, sent again", f"{f.journalled_sent_again}"),
        ("goal", f"answered and sent again ≤ kills × concurrency = {bound}: {goal}"),
        ("final run exit code", f"{f.final_exit_code}"),
        ("runtime", f"{f.runtime_s:.1f} s"),
    ]
    header = (
        f"chaos: {f.rows} rows, emulator latency {cfg.latency_s} s, {cfg.fault_rate:.0%} 500s, "
        f"{cfg.drop_rate:.1%} dropped connections; concurrency {cfg.concurrency}, rows_per_part "
        f"{cfg.rows_per_part}, flush_seconds {cfg.flush_seconds:g}"
    )
    verdict = "PASS" if not f.failures else "FAIL: " + "; ".join(f.failures)
    return "\n".join([header, *(f"  {name:26s}{value}" for name, value in figures), f"result: {verdict}"])


def parse_args(argv: Iterable[str] | None = None) -> tuple[ChaosConfig, Path]:
    defaults = ChaosConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=defaults.rows)
    parser.add_argument("--kills", type=int, default=defaults.kills, help="SIGKILLs of a live run, at least")
    parser.add_argument(
        "--latency", type=float, default=defaults.latency_s, help="emulator seconds per answer"
    )
    parser.add_argument("--fault-rate", type=float, default=defaults.fault_rate)
    parser.add_argument("--drop-rate", type=float, default=defaults.drop_rate)
    parser.add_argument("--concurrency", type=int, default=defaults.concurrency)
    parser.add_argument("--rows-per-part", type=int, default=defaults.rows_per_part)
    parser.add_argument("--flush-seconds", type=float, default=defaults.flush_seconds)
    parser.add_argument("--seed", type=int, default=defaults.seed, help="kill moments and emulator faults")
    parser.add_argument("--workdir", type=Path, default=Path("out/chaos"), help="emptied first, kept after")
    args = parser.parse_args(None if argv is None else list(argv))
    cfg = ChaosConfig(
        rows=args.rows, kills=args.kills, latency_s=args.latency, fault_rate=args.fault_rate,
        drop_rate=args.drop_rate, concurrency=args.concurrency, rows_per_part=args.rows_per_part,
        flush_seconds=args.flush_seconds, seed=args.seed,
    )  # fmt: skip
    return cfg, args.workdir


def main(argv: Iterable[str] | None = None) -> int:
    cfg, workdir = parse_args(argv)
    figures = chaos(cfg, workdir)
    print(format_figures(figures, cfg))
    print(f"(runs' stderr: {workdir / 'runs.log'}; requests: {workdir / 'requests.jsonl'})")
    return 1 if figures.failures else 0


if __name__ == "__main__":
    sys.exit(main())
