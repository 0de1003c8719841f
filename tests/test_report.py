"""`vision-pipeline report`: one HTML page that opens anywhere, shows the run's figures, and escapes everything."""

from __future__ import annotations

import asyncio
import base64
import html
import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
from conftest import TINY_HEIC, azure_config, in_fresh_python, make_image, write_csv
from PIL import Image

from pipeline.emulator import FILTER_MARKER
from pipeline.report import Bin, filter_hits, histogram, sample_ids, thumbnail, write_report
from pipeline.runner import RunOptions, run
from pipeline.sink import read_output
from pipeline.status import read_status

CLI = [sys.executable, "-m", "pipeline"]
HOSTILE_ID = '<script>alert("id")</script>'
CHROMIUM_PATHS = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")


def test_histogram_bins_span_min_to_max_with_the_maximum_in_the_last_bin():
    bins = histogram(pa.array([0.0, 1, 2, 3, 4, 5, 6, 7, 8, 10, None]), bins=5)

    assert [b.count for b in bins] == [2, 2, 2, 2, 2]
    assert bins[0].low == 0 and bins[-1].high == 10


def test_histogram_of_one_value_is_one_bin_and_of_nothing_is_empty():
    assert histogram(pa.array([3, 3, 3])) == (Bin(3.0, 3.0, 3),)
    assert histogram(pa.array([None], type=pa.float64())) == ()


def test_the_sample_is_spread_over_the_sorted_ids_and_the_same_every_time():
    ids = [f"r{i:03d}" for i in range(100)]

    chosen = sample_ids(list(reversed(ids)), n=4)

    assert chosen == ["r000", "r025", "r050", "r075"] == sample_ids(ids, n=4)
    assert sample_ids(ids[:3], n=4) == ids[:3]


@pytest.mark.parametrize(
    ("ref", "reason"),
    [
        ("https://example.org/a.jpg", "remote image"),
        ("nowhere.png", "not readable"),
        ("data:image/png;base64,%%%not-base64", "not readable"),
        ("data:image/png;base64,AAAA", "not readable"),
        (None, "no image"),
    ],
)
def test_an_image_the_report_cannot_show_gets_a_reason_instead_of_a_thumbnail(tmp_path, ref, reason):
    thumb, missing = thumbnail(ref, tmp_path)

    assert thumb is None and reason in missing


def test_a_heic_photo_gets_a_thumbnail_even_when_nothing_else_read_an_image_first(tmp_path):
    """`vision-pipeline report` may run in a process that never prepared an image: HEIC still shows."""
    (tmp_path / "IMG_0001.HEIC").write_bytes(TINY_HEIC)

    thumb, missing = in_fresh_python(f"""
        import json
        from pathlib import Path
        from pipeline.report import thumbnail

        print(json.dumps(thumbnail("IMG_0001.HEIC", Path({str(tmp_path)!r}))))
    """)

    assert missing is None and thumb.startswith("data:image/jpeg;base64,")


def data_url_png() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (90, 60), "purple").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture
async def reported(tmp_path, emulator, key_in_env) -> tuple[Path, str]:
    """An output with ok, filtered and failed rows, a hostile id, a data-URL image; and its report page."""
    for i in range(5):
        make_image(tmp_path / f"img{i}.png", (200 + 40 * i, 150))
    rows = [
        *({"id": f"ok-{i}", "image": f"img{i}.png"} for i in range(5)),
        {"id": HOSTILE_ID, "image": "img0.png"},
        {"id": "inline", "image": data_url_png()},
        {"id": "filtered", "image": "img1.png", "prompt": f"Describe {FILTER_MARKER}"},
        {"id": "missing", "image": "nowhere.png"},
    ]
    manifest = write_csv(tmp_path / "m.csv", rows)
    await run(azure_config(emulator), RunOptions(manifest, tmp_path / "out", handle_signals=False))

    page_path = write_report(tmp_path / "out")

    return tmp_path / "out", page_path.read_text(encoding="utf-8")


def figure(page: str, element_id: str) -> str:
    match = re.search(rf'id="{re.escape(element_id)}">([^<]*)<', page)
    assert match, f"no figure {element_id}"
    return html.unescape(match.group(1))


async def test_the_page_shows_the_output_figures_and_the_last_run(reported):
    output, page = reported

    status = read_status(output)

    assert figure(page, "rows-total") == "9" and figure(page, "rows-ok") == "7"
    assert figure(page, "rows-filtered") == "1" and figure(page, "rows-error") == "1"
    assert figure(page, "prompt-tokens") == f"{status.prompt_tokens:,}"
    assert figure(page, "cost-usd") == f"${status.cost_usd:,.4f}"
    assert figure(page, "exit-code") == "1 (some rows ended in error)"
    assert figure(page, "run-latency").count(" s") == 3  # p50 / p90 / p99


async def test_failed_rows_are_listed_with_their_reasons(reported):
    _, page = reported

    assert figure(page, "failed-count").startswith("1 failed rows")
    assert "missing" in page and "nowhere.png" in page and "file not found" in page


async def test_every_text_is_escaped_and_nothing_is_fetched_or_run(reported):
    _, page = reported

    assert "<script" not in page and html.escape(HOSTILE_ID) in page
    assert re.findall(r'(?:src|href)="(?!data:)', page) == []
    assert "Content-Security-Policy" in page and "default-src 'none'" in page


async def test_the_sample_shows_descriptions_beside_thumbnails_of_local_and_inline_images(reported):
    output, page = reported

    thumbnails = re.findall(r'<img src="data:image/jpeg;base64,([^"]+)"', page)

    assert len(thumbnails) == 6  # every ok row but the data URL's: five files, the hostile id's file
    assert "inline image (the output keeps its type and size, not its bytes)" in page
    with Image.open(io.BytesIO(base64.b64decode(thumbnails[0]))) as im:
        assert max(im.size) <= 160
    description = read_output(output, ["id", "description"]).to_pylist()[0]["description"]
    assert html.escape(description) in page
    assert "base64,iVBOR" not in page  # the data URL itself is not repeated as text


async def test_filter_hits_count_the_filtered_prompt_under_its_category(reported):
    output, page = reported

    hits = filter_hits(read_output(output))

    prompt_filtered = [h for h in hits if h.where == "prompt" and h.filtered]
    assert sum(h.filtered for h in prompt_filtered) == 1
    hit = prompt_filtered[0]
    assert figure(page, f"filter-prompt-{hit.category}") == "1"


def test_a_folder_that_is_not_an_output_exits_2(tmp_path):
    done = subprocess.run(
        [*CLI, "report", str(tmp_path)], capture_output=True, text=True, timeout=60, check=False
    )

    assert done.returncode == 2 and "not a vision-pipeline output" in done.stderr


def chromium() -> str | None:
    return next((p for p in CHROMIUM_PATHS if os.access(p, os.X_OK)), None) or shutil.which("chromium")


async def test_the_report_opens_in_a_headless_browser_with_its_figures(reported, tmp_path):
    """The page as a browser renders it, offline: the figures are in the DOM it built."""
    browser = chromium()
    if browser is None:
        pytest.skip("no Chromium here (apt-get install chromium): the report was not opened in a browser")
    output, _ = reported
    (tmp_path / "elsewhere").mkdir()
    dest = write_report(
        output, tmp_path / "elsewhere" / "report.html"
    )  # thumbnails are inside: no path to follow

    proc = await asyncio.create_subprocess_exec(
        browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
        "--dump-dom", dest.as_uri(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout=120)

    dom = stdout.decode()
    assert proc.returncode == 0, stderr.decode()[-2000:]
    assert "<title>vision-pipeline report" in dom
    assert figure(dom, "rows-total") == "9" and figure(dom, "rows-error") == "1"
    assert figure(dom, "exit-code").startswith("1 ")
    assert len(re.findall(r'<img src="data:image/jpeg', dom)) == 6 and dom.count("<svg") == 4
