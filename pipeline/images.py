"""Preparing image bytes for the wire: decoding, orienting, downscaling and encoding.

A local image (or, with ``images.fetch_remote``, a downloaded one: ``prepare_image_bytes``) is sent as a
data URL of exactly the pixels the service looks at (``tokens.viewed_size``): smaller requests, the same
bill. Remote http(s) URLs and data URLs pass through untouched. What a reference is comes from
``refs.py``; where a local file may be, its format, its size and the refusals made before decoding come
from ``sniff.py``. Pillow reads headers and the formats libvips is not given; libvips (pyvips) reads
plain colour JPEGs, and shrinks and encodes every image. Everything here blocks: call it from a thread,
never from the event loop (the runner keeps a pool of ``image_threads``). Nothing here speaks HTTP
(``remote.py`` downloads).

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

Setup: ``setup()`` (``sniff.register_formats()``, then libvips set up for the run's pool) changes Pillow
and libvips for the whole process, so importing this module does not run it; ``prepare_image`` and
``prepare_image_bytes`` call it themselves, and it is idempotent.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import io
import logging
import os
import struct
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import pyvips
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from pipeline import sniff, tokens
from pipeline.config import ImagesConfig
from pipeline.records import Detail, ErrorKind, ImageError, PreparedImage, RowError
from pipeline.refs import shorten_url, url_scheme

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

log = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h) and the values reuse_freed_image_memory sets: blocks up to the
# largest mmap threshold glibc accepts come from the heap, and up to 128 MB spare stays there.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MALLOC_MMAP_BYTES = 32 * 1024 * 1024
MALLOC_TRIM_BYTES = 128 * 1024 * 1024

_ready = False
_ready_lock = threading.Lock()


def setup() -> None:
    """Set Pillow and libvips up for preparing images: ``sniff.register_formats()``, then libvips' settings.

    Process-wide and idempotent (thread-safe; after the first call, one flag test). ``prepare_image`` and
    ``prepare_image_bytes`` call it first, so no caller has to; importing this module changes nothing.
    """
    global _ready
    if _ready:
        return
    with _ready_lock:
        if _ready:
            return
        sniff.register_formats()
        # Each thread of the run's image pool shrinks one image at a time: libvips needs no threads of its
        # own, and nothing it computes is used twice, so its operation cache would only hold on to pixels.
        pyvips.concurrency_set(1)
        pyvips.cache_set_max(0)
        # pyvips relays libvips' messages to logging: an INFO line per operation ("threadpool completed")
        # and a WARNING per tile of a damaged image, whose one-line reason is already the row's error
        logging.getLogger("pyvips").setLevel(logging.ERROR)
        _ready = True


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
    setup()
    scheme = url_scheme(ref)
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
    path = sniff.resolve_local_path(ref, base_dir=base_dir, allowed_roots=cfg.allowed_roots, row_id=row_id)
    return _prepare(path, ref=ref, detail=detail, cfg=cfg, row_id=row_id)


def prepare_image_bytes(
    data: bytes, *, ref: str, detail: Detail, cfg: ImagesConfig, row_id: str
) -> PreparedImage:
    """Downloaded image bytes ready to send, exactly as ``prepare_image`` prepares a local file.

    `ref` names the image in errors (pass the URL; it is shortened). Blocks. Raises ImageError.
    """
    setup()
    short = shorten_url(ref)
    if not data:
        raise ImageError(row_id, "download is empty (0 bytes)", kind=ErrorKind.UNREADABLE_IMAGE, path=short)
    return _prepare(io.BytesIO(data), ref=short, detail=detail, cfg=cfg, row_id=row_id)


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
        with _opened(source) as fp, Image.open(fp, formats=sniff.SNIFFED_FORMATS) as im:
            source_bytes = (
                os.fstat(fp.fileno()).st_size if isinstance(source, Path) else len(source.getbuffer())
            )
            stored_w, stored_h = im.size
            if isinstance(source, Path) and cfg.extension_must_match:
                sniff.check_extension(ref, im.format or "", row_id=row_id)
            sniff.check_pixels(stored_w, stored_h, cfg=cfg, ref=ref, row_id=row_id)
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
    except (UnidentifiedImageError, Image.DecompressionBombError) as err:
        raise sniff.pillow_refusal(err, source, row_id=row_id, ref=ref) from None
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


def _prepare_data_url(url: str, *, cfg: ImagesConfig, row_id: str) -> PreparedImage:
    """A data URL goes out as given; its size comes from the decoded header, nothing more is decoded."""
    width, height, nbytes = sniff.measure_data_url(url, cfg=cfg, row_id=row_id)
    return PreparedImage(url=url, width=width, height=height, source_bytes=nbytes, sent_bytes=nbytes)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__
