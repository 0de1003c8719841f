"""Small fixtures: images on disk, manifests, a real emulator on 127.0.0.1, configs that point at it."""

from __future__ import annotations

import base64
import contextlib
import csv
import dataclasses
import json
import struct
import subprocess
import sys
import textwrap
import zlib
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings
from PIL import Image

from pipeline.config import EmulatorConfig, RunConfig, config_from_mapping
from pipeline.emulator import Emulator

# Examples are judged on what they return, never on how long they took: on a busy 2-core machine the first
# example (tables loading) can pass Hypothesis's 200 ms deadline, and timing belongs to the benchmarks.
settings.register_profile("vision-pipeline", deadline=None)
settings.load_profile("vision-pipeline")

TEST_KEY = "test-key-7f3a9c1e5b2d4f6a8c0e"  # what a leak would look like: tests grep outputs for it
KEY_ENV = "VISION_PIPELINE_TEST_KEY"
ROOT = Path(__file__).resolve().parent.parent
# A 64×48 HEIC, left half red and right half blue, as an iPhone would store it (ftyp heic, HEVC inside).
# Made once with pillow-heif 1.8.1's encoder, which this project does not install: it reads, never writes.
TINY_HEIC = base64.b64decode(
    "AAAAHGZ0eXBoZWljAAAAAG1pZjFoZWljbWlhZgAAAX1tZXRhAAAAAAAAACFoZGxyAAAAAAAAAABwaWN0AAAAAAAAAAAAAAAAAAAAACJpbG9j"
    "AAAAAERAAAEAAQAAAAABoQABAAAAAAAAAGoAAAAjaWluZgAAAAAAAQAAABVpbmZlAgAAAAABAABodmMxAAAAAA5waXRtAAAAAAABAAAA/Wlw"
    "cnAAAADdaXBjbwAAAHZodmNDAQNwAAAAkAAAAAAAHvAA/P34+AAADwNgAAEAGEABDAH//wNwAAADAJAAAAMAAAMAHroCQGEAAQAqQgEBA3AA"
    "AAMAkAAAAwAAAwAeoCCBBZbq5Ka5uAhoMCAAAAMDIAAAAwAhYgABAAZEAcFzwIkAAAATY29scm5jbHgAAQANAAaAAAAAFGlzcGUAAAAAAAAA"
    "QAAAAEAAAAAoY2xhcAAAAEAAAAABAAAAMAAAAAEAAAAAAAAAAv////AAAAACAAAAEHBpeGkAAAAAAwgICAAAABhpcG1hAAAAAAAAAAEAAQWB"
    "AgMFhAAAAHJtZGF0AAAAZigBrxOA+BDhp//8TSj/+nXPD9PMiYn/+tNSR/hUO//WicPySkWzrHl9nv8H4h1KpEq3xpK+HfM2sf+d4tvFAhne"
    "Iy6JZXLEP+zlxMa+qdw77mN6fapRbf83mqG4xuGn3Gx6O58SuA=="
)


def make_image(path: Path, size: tuple[int, int] = (64, 48), fmt: str = "PNG", color: str = "teal") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)
    return path


def png_header_only(width: int, height: int) -> bytes:
    """A PNG declaring `width`×`height` with no pixel data: decoding it would fail, opening it works."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


def in_fresh_python(code: str) -> Any:
    """Run `code` in a new interpreter, where nothing is imported yet, and return the JSON it prints last.

    For what importing a module does to the process: this one has long imported everything.
    """
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture
def images_manifest(tmp_path: Path) -> Callable[..., Path]:
    """Write `n` small images and a CSV manifest of them; returns the manifest path."""

    def build(n: int = 6, **columns: Any) -> Path:
        rows = []
        for i in range(n):
            make_image(tmp_path / "images" / f"img{i}.png", (64 + 8 * i, 48 + 4 * i))
            rows.append({"id": f"row-{i}", "image": f"images/img{i}.png", **columns})
        return write_csv(tmp_path / "manifest.csv", rows)

    return build


@pytest.fixture
async def emulator() -> AsyncIterator[Emulator]:
    async with Emulator(EmulatorConfig(), api_key=TEST_KEY, deployment="vision", model="gpt-4-turbo") as emu:
        yield emu


@pytest.fixture
def key_in_env(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(KEY_ENV, TEST_KEY)
    return TEST_KEY


def azure_config(emulator: Emulator, **sections: dict[str, Any]) -> RunConfig:
    """A config for the Azure route of a running emulator, with fast retries; `sections` override."""
    raw: dict[str, dict[str, Any]] = {
        "endpoint": {
            "provider": "azure",
            "url": emulator.url,
            "deployment": "vision",
            "api_key_env": KEY_ENV,
        },
        "limits": {
            "tokens_per_minute": 10_000_000,
            "concurrency": 4,
            "backoff_initial_s": 0.0,
            "max_attempts": 4,
        },
        "output": {"rows_per_part": 2},
    }
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return config_from_mapping(raw, source="test.toml")


def with_limits(cfg: RunConfig, **values: Any) -> RunConfig:
    return dataclasses.replace(cfg, limits=dataclasses.replace(cfg.limits, **values))


POOL_QUOTAS_TPM = (6_000_000, 12_000_000, 18_000_000)  # three quotas no test run comes near
POOL_NAMES = ("eastus", "westus", "sweden")


@pytest.fixture
async def emulator_pool() -> AsyncIterator[list[Emulator]]:
    """Three emulators of one deployment, each with its own quota (as three Azure regions would be)."""
    async with contextlib.AsyncExitStack() as stack:
        emulators = [
            await stack.enter_async_context(
                Emulator(
                    EmulatorConfig(tokens_per_minute=tpm, latency_s=0.05),
                    api_key=TEST_KEY,
                    deployment="vision",
                    model="gpt-4-turbo",
                )
            )
            for tpm in POOL_QUOTAS_TPM
        ]
        yield emulators


def pool_config(emulators: Sequence[Emulator], **sections: dict[str, Any]) -> RunConfig:
    """A config whose [[endpoints]] are the running `emulators` (named POOL_NAMES), with fast retries;
    `sections` override, and `endpoints=[{...}, ...]` overrides each endpoint's keys."""
    overrides = sections.pop("endpoints", [{}] * len(emulators))
    endpoints = [
        {
            "name": POOL_NAMES[n],
            "provider": "azure",
            "url": emu.url,
            "deployment": "vision",
            "api_key_env": KEY_ENV,
            "tokens_per_minute": POOL_QUOTAS_TPM[n],
            **overrides[n],
        }
        for n, emu in enumerate(emulators)
    ]
    raw: dict[str, Any] = {
        "endpoints": endpoints,
        "limits": {"concurrency": 6, "backoff_initial_s": 0.0, "max_attempts": 3},
        "output": {"rows_per_part": 4},
    }
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return config_from_mapping(raw, source="pool.toml")
