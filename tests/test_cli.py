"""The command line as cron sees it: real processes, exit codes, one-line messages."""

from __future__ import annotations

import base64
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as ds
import pytest
from conftest import KEY_ENV, TEST_KEY, make_image, write_csv

CLI = [sys.executable, "-m", "pipeline"]


def start_emulator(*args: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [*CLI, "emulator", "--port", "0", "--api-key", TEST_KEY, "--deployment", "vision", *args],
        stdout=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline().strip()
    assert line.startswith("listening on http://127.0.0.1:"), line
    return proc, line.removeprefix("listening on ")


@pytest.fixture
def emulator_url():
    proc, url = start_emulator("--latency", "0.2")
    yield url
    proc.terminate()
    proc.wait(timeout=10)


def write_config(tmp_path: Path, url: str, **limits: object) -> Path:
    limits_toml = "\n".join(
        f"{k} = {v}" for k, v in {"concurrency": 2, "backoff_initial_s": 0, **limits}.items()
    )
    path = tmp_path / "run.toml"
    path.write_text(
        f'[endpoint]\nprovider = "azure"\nurl = "{url}"\ndeployment = "vision"\napi_key_env = "{KEY_ENV}"\n'
        f"[limits]\n{limits_toml}\n[output]\nrows_per_part = 1\nflush_seconds = 1\n"
    )
    return path


def manifest_of(tmp_path: Path, rows: int) -> Path:
    for i in range(rows):
        make_image(tmp_path / f"img{i}.png", (40 + i, 30))
    return write_csv(tmp_path / "m.csv", [{"id": f"r{i}", "image": f"img{i}.png"} for i in range(rows)])


def run_cli(*args: object, key: str = TEST_KEY, **kwargs) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, KEY_ENV: key}
    return subprocess.run(
        [*CLI, *map(str, args)], check=False, env=env, capture_output=True, text=True, timeout=60, **kwargs
    )


def test_the_standalone_emulator_prints_its_address_first():
    proc, url = start_emulator()
    try:
        assert url.startswith("http://127.0.0.1:") and int(url.rsplit(":", 1)[1]) > 0
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_a_bad_setting_exits_2_with_one_line_naming_file_and_key(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("[limits]\nconcurrency = -1\n")

    done = run_cli("run", config, "--manifest", manifest_of(tmp_path, 1), "--output", tmp_path / "out")

    assert done.returncode == 2
    assert done.stderr.strip() == f"error: {config}: limits.concurrency = -1: must be greater than 0"


def test_a_refused_key_exits_3_within_seconds_naming_the_variable(tmp_path, emulator_url):
    started = time.monotonic()

    done = run_cli(
        "run",
        write_config(tmp_path, emulator_url),
        "--manifest",
        manifest_of(tmp_path, 5),
        "--output",
        tmp_path / "out",
        key="wrong-key",
    )

    assert done.returncode == 3 and time.monotonic() - started < 5
    assert KEY_ENV in done.stdout + done.stderr and "wrong-key" not in done.stdout + done.stderr


def test_sigterm_exits_130_and_leaves_a_valid_dataset(tmp_path, emulator_url):
    args = [
        "run",
        write_config(tmp_path, emulator_url),
        "--manifest",
        manifest_of(tmp_path, 30),
        "--output",
        tmp_path / "out",
    ]
    proc = subprocess.Popen(
        [*CLI, *map(str, args)],
        env={**os.environ, KEY_ENV: TEST_KEY},
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 20
    while not list((tmp_path / "out").glob("part-*.parquet")) and time.monotonic() < deadline:
        time.sleep(0.05)  # waiting on another process: there is nothing to await

    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=30)

    assert proc.returncode == 130 and "interrupted by SIGTERM" in stdout
    ids = ds.dataset(tmp_path / "out").to_table(columns=["id"]).column("id").to_pylist()
    assert 0 < len(ids) < 30 and len(ids) == len(set(ids))
    assert not list((tmp_path / "out").glob(".tmp-*"))


def _limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))


def test_an_output_that_cannot_be_written_exits_4_and_keeps_what_was_committed(tmp_path, emulator_url):
    """A file-size limit makes part writes fail as a full disk would; earlier parts stay readable."""
    config = write_config(tmp_path, emulator_url)
    manifest = manifest_of(tmp_path, 3)
    run_cli("run", config, "--manifest", manifest, "--output", tmp_path / "out", "--limit", "1")
    write_csv(
        tmp_path / "m.csv",
        [
            {"id": f"r{i}", "image": f"img{i}.png", "pad": base64.b64encode(os.urandom(30_000)).decode()}
            for i in range(3)
        ],
    )

    done = run_cli(
        "run", config, "--manifest", manifest, "--output", tmp_path / "out", preexec_fn=_limit_file_size
    )

    assert done.returncode == 4, done.stderr
    assert "cannot write to" in done.stdout
    assert ds.dataset(tmp_path / "out").to_table(columns=["id"]).column("id").to_pylist() == ["r0"]
    assert not list((tmp_path / "out").glob(".tmp-*"))


def stats_of(output: Path) -> dict:
    import json

    return json.loads((output / "_stats.json").read_text())


def test_every_row_ok_exits_0_and_stats_say_so(tmp_path, emulator_url):
    done = run_cli(
        "run",
        write_config(tmp_path, emulator_url),
        "--manifest",
        manifest_of(tmp_path, 3),
        "--output",
        tmp_path / "out",
    )

    assert done.returncode == 0, done.stderr
    assert stats_of(tmp_path / "out")["exit_code"] == 0


def test_a_row_in_error_exits_1_and_stats_say_so(tmp_path, emulator_url):
    manifest = manifest_of(tmp_path, 2)
    with open(manifest, "a", encoding="utf-8") as f:
        f.write("gone,nowhere.png\n")

    done = run_cli(
        "run", write_config(tmp_path, emulator_url), "--manifest", manifest, "--output", tmp_path / "out"
    )

    assert done.returncode == 1, done.stderr
    assert stats_of(tmp_path / "out")["exit_code"] == 1 and stats_of(tmp_path / "out")["counts"]["error"] == 1


def test_an_unknown_option_exits_2():
    done = run_cli("run", "--no-such-option")

    assert done.returncode == 2


def test_help_lists_every_exit_code_with_its_meaning():
    from pipeline.exits import EXIT_MEANINGS

    done = run_cli("run", "--help")

    text = " ".join(done.stdout.split())
    for code, meaning in EXIT_MEANINGS.items():
        assert f"{code} {meaning}" in text
