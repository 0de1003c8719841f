"""Downloading http(s) images for ``images.fetch_remote``, so they can be prepared like local files, and
probing their size from their first bytes for the estimate (``probe_image``).

Bounded every way a download can go wrong at night: only http and https (a redirect to ``file:`` or
``ftp:`` is refused like the URL itself), at most ``images.max_redirects`` hops, at most
``images.max_remote_bytes`` counted while streaming (a missing or lying Content-Length changes nothing),
and ``images.remote_timeout_s`` for the whole download, redirects included. A size probe keeps the same
rules for schemes, redirects and addresses, and reads at most ``PROBE_BYTES``.

Unless ``images.allow_private_urls``, no hop may reach a loopback, private, link-local, multicast or
otherwise non-public address: a manifest must not be a way to read the cloud metadata service or an
internal admin page. The check sits where the connection is made: the session's resolver refuses a name
that resolves to such an address, so the answer checked is the answer connected to (no window for DNS
rebinding), and each redirect is resolved afresh. IP literals, which aiohttp does not resolve, are checked
before each request.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Mapping
from typing import TypeVar

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from pipeline.config import ImagesConfig
from pipeline.records import ErrorKind, ImageError, RemoteProbe
from pipeline.refs import REMOTE_SCHEMES, shorten_url
from pipeline.sniff import measure_image_bytes

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
READ_CHUNK_BYTES = 64 * 1024
USER_AGENT = "vision-pipeline/0.1 (image download)"
ERROR_TEXT_CHARS = 200
PROBE_BYTES = 64 * 1024  # a JPEG's size comes after its EXIF block, which is rarely larger
PROBE_REFUSED = "probe: refused, not a public address (images.allow_private_urls)"

T = TypeVar("T")


class AddressRefused(OSError):
    """A host that is, or resolves to, an address we may not reach (images.allow_private_urls = false)."""


class _HopRefused(Exception):
    """A redirect that is not followed: to another scheme, without a Location, or one too many."""


def is_public_address(address: str) -> bool:
    """Whether an IP address is on the public internet: not loopback, private, link-local, shared, reserved,
    multicast or unspecified, nor an IPv6 form that embeds such an IPv4 address (mapped, 6to4, Teredo)."""
    ip = ipaddress.ip_address(address.partition("%")[0])  # drop an IPv6 zone such as fe80::1%eth0
    if ip.is_multicast or not ip.is_global:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = [ip.ipv4_mapped, ip.sixtofour, ip.teredo[1] if ip.teredo else None]
        return all(v4 is None or is_public_address(str(v4)) for v4 in embedded)
    return True


class _PublicOnlyResolver(AbstractResolver):
    """aiohttp's resolver, refusing any name with a non-public address among its answers."""

    def __init__(self) -> None:
        self._inner = aiohttp.DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        answers = await self._inner.resolve(host, port, family)
        for answer in answers:
            if not is_public_address(answer["host"]):  # one bad answer taints the name: refuse them all
                raise AddressRefused(f"{host} resolves to {answer['host']}, which is not a public address")
        return answers

    async def close(self) -> None:
        await self._inner.close()


def open_session(cfg: ImagesConfig) -> aiohttp.ClientSession:
    """A session for image downloads under `cfg`'s address rule; use it as ``async with``.

    No cookies, no proxy from the environment, no automatic redirects (``fetch_image`` follows them).
    Must be called inside the running event loop.
    """
    resolver = None if cfg.allow_private_urls else _PublicOnlyResolver()
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(resolver=resolver),
        timeout=aiohttp.ClientTimeout(total=cfg.remote_timeout_s),
        headers={"User-Agent": USER_AGENT},
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,
    )


async def fetch_image(session: aiohttp.ClientSession, url: str, cfg: ImagesConfig, *, row_id: str) -> bytes:
    """The bytes at the http(s) `url`, following at most ``cfg.max_redirects`` redirects.

    `session` comes from ``open_session(cfg)``. Raises ImageError (one line naming the row and the URL
    without its query string) for another scheme, a refused address, an HTTP status other than 200, more
    than ``cfg.max_remote_bytes``, more than ``cfg.remote_timeout_s`` in all, or a connection failure.
    """
    short = shorten_url(url)

    async def read(response: aiohttp.ClientResponse) -> bytes:
        if response.status != 200:
            raise ImageError(
                row_id,
                f"download failed: HTTP {response.status} {response.reason or ''}".rstrip(),
                kind=ErrorKind.DOWNLOAD_FAILED,
                path=short,
            )
        return await _read_at_most(response, cfg, row_id=row_id, short=short)

    try:
        async with asyncio.timeout(cfg.remote_timeout_s):
            return await _follow(session, URL(url), cfg, read)
    except TimeoutError:
        reason = f"download took longer than images.remote_timeout_s = {cfg.remote_timeout_s:g} s"
        raise ImageError(row_id, reason, kind=ErrorKind.DOWNLOAD_FAILED, path=short) from None
    except _HopRefused as err:
        raise ImageError(row_id, str(err), kind=ErrorKind.DOWNLOAD_FAILED, path=short) from None
    except AddressRefused as err:  # an IP literal, refused before connecting
        raise ImageError(row_id, _refused(str(err)), kind=ErrorKind.DOWNLOAD_FAILED, path=short) from None
    except aiohttp.ClientConnectorError as err:
        if isinstance(err.os_error, AddressRefused):
            raise ImageError(
                row_id, _refused(str(err.os_error)), kind=ErrorKind.DOWNLOAD_FAILED, path=short
            ) from None
        raise ImageError(
            row_id,
            f"download failed: cannot connect: {_one_line(err.os_error)}",
            kind=ErrorKind.DOWNLOAD_FAILED,
            path=short,
        ) from None
    except (aiohttp.ClientError, ValueError) as err:  # ValueError: yarl on a malformed URL or Location
        raise ImageError(
            row_id,
            f"download failed: {type(err).__name__}: {_one_line(err)}",
            kind=ErrorKind.DOWNLOAD_FAILED,
            path=short,
        ) from None


async def probe_image(
    session: aiohttp.ClientSession, url: str, cfg: ImagesConfig, *, timeout_s: float
) -> RemoteProbe:
    """The size in the header of the http(s) `url`'s first PROBE_BYTES, fetched with a Range request.

    For the estimator. `session` comes from ``open_session(cfg)``: the probe follows redirects and obeys
    the address rule exactly as ``fetch_image`` does. Never raises for the image: a failure (an HTTP status
    other than 200 or 206, no size in the bytes read, a refused address or redirect, more than
    `timeout_s`, a connection error) comes back as ``unsized_because``. ``total_bytes`` is the whole
    file's length when the server says it, so the caller can apply ``cfg.max_image_bytes``.
    """
    headers = {"Range": f"bytes=0-{PROBE_BYTES - 1}", "Accept-Encoding": "identity"}

    async def read(response: aiohttp.ClientResponse) -> tuple[int, int | None, bytes]:
        if response.status not in (200, 206):
            return response.status, None, b""
        total_bytes = _total_bytes(response.headers, response.status)
        return response.status, total_bytes, await _read_head(response.content)

    try:
        async with asyncio.timeout(timeout_s):
            status, total_bytes, head = await _follow(session, URL(url), cfg, read, headers=headers)
    except TimeoutError:
        return RemoteProbe(None, unsized_because="probe: timed out")
    except _HopRefused as err:
        return RemoteProbe(None, unsized_because=f"probe: {err}")
    except AddressRefused:
        return RemoteProbe(None, unsized_because=PROBE_REFUSED)
    except (aiohttp.ClientError, ValueError) as err:  # ValueError: a URL yarl cannot parse
        if isinstance(err, aiohttp.ClientConnectorError) and isinstance(err.os_error, AddressRefused):
            return RemoteProbe(None, unsized_because=PROBE_REFUSED)
        return RemoteProbe(None, unsized_because=f"probe: {type(err).__name__}")
    if status not in (200, 206):
        return RemoteProbe(None, unsized_because=f"probe: HTTP {status}")
    try:  # the header reader used for files, over the bytes we have
        size = await asyncio.to_thread(measure_image_bytes, head, ref=url, row_id="probe")
    except ImageError:  # not an image, or its size lies past the bytes read
        return RemoteProbe(None, total_bytes, f"probe: no size in the first {PROBE_BYTES // 1024} KiB")
    return RemoteProbe(size, total_bytes)


async def _follow(
    session: aiohttp.ClientSession,
    url: URL,
    cfg: ImagesConfig,
    read: Callable[[aiohttp.ClientResponse], Awaitable[T]],
    *,
    headers: Mapping[str, str] | None = None,
) -> T:
    """`read` of the answer at the end of at most ``cfg.max_redirects`` redirects, each hop checked first.

    Raises _HopRefused or AddressRefused for a hop that may not be requested.
    """
    for _ in range(cfg.max_redirects + 1):
        _check_target(url, cfg)
        async with session.get(url, headers=headers, allow_redirects=False) as response:
            if response.status in REDIRECT_STATUSES:
                location = response.headers.get("Location")
                if not location:
                    raise _HopRefused(f"HTTP {response.status} redirect without a Location")
                url = url.join(URL(location))  # a Location may be relative to the URL that sent it
                continue
            return await read(response)
    raise _HopRefused(f"more than images.max_redirects = {cfg.max_redirects} redirects")


def _check_target(url: URL, cfg: ImagesConfig) -> None:
    """Refuse a hop before it is requested: its scheme, and its address when the host is an IP literal."""
    if (url.scheme or "").lower() not in REMOTE_SCHEMES:
        raise _HopRefused(f"redirected to a {url.scheme or 'schemeless'}: URL; only http(s) is fetched")
    host = url.raw_host or ""
    try:
        ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return  # a name: the session's resolver checks what it resolves to
    if not cfg.allow_private_urls and not is_public_address(host):
        raise AddressRefused(f"{host} is not a public address")


def _refused(why: str) -> str:
    return f"download refused: {why} (set images.allow_private_urls = true to allow it)"


async def _read_at_most(
    response: aiohttp.ClientResponse, cfg: ImagesConfig, *, row_id: str, short: str
) -> bytes:
    """The body, refused as soon as it is known to exceed ``cfg.max_remote_bytes``."""
    limit = cfg.max_remote_bytes
    too_big = f"download is more than images.max_remote_bytes = {limit:,} bytes"
    if response.content_length is not None and response.content_length > limit:
        raise ImageError(
            row_id,
            f"{too_big} (Content-Length {response.content_length:,})",
            kind=ErrorKind.TOO_LARGE,
            path=short,
        )
    chunks: list[bytes] = []
    received = 0
    async for chunk in response.content.iter_chunked(READ_CHUNK_BYTES):
        received += len(chunk)
        if received > limit:
            raise ImageError(row_id, too_big, kind=ErrorKind.TOO_LARGE, path=short)
        chunks.append(chunk)
    return b"".join(chunks)


async def _read_head(stream: aiohttp.StreamReader) -> bytes:
    """Up to PROBE_BYTES: a server that ignores Range would send us the whole file."""
    chunks: list[bytes] = []
    while (got := sum(map(len, chunks))) < PROBE_BYTES and (chunk := await stream.read(PROBE_BYTES - got)):
        chunks.append(chunk)
    return b"".join(chunks)


def _total_bytes(headers: Mapping[str, str], status: int) -> int | None:
    """The whole file's length: Content-Range of a 206, Content-Length of a 200."""
    text = (
        headers.get("Content-Range", "").rpartition("/")[2]
        if status == 206
        else headers.get("Content-Length")
    )
    return int(text) if text and text.isdigit() else None


def _one_line(err: BaseException | None) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text[:ERROR_TEXT_CHARS]
