"""Reading, sniffing, orienting, downscaling and encoding images for the wire.

A local image is sent as a JPEG data URL of exactly the pixels the service looks at
(``tokens.viewed_size``): smaller requests, the same bill. Remote http(s) URLs and data URLs pass
through untouched. Everything here blocks on Pillow: call it from a thread, never from the event loop.

Formats are sniffed from the bytes, never from the file name: JPEG (MPO counts as JPEG), PNG, WebP,
GIF (its first frame), BMP and TIFF (its first page).
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import stat
import struct
import warnings
from pathlib import Path
from urllib.parse import urlsplit

from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from pipeline import tokens
from pipeline.config import ImagesConfig
from pipeline.records import Detail, ImageError, PreparedImage

SNIFFED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # Pillow opens MPO through its JPEG plugin
SUPPORTED_NAMES = "JPEG, PNG, WebP, GIF, BMP or TIFF"
FLATTEN_ONTO_RGB = (255, 255, 255)  # transparent pixels become white, as most viewers show them
RESIZE_REDUCING_GAP = 3.0  # Pillow: box-reduce first, then LANCZOS; indistinguishable from LANCZOS alone
# 16-bit samples: Pillow opens 16-bit greyscale PNG and TIFF as I;16 (older Pillow as I)
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
ORIENTATIONS_SWAPPING_SIDES = (5, 6, 7, 8)  # EXIF orientations that turn the picture a quarter

# Anything of more than images.max_pixels is refused from its header, before decoding, so Pillow's
# warning for images between its own limit (~89 Mpx) and ours is noise in an unattended run.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
Image.init()  # registers every format plugin: Image.open(formats=...) only knows those already loaded

_URL_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_DATA_URL_HEAD_CHARS = 64  # how much of a malformed data URL's header a log line may show


def prepare_image(
    ref: str, *, base_dir: Path, detail: Detail, cfg: ImagesConfig, row_id: str
) -> PreparedImage:
    """The image `ref` ready to send, with the size the model will view.

    `ref` is the manifest's reference: an http(s) URL (passed through, size unknown), a base64
    ``data:`` URL (passed through, size read from its header), or a path relative to `base_dir` that
    must stay inside it once resolved. A local image is oriented by EXIF, made RGB (alpha flattened onto
    white), shrunk to ``tokens.viewed_size`` of its oriented size (never enlarged) and encoded as JPEG at
    ``cfg.jpeg_quality``; so it costs the same tokens as the original. Blocks: decodes with Pillow.

    Raises ImageError (one line naming the row and the reference, never a data URL or file bytes) for
    another URL scheme, a path outside `base_dir`, a missing, empty, unreadable, truncated or
    unsupported file, more than ``cfg.max_pixels`` pixels, or more than ``cfg.max_image_bytes`` to send.
    """
    scheme = _scheme(ref)
    if scheme in ("http", "https"):
        return PreparedImage(url=ref, width=None, height=None)
    if scheme == "data":
        return _prepare_data_url(ref, cfg=cfg, row_id=row_id)
    if scheme is not None:
        raise ImageError(
            row_id, f"{scheme}: URLs are not supported (use http(s), data: or a path)", path=shorten_url(ref)
        )
    path = _local_path(ref, base_dir=base_dir, row_id=row_id)
    return _prepare_file(path, ref=ref, detail=detail, cfg=cfg, row_id=row_id)


def read_image_size(path: Path) -> tuple[int, int]:
    """The stored width and height in pixels of an image file, from its header only (nothing is decoded).

    EXIF orientation is ignored: token counts are the same either way round. Raises OSError when the
    file is missing, unreadable, not a supported image, or too large for Pillow to open safely.
    """
    try:
        with Image.open(path, formats=SNIFFED_FORMATS) as im:
            return im.size
    except Image.DecompressionBombError as err:
        raise OSError(f"{path}: {err}") from err


def measure_image(ref: str, *, base_dir: Path, row_id: str) -> tuple[int, int] | None:
    """The pixel size of image `ref` as ``prepare_image`` would see it, from headers only; None for http(s).

    For the estimator: the same reference rules and errors as ``prepare_image`` without decoding or
    encoding anything. Raises ImageError.
    """
    scheme = _scheme(ref)
    if scheme in ("http", "https"):
        return None
    if scheme == "data":
        data = _decode_data_url(ref, row_id=row_id)
        return _header_size(io.BytesIO(data), ref=shorten_url(ref), row_id=row_id)
    if scheme is not None:
        raise ImageError(
            row_id, f"{scheme}: URLs are not supported (use http(s), data: or a path)", path=shorten_url(ref)
        )
    path = _local_path(ref, base_dir=base_dir, row_id=row_id)
    return _header_size(path, ref=ref, row_id=row_id)


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
    if _scheme(url) is None:
        return url
    try:
        parts = urlsplit(url)
        port = f":{parts.port}" if parts.port else ""
    except ValueError:  # a malformed port or host: show the scheme only
        return f"{_scheme(url)}://<malformed>"
    dropped = "?…" if parts.query or parts.fragment else ""
    return f"{parts.scheme}://{parts.hostname or ''}{port}{parts.path}{dropped}"


def _scheme(ref: str) -> str | None:
    """The lower-case URL scheme of `ref`, or None for a local path (a name like ``a:b.jpg`` is a path)."""
    if ref[:5].lower() == "data:":
        return "data"
    match = _URL_SCHEME.match(ref)
    return match.group(1).lower() if match else None


def _local_path(ref: str, *, base_dir: Path, row_id: str) -> Path:
    """`ref` resolved against `base_dir`: inside it once links are followed, and a non-empty regular file."""
    root = base_dir.resolve()
    try:
        path = (root / ref).resolve()
        if not path.is_relative_to(root):
            raise ImageError(row_id, f"outside the manifest's folder {root}", path=ref)
        st = path.stat()
    except FileNotFoundError:
        raise ImageError(row_id, "file not found", path=ref) from None
    except (OSError, RuntimeError, ValueError) as err:  # RuntimeError: a symlink loop (Python 3.11)
        raise ImageError(row_id, f"cannot read: {_one_line(err)}", path=ref) from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageError(row_id, "is a folder, not an image", path=ref)
    if not stat.S_ISREG(st.st_mode):
        raise ImageError(row_id, "is not a regular file", path=ref)  # a FIFO would block the worker forever
    if st.st_size == 0:
        raise ImageError(row_id, "file is empty (0 bytes)", path=ref)
    return path


def _prepare_file(path: Path, *, ref: str, detail: Detail, cfg: ImagesConfig, row_id: str) -> PreparedImage:
    try:
        source_bytes = path.stat().st_size
        with Image.open(path, formats=SNIFFED_FORMATS) as im:
            stored_w, stored_h = im.size
            _check_pixels(stored_w, stored_h, cfg=cfg, ref=ref, row_id=row_id)
            turns = im.getexif().get(ExifTags.Base.Orientation) in ORIENTATIONS_SWAPPING_SIDES
            oriented_w, oriented_h = (stored_h, stored_w) if turns else (stored_w, stored_h)
            target = tokens.viewed_size(oriented_w, oriented_h, detail)
            if im.format in ("JPEG", "MPO") and target != (oriented_w, oriented_h):
                # DCT scaling while decoding: a big JPEG decodes at 1/2 to 1/8 of the work, still >= target
                im.draft("RGB", (target[1], target[0]) if turns else target)
            im.load()  # decodes; a truncated file raises here
            ImageOps.exif_transpose(im, in_place=True)  # in place: no second full-size copy
            rgb = _to_rgb(im)
            if rgb.size != target:
                rgb = rgb.resize(target, Image.Resampling.LANCZOS, reducing_gap=RESIZE_REDUCING_GAP)
            buffer = io.BytesIO()
            rgb.save(buffer, "JPEG", quality=cfg.jpeg_quality, optimize=False)  # optimize: slow, little gain
    except FileNotFoundError:
        raise ImageError(row_id, "file not found", path=ref) from None
    except PermissionError as err:
        raise ImageError(row_id, f"cannot read: {err.strerror or err}", path=ref) from None
    except UnidentifiedImageError:
        raise ImageError(row_id, f"not a {SUPPORTED_NAMES} image", path=ref) from None
    except Image.DecompressionBombError as err:
        raise ImageError(row_id, f"too many pixels to decode safely: {_one_line(err)}", path=ref) from None
    except (OSError, ValueError, EOFError, SyntaxError, struct.error) as err:  # Pillow's decoders on bad data
        raise ImageError(row_id, f"damaged or truncated image: {_one_line(err)}", path=ref) from None
    jpeg = buffer.getvalue()
    if len(jpeg) > cfg.max_image_bytes:
        raise ImageError(
            row_id,
            f"{len(jpeg):,} bytes as JPEG is more than images.max_image_bytes = {cfg.max_image_bytes:,}",
            path=ref,
        )
    return PreparedImage(
        url="data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii"),
        width=target[0],
        height=target[1],
        source_bytes=source_bytes,
        sent_bytes=len(jpeg),
    )


def _to_rgb(im: Image.Image) -> Image.Image:
    """`im` as 8-bit RGB: 16-bit samples scaled down, transparency flattened onto white."""
    if im.mode in SIXTEEN_BIT_MODES:
        im = im.convert("I").point(lambda v: v / 256).convert("L")  # a plain convert clips at 255: all white
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        flat = Image.new("RGB", rgba.size, FLATTEN_ONTO_RGB)
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return im if im.mode == "RGB" else im.convert("RGB")


def _prepare_data_url(url: str, *, cfg: ImagesConfig, row_id: str) -> PreparedImage:
    """A data URL goes out as given; its size comes from the decoded header, nothing more is decoded."""
    short = shorten_url(url)
    data = _decode_data_url(url, row_id=row_id)
    if len(data) > cfg.max_image_bytes:
        raise ImageError(
            row_id,
            f"{len(data):,} bytes is more than images.max_image_bytes = {cfg.max_image_bytes:,}",
            path=short,
        )
    width, height = _header_size(io.BytesIO(data), ref=short, row_id=row_id)
    _check_pixels(width, height, cfg=cfg, ref=short, row_id=row_id)
    return PreparedImage(url=url, width=width, height=height, source_bytes=len(data), sent_bytes=len(data))


def _decode_data_url(url: str, *, row_id: str) -> bytes:
    """The bytes of a ``data:<type>;base64,<payload>`` URL."""
    short = shorten_url(url)
    head, comma, payload = url.partition(",")
    if not comma or not head.lower().endswith(";base64"):
        raise ImageError(row_id, "a data URL must look like data:image/<type>;base64,<data>", path=short)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError(row_id, "data URL is not valid base64", path=short) from None
    if not data:
        raise ImageError(row_id, "data URL holds no bytes", path=short)
    return data


def _header_size(source: Path | io.BytesIO, *, ref: str, row_id: str) -> tuple[int, int]:
    try:
        with Image.open(source, formats=SNIFFED_FORMATS) as im:
            return im.size
    except UnidentifiedImageError:
        raise ImageError(row_id, f"not a {SUPPORTED_NAMES} image", path=ref) from None
    except Image.DecompressionBombError as err:
        raise ImageError(row_id, f"too many pixels to decode safely: {_one_line(err)}", path=ref) from None
    except OSError as err:
        raise ImageError(row_id, f"cannot read: {_one_line(err)}", path=ref) from None


def _check_pixels(width: int, height: int, *, cfg: ImagesConfig, ref: str, row_id: str) -> None:
    if width * height > cfg.max_pixels:
        raise ImageError(
            row_id,
            f"too many pixels: {width}×{height} is more than images.max_pixels = {cfg.max_pixels:,}",
            path=ref,
        )


def _human_bytes(n: int) -> str:
    if n < 1000:
        return f"{n} B"
    if n < 1_000_000:
        return f"{n / 1000:.0f} kB"
    return f"{n / 1_000_000:.1f} MB"


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__
