"""The estimate: the run's own token count from headers only, failing rows by error kind, costs, duration."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from aiohttp import web
from conftest import azure_config, make_image, png_header_only, write_csv
from hypothesis import given
from hypothesis import strategies as st

import pipeline.sniff
from pipeline.config import RunConfig, config_from_mapping, load_config
from pipeline.estimate import NOT_PROBED, EstimateOptions, ImageSize, estimate, estimate_row
from pipeline.estimate_text import SCHEMA, estimate_as_json, format_estimate
from pipeline.records import ConfigError, ImageTask
from pipeline.remote import PROBE_REFUSED
from pipeline.runner import RunOptions, run
from pipeline.sink import read_output
from pipeline.tokens import max_image_tokens

ROOT = Path(__file__).resolve().parent.parent
ALLOW_LOOPBACK = {"allow_private_urls": True}  # the test servers listen on 127.0.0.1
SAMPLE_MANIFEST = ROOT / "sample_data" / "manifest.csv"
CLI = [sys.executable, "-m", "pipeline"]


def config(**sections: dict) -> RunConfig:
    return config_from_mapping({"limits": {"tokens_per_minute": 1_000_000}, **sections}, source="test.toml")


def image_only_tokens(w: int, h: int, detail: str, cfg: RunConfig) -> int:
    """The tokens one image adds to a row: the row with it, less the same row without it."""
    task = ImageTask("r", ("a.png",), "Describe.", detail, line=2)  # type: ignore[arg-type]
    with_image = estimate_row(task, [ImageSize((w, h))], cfg).prompt_tokens
    without = estimate_row(dataclasses.replace(task, images=()), [], cfg).prompt_tokens
    return with_image - without


# ---- tokens: the published numbers, through the estimator ------------------------------------------------


@pytest.mark.parametrize(
    ("w", "h", "detail", "tokens"),
    [(1024, 1024, "high", 765), (2048, 4096, "high", 1105), (4096, 8192, "low", 85), (640, 480, "high", 425)],
)
async def test_image_files_cost_the_published_examples_sized_from_their_headers_only(
    tmp_path, w, h, detail, tokens
):
    """The PNGs hold no pixel data: an estimate that decoded them would fail."""
    (tmp_path / "image.png").write_bytes(png_header_only(w, h))
    manifest = write_csv(tmp_path / "m.csv", [{"id": "r", "image": "image.png", "detail": detail}])
    cfg = config()
    text_only = estimate_row(ImageTask("r", (), cfg.request.prompt, detail, line=2), [], cfg).prompt_tokens

    result = await estimate(cfg, EstimateOptions(manifest))

    assert result.tally.to_send == 1 and result.tally.failing == {}
    assert result.tally.prompt_tokens - text_only == tokens


@pytest.mark.parametrize(
    ("w", "h", "tokens"), [(640, 480, 425), (300, 200, 255), (767, 767, 765), (100, 3000, 765)]
)
def test_an_image_under_768_px_on_its_short_side_is_not_upscaled(w, h, tokens):
    assert image_only_tokens(w, h, "high", config()) == tokens


@given(w=st.integers(1, 20_000), h=st.integers(1, 20_000), detail=st.sampled_from(["low", "high", "auto"]))
def test_an_unsized_image_never_costs_less_than_a_sized_one(w, h, detail):
    cfg = config()
    task = ImageTask("r", ("https://example.invalid/a.jpg",), "Describe.", detail, line=2)

    sized = estimate_row(task, [ImageSize((w, h))], cfg)
    unsized = estimate_row(task, [ImageSize(None, is_remote=True)], cfg)

    assert unsized.prompt_tokens >= sized.prompt_tokens and unsized.unsized_because == (NOT_PROBED,)


# ---- the estimate agrees with the run --------------------------------------------------------------------


@pytest.mark.parametrize("detail", ["low", "high", "auto"])
async def test_estimated_prompt_tokens_equal_the_billed_ones_row_by_row_on_sample_data(
    tmp_path, emulator, key_in_env, detail
):
    """sample_data holds EXIF-rotated, CMYK, 16-bit, palette, panorama and 4000×3000 images."""
    cfg = azure_config(emulator, request={"detail": detail})
    await run(cfg, RunOptions(SAMPLE_MANIFEST, tmp_path / "out", handle_signals=False))

    result = await estimate(cfg, EstimateOptions(SAMPLE_MANIFEST, observed=tmp_path / "out"))

    ok_rows = [r for r in read_output(tmp_path / "out").to_pylist() if r["status"] == "ok"]
    comparison = result.tally.comparison
    assert comparison.rows == len(ok_rows) >= 12 and comparison.differing_rows == 0
    assert comparison.estimated_prompt_tokens == sum(r["prompt_tokens"] for r in ok_rows)
    billed_usd = sum(r["cost_usd"] for r in ok_rows)
    observed = estimate_as_json(result)["observed"]
    assert abs(observed["estimated_cost_usd"] - billed_usd) <= 0.01 * billed_usd
    assert result.expected_completion_tokens == pytest.approx(
        sum(r["completion_tokens"] for r in ok_rows) / len(ok_rows)
    )


async def test_rows_that_would_fail_are_grouped_by_error_kind_with_the_run_s_own_error(
    tmp_path, emulator, key_in_env
):
    for name in ("a.png", "b.png"):
        make_image(tmp_path / name, (64, 48))
    (tmp_path / "notes.png").write_text("not an image")
    (tmp_path / "huge.png").write_bytes(png_header_only(5000, 5000))
    rows = [
        {"id": "ok", "image": "a.png"},
        {"id": "missing", "image": "gone.png"},
        {"id": "eleven", "images": json.dumps(["a.png"] * 11)},
        {"id": "text", "image": "notes.png"},
        {"id": "huge", "image": "huge.png"},
        {"id": "ftp", "image": "ftp://host/a.png"},
        {
            "id": "big-data-url",
            "image": "data:image/png;base64," + base64.b64encode(os.urandom(3000)).decode(),
        },
        {"id": "ten", "images": json.dumps(["a.png", "b.png"] * 5)},
        {"id": "bad-detail", "image": "a.png", "detail": "ultra"},
        {"id": "ok", "image": "b.png"},
    ]
    manifest = write_csv(tmp_path / "m.csv", rows)
    # ten images at high cost 10 × 255 tokens: more than this budget; one image fits
    cfg = azure_config(
        emulator,
        limits={"tokens_per_minute": 2_000},
        images={"max_pixels": 20_000_000, "max_image_bytes": 2_000},
    )

    result = await estimate(cfg, EstimateOptions(manifest, per_row=tmp_path / "rows.parquet"))
    await run(cfg, RunOptions(manifest, tmp_path / "out", handle_signals=False))

    tally = result.tally
    assert (tally.read, tally.to_send, tally.duplicates) == (10, 1, 1)
    assert tally.failing == {
        "missing_file": 1,
        "too_many_images": 1,
        "unsupported_format": 2,
        "too_many_pixels": 1,
        "too_large": 1,
        "over_budget": 1,
        "bad_manifest_row": 1,
    }
    assert tally.failing_ids["unsupported_format"] == ("text", "ftp")
    estimated = {
        r["id"]: (r["error_kind"], r["error"]) for r in pq.read_table(tmp_path / "rows.parquet").to_pylist()
    }
    committed = {r["id"]: (r["error_kind"], r["error"]) for r in read_output(tmp_path / "out").to_pylist()}
    assert estimated == committed
    assert all(kind is not None for kind, error in committed.values() if error is not None)


async def test_refusals_of_the_images_module_are_grouped_by_error_kind(tmp_path, monkeypatch):
    """Outside images.allowed_roots, and a HEIC file where no HEIF reader is installed."""
    make_image(tmp_path / "shared" / "a.png")
    make_image(tmp_path / "elsewhere" / "b.png")
    ftyp = struct.pack(">I", 24) + b"ftypheic" + b"\0\0\0\0" + b"mif1heic"
    (tmp_path / "shared" / "IMG_0001.HEIC").write_bytes(ftyp + b"\0" * 64)
    monkeypatch.setattr(
        pipeline.sniff, "SNIFFED_FORMATS", tuple(f for f in pipeline.sniff.SNIFFED_FORMATS if f != "HEIF")
    )
    (tmp_path / "manifests").mkdir()
    rows = [
        {"id": "allowed", "image": "../shared/a.png"},
        {"id": "outside", "image": "../elsewhere/b.png"},
        {"id": "heic", "image": "../shared/IMG_0001.HEIC"},
    ]
    manifest = write_csv(tmp_path / "manifests" / "m.csv", rows)

    result = await estimate(config(images={"allowed_roots": ["../shared"]}), EstimateOptions(manifest))

    assert result.tally.to_send == 1
    assert result.tally.failing == {"outside_allowed_folders": 1, "unsupported_format": 1}


async def test_duplicate_ids_are_ignored_as_the_run_ignores_them(tmp_path):
    make_image(tmp_path / "a.png")
    manifest = write_csv(
        tmp_path / "m.csv", [{"id": "x", "image": "a.png"}, {"id": "x", "image": "gone.png"}]
    )

    result = await estimate(config(), EstimateOptions(manifest))

    assert (result.tally.to_send, result.tally.duplicates, result.tally.failing) == (1, 1, {})


# ---- prices -----------------------------------------------------------------------------------------------


async def test_a_model_without_a_price_is_an_error_naming_the_file_to_edit(tmp_path, images_manifest):
    cfg = config(endpoint={"model": "llava-1.5-7b"})

    with pytest.raises(
        ConfigError,
        match=r"no price for model 'llava-1.5-7b': add \[models.\"llava-1.5-7b\"\] to "
        r".*configs/prices.toml, or .* under \[pricing\] in test.toml",
    ):
        await estimate(cfg, EstimateOptions(images_manifest(1)))


async def test_a_config_s_pricing_section_overrides_the_price_file(tmp_path, images_manifest):
    manifest = images_manifest(2)
    (tmp_path / "mine.toml").write_text(
        'checked = "2030-01-01"\nsource = "contract"\n'
        '[models."gpt-4"]\ninput_per_1m = 1.0\noutput_per_1m = 2.0\n'
    )
    inline = config(pricing={"input_per_1m": 0.0, "output_per_1m": 0.0})
    in_file = config_from_mapping({"pricing": {"file": "mine.toml"}}, source=str(tmp_path / "run.toml"))

    free = await estimate(inline, EstimateOptions(manifest))
    contract = await estimate(in_file, EstimateOptions(manifest))

    assert free.cost.total_max_usd == 0 and free.price.file == "test.toml"
    assert contract.price.checked == "2030-01-01" and contract.price.batch_discount == 0
    assert contract.cost.input_usd == pytest.approx(contract.tally.prompt_tokens / 1e6)


def test_inline_prices_come_in_pairs():
    with pytest.raises(
        ConfigError, match="test.toml: pricing.input_per_1m and pricing.output_per_1m go together"
    ):
        config(pricing={"input_per_1m": 1.0})


async def test_cost_prices_input_and_output_separately_and_at_batch_prices(images_manifest):
    cfg = config(request={"max_tokens": 200})

    result = await estimate(cfg, EstimateOptions(images_manifest(4)))

    assert result.cost.input_usd == pytest.approx(result.tally.prompt_tokens * 10 / 1e6)
    assert result.cost.output_max_usd == pytest.approx(4 * 200 * 30 / 1e6)
    assert result.cost.output_expected_usd == pytest.approx(4 * 100 * 30 / 1e6)  # half of max_tokens: stated
    assert "assumed 50% of max_tokens" in result.expected_source
    assert result.batch_cost.total_max_usd == pytest.approx(result.cost.total_max_usd / 2)


# ---- http(s) images: sized by a Range request, only when asked ------------------------------------------


@pytest.fixture
async def image_server(tmp_path):
    """A local server: /big.png (1024×1024, honours Range), /whole.png (ignores it), /slow.png, /huge.png."""
    make_image(tmp_path / "www" / "big.png", (1024, 1024))
    whole = png_header_only(1024, 1024) + b"\0" * 200_000
    ranges: list[str | None] = []
    released = asyncio.Event()

    async def big(request: web.Request) -> web.StreamResponse:
        ranges.append(request.headers.get("Range"))
        return web.FileResponse(tmp_path / "www" / "big.png")

    async def slow(request: web.Request) -> web.Response:
        await released.wait()  # the scripted fault: answers only after the probe gave up
        return web.Response(body=whole)

    async def whole_file(request: web.Request) -> web.Response:
        return web.Response(body=whole)  # a server that ignores Range

    async def huge(request: web.Request) -> web.Response:
        return web.Response(
            status=206, body=png_header_only(1024, 1024), headers={"Content-Range": "bytes 0-65535/30000000"}
        )

    app = web.Application()
    app.router.add_get("/big.png", big)
    app.router.add_get("/whole.png", whole_file)
    app.router.add_get("/slow.png", slow)
    app.router.add_get("/huge.png", huge)
    runner = web.AppRunner(app, shutdown_timeout=0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", ranges
    released.set()
    await runner.cleanup()


async def test_probed_urls_are_sized_from_their_first_bytes(tmp_path, image_server):
    url, ranges = image_server
    rows = [{"id": name, "image": f"{url}/{name}", "detail": "high"} for name in ("big.png", "whole.png")]
    rows.append({"id": "again", "image": f"{url}/big.png", "detail": "high"})
    manifest = write_csv(tmp_path / "m.csv", rows)

    probed = await estimate(config(images=ALLOW_LOOPBACK), EstimateOptions(manifest, probe_urls=True))
    unprobed = await estimate(config(images=ALLOW_LOOPBACK), EstimateOptions(manifest))

    assert probed.tally.unsized_because == {} and ranges == ["bytes=0-65535"]  # one probe per URL
    assert (
        unprobed.tally.unsized_because == {NOT_PROBED: 3}
        and "as the run reserves it" in unprobed.unsized_assumption
    )
    assert unprobed.tally.prompt_tokens - probed.tally.prompt_tokens == 3 * (max_image_tokens("high") - 765)


async def test_probes_that_fail_leave_the_image_unsized_and_an_oversized_one_fails(tmp_path, image_server):
    url, _ = image_server
    rows = [{"id": name, "image": f"{url}/{name}"} for name in ("gone.png", "slow.png", "huge.png")]
    manifest = write_csv(tmp_path / "m.csv", rows)

    result = await estimate(
        config(images=ALLOW_LOOPBACK), EstimateOptions(manifest, probe_urls=True, probe_timeout_s=0.2)
    )

    assert result.tally.unsized_because == {"probe: HTTP 404": 1, "probe: timed out": 1}
    assert result.tally.failing == {"too_large": 1} and result.tally.failing_ids["too_large"] == ("huge.png",)


async def test_a_probe_reaches_no_private_address_unless_allowed(tmp_path, image_server):
    """The image server is on 127.0.0.1: probes keep the download's rule (images.allow_private_urls)."""
    url, ranges = image_server
    manifest = write_csv(tmp_path / "m.csv", [{"id": "big", "image": f"{url}/big.png", "detail": "high"}])

    result = await estimate(config(), EstimateOptions(manifest, probe_urls=True))

    assert result.tally.unsized_because == {PROBE_REFUSED: 1} and result.tally.to_send == 1
    assert ranges == []  # refused before connecting


# ---- what the user gets ---------------------------------------------------------------------------------


async def test_the_per_row_file_lets_users_find_the_expensive_rows(tmp_path):
    make_image(tmp_path / "small.png", (100, 100))
    make_image(tmp_path / "large.png", (2000, 2000))
    rows = [
        {"id": "small", "image": "small.png"},
        {"id": "large", "image": "large.png"},
        {"id": "both", "images": json.dumps(["small.png", "large.png"])},
        {"id": "gone", "image": "x.png"},
    ]
    manifest = write_csv(tmp_path / "m.csv", rows)

    result = await estimate(config(), EstimateOptions(manifest, per_row=tmp_path / "rows.parquet"))

    table = pq.read_table(tmp_path / "rows.parquet")
    assert table.column_names == [
        "id",
        "line",
        "detail",
        "images",
        "unsized_images",
        "prompt_tokens",
        "cost_usd",
        "error_kind",
        "error",
    ]
    by_cost = table.sort_by([("cost_usd", "descending")]).to_pylist()
    assert [r["id"] for r in by_cost] == ["both", "large", "small", "gone"]
    assert by_cost[-1]["error_kind"] == "missing_file" and by_cost[-1]["cost_usd"] is None
    assert sum(r["cost_usd"] or 0 for r in by_cost) == pytest.approx(result.cost.total_expected_usd)
    assert sum(r["prompt_tokens"] or 0 for r in by_cost) == result.tally.prompt_tokens
    assert not list(tmp_path.glob(".tmp-*"))


async def test_estimate_on_sample_data_prints_every_figure():
    cfg = load_config(ROOT / "configs" / "azure.toml")

    text = format_estimate(await estimate(cfg, EstimateOptions(SAMPLE_MANIFEST, window_h=6.0)))

    for words in (
        "rows: 13 read, 13 to send, 0 would fail",
        "images: 13 (low 1, high 1, auto 11",
        "prompt tokens: ",
        "output tokens: at most 3,900 (max_tokens 300 × 13 rows); expected 1,950",
        "cost: input $",
        "at Batch API prices (50% off)",
        "checked 2026-",
        "tokens_per_minute binds",
        "window 6.00 h: fits",
    ):
        assert words in text


def test_estimate_json_on_sample_data_follows_the_documented_schema():
    args = [
        *CLI,
        "estimate",
        ROOT / "configs" / "azure.toml",
        "--manifest",
        SAMPLE_MANIFEST,
        "--window",
        "6h",
        "--json",
    ]

    done = subprocess.run(args, check=False, capture_output=True, text=True, timeout=60, cwd=ROOT)

    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert list(doc) == [
        "schema",
        "manifest",
        "config",
        "model",
        "rows",
        "images",
        "prompt_tokens",
        "output_tokens",
        "price",
        "cost",
        "batch_cost",
        "duration",
        "failing",
        "observed",
        "cap",
        "mode",
        "batch_duration_h",
    ]
    assert doc["schema"] == SCHEMA and doc["rows"]["to_send"] == 13 and doc["prompt_tokens"] > 13 * 85
    assert set(doc["cost"]) == {
        "input_usd",
        "output_max_usd",
        "output_expected_usd",
        "total_max_usd",
        "total_expected_usd",
    }
    assert doc["duration"]["binding"] == "tokens_per_minute" and doc["duration"]["fits_window"] is True
    assert doc["price"]["file"].endswith("configs/prices.toml") and doc["observed"] is None


def test_an_unknown_model_exits_2_with_one_line_naming_the_price_file(tmp_path):
    (tmp_path / "llava.toml").write_text(
        '[endpoint]\nprovider = "openai"\nurl = "http://127.0.0.1:1/v1"\nmodel = "llava-hf/llava-1.5-7b-hf"\n'
    )

    done = subprocess.run(
        [*CLI, "estimate", tmp_path / "llava.toml", "--manifest", SAMPLE_MANIFEST],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 2 and done.stdout == ""
    assert (
        done.stderr.count("\n") == 1 and "configs/prices.toml" in done.stderr and "llava.toml" in done.stderr
    )


async def test_the_text_names_failing_rows_and_the_comparison(
    tmp_path, emulator, key_in_env, images_manifest
):
    manifest = images_manifest(3)
    cfg = azure_config(emulator)
    await run(cfg, RunOptions(manifest, tmp_path / "out", handle_signals=False))
    write_csv(
        manifest,
        [{"id": f"row-{i}", "image": f"images/img{i}.png"} for i in range(3)]
        + [{"id": "lost", "image": "images/lost.png"}],
    )

    text = format_estimate(await estimate(cfg, EstimateOptions(manifest, observed=tmp_path / "out")))

    assert "would fail, missing_file: 1 (lost)" in text
    assert "3 rows compared; estimated prompt tokens differ from the billed ones in 0" in text
    assert "(+0.00 %)" in text
