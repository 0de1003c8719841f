"""Cleaning up after a killed Ray run: the processes recorded in ``_ray.json`` are stopped by the next run,
and nothing else is. Runs without Ray: the record is plain JSON of pids and start times."""

from __future__ import annotations

import json
import subprocess
import sys

from pipeline.ray_cluster import RAY_FILE, _start_ticks, stop_leftover_ray


def test_the_next_run_stops_what_a_killed_run_s_local_ray_left_and_only_that(tmp_path):
    left = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    record = {
        "processes": [
            {"pid": left.pid, "start": _start_ticks(left.pid), "name": "raylet"},
            {"pid": other.pid, "start": -1, "name": "a pid reused by someone else"},
        ]
    }
    (tmp_path / RAY_FILE).write_text(json.dumps(record))

    stop_leftover_ray(tmp_path)

    try:
        assert left.wait(timeout=10) != 0  # stopped by a signal
        assert other.poll() is None  # its start time differs: not the recorded process
        assert not (tmp_path / RAY_FILE).exists()
    finally:
        other.kill()
        other.wait()
