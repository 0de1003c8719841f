"""Reading, sniffing, orienting, downscaling and encoding images for the wire.

A local image (or, with ``images.fetch_remote``, a downloaded one: ``prepare_image_bytes``) is sent as a
data URL of exactly the pixels the service looks at (``tokens.viewed_size``): smaller requests, the same
bill. Remote http(s) URLs and data URLs pass through untouched. Pillow reads headers and the formats
libvips is not given; libvips (pyvips) reads plain colour JPEGs, and shrinks and encodes every image.
Everything here blocks: call it from a thread, never from the event loop (the runner keeps a pool of
``image_threads``). Nothing here speaks HTTP (``remote.py`` downloads).

Formats are sniffed from the bytes, never taken from the file name: JPEG (MPO counts as JPEG), PNG, WebP,
GIF (its first frame), BMP, TIFF (its first page), AVIF (Pillow >= 11.3 reads it natively) and
HEIC/HEIF when a HEIF plugin is installed (``pi-heif``, decode-only; ``pillow-heif`` works too). Without
one, a HEIC file is refused with a reason that says what to install. A local file whose extension names
another format than its bytes (a PNG named .jpg: usually an export gone wrong upstream) is refused unless
``images.extension_must_match = false``; downloads are not held to their URL's extension, as servers
often answer a .jpg URL with WebP.

Encoding: JPEG at ``images.jpeg_quality`` by default; ``images.encoding = "png"`` sends lossless PNG.
No metadata goes along (EXIF, GPS, comments, colour profiles): an embedded ICC profile is not applied
either, so the pixels go out as stored (converting with lcms would cost ~7 ms a photo).
Transparency: the service does not document how it composites alpha, so by default transparent pixels
are flattened onto white, as viewers show them, and the model sees what a person sees. With
``images.keep_alpha = true`` an image that has transparent pixels goes out as an RGBA PNG whatever the
encoding (JPEG has no alpha), for users whose images mean something by their transparency. An alpha
channel that is fully opaque is dropped either way.

``detail = "auto"`` is prepared like ``high``. The reference says only that the service "decides between
low or high based on the size of the image input". The high view leaves an image alone unless its short
side is over 768 px or its long side over 2048 px, and then keeps its long side at 768 px or more; so an
image that fits the 512×512 low view still does and one that does not still does not, and any threshold
on the long side up to 768 px decides the same for the prepared image as for the original.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import ctypes
import io
import logging
import os
import re
import stat
import struct
import warnings
from collections.abc import Sequence
from pathlib import Path, PurePath
from typing import BinaryIO
from urllib.parse import urlsplit

import pyvips
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from pipeline import tokens
from pipeline.config import ImagesConfig
from pipeline.records import Detail, ErrorKind, ImageError, PreparedImage, RowError

try:  # decode-only HEIF support; optional so that a plain `pip install` still works without it
    import pi_heif as _heif_plugin
except ImportError:  # pragma: no cover - requirements.lock installs pi-heif
    try:
        import pillow_heif as _heif_plugin  # type: ignore[no-redef]
    except ImportError:
        _heif_plugin = None  # type: ignore[assignment]
if _heif_plugin is not None:
    _heif_plugin.register_heif_opener()

# Each thread of the run's image pool shrinks one image at a time: libvips needs no threads of its own,
# and nothing it computes is used twice, so its operation cache would only hold on to pixels.
pyvips.concurrency_set(1)
pyvips.cache_set_max(0)
# pyvips relays libvips' messages to logging: an INFO line per operation ("threadpool completed") and a
# WARNING per tile of a damaged image, whose one-line reason is already the row's error
logging.getLogger("pyvips").setLevel(logging.ERROR)

Image.init()  # registers every format plugin: Image.open(formats=...) only knows those already loaded

# Tried in this order. AVIF before HEIF: a HEIF plugin may claim AVIF files it has no decoder for.
_WANTED_FORMATS = {"JPEG": "JPEG", "PNG": "PNG", "WEBP": "WebP", "GIF": "GIF", "BMP": "BMP", "TIFF": "TIFF",
                   "AVIF": "AVIF", "HEIF": "HEIC"}  # fmt: skip
SNIFFED_FORMATS = tuple(name for name in _WANTED_FORMATS if name in Image.OPEN)  # MPO opens as JPEG
_NAMES = [_WANTED_FORMATS[name] for name in SNIFFED_FORMATS]
SUPPORTED_NAMES = ", ".join(_NAMES[:-1]) + " or " + _NAMES[-1]
# Pillow's names that are one format as far as a file's extension goes (AVIF is HEIF with AV1 inside)
_FORMAT_FAMILY = {"MPO": "JPEG", "DIB": "BMP", "AVIF": "HEIF"}

# ISO base media files (HEIF, AVIF) start with an ftyp box: size, "ftyp", major brand, version, brands.
HEIF_BRANDS = frozenset(
    {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1"}
)
AVIF_BRANDS = frozenset({b"avif", b"avis"})
SNIFF_BYTES = 64

FLATTEN_ONTO_RGB = (255, 255, 255)  # transparent pixels become white, as most viewers show them
# Shrinking is libvips' Lanczos-3, whose vectorised kernels take 7 ms of CPU for a 2000×1500 draft of a
# 12 Mpx photo where Pillow's bicubic takes 20 (Lanczos 29), and keep fine print 0.2 dB closer to a
# full-resolution Lanczos than Pillow's bicubic does (bench/images_bench.py). The service's own filter is
# not documented; the pixel count, which is what it bills, is the same whatever the filter.
RESAMPLE_KERNEL = "lanczos3"
JPEG_SHRINKS = (1, 2, 4, 8)  # the DCT scalings both libjpeg readers (Pillow's draft, libvips) offer
PNG_COMPRESS_LEVEL = 3  # zlib-ng: smaller than level 6 on photos, in half the time; 9: 11× slower, 5 % less
# 16-bit samples: Pillow opens 16-bit greyscale PNG and TIFF as I;16 (older Pillow as I)
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
ORIENTATIONS_SWAPPING_SIDES = (5, 6, 7, 8)  # EXIF orientations that turn the picture a quarter
IN_ORDER_ORIENTATIONS = (1, 2)  # upright, or mirrored left to right: turned upright line by line

# Anything of more than images.max_pixels is refused from its header, before decoding, so Pillow's
# warning for images between its own limit (~89 Mpx) and ours is noise in an unattended run.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

log = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h) and the values reuse_freed_image_memory sets: blocks up to the
# largest mmap threshold glibc accepts come from the heap, and up to 128 MB spare stays there.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MALLOC_MMAP_BYTES = 32 * 1024 * 1024
MALLOC_TRIM_BYTES = 128 * 1024 * 1024

_URL_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_DATA_URL_HEAD_CHARS = 64  # how much of a malformed data URL's header a log line may show


def reuse_freed_image_memory() -> None:
    """Let glibc keep freed image buffers for the next image instead of handing them back to the kernel.

    Preparing a 12 Mpx photo passes ~25 MB through buffers of 9 to 12 MB each (Pillow's blocks, the pixels
    handed to libvips). glibc serves blocks that large with fresh mappings and unmaps them on free, so every
    image faults its pages in again: ~10 ms of system time per photo, a fifth of its cost
    (bench/images_bench.py). With these thresholds they come from the heap and stay there, at most
    ``MALLOC_TRIM_BYTES`` spare per allocator arena (glibc keeps one per thread at most). Process-wide,
    so the runner calls it, once; other C libraries have no ``mallopt`` and keep their own policy.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):  # macOS, Windows, musl without the symbol
        return
    mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_BYTES)
    mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_BYTES)


def image_threads(cfg: ImagesConfig) -> int:
    """How many images to prepare at once: ``cfg.threads``, or one more than the CPU cores this process
    may use.

    Preparing is CPU-bound and mostly outside the GIL (libvips; Pillow for the formats libvips does not
    read), so threads use every core. The one extra keeps the cores busy while a thread waits for the GIL
    or the disk: 55 photos/s instead of 52 with 6 threads against 2 on 2 cores (bench/images_bench.py).
    """
    if cfg.threads:
        return cfg.threads
    try:
        cores = len(os.sched_getaffinity(0))  # a container or taskset may allow fewer than os.cpu_count()
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    return cores + 1


def prepare_image(
    ref: str, *, base_dir: Path, detail: Detail, cfg: ImagesConfig, row_id: str
) -> PreparedImage:
    """The image `ref` ready to send, with the size the model will view.

    `ref` is the manifest's reference: an http(s) URL (passed through, size unknown; the runner downloads
    it first when ``cfg.fetch_remote``), a base64 ``data:`` URL (passed through, size read from its
    header), or a path relative to `base_dir` that must stay inside ``cfg.allowed_roots`` (default:
    `base_dir`) once resolved. A local image is oriented by EXIF, made RGB (see the module's notes on
    alpha), shrunk to ``tokens.viewed_size`` of its oriented size (never enlarged) and encoded as
    ``cfg.encoding``; so it costs the same tokens as the original. Blocks: decodes with Pillow or libvips.

    Raises ImageError (one line naming the row and the reference, never a data URL or file bytes) for
    another URL scheme, a path outside the allowed folders, a missing, empty, unreadable, truncated or
    unsupported file, more than ``cfg.max_pixels`` pixels, or more than ``cfg.max_image_bytes`` to send.
    """
    scheme = _scheme(ref)
    if scheme in ("http", "https"):
        return PreparedImage(url=ref, width=None, height=None)
    if scheme == "data":
        return _prepare_data_url(ref, cfg=cfg, row_id=row_id)
    if scheme is not None:
        raise ImageError(
            row_id,
            f"{scheme}: URLs are not supported (use http(s), data: or a path)",
            kind=ErrorKind.UNSUPPORTED_FORMAT,
            path=shorten_url(ref),
        )
    path = _local_path(ref, base_dir=base_dir, allowed_roots=cfg.allowed_roots, row_id=row_id)
    return _prepare(path, ref=ref, detail=detail, cfg=cfg, row_id=row_id)


def prepare_image_bytes(
    data: bytes, *, ref: str, detail: Detail, cfg: ImagesConfig, row_id: str
) -> PreparedImage:
    """Downloaded image bytes ready to send, exactly as ``prepare_image`` prepares a local file.

    `ref` names the image in errors (pass the URL; it is shortened). Blocks. Raises ImageError.
    """
    short = shorten_url(ref)
    if not data:
        raise ImageError(row_id, "download is empty (0 bytes)", kind=ErrorKind.UNREADABLE_IMAGE, path=short)
    return _prepare(io.BytesIO(data), ref=short, detail=detail, cfg=cfg, row_id=row_id)


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


def check_request_size(images: Sequence[PreparedImage], *, cfg: ImagesConfig, row_id: str) -> None:
    """Raise RowError when a row's data URLs together exceed ``cfg.max_request_bytes``.

    The service would refuse the request, and only after it had been uploaded. Ten images can each be
    within ``cfg.max_image_bytes`` (lossless PNGs, data URLs from the manifest) and too large together.
    """
    total = sum(len(image.url) for image in images if image.url[:5].lower() == "data:")
    if total > cfg.max_request_bytes:
        raise RowError(
            row_id,
            f"{len(images)} images come to {total:,} bytes of data URLs, more than "
            f"images.max_request_bytes = {cfg.max_request_bytes:,}",
            kind=ErrorKind.TOO_LARGE,
        )


def measure_image(ref: str, *, base_dir: Path, cfg: ImagesConfig, row_id: str) -> tuple[int, int] | None:
    """The pixel size of image `ref` as ``prepare_image`` would see it, from headers only; None for http(s).

    For the estimator: the same reference rules and refusals as ``prepare_image`` under `cfg` (folders
    outside ``cfg.allowed_roots``, more than ``cfg.max_pixels``, a data URL of more than
    ``cfg.max_image_bytes``) without decoding or encoding anything. What only encoding can tell (a local
    image too large once encoded) is not checked. Blocks on file reads. Raises ImageError.
    """
    scheme = _scheme(ref)
    if scheme in ("http", "https"):
        return None
    if scheme == "data":
        width, height, _ = _measure_data_url(ref, cfg=cfg, row_id=row_id)
        return width, height
    if scheme is not None:
        raise ImageError(
            row_id,
            f"{scheme}: URLs are not supported (use http(s), data: or a path)",
            kind=ErrorKind.UNSUPPORTED_FORMAT,
            path=shorten_url(ref),
        )
    path = _local_path(ref, base_dir=base_dir, allowed_roots=cfg.allowed_roots, row_id=row_id)
    width, height, fmt = _header(path, ref=ref, row_id=row_id)
    if cfg.extension_must_match:
        _check_extension(ref, fmt, row_id=row_id)
    _check_pixels(width, height, cfg=cfg, ref=ref, row_id=row_id)
    return width, height


def measure_image_bytes(data: bytes, *, ref: str, row_id: str) -> tuple[int, int]:
    """The pixel size in the header of an image's bytes, or of only its first bytes; nothing is decoded.

    `ref` names the image in errors (pass the URL; it is shortened). Raises ImageError when the bytes are
    not a supported image or its size lies past them.
    """
    width, height, _ = _header(io.BytesIO(data), ref=shorten_url(ref), row_id=row_id)
    return width, height


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
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host  # an IPv6 address keeps its brackets
    return f"{parts.scheme}://{host}{port}{parts.path}{dropped}"


def _scheme(ref: str) -> str | None:
    """The lower-case URL scheme of `ref`, or None for a local path (a name like ``a:b.jpg`` is a path)."""
    if ref[:5].lower() == "data:":
        return "data"
    match = _URL_SCHEME.match(ref)
    return match.group(1).lower() if match else None


def _local_path(ref: str, *, base_dir: Path, allowed_roots: Sequence[str], row_id: str) -> Path:
    """`ref` resolved against `base_dir`: inside an allowed root once links are followed, a non-empty file.

    The roots are `allowed_roots` (relative ones against `base_dir`), or `base_dir` alone when empty.
    """
    base = base_dir.resolve()
    try:
        roots = [(base / Path(root).expanduser()).resolve() for root in allowed_roots] or [base]
        path = (base / ref).resolve()
        if not any(path.is_relative_to(root) for root in roots):
            if allowed_roots:
                raise ImageError(
                    row_id,
                    f"outside images.allowed_roots ({', '.join(map(str, roots))})",
                    kind=ErrorKind.OUTSIDE_ALLOWED_FOLDERS,
                    path=ref,
                )
            raise ImageError(
                row_id,
                f"outside the manifest's folder {base}",
                kind=ErrorKind.OUTSIDE_ALLOWED_FOLDERS,
                path=ref,
            )
        st = path.stat()
    except FileNotFoundError:
        raise ImageError(row_id, "file not found", kind=ErrorKind.MISSING_FILE, path=ref) from None
    except (OSError, RuntimeError, ValueError) as err:  # RuntimeError: a symlink loop (Python 3.11)
        raise ImageError(
            row_id, f"cannot read: {_one_line(err)}", kind=ErrorKind.UNREADABLE_IMAGE, path=ref
        ) from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageError(row_id, "is a folder, not an image", kind=ErrorKind.UNREADABLE_IMAGE, path=ref)
    if not stat.S_ISREG(st.st_mode):
        raise ImageError(
            row_id, "is not a regular file", kind=ErrorKind.UNREADABLE_IMAGE, path=ref
        )  # a FIFO would block the worker forever
    if st.st_size == 0:
        raise ImageError(row_id, "file is empty (0 bytes)", kind=ErrorKind.UNREADABLE_IMAGE, path=ref)
    return path


def _prepare(
    source: Path | io.BytesIO, *, ref: str, detail: Detail, cfg: ImagesConfig, row_id: str
) -> PreparedImage:
    """Decode, orient, convert, shrink to the viewed size and encode one image file or buffer.

    Pillow reads the header and makes the checks. A plain 8-bit colour JPEG, most of what cameras and
    phones write, is then decoded by libvips, which shrinks by DCT scaling as it reads and then rotates,
    resamples and encodes without holding the GIL; anything else is decoded and made RGB by Pillow and
    handed over. Pillow's own JPEG decoder and encoder hold the GIL for part of their work, which kept two
    threads from two cores: 51 images/s instead of 56 (bench/images_bench.py). The file is opened once:
    both read the same bytes, whatever happens to its name meanwhile.
    """
    try:
        with _opened(source) as fp, Image.open(fp, formats=SNIFFED_FORMATS) as im:
            source_bytes = (
                os.fstat(fp.fileno()).st_size if isinstance(source, Path) else len(source.getbuffer())
            )
            stored_w, stored_h = im.size
            if isinstance(source, Path) and cfg.extension_must_match:
                _check_extension(ref, im.format or "", row_id=row_id)
            _check_pixels(stored_w, stored_h, cfg=cfg, ref=ref, row_id=row_id)
            orientation = im.getexif().get(ExifTags.Base.Orientation, 1)
            turns = orientation in ORIENTATIONS_SWAPPING_SIDES
            target = tokens.viewed_size(*((stored_h, stored_w) if turns else (stored_w, stored_h)), detail)
            stored_target = (target[1], target[0]) if turns else target
            done = None
            if im.format in ("JPEG", "MPO") and im.mode == "RGB":
                done = _jpeg_by_libvips(fp, im.size, stored_target, orientation, target, cfg)
            if done is None:
                done = _finish(_from_pillow(im, stored_target, keep_alpha=cfg.keep_alpha), target, cfg)
            mime, encoded = done
    except FileNotFoundError:
        raise ImageError(row_id, "file not found", kind=ErrorKind.MISSING_FILE, path=ref) from None
    except PermissionError as err:
        raise ImageError(
            row_id, f"cannot read: {err.strerror or err}", kind=ErrorKind.UNREADABLE_IMAGE, path=ref
        ) from None
    except UnidentifiedImageError:
        raise ImageError(
            row_id, _unidentified_reason(_head(source)), kind=ErrorKind.UNSUPPORTED_FORMAT, path=ref
        ) from None
    except Image.DecompressionBombError as err:
        raise ImageError(
            row_id,
            f"too many pixels to decode safely: {_one_line(err)}",
            kind=ErrorKind.TOO_MANY_PIXELS,
            path=ref,
        ) from None
    except (OSError, ValueError, EOFError, SyntaxError, struct.error) as err:  # Pillow's decoders on bad data
        raise ImageError(
            row_id, f"damaged or truncated image: {_one_line(err)}", kind=ErrorKind.UNREADABLE_IMAGE, path=ref
        ) from None
    except pyvips.Error as err:  # decoded pixels that libvips could not shrink or encode: not expected
        reason = " ".join(err.message.split())  # not .detail: libvips' process-wide buffer, other rows' text
        raise ImageError(
            row_id,
            f"could not shrink or encode the image: {reason}",
            kind=ErrorKind.UNREADABLE_IMAGE,
            path=ref,
        ) from None
    if len(encoded) > cfg.max_image_bytes:
        kind = mime.removeprefix("image/").upper()
        raise ImageError(
            row_id,
            f"{len(encoded):,} bytes as {kind} is more than images.max_image_bytes = {cfg.max_image_bytes:,}",
            kind=ErrorKind.TOO_LARGE,
            path=ref,
        )
    return PreparedImage(
        url=f"data:{mime};base64," + base64.b64encode(encoded).decode("ascii"),
        width=target[0],
        height=target[1],
        source_bytes=source_bytes,
        sent_bytes=len(encoded),
    )


def _opened(source: Path | io.BytesIO) -> contextlib.AbstractContextManager[BinaryIO]:
    return open(source, "rb") if isinstance(source, Path) else contextlib.nullcontext(source)


def _jpeg_shrink(size: tuple[int, int], target: tuple[int, int]) -> int:
    """The largest DCT scaling (1/1, 1/2, 1/4 or 1/8) that still leaves `size` at least `target`."""
    ratio = min(size[0] // target[0], size[1] // target[1])
    return max(shrink for shrink in JPEG_SHRINKS if shrink <= max(ratio, 1))


def _jpeg_by_libvips(
    fp: BinaryIO,
    stored_size: tuple[int, int],
    stored_target: tuple[int, int],
    orientation: int,
    target: tuple[int, int],
    cfg: ImagesConfig,
) -> tuple[str, bytes] | None:
    """The JPEG in `fp` decoded (DCT-scaled towards `stored_target`), turned upright, shrunk to `target`
    and encoded by libvips: its MIME type and bytes, or None when libvips refuses it.

    libvips is told to fail on libjpeg's warnings, so that corrupt scan data never decodes to a grey
    smear that the service bills and describes. Some warnings are only glitches in the headers, which
    Pillow reads past, and libvips' error text is one buffer for the whole process that other threads
    overwrite. So a refusal here sends the image on to Pillow, whose decoder decides and says why.

    An image that needs no turn and no upside-down flip is read line by line as it is shrunk (1 ms a
    photo less); any other is decoded whole first, as libvips reads it out of order to turn it.
    """
    fp.seek(0)
    access = "sequential" if orientation in IN_ORDER_ORIENTATIONS else "random"
    try:
        jpeg = pyvips.Image.jpegload_buffer(
            fp.read(), shrink=_jpeg_shrink(stored_size, stored_target), access=access, fail_on="warning"
        )
        return _finish(_upright(jpeg, orientation), target, cfg)
    except pyvips.Error:
        log.debug("libvips refused a JPEG; Pillow reads it instead")
        return None


def _finish(pixels: pyvips.Image, target: tuple[int, int], cfg: ImagesConfig) -> tuple[str, bytes]:
    """Upright RGB or RGBA pixels shrunk to `target` and encoded: their MIME type and bytes."""
    if (pixels.width, pixels.height) != target:
        pixels = _shrink(pixels, target)
    return _encode(pixels, cfg)


def _upright(im: pyvips.Image, orientation: int) -> pyvips.Image:
    """`im` turned and mirrored as EXIF `orientation` (1-8) says, the way Pillow's exif_transpose does.

    Pillow read the orientation that sized the target, so libvips applies that one rather than its own
    reading of the EXIF: the two can disagree on a damaged EXIF block, and the picture would be squashed.
    """
    turned = {3: "d180", 5: "d90", 6: "d90", 7: "d270", 8: "d270"}.get(orientation)
    if turned is not None:
        im = im.rot(turned)  # clockwise
    if orientation in (2, 4, 5, 7):
        im = im.flip("vertical" if orientation == 4 else "horizontal")
    return im


def _from_pillow(im: Image.Image, stored_target: tuple[int, int], *, keep_alpha: bool) -> pyvips.Image:
    """Any other image decoded by Pillow (a JPEG drafted towards `stored_target`), upright, RGB or RGBA."""
    if im.format in ("JPEG", "MPO"):  # greyscale or CMYK: DCT scaling still saves most of the decoding
        im.draft(None, stored_target)
    im.load()  # decodes; a truncated file raises here
    ImageOps.exif_transpose(im, in_place=True)  # in place: no second full-size copy
    ready = _to_rgb(im, keep_alpha=keep_alpha)
    bands = len(ready.getbands())
    return pyvips.Image.new_from_memory(ready.tobytes(), ready.width, ready.height, bands, "uchar")


def _to_rgb(im: Image.Image, *, keep_alpha: bool) -> Image.Image:
    """`im` as 8-bit RGB: 16-bit samples scaled down, transparency flattened onto white.

    With `keep_alpha`, an image with at least one transparent pixel comes back as RGBA instead.
    """
    if im.mode in SIXTEEN_BIT_MODES:
        im = im.convert("I").point(lambda v: v / 256).convert("L")  # a plain convert clips at 255: all white
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ALPHA_MODES:
        rgba = im.convert("RGBA")
        alpha = rgba.getchannel("A")
        if alpha.getextrema()[0] == 255:  # an alpha channel that hides nothing
            return rgba.convert("RGB")
        if keep_alpha:
            return rgba
        flat = Image.new("RGB", rgba.size, FLATTEN_ONTO_RGB)
        flat.paste(rgba, mask=alpha)
        return flat
    return im if im.mode == "RGB" else im.convert("RGB")


def _shrink(im: pyvips.Image, size: tuple[int, int]) -> pyvips.Image:
    """`im` (RGB or RGBA) resampled down to exactly `size`; RGBA is shrunk premultiplied, so that hidden
    colour under transparent pixels does not bleed into the edges they touch."""
    if im.bands == 4:
        im = im.premultiply()
    im = im.resize(size[0] / im.width, vscale=size[1] / im.height, kernel=RESAMPLE_KERNEL)
    if im.bands == 4:
        im = im.unpremultiply().cast("uchar")
    assert (im.width, im.height) == size, (im.width, im.height, size)  # scale × side rounds back to the side
    return im


def _encode(im: pyvips.Image, cfg: ImagesConfig) -> tuple[str, bytes]:
    """`im` (RGB, or RGBA to keep) as the bytes to send and their MIME type; no metadata goes along."""
    if im.bands == 4 or cfg.encoding == "png":
        return "image/png", im.pngsave_buffer(compression=PNG_COMPRESS_LEVEL, keep="none")
    # 4:2:0 chroma, as Pillow and most cameras write; libvips would keep full chroma from Q 90 up, ~50 % more
    # bytes for colour detail the service's own resampling does not keep either
    return "image/jpeg", im.jpegsave_buffer(Q=cfg.jpeg_quality, subsample_mode="on", keep="none")


def _head(source: Path | io.BytesIO) -> bytes:
    """The first bytes of a file or buffer, to say what an unreadable image is."""
    if isinstance(source, io.BytesIO):
        return source.getvalue()[:SNIFF_BYTES]
    try:
        with open(source, "rb") as f:
            return f.read(SNIFF_BYTES)
    except OSError:
        return b""


def _unidentified_reason(head: bytes) -> str:
    """Why Pillow opened none of our formats: one we know but cannot read on this install, or another one."""
    if head[4:8] == b"ftyp":
        box_end = min(len(head), int.from_bytes(head[:4], "big"))
        brands = {head[8:12]} | {head[i : i + 4] for i in range(16, box_end - 3, 4)}
        if brands & AVIF_BRANDS:
            return "AVIF image, but this Pillow cannot read AVIF: install Pillow 11.3 or newer from a wheel"
        if brands & HEIF_BRANDS:
            return "HEIC/HEIF image, but no HEIF reader is installed: pip install pi-heif"
    return f"not a {SUPPORTED_NAMES} image"


def _prepare_data_url(url: str, *, cfg: ImagesConfig, row_id: str) -> PreparedImage:
    """A data URL goes out as given; its size comes from the decoded header, nothing more is decoded."""
    width, height, nbytes = _measure_data_url(url, cfg=cfg, row_id=row_id)
    return PreparedImage(url=url, width=width, height=height, source_bytes=nbytes, sent_bytes=nbytes)


def _measure_data_url(url: str, *, cfg: ImagesConfig, row_id: str) -> tuple[int, int, int]:
    """Width, height and byte count of a data URL's image, refused as ``cfg`` refuses it. Reads its header."""
    short = shorten_url(url)
    data = _decode_data_url(url, row_id=row_id)
    if len(data) > cfg.max_image_bytes:
        raise ImageError(
            row_id,
            f"{len(data):,} bytes is more than images.max_image_bytes = {cfg.max_image_bytes:,}",
            kind=ErrorKind.TOO_LARGE,
            path=short,
        )
    width, height, _ = _header(io.BytesIO(data), ref=short, row_id=row_id)
    _check_pixels(width, height, cfg=cfg, ref=short, row_id=row_id)
    return width, height, len(data)


def _decode_data_url(url: str, *, row_id: str) -> bytes:
    """The bytes of a ``data:<type>;base64,<payload>`` URL."""
    short = shorten_url(url)
    head, comma, payload = url.partition(",")
    if not comma or not head.lower().endswith(";base64"):
        raise ImageError(
            row_id,
            "a data URL must look like data:image/<type>;base64,<data>",
            kind=ErrorKind.UNREADABLE_IMAGE,
            path=short,
        )
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError(
            row_id, "data URL is not valid base64", kind=ErrorKind.UNREADABLE_IMAGE, path=short
        ) from None
    if not data:
        raise ImageError(row_id, "data URL holds no bytes", kind=ErrorKind.UNREADABLE_IMAGE, path=short)
    return data


def _header(source: Path | io.BytesIO, *, ref: str, row_id: str) -> tuple[int, int, str]:
    """Width, height and Pillow's format name, from the image's header only."""
    try:
        with Image.open(source, formats=SNIFFED_FORMATS) as im:
            return im.width, im.height, im.format or ""
    except UnidentifiedImageError:
        raise ImageError(
            row_id, _unidentified_reason(_head(source)), kind=ErrorKind.UNSUPPORTED_FORMAT, path=ref
        ) from None
    except Image.DecompressionBombError as err:
        raise ImageError(
            row_id,
            f"too many pixels to decode safely: {_one_line(err)}",
            kind=ErrorKind.TOO_MANY_PIXELS,
            path=ref,
        ) from None
    except OSError as err:
        raise ImageError(
            row_id, f"cannot read: {_one_line(err)}", kind=ErrorKind.UNREADABLE_IMAGE, path=ref
        ) from None


def _check_extension(ref: str, fmt: str, *, row_id: str) -> None:
    """Refuse a file whose extension names another format than its bytes hold, such as a PNG named .jpg.

    An extension Pillow does not know (or none) names nothing and passes; MPO counts as JPEG.
    """
    suffix = PurePath(ref).suffix
    named = Image.registered_extensions().get(suffix.lower())
    if named is None or _FORMAT_FAMILY.get(named, named) == _FORMAT_FAMILY.get(fmt, fmt):
        return
    raise ImageError(
        row_id,
        f"named {suffix} but the bytes are {_WANTED_FORMATS.get(fmt, fmt)}: rename the file, "
        "or set images.extension_must_match = false to go by the bytes",
        kind=ErrorKind.WRONG_EXTENSION,
        path=ref,
    )


def _check_pixels(width: int, height: int, *, cfg: ImagesConfig, ref: str, row_id: str) -> None:
    if width * height > cfg.max_pixels:
        raise ImageError(
            row_id,
            f"too many pixels: {width}×{height} is more than images.max_pixels = {cfg.max_pixels:,}",
            kind=ErrorKind.TOO_MANY_PIXELS,
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
