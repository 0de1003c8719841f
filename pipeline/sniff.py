"""Reading what an image is without decoding it: where a local one may be, its format, its size, and the
refusals these allow.

Formats are sniffed from the bytes, never taken from the file name: JPEG (MPO counts as JPEG), PNG, WebP,
GIF (its first frame), BMP, TIFF (its first page), AVIF (Pillow >= 11.3 reads it natively) and
HEIC/HEIF when a HEIF plugin is installed (``pi-heif``, decode-only; ``pillow-heif`` works too). Without
one, a HEIC file is refused with a reason that says what to install. A local file whose extension names
another format than its bytes (a PNG named .jpg: usually an export gone wrong upstream) is refused unless
``images.extension_must_match = false``; downloads are not held to their URL's extension, as servers
often answer a .jpg URL with WebP.

A local path resolves against the manifest's folder and must stay inside ``images.allowed_roots`` once
links are followed; a data URL is decoded and its image measured from its header. ``measure_image`` (for
the estimator) and ``measure_image_bytes`` (for a probe's first bytes) read sizes from headers only, with
the refusals ``images.prepare_image`` makes before it decodes anything, in the same words.

Setup: ``register_formats()`` loads Pillow's format plugins and the HEIF plugin and sets
``SNIFFED_FORMATS`` and ``SUPPORTED_NAMES`` from what this install reads. It changes Pillow for the whole
process, so importing this module does not do it; it is idempotent, and every public function here that
needs it calls it first, so no caller has to. Pillow only, never libvips. Everything here blocks on file
reads: call it from a thread, never from the event loop.
"""

from __future__ import annotations

import base64
import binascii
import importlib
import io
import stat
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path, PurePath
from types import ModuleType

from PIL import Image, UnidentifiedImageError

from pipeline.config import ImagesConfig
from pipeline.records import ErrorKind, ImageError
from pipeline.refs import shorten_url, url_scheme

# Tried in this order. AVIF before HEIF: a HEIF plugin may claim AVIF files it has no decoder for.
_WANTED_FORMATS = {"JPEG": "JPEG", "PNG": "PNG", "WEBP": "WebP", "GIF": "GIF", "BMP": "BMP", "TIFF": "TIFF",
                   "AVIF": "AVIF", "HEIF": "HEIC"}  # fmt: skip
# Pillow's names that are one format as far as a file's extension goes (AVIF is HEIF with AV1 inside)
_FORMAT_FAMILY = {"MPO": "JPEG", "DIB": "BMP", "AVIF": "HEIF"}

# ISO base media files (HEIF, AVIF) start with an ftyp box: size, "ftyp", major brand, version, brands.
HEIF_BRANDS = frozenset(
    {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1"}
)
AVIF_BRANDS = frozenset({b"avif", b"avis"})
SNIFF_BYTES = 64

# Set by register_formats() from the plugins this install has. Read from another module before then,
# either one registers first (the module's __getattr__), so a reader never sees a partial list. Code
# here calls register_formats() before reading them.
SNIFFED_FORMATS: tuple[str, ...]  # Pillow's names, for Image.open(formats=...); MPO opens as JPEG
SUPPORTED_NAMES: str  # "JPEG, PNG, ... or HEIC", for the reason an image is refused

_ready = False
_ready_lock = threading.Lock()


def register_formats() -> None:
    """Make Pillow read every format we send, and set ``SNIFFED_FORMATS`` and ``SUPPORTED_NAMES``.

    Process-wide and idempotent (thread-safe; after the first call, one flag test). Registers a HEIF
    plugin's opener when one is installed, loads every Pillow format plugin (``Image.open(formats=...)``
    only knows those already loaded), and silences Pillow's DecompressionBombWarning: anything of more
    than ``images.max_pixels`` is refused from its header, before decoding, so Pillow's warning for images
    between its own limit (~89 Mpx) and ours is noise in an unattended run.
    """
    global _ready, SNIFFED_FORMATS, SUPPORTED_NAMES
    if _ready:
        return
    with _ready_lock:
        if _ready:
            return
        heif_plugin = _heif_plugin()
        if heif_plugin is not None:
            heif_plugin.register_heif_opener()
        Image.init()
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
        SNIFFED_FORMATS = tuple(name for name in _WANTED_FORMATS if name in Image.OPEN)
        names = [_WANTED_FORMATS[name] for name in SNIFFED_FORMATS]
        SUPPORTED_NAMES = ", ".join(names[:-1]) + " or " + names[-1]
        _ready = True


def __getattr__(name: str) -> object:
    """``SNIFFED_FORMATS`` and ``SUPPORTED_NAMES`` before ``register_formats()`` ran: it runs first."""
    if name in ("SNIFFED_FORMATS", "SUPPORTED_NAMES"):
        register_formats()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def measure_image(ref: str, *, base_dir: Path, cfg: ImagesConfig, row_id: str) -> tuple[int, int] | None:
    """The pixel size of image `ref` as ``prepare_image`` would see it, from headers only; None for http(s).

    For the estimator: the same reference rules and refusals as ``prepare_image`` under `cfg` (folders
    outside ``cfg.allowed_roots``, more than ``cfg.max_pixels``, a data URL of more than
    ``cfg.max_image_bytes``) without decoding or encoding anything. What only encoding can tell (a local
    image too large once encoded) is not checked. Blocks on file reads. Raises ImageError.
    """
    register_formats()
    scheme = url_scheme(ref)
    if scheme in ("http", "https"):
        return None
    if scheme == "data":
        width, height, _ = measure_data_url(ref, cfg=cfg, row_id=row_id)
        return width, height
    if scheme is not None:
        raise ImageError(
            row_id,
            f"{scheme}: URLs are not supported (use http(s), data: or a path)",
            kind=ErrorKind.UNSUPPORTED_FORMAT,
            path=shorten_url(ref),
        )
    path = resolve_local_path(ref, base_dir=base_dir, allowed_roots=cfg.allowed_roots, row_id=row_id)
    width, height, fmt = _header(path, ref=ref, row_id=row_id)
    if cfg.extension_must_match:
        check_extension(ref, fmt, row_id=row_id)
    check_pixels(width, height, cfg=cfg, ref=ref, row_id=row_id)
    return width, height


def measure_image_bytes(data: bytes, *, ref: str, row_id: str) -> tuple[int, int]:
    """The pixel size in the header of an image's bytes, or of only its first bytes; nothing is decoded.

    `ref` names the image in errors (pass the URL; it is shortened). Raises ImageError when the bytes are
    not a supported image or its size lies past them.
    """
    register_formats()
    width, height, _ = _header(io.BytesIO(data), ref=shorten_url(ref), row_id=row_id)
    return width, height


def read_image_size(path: Path) -> tuple[int, int]:
    """The stored width and height in pixels of an image file, from its header only (nothing is decoded).

    EXIF orientation is ignored: token counts are the same either way round. Raises OSError when the
    file is missing, unreadable, not a supported image, or too large for Pillow to open safely.
    """
    register_formats()
    try:
        with Image.open(path, formats=SNIFFED_FORMATS) as im:
            return im.size
    except Image.DecompressionBombError as err:
        raise OSError(f"{path}: {err}") from err


def resolve_local_path(ref: str, *, base_dir: Path, allowed_roots: Sequence[str], row_id: str) -> Path:
    """`ref` resolved against `base_dir`: inside an allowed root once links are followed, a non-empty file.

    The roots are `allowed_roots` (relative ones against `base_dir`), or `base_dir` alone when empty.
    Raises ImageError.
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


def measure_data_url(url: str, *, cfg: ImagesConfig, row_id: str) -> tuple[int, int, int]:
    """Width, height and byte count of a data URL's image, refused as ``cfg`` refuses it. Reads its header.

    Raises ImageError (naming the URL without its payload).
    """
    register_formats()
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
    check_pixels(width, height, cfg=cfg, ref=short, row_id=row_id)
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


def pillow_refusal(
    err: UnidentifiedImageError | Image.DecompressionBombError,
    source: Path | io.BytesIO,
    *,
    row_id: str,
    ref: str,
) -> ImageError:
    """The row error for Pillow refusing to open an image: not a format it reads, or too many pixels."""
    if isinstance(err, UnidentifiedImageError):
        return ImageError(
            row_id, unidentified_reason(read_head(source)), kind=ErrorKind.UNSUPPORTED_FORMAT, path=ref
        )
    reason = f"too many pixels to decode safely: {_one_line(err)}"
    return ImageError(row_id, reason, kind=ErrorKind.TOO_MANY_PIXELS, path=ref)


def _header(source: Path | io.BytesIO, *, ref: str, row_id: str) -> tuple[int, int, str]:
    """Width, height and Pillow's format name, from the image's header only."""
    try:
        with Image.open(source, formats=SNIFFED_FORMATS) as im:
            return im.width, im.height, im.format or ""
    except (UnidentifiedImageError, Image.DecompressionBombError) as err:
        raise pillow_refusal(err, source, row_id=row_id, ref=ref) from None
    except OSError as err:
        raise ImageError(
            row_id, f"cannot read: {_one_line(err)}", kind=ErrorKind.UNREADABLE_IMAGE, path=ref
        ) from None


def check_extension(ref: str, fmt: str, *, row_id: str) -> None:
    """Refuse a file whose extension names another format than its bytes hold, such as a PNG named .jpg.

    An extension Pillow does not know (or none) names nothing and passes; MPO counts as JPEG. `fmt` is
    Pillow's name of the format. Raises ImageError.
    """
    register_formats()  # a HEIF plugin adds .heic and .heif to the extensions Pillow knows
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


def check_pixels(width: int, height: int, *, cfg: ImagesConfig, ref: str, row_id: str) -> None:
    """Refuse an image of more than ``cfg.max_pixels`` pixels, known from its header: raises ImageError."""
    if width * height > cfg.max_pixels:
        raise ImageError(
            row_id,
            f"too many pixels: {width}×{height} is more than images.max_pixels = {cfg.max_pixels:,}",
            kind=ErrorKind.TOO_MANY_PIXELS,
            path=ref,
        )


def read_head(source: Path | io.BytesIO) -> bytes:
    """The first SNIFF_BYTES of a file or buffer, to say what an unreadable image is; nothing if unreadable."""
    if isinstance(source, io.BytesIO):
        return source.getvalue()[:SNIFF_BYTES]
    try:
        with open(source, "rb") as f:
            return f.read(SNIFF_BYTES)
    except OSError:
        return b""


def unidentified_reason(head: bytes) -> str:
    """Why Pillow opened none of our formats: one we know but cannot read on this install, or another one.

    `head` is the image's first bytes (``read_head``).
    """
    register_formats()
    if head[4:8] == b"ftyp":
        box_end = min(len(head), int.from_bytes(head[:4], "big"))
        brands = {head[8:12]} | {head[i : i + 4] for i in range(16, box_end - 3, 4)}
        if brands & AVIF_BRANDS:
            return "AVIF image, but this Pillow cannot read AVIF: install Pillow 11.3 or newer from a wheel"
        if brands & HEIF_BRANDS:
            return "HEIC/HEIF image, but no HEIF reader is installed: pip install pi-heif"
    return f"not a {SUPPORTED_NAMES} image"


def _heif_plugin() -> ModuleType | None:
    """pi-heif, else pillow-heif, else None: decode-only HEIF support, optional so that a plain
    `pip install` still works without it (requirements.lock installs pi-heif)."""
    for name in ("pi_heif", "pillow_heif"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__
