"""Exactly once under SIGKILL: the real CLI, killed for real, against the standalone emulator on 127.0.0.1.

The small sibling of ``make chaos`` (bench/chaos.py, whose reader and verdict it shares): four kills at
chosen moments, then one run to completion, checked by pyarrow over the part files and by the
emulator's request log, never by the pipeline's own code.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("chaos", Path(__file__).parents[1] / "bench" / "chaos.py")
assert _spec is not None and _spec.loader is not None
chaos = importlib.util.module_from_spec(_spec)
sys.modules["chaos"] = chaos  # dataclasses look their module up while the class is made
_spec.loader.exec_module(chaos)

MOMENTS = ("start-up", "first answer paid", "after a commit", "part write")
STARTUP_KILL_S = 0.3
PART_TEMP_PREFIX = chaos.TEMP_PREFIX + "part-"  # not .tmp-_run.json, written at start-up
POLL_S = 0.002  # another process's progress can only be seen by looking: there is no event to await
MOMENT_TIMEOUT_S = 15.0


def answers_logged_since(log: Path, since: float) -> int:
    if not log.exists():
        return 0
    with open(log, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip() and json.loads(line)["at"] >= since)


def is_moment_to_kill(
    moment: str, run: chaos.Invocation, previous: chaos.Invocation | None, out: Path, log: Path
) -> bool:
    if moment == "start-up":  # the interpreter is importing, or the output is being opened
        return time.monotonic() - run.started > STARTUP_KILL_S
    if moment == "first answer paid":  # nothing of this run committed, its first answers in hand
        return answers_logged_since(log, run.started) > 0
    committed_before = previous.committed_after if previous else frozenset()
    if moment == "after a commit":  # a part of this run is in place, the next rows in flight or buffered
        return len(chaos.committed_id_counts(out)) > len(committed_before)
    stale = previous.temp_files_after if previous else ()
    writing = [name for name in chaos.temp_files(out) if name.startswith(PART_TEMP_PREFIX)]
    return any(name not in stale for name in writing)  # "part write": a part file is half-written


def kill_at(
    moment: str,
    proc: subprocess.Popen[bytes],
    run: chaos.Invocation,
    previous: chaos.Invocation | None,
    out: Path,
    log: Path,
) -> None:
    """SIGKILL the run as soon as `moment` comes; fail if the run ends or takes too long before it does."""
    deadline = time.monotonic() + MOMENT_TIMEOUT_S
    while not is_moment_to_kill(moment, run, previous, out, log):
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before the moment {moment!r}"
        assert time.monotonic() < deadline, f"the moment {moment!r} never came"
        time.sleep(POLL_S)
    run.killed = chaos.kill_after(proc, 0.0, log)
    run.was_killed = run.killed is not None


@pytest.mark.timeout(120)
def test_rerun_after_sigkills_commits_every_row_exactly_once_and_pays_at_most_once_per_kill(tmp_path):
    """Kills during start-up, once the first answers are paid for, after a part commits, and while a
    part is being written; each rerun resumes, and the last one completes."""
    cfg = chaos.ChaosConfig(
        rows=200, kills=4, latency_s=0.1, fault_rate=0.02, drop_rate=0.01, concurrency=8,
        rows_per_part=20, flush_seconds=0.5, seed=7,
    )  # fmt: skip
    manifest, ids = chaos.write_manifest(tmp_path, cfg.rows)
    output, log, runs_log = tmp_path / "out", tmp_path / "requests.jsonl", tmp_path / "runs.log"
    emulator, url = chaos.start_emulator(cfg, log, tmp_path / "emulator.log")
    config = chaos.write_run_config(tmp_path / "run.toml", url, cfg)
    invocations: list[chaos.Invocation] = []
    proc: subprocess.Popen[bytes] | None = None
    try:
        for number, moment in enumerate(MOMENTS, start=1):
            previous = invocations[-1] if invocations else None
            run = chaos.Invocation(number, time.monotonic(), kill_mode=moment)
            proc = chaos.start_run(config, manifest, output, runs_log)
            kill_at(moment, proc, run, previous, output, log)
            run.ended, run.exit_code = time.monotonic(), proc.returncode
            run.temp_files_after = tuple(chaos.temp_files(output))
            run.committed_after = frozenset(chaos.committed_id_counts(output))
            invocations.append(run)
        final = chaos.Invocation(len(invocations) + 1, time.monotonic())
        proc = chaos.start_run(config, manifest, output, runs_log)
        final.exit_code = proc.wait(timeout=60)
        final.committed_after = frozenset(chaos.committed_id_counts(output))
        invocations.append(final)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        chaos.stop(emulator)

    figures = chaos.verify(ids, invocations, output, log)

    assert figures.kills == 4, "a run ended before its kill: the test proved nothing about that moment"
    assert figures.final_exit_code in (0, 1), runs_log.read_text()[-2000:]
    assert (figures.duplicates, figures.missing, figures.unknown_ids) == (0, 0, 0)
    assert figures.committed == cfg.rows
    assert figures.temp_files_left == 0 and figures.rows_lost_by_a_kill == 0
    assert figures.paid_twice_in_one_run == 0 and figures.paid_after_commit == 0
    assert figures.rows_over_bound == 0
    assert figures.kills_hitting_rows >= 1, (
        "no kill caught a paid, uncommitted row: the resend path went untested"
    )
