"""remote.py: http(s) images are downloaded within bounds, and never from addresses a manifest must not reach.

A real aiohttp server on 127.0.0.1 serves the images; a loopback address is private, so the happy paths
set allow_private_urls = true and the refusals use the default.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
from collections.abc import AsyncIterator

import pyarrow.dataset as ds
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import azure_config
from PIL import Image

import pipeline.remote
from pipeline.config import ImagesConfig
from pipeline.exits import EXIT_OK, EXIT_ROW_ERRORS
from pipeline.records import ImageError, RemoteProbe
from pipeline.remote import (
    PROBE_REFUSED,
    fetch_image,
    is_public_address,
    open_session,
    probe_image,
)
from pipeline.runner import RunOptions, run

ALLOW_LOOPBACK = ImagesConfig(allow_private_urls=True)
HITS = web.AppKey("hits", list[str])  # the paths the server was asked for, in order
LIMIT_BYTES = 10_000


def jpeg_bytes(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.linear_gradient("L").resize(size).convert("RGB").save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


PHOTO = jpeg_bytes((4000, 3000))


@pytest.fixture
async def server() -> AsyncIterator[TestServer]:
    """Images, redirects and misbehaviour on 127.0.0.1; ``server.app[HITS]`` lists the paths asked for."""
    never = asyncio.Event()

    async def photo(request: web.Request) -> web.Response:
        return web.Response(body=PHOTO, content_type="image/jpeg")

    async def redirect(request: web.Request) -> web.Response:
        hops = int(request.match_info["hops"])
        raise web.HTTPFound(f"/redirect/{hops - 1}" if hops > 1 else "/photo.jpg")

    async def redirect_to(request: web.Request) -> web.Response:
        raise web.HTTPFound(request.query["location"])

    async def big(request: web.Request) -> web.Response:
        return web.Response(body=b"\xff" * (LIMIT_BYTES + 1))

    async def big_chunked(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()  # no Content-Length: chunked
        await response.prepare(request)
        for _ in range(4):
            await response.write(b"\xff" * (LIMIT_BYTES // 3))
        return response

    async def stalls(request: web.Request) -> web.Response:
        await never.wait()
        return web.Response()

    app = web.Application()
    app[HITS] = []

    @web.middleware
    async def count(request: web.Request, handler):  # type: ignore[no-untyped-def]
        request.app[HITS].append(request.path)
        return await handler(request)

    app.middlewares.append(count)
    app.router.add_get("/photo.jpg", photo)
    app.router.add_get("/redirect/{hops}", redirect)
    app.router.add_get("/redirect-to", redirect_to)
    app.router.add_get("/big", big)
    app.router.add_get("/big-chunked", big_chunked)
    app.router.add_get("/stalls", stalls)
    async with TestServer(app, host="127.0.0.1") as running:
        yield running


async def fetch(url: str, cfg: ImagesConfig = ALLOW_LOOPBACK) -> bytes:
    async with open_session(cfg) as session:
        return await fetch_image(session, url, cfg, row_id="row-1")


def url_of(server: TestServer, path: str) -> str:
    return str(server.make_url(path))


# What is fetched


async def test_an_image_is_downloaded_whole_when_its_address_is_allowed(server):
    data = await fetch(url_of(server, "/photo.jpg"))

    assert data == PHOTO


async def test_redirects_are_followed_up_to_max_redirects_and_no_further(server):
    cfg = dataclasses.replace(ALLOW_LOOPBACK, max_redirects=3)

    data = await fetch(url_of(server, "/redirect/3"), cfg)

    assert data == PHOTO
    with pytest.raises(ImageError, match=r"more than images\.max_redirects = 3 redirects"):
        await fetch(url_of(server, "/redirect/4"), cfg)


async def test_a_relative_location_is_followed_from_the_url_that_sent_it(server):
    data = await fetch(url_of(server, "/redirect-to?location=../photo.jpg"))

    assert data == PHOTO


@pytest.mark.parametrize("location", ["file:///etc/passwd", "ftp://example.com/a.jpg"])
async def test_a_redirect_to_another_scheme_is_refused(server, location):
    with pytest.raises(ImageError, match="only http\\(s\\) is fetched"):
        await fetch(url_of(server, f"/redirect-to?location={location}"))


@pytest.mark.parametrize("path", ["/big", "/big-chunked"])
async def test_a_download_over_max_remote_bytes_is_refused_with_or_without_a_content_length(server, path):
    cfg = dataclasses.replace(ALLOW_LOOPBACK, max_remote_bytes=LIMIT_BYTES)

    with pytest.raises(ImageError, match=r"download is more than images\.max_remote_bytes = 10,000 bytes"):
        await fetch(url_of(server, path), cfg)


@pytest.mark.looptime  # the loop's clock jumps to the deadline while the server stalls: no real wait
async def test_a_download_slower_than_remote_timeout_s_is_refused(server):
    cfg = dataclasses.replace(ALLOW_LOOPBACK, remote_timeout_s=20.0)

    with pytest.raises(ImageError, match=r"download took longer than images\.remote_timeout_s = 20 s"):
        await fetch(url_of(server, "/stalls"), cfg)


async def test_an_http_error_is_a_row_error_naming_the_status_and_never_the_query(server):
    with pytest.raises(ImageError) as caught:
        await fetch(url_of(server, "/missing.jpg?sig=SECRET"))

    assert "HTTP 404 Not Found" in str(caught.value)
    assert "SECRET" not in str(caught.value) and "\n" not in str(caught.value)


# Where it is never fetched from


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_loopback_is_refused_by_default_by_address_and_by_name(server, host):
    url = f"http://{host}:{server.port}/photo.jpg"

    with pytest.raises(ImageError, match="download refused: .*not a public address") as caught:
        await fetch(url, ImagesConfig())

    assert "images.allow_private_urls = true" in str(caught.value)
    assert server.app[HITS] == []  # refused before connecting


async def test_every_redirect_hop_is_checked_again(server, monkeypatch):
    """A public first hop may not redirect into the private network."""
    monkeypatch.setattr(pipeline.remote, "is_public_address", lambda address: address == "127.0.0.1")
    inside = f"http://127.0.0.2:{server.port}/photo.jpg"

    with pytest.raises(ImageError, match="download refused: 127.0.0.2 is not a public address"):
        await fetch(url_of(server, f"/redirect-to?location={inside}"), ImagesConfig())

    assert server.app[HITS] == ["/redirect-to"]


@pytest.mark.parametrize(
    ("address", "is_public"),
    [
        ("8.8.8.8", True),
        ("2606:4700:4700::1111", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.10", False),
        ("169.254.169.254", False),  # the cloud metadata service
        ("100.64.0.1", False),  # carrier-grade NAT
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("::1", False),
        ("fe80::1%eth0", False),
        ("fd00::1", False),
        ("::ffff:127.0.0.1", False),  # IPv4-mapped loopback
        ("2002:a00:1::1", False),  # 6to4 around 10.0.0.1
    ],
)
def test_only_public_internet_addresses_count_as_public(address, is_public):
    assert is_public_address(address) is is_public


# Probes for the estimate: the first bytes only, under the same rules


async def probe(url: str, cfg: ImagesConfig = ALLOW_LOOPBACK) -> RemoteProbe:
    async with open_session(cfg) as session:
        return await probe_image(session, url, cfg, timeout_s=10.0)


async def test_a_probe_follows_redirects_and_reads_the_size_from_the_first_bytes(server):
    result = await probe(url_of(server, "/redirect/2"))

    assert result.size == (4000, 3000) and result.total_bytes == len(PHOTO) > 64 * 1024
    assert server.app[HITS] == ["/redirect/2", "/redirect/1", "/photo.jpg"]


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_a_probe_is_refused_where_a_download_would_be(server, host):
    result = await probe(f"http://{host}:{server.port}/photo.jpg", ImagesConfig())

    assert result == RemoteProbe(None, unsized_because=PROBE_REFUSED)
    assert server.app[HITS] == []  # refused before connecting


async def test_a_probe_redirected_to_another_scheme_stays_unsized(server):
    result = await probe(url_of(server, "/redirect-to?location=file:///etc/passwd"))

    assert result.size is None and "only http(s) is fetched" in (result.unsized_because or "")


# In a run


async def test_with_fetch_remote_a_run_sends_the_downloaded_image_at_the_viewed_size(
    tmp_path, emulator, server, key_in_env
):
    (tmp_path / "manifest.csv").write_text(f"id,image,detail\nremote,{url_of(server, '/photo.jpg')},high\n")
    cfg = azure_config(emulator, images={"fetch_remote": True, "allow_private_urls": True})

    summary = await run(cfg, RunOptions(tmp_path / "manifest.csv", tmp_path / "out", handle_signals=False))

    (request,) = emulator.requests
    url = request.body["messages"][-1]["content"][1]["image_url"]["url"]
    assert summary.exit_code == EXIT_OK
    assert url.startswith("data:image/jpeg;base64,") and len(url) < len(PHOTO)
    row = ds.dataset(tmp_path / "out").to_table().to_pylist()[0]
    assert (
        row["prompt_tokens"] == row["estimated_prompt_tokens"]
    )  # the size is known: no upper-bound estimate


async def test_with_fetch_remote_a_private_address_is_one_error_row_and_nothing_is_fetched(
    tmp_path, emulator, server, key_in_env
):
    (tmp_path / "manifest.csv").write_text(f"id,image\ninside,{url_of(server, '/photo.jpg')}\n")
    cfg = azure_config(emulator, images={"fetch_remote": True})

    summary = await run(cfg, RunOptions(tmp_path / "manifest.csv", tmp_path / "out", handle_signals=False))

    (row,) = ds.dataset(tmp_path / "out").to_table().to_pylist()
    assert summary.exit_code == EXIT_ROW_ERRORS
    assert row["status"] == "error" and "download refused" in row["error"]
    assert server.app[HITS] == [] and emulator.requests == []
