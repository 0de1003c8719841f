"""Which Ray the run uses, and cleaning up a local one that a killed run left behind.

- ``--ray-address ADDRESS`` (``auto``: the cluster this machine belongs to): that cluster; the run only
  disconnects at the end.
- A program that has already called ``ray.init`` (the tests): that Ray, left running.
- Otherwise a local Ray that the run starts, and stops however the driver ends. Its processes (the GCS
  server, the raylet and their agents: the driver's descendants once Ray is up) are recorded in
  ``OUTPUT/_ray.json`` with their start times. Ray stops most of them when the driver dies, but not all
  (the dashboard and runtime-env agents outlive a SIGKILLed driver); the next run on the output stops
  every recorded process that is still the same process (same pid and start time), then removes the file.

Workers' own output is not copied to the driver (``log_to_driver=False``): stdout stays the summary's, as
``--log-format json`` promises; it is in Ray's session logs (``/tmp/ray/session_*/logs/worker-*``).

Ray is imported inside the functions only: the package imports without the extra.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.records import ConfigError
from pipeline.sink import write_json_atomic

log = logging.getLogger(__name__)

RAY_FILE = "_ray.json"
STOP_WAIT_S = 5.0  # how long a left-over Ray process gets to exit on SIGTERM before SIGKILL


def import_ray() -> Any:
    """The ray module, or ConfigError saying how to install the extra."""
    try:
        import ray
    except ImportError:
        raise ConfigError(
            "--engine ray: Ray is not installed; `make ray-demo` installs it into .venv, "
            "or `pip install -c requirements.lock -r requirements-ray.lock` then `pip install -e '.[ray]'`"
        ) from None
    return ray


@contextlib.contextmanager
def connected(address: str | None, output: Path) -> Iterator[Any]:
    """Ray, connected for the run (see the module docstring); yields the ray module."""
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    if address is not None:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        try:
            yield ray
        finally:
            ray.shutdown()
        return
    stop_leftover_ray(output)
    ray.init(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    try:
        write_json_atomic(
            output / RAY_FILE,
            {
                "gcs_address": ray.get_runtime_context().gcs_address,
                "driver_pid": os.getpid(),
                "processes": [
                    {"pid": pid, "start": _start_ticks(pid), "name": _name(pid)}
                    for pid in _descendants(os.getpid())
                ],
            },
        )
        yield ray
    finally:
        ray.shutdown()
        (output / RAY_FILE).unlink(missing_ok=True)


def stop_leftover_ray(output: Path) -> int:
    """Stop the processes of a local Ray a killed run on `output` started; returns how many were running."""
    record_path = output / RAY_FILE
    if not record_path.exists():
        return 0
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        processes = [(int(p["pid"]), int(p["start"])) for p in record.get("processes", [])]
    except (ValueError, KeyError, TypeError) as err:
        log.warning("%s: unreadable (%s); stop its Ray by hand as the README says", record_path, err)
        return 0
    alive = [pid for pid, start in processes if _start_ticks(pid) == start]
    if alive:
        log.warning("stopping %d processes of the local Ray a killed run left: %s", len(alive), alive)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + STOP_WAIT_S
        while alive and time.monotonic() < deadline:
            alive = [pid for pid, start in processes if pid in alive and _is_running(pid, start)]
            time.sleep(0.1)  # other processes' exit: nothing to await
    record_path.unlink(missing_ok=True)
    return len(processes)


def _is_running(pid: int, start: int) -> bool:
    if _start_ticks(pid) != start:
        return False
    with contextlib.suppress(OSError):
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[0]
        return state != "Z"  # a zombie has exited: its parent has not reaped it yet
    return False


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(") ", 1)[1].split()  # the name in parentheses may hold spaces


def _start_ticks(pid: int) -> int | None:
    """When the process started (clock ticks after boot): a pid reused by another process differs."""
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[19])


def _name(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")[-80:]
    return "?"


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat_fields(int(entry.name))) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found
