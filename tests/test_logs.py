"""Log lines as cron and CI read them: JSON objects, one per line, with no key and no data URL."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import KEY_ENV, TEST_KEY, in_fresh_python, make_image, write_csv

from pipeline.logs import JsonFormatter, TextFormatter, redact, resolve_format

CLI = [sys.executable, "-m", "pipeline"]


def formatted(formatter: logging.Formatter, message: str, *args: object, **extra: object) -> str:
    logger = logging.getLogger("test.logs")
    record = logger.makeRecord(logger.name, logging.INFO, __file__, 1, message, args, None, extra=extra)
    return formatter.format(record)


def png_data_url(size: tuple[int, int] = (40, 30)) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, "orange").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_importing_logs_does_not_load_libvips():
    """Shortening data URLs in log lines needs no image library: a command that only logs stays light."""
    loaded = in_fresh_python(
        "import json, sys; import pipeline.logs; print(json.dumps('pyvips' in sys.modules))"
    )

    assert loaded is False


def test_a_json_line_carries_time_level_event_message_and_the_extra_fields():
    line = formatted(JsonFormatter(), "committed %s", "part-1", event="part_committed", rows=1000)

    parsed = json.loads(line)

    assert parsed["level"] == "info" and parsed["event"] == "part_committed"
    assert parsed["message"] == "committed part-1" and parsed["rows"] == 1000
    assert parsed["ts"].endswith("Z") and "T" in parsed["ts"]
    assert "\n" not in line


def test_a_line_without_an_event_still_parses_with_a_null_event():
    parsed = json.loads(formatted(JsonFormatter(), "emulator listening"))

    assert parsed["event"] is None and parsed["message"] == "emulator listening"


@pytest.mark.parametrize("formatter", [JsonFormatter(), TextFormatter()])
def test_a_data_url_in_a_message_or_a_field_is_logged_shortened(formatter):
    url = png_data_url()

    line = formatted(formatter, "row 'a': image %s broke", url, event="x", image=url)

    assert "base64," in line and url not in line and url[30:60] not in line
    assert "data:image/png;base64,<" in line


def test_redact_leaves_words_that_merely_end_in_data_alone():
    assert redact("metadata:a,b and more") == "metadata:a,b and more"


def test_auto_is_json_when_stderr_is_not_a_terminal_and_text_when_it_is():
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert resolve_format("auto", io.StringIO()) == "json"
    assert resolve_format("auto", Tty()) == "text"
    assert resolve_format("text", io.StringIO()) == "text"


def test_a_cron_run_writes_json_lines_with_the_events_and_no_key_or_data_url(tmp_path, emulator_process):
    """A run with retries, a bad data URL and a good one, at -v: every stderr line parses; none leaks."""
    make_image(tmp_path / "a.png")
    rows = [
        {"id": "good", "image": "a.png"},
        {"id": "inline", "image": png_data_url((300, 200))},
        {"id": "broken-inline", "image": "data:image/png;base64," + "A" * 4000},
        {"id": "missing", "image": "nowhere.png"},
        *({"id": f"more-{i}", "image": "a.png"} for i in range(8)),
    ]
    manifest = write_csv(tmp_path / "m.csv", rows)
    config = tmp_path / "run.toml"
    config.write_text(
        f'[endpoint]\nprovider = "azure"\nurl = "{emulator_process}"\ndeployment = "vision"\napi_key_env = "{KEY_ENV}"\n'
        "[limits]\nconcurrency = 2\nbackoff_initial_s = 0\nmax_attempts = 8\n[output]\nrows_per_part = 4\n"
    )

    done = subprocess.run(
        [*CLI, "run", str(config), "--manifest", str(manifest), "--output", str(tmp_path / "out"), "-v"],
        env={**os.environ, KEY_ENV: TEST_KEY}, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip

    assert done.returncode == 1, done.stderr  # stderr is a pipe: auto chose JSON
    lines = [json.loads(line) for line in done.stderr.splitlines()]
    events = [line["event"] for line in lines]
    assert events.count("run_started") == 1 and events.count("run_finished") == 1
    assert "part_committed" in events
    info_lines = [line for line in lines if line["level"] == "info"]
    assert len(info_lines) < len(rows)  # no line per row at INFO
    for stream in (done.stdout, done.stderr):
        assert TEST_KEY not in stream and "base64,iVBOR" not in stream and "A" * 100 not in stream
    summary = json.loads(done.stdout)
    assert summary["exit_code"] == 1 and summary["counts"]["error"] == 2


@pytest.fixture
def emulator_process():
    proc = subprocess.Popen(
        [*CLI, "emulator", "--port", "0", "--api-key", TEST_KEY, "--deployment", "vision", "--fault-rate", "0.2"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    line = proc.stdout.readline().strip()
    assert line.startswith("listening on "), line
    yield line.removeprefix("listening on ")
    proc.terminate()
    proc.wait(timeout=10)


def test_the_json_log_of_a_run_parses_even_with_a_path_holding_quotes(tmp_path: Path):
    """A message with quotes, newlines and non-ASCII stays one parseable line."""
    line = formatted(JsonFormatter(), "cannot read %s", 'a "quoted"\nname — é.png', event="x")

    assert json.loads(line)["message"] == 'cannot read a "quoted"\nname — é.png'
    assert "\n" not in line
