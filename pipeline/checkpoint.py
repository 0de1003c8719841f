"""Which ids are committed, the run's identity file, and the rules for resuming an output.

The output folder is the checkpoint: a row is done when a part file holding it has been renamed into
place (see sink.py). Resume reads only the ``id`` column of the committed parts.
"""

from __future__ import annotations

import hashlib
import json
import platform
import secrets
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from pipeline.config import RunConfig
from pipeline.records import ConfigError
from pipeline.sink import RUN_FILE, TEMP_PREFIX, part_files, write_json_atomic

IDENTITY_FORMAT = 1


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


def settings_of(cfg: RunConfig) -> Settings:
    ep, req = cfg.endpoint, cfg.request
    return Settings(ep.provider, ep.model, req.system_prompt, req.prompt, req.detail, req.max_tokens, req.temperature)


def fingerprint(value: Any) -> str:
    """A short stable digest of a JSON-able value."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def manifest_fingerprint(path: Path) -> dict[str, Any]:
    """Identify a manifest cheaply (path, size, modification time); it may grow between nightly runs."""
    stat = path.stat()
    return {"path": str(path.resolve()), "bytes": stat.st_size if path.is_file() else None, "mtime": stat.st_mtime}


def new_run_id(now: float) -> str:
    """A run id that sorts by start time: part files of later runs sort after earlier ones."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now)) + "-" + secrets.token_hex(3)


def remove_temp_files(output: Path) -> int:
    """Delete part files a killed run left half-written; returns how many."""
    stale = list(output.glob(f"{TEMP_PREFIX}*"))
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def committed_ids(output: Path) -> set[str]:
    """The ids of every committed row (reads only the id column)."""
    ids: set[str] = set()
    for path in part_files(output):
        ids.update(pq.read_table(path, columns=["id"]).column("id").to_pylist())
    return ids


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("vision-pipeline", "aiohttp", "pyarrow"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "unknown"
    return versions


def open_output(output: Path, cfg: RunConfig, manifest: Path, run_id: str, now: float) -> set[str]:
    """Prepare `output` for a run and return the ids already committed there.

    Creates the folder, removes temp files of a killed run, refuses an output whose rows were made with
    other settings (ConfigError naming what changed), and records this run in ``_run.json``.
    """
    output.mkdir(parents=True, exist_ok=True)
    remove_temp_files(output)
    settings = asdict(settings_of(cfg))
    identity_path = output / RUN_FILE
    previous: dict[str, Any] = {}
    if identity_path.exists():
        previous = json.loads(identity_path.read_text(encoding="utf-8"))
        changed = sorted(k for k, v in settings.items() if previous.get("settings", {}).get(k) != v)
        if changed and part_files(output):
            raise ConfigError(
                f"{output}: was made with other settings ({', '.join(changed)} changed in {cfg.source}); "
                "use another --output"
            )
    identity = {
        "format": IDENTITY_FORMAT,
        "settings": settings,
        "config_fingerprint": fingerprint(settings),
        "manifest": {**manifest_fingerprint(manifest), "fingerprint": fingerprint(manifest_fingerprint(manifest))},
        "versions": _versions(),
        "runs": [*previous.get("runs", []), {"run_id": run_id, "started_at": now, "config": cfg.source}],
    }
    write_json_atomic(identity_path, identity)
    return committed_ids(output)
