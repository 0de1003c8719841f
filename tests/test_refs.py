"""refs.py: what an image reference is, and how one is shown in a log line, without any image library."""

from __future__ import annotations

import pytest
from conftest import in_fresh_python

from pipeline.refs import is_remote_url, shorten_url, url_scheme


@pytest.mark.parametrize(
    ("ref", "scheme"),
    [("https://a.example/x.jpg", "https"), ("S3://bucket/x.jpg", "s3"), ("data:image/png;base64,AAAA", "data"),
     ("DATA:image/png;base64,AAAA", "data"), ("photos/x.jpg", None), ("shot 12:30.png", None),
     ("c:/photos/x.jpg", None)],
)  # fmt: skip
def test_a_reference_has_a_scheme_only_when_it_is_a_url(ref, scheme):
    """A colon alone does not make a URL: ``shot 12:30.png`` is a file name."""
    assert url_scheme(ref) == scheme


def test_shorten_url_keeps_a_data_urls_type_and_size_only():
    url = "data:image/jpeg;base64," + "A" * 244_000

    assert shorten_url(url) == "data:image/jpeg;base64,<183 kB>"


def test_shorten_url_drops_query_strings_and_credentials():
    url = "https://user:pw@acct.blob.core.windows.net/c/cat.jpg?sv=2024&sig=SECRET"

    assert shorten_url(url) == "https://acct.blob.core.windows.net/c/cat.jpg?…"


def test_shorten_url_keeps_the_brackets_of_an_ipv6_host():
    assert shorten_url("http://[fe80::1]:8080/a.jpg?sig=SECRET") == "http://[fe80::1]:8080/a.jpg?…"


def test_shorten_url_leaves_local_paths_alone():
    assert shorten_url("photos/cat.jpg") == "photos/cat.jpg"


@pytest.mark.parametrize(
    ("ref", "is_remote"),
    [("https://a.example/x.jpg", True), ("HTTP://a.example/x.jpg", True), ("file:///x.jpg", False),
     ("ftp://a.example/x.jpg", False), ("data:image/png;base64,AAAA", False), ("photos/x.jpg", False)],
)  # fmt: skip
def test_only_http_and_https_references_are_downloaded(ref, is_remote):
    assert is_remote_url(ref) is is_remote


def test_shorten_url_shows_a_malformed_url_by_its_scheme_only():
    assert shorten_url("https://host:port/a.jpg?sig=SECRET") == "https://<malformed>"


def test_importing_refs_loads_no_image_library():
    """logs.py and remote.py import it: a log line must not cost loading Pillow or libvips."""
    loaded = in_fresh_python(
        "import json, sys; import pipeline.refs; print(json.dumps(sorted({'PIL', 'pyvips'} & set(sys.modules))))"
    )

    assert loaded == []
