"""What an image reference is, and how one is shown in a log line.

A manifest names each image by a reference: an http(s) URL, a base64 ``data:`` URL, a URL of another
scheme (refused by ``images.py``), or a local path (anything without a scheme: a name like ``a:b.jpg`` is a
path). ``shorten_url`` makes any of them fit for a log line or an error: a data URL loses its payload, a
URL its query string and credentials.

Pure string work, with no image library: ``logs.py`` and ``remote.py`` import it without loading Pillow or
libvips.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

REMOTE_SCHEMES = ("http", "https")

_URL_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_DATA_URL_HEAD_CHARS = 64  # how much of a malformed data URL's header a log line may show


def url_scheme(ref: str) -> str | None:
    """The lower-case URL scheme of `ref`, or None for a local path (a name like ``a:b.jpg`` is a path)."""
    if ref[:5].lower() == "data:":
        return "data"
    match = _URL_SCHEME.match(ref)
    return match.group(1).lower() if match else None


def is_remote_url(ref: str) -> bool:
    """Whether the manifest reference `ref` is an http(s) URL, the kind ``remote.fetch_image`` downloads."""
    scheme, sep, _ = ref.partition("://")
    return bool(sep) and scheme.lower() in REMOTE_SCHEMES


def shorten_url(url: str) -> str:
    """A reference fit for a log line: a data URL loses its payload, a URL its query string and credentials.

    ``data:image/jpeg;base64,<183 kB>``; ``https://acct.blob.core.windows.net/c/a.jpg?…`` (the query may
    hold a SAS token). Anything else (a local path) comes back unchanged.
    """
    if url[:5].lower() == "data:":
        head, comma, payload = url.partition(",")
        if not comma:
            return f"data:<{_human_bytes(len(url))}, malformed>"
        head = head if len(head) <= _DATA_URL_HEAD_CHARS else head[:_DATA_URL_HEAD_CHARS] + "…"
        size = len(payload) * 3 // 4 if head.lower().endswith(";base64") else len(payload)
        return f"{head},<{_human_bytes(size)}>"
    if url_scheme(url) is None:
        return url
    try:
        parts = urlsplit(url)
        port = f":{parts.port}" if parts.port else ""
    except ValueError:  # a malformed port or host: show the scheme only
        return f"{url_scheme(url)}://<malformed>"
    dropped = "?…" if parts.query or parts.fragment else ""
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host  # an IPv6 address keeps its brackets
    return f"{parts.scheme}://{host}{port}{parts.path}{dropped}"


def _human_bytes(n: int) -> str:
    if n < 1000:
        return f"{n} B"
    if n < 1_000_000:
        return f"{n / 1000:.0f} kB"
    return f"{n / 1_000_000:.1f} MB"
