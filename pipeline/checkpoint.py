"""Which ids are committed, the run's identity file, and the rules for resuming an output.

The output folder is the checkpoint: a row is done when a part file holding it has been renamed into
place (see sink.py). Resume reads only the ``id`` column of the committed parts.

Retrying failed rows (``--retry-failed``) commits a newer row for an id that already has one. The
newest row wins: ``compact`` rewrites each older part without its superseded rows, replacing the file
in one rename, so readers see one row per id. It runs at the end of a run and, in case a kill came
between the new part and the compaction, at the start of the next.

A run whose settings differ from the output's is refused; ``--new-run`` moves the old rows into
``_generations/<run id>/`` (readers skip folders starting with "_") and starts afresh.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import RunConfig
from pipeline.idset import IdSet
from pipeline.records import FAILED_STATUSES, ConfigError
from pipeline.sink import (
    RUN_FILE,
    STATS_FILE,
    TEMP_PREFIX,
    fsync_dir,
    part_files,
    write_json_atomic,
    write_part,
)

IDENTITY_FORMAT = 1
ID_READ_THREADS = 4  # part files whose id column is read at once when a run resumes


@dataclass(frozen=True, slots=True)
class Settings:
    """What decides a row's answer: changing any of these makes old and new rows incomparable."""

    provider: str
    model: str
    system_prompt: str
    prompt: str
    detail: str
    max_tokens: int
    temperature: float
    # json_object, or json_schema and the schema's fingerprint; None (what outputs made before it hold) for text
    answer_format: str | None = None


def settings_of(cfg: RunConfig, answer_format: str | None = None) -> Settings:
    ep, req = cfg.endpoint, cfg.request
    return Settings(
        ep.provider,
        ep.model,
        req.system_prompt,
        req.prompt,
        req.detail,
        req.max_tokens,
        req.temperature,
        answer_format,
    )


def fingerprint(value: Any) -> str:
    """A short stable digest of a JSON-able value."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def manifest_fingerprint(path: Path) -> dict[str, Any]:
    """Identify a manifest cheaply (path, size, modification time); it may grow between nightly runs."""
    stat = path.stat()
    return {
        "path": str(path.resolve()),
        "bytes": stat.st_size if path.is_file() else None,
        "mtime": stat.st_mtime,
    }


def new_run_id(number: int, now: float) -> str:
    """A run id that sorts by run: part files of later runs sort after earlier ones, which is how
    compaction knows the newest row of an id. `number` counts the output's runs from 1."""
    return f"{number:06d}-" + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))


LOCK_FILE = ".lock"


@contextlib.contextmanager
def output_lock(output: Path) -> Iterator[None]:
    """Hold the output for this run alone: two runs writing one output would duplicate rows.

    An advisory lock (flock) that the kernel releases when the process dies, however it dies.
    Raises ConfigError when another run holds it.
    """
    output.mkdir(parents=True, exist_ok=True)
    with open(output / LOCK_FILE, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise ConfigError(
                f"{output}: another run is writing to it (pid {holder}); wait for it to end"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def remove_temp_files(output: Path) -> int:
    """Delete part files a killed run left half-written; returns how many."""
    stale = list(output.glob(f"{TEMP_PREFIX}*"))
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def committed_ids(output: Path) -> IdSet:
    """The ids of every committed row (reads only the id column)."""
    ids = IdSet()
    # A few files at once (Parquet decodes without the GIL), each on one thread: a dataset reads in
    # parallel too, but holds ~40 MB more.
    with ThreadPoolExecutor(ID_READ_THREADS, thread_name_prefix="committed-ids") as pool:
        for column in pool.map(_id_column, part_files(output)):
            ids.add_column(column)
    len(ids)  # sorts them now, so that the buffers read and sorted go back to the system below
    pa.default_memory_pool().release_unused()  # Arrow's allocator keeps freed pages unless told
    return ids


def _id_column(path: Path) -> pa.ChunkedArray:
    return pq.ParquetFile(path).read(columns=["id"], use_threads=False).column("id")


def committed_rows(output: Path) -> int:
    """How many rows the committed parts hold (from their footers; no data is read)."""
    return sum(pq.read_metadata(path).num_rows for path in part_files(output))


def failed_ids(output: Path) -> set[str]:
    """The ids whose committed row failed: error, refused or invalid_output (reads the id and status columns)."""
    ids: set[str] = set()
    failed = pa.array(FAILED_STATUSES)
    for path in part_files(output):
        table = pq.read_table(path, columns=["id", "status"])
        ids.update(table.filter(pc.is_in(table.column("status"), failed)).column("id").to_pylist())
    return ids


def compact(output: Path) -> int:
    """Keep only the newest row of each id; returns how many superseded rows were removed.

    Parts sort oldest first by name. Each older part holding a superseded row is rewritten without it
    under the same name (temp file, fsync, rename), or removed when nothing of it is left.
    """
    parts = part_files(output)
    total = committed_rows(output)
    newest: dict[str, int] = {}
    for index, path in enumerate(parts):
        for row_id in pq.read_table(path, columns=["id"]).column("id").to_pylist():
            newest[row_id] = index
    if len(newest) == total:
        return 0  # the common case: nothing was retried
    removed = 0
    for index, path in enumerate(parts):
        table = pq.read_table(path)
        keep = pa.array([newest[row_id] == index for row_id in table.column("id").to_pylist()], pa.bool_())
        kept = table.filter(keep)
        if kept.num_rows == table.num_rows:
            continue
        removed += table.num_rows - kept.num_rows
        if kept.num_rows:
            write_part(output, path.name, kept)
        else:
            path.unlink()
            fsync_dir(output)
    return removed


def start_new_generation(output: Path, previous_run: str) -> Path:
    """Move the committed rows and run files of `output` aside, under _generations/; returns the folder."""
    folder = output / "_generations" / previous_run
    folder.mkdir(parents=True, exist_ok=True)
    for path in [*part_files(output), output / RUN_FILE, output / STATS_FILE]:
        if path.exists():
            path.rename(folder / path.name)
    fsync_dir(output)
    return folder


@dataclass(frozen=True, slots=True)
class Resume:
    """What an output holds at the start of a run."""

    run_id: str
    skip: IdSet  # ids not to send again
    retrying: int  # failed rows that will be sent again (--retry-failed)
    compacted: int  # superseded rows removed at start-up (a kill came before the last compaction)
    archived: Path | None  # where --new-run moved the previous generation


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("vision-pipeline", "aiohttp", "pyarrow"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "unknown"
    return versions


def open_output(
    output: Path,
    cfg: RunConfig,
    manifest: Path,
    now: float,
    *,
    retry_failed: bool = False,
    new_run: bool = False,
    answer_format: str | None = None,
) -> Resume:
    """Prepare `output` for a run and say which ids to skip. Blocking.

    Creates the folder, removes temp files of a killed run, finishes an interrupted compaction,
    refuses an output whose rows were made with other settings (ConfigError naming what changed)
    unless `new_run` moves them aside, and records this run in ``_run.json``.
    """
    output.mkdir(parents=True, exist_ok=True)
    remove_temp_files(output)
    settings = asdict(settings_of(cfg, answer_format))
    identity_path = output / RUN_FILE
    previous: dict[str, Any] = {}
    archived = None
    if identity_path.exists():
        previous = json.loads(identity_path.read_text(encoding="utf-8"))
        changed = sorted(k for k, v in settings.items() if previous.get("settings", {}).get(k) != v)
        if changed and part_files(output):
            if not new_run:
                raise ConfigError(
                    f"{output}: its rows were made with other settings ({', '.join(changed)} differ in "
                    f"{cfg.source}); use another --output, or --new-run to set the old rows aside"
                )
            last_run = (previous.get("runs") or [{"run_id": "unknown"}])[-1]["run_id"]
            archived = start_new_generation(output, last_run)
            previous = {}
    skip = committed_ids(output)
    compacted = compact(output) if skip.repeats else 0  # an id in two parts: a retry not yet compacted
    runs = previous.get("runs", [])
    run_id = new_run_id(len(runs) + 1, now)
    identity = {
        "format": IDENTITY_FORMAT,
        "settings": settings,
        "config_fingerprint": fingerprint(settings),
        "manifest": {
            **manifest_fingerprint(manifest),
            "fingerprint": fingerprint(manifest_fingerprint(manifest)),
        },
        "versions": _versions(),
        "runs": [*runs, {"run_id": run_id, "started_at": now, "config": cfg.source}],
    }
    write_json_atomic(identity_path, identity)
    retrying = failed_ids(output) if retry_failed else set()
    skip.difference_update(retrying)  # in place: a copy of a million ids costs tens of MB
    return Resume(run_id, skip, len(retrying), compacted, archived)
