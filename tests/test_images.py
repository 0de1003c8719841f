"""images.py: local images go out as JPEG (or PNG) data URLs of exactly the pixels the model views."""

from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import io
import json
import logging
import os
from pathlib import Path

import pyarrow.dataset as ds
import pytest
from conftest import TINY_HEIC, azure_config, in_fresh_python, make_image, png_header_only
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import pipeline.images
import pipeline.sniff
from pipeline.config import ImagesConfig, config_from_mapping
from pipeline.exits import EXIT_ROW_ERRORS
from pipeline.images import image_threads, prepare_image, prepare_image_bytes
from pipeline.records import ConfigError, ImageError, PreparedImage
from pipeline.runner import RunOptions, run
from pipeline.tokens import count_prompt_tokens, image_tokens, viewed_size

CFG = ImagesConfig()
RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)
EXIF_ORIENTATION = 0x0112


def sent_image(prepared: PreparedImage, fmt: str = "JPEG") -> Image.Image:
    """The image the service would receive, decoded from the data URL, which must hold `fmt`."""
    head, _, payload = prepared.url.partition(",")
    assert head == f"data:image/{fmt.lower()};base64"
    image = Image.open(io.BytesIO(base64.b64decode(payload)))
    assert image.format == fmt
    return image


def near(pixel: tuple[int, ...], colour: tuple[int, int, int], tolerance: int = 24) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, colour, strict=True))


def prepare(tmp_path: Path, ref: str, detail: str = "high", cfg: ImagesConfig = CFG) -> PreparedImage:
    return prepare_image(ref, base_dir=tmp_path, detail=detail, cfg=cfg, row_id="row-1")


# Orientation, colour modes, formats


def test_exif_orientation_6_comes_out_upright(tmp_path):
    """A camera held sideways stores the picture turned; orientation 6 says "turn it a quarter clockwise"."""
    upright = Image.new("RGB", (400, 200), BLUE)
    upright.paste(RED, (0, 0, 100, 50))  # the top-left corner, as a viewer shows it
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "sideways.jpg", exif=exif, quality=95)

    prepared = prepare(tmp_path, "sideways.jpg")

    sent = sent_image(prepared)
    assert (prepared.width, prepared.height) == sent.size == (400, 200)
    assert near(sent.getpixel((10, 10)), RED)
    assert near(sent.getpixel((390, 190)), BLUE)


def test_large_exif_rotated_jpeg_is_drafted_and_still_upright_at_the_viewed_size(tmp_path):
    upright = Image.new("RGB", (3000, 4000), BLUE)
    upright.paste(RED, (0, 0, 1500, 2000))
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "tall.jpg", exif=exif)

    prepared = prepare(tmp_path, "tall.jpg", detail="high")

    sent = sent_image(prepared)
    assert sent.size == viewed_size(3000, 4000, "high") == (768, 1024)
    assert near(sent.getpixel((20, 20)), RED)
    assert near(sent.getpixel((740, 1000)), BLUE)


@pytest.mark.parametrize("orientation", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("mode", ["RGB", "L"])  # read by libvips, and by Pillow
@pytest.mark.parametrize("size", [(400, 200), (1600, 800)])  # sent as it is; shrunk to 1536×768
def test_every_exif_orientation_comes_out_upright_from_either_reader(tmp_path, orientation, mode, size):
    width, height = size
    upright = Image.new("RGB", size, BLUE)
    upright.paste(RED, (0, 0, width // 4, height // 4))
    stored = {
        1: upright,
        2: upright.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
        3: upright.transpose(Image.Transpose.ROTATE_180),
        4: upright.transpose(Image.Transpose.FLIP_TOP_BOTTOM),
        5: upright.transpose(Image.Transpose.TRANSPOSE),
        6: upright.transpose(Image.Transpose.ROTATE_90),
        7: upright.transpose(Image.Transpose.TRANSVERSE),
        8: upright.transpose(Image.Transpose.ROTATE_270),
    }[orientation]
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    stored.convert(mode).save(tmp_path / "turned.jpg", exif=exif, quality=95)

    sent = sent_image(prepare(tmp_path, "turned.jpg")).convert("L")

    red, blue = Image.new("L", (1, 1)), Image.new("L", (1, 1))
    red.putpixel((0, 0), Image.new("RGB", (1, 1), RED).convert("L").getpixel((0, 0)))
    blue.putpixel((0, 0), Image.new("RGB", (1, 1), BLUE).convert("L").getpixel((0, 0)))
    assert sent.size == viewed_size(width, height, "high")
    assert abs(sent.getpixel((10, 10)) - red.getpixel((0, 0))) <= 12
    assert abs(sent.getpixel((sent.width - 10, sent.height - 10)) - blue.getpixel((0, 0))) <= 12


@pytest.mark.parametrize("orientation", [1, 2, 3, 4, 5, 6, 7, 8])
def test_libvips_itself_prepares_a_plain_colour_jpeg_in_every_orientation(orientation):
    """Pillow would step in if libvips refused, more slowly: this keeps the fast path from going quiet."""
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    buffer = io.BytesIO()
    Image.effect_noise((1600, 800), 60).convert("RGB").save(buffer, "JPEG", exif=exif)
    turns = orientation >= 5
    target = viewed_size(*((800, 1600) if turns else (1600, 800)), "high")
    stored_target = (target[1], target[0]) if turns else target

    done = pipeline.images._jpeg_by_libvips(buffer, (1600, 800), stored_target, orientation, target, CFG)

    assert done is not None and Image.open(io.BytesIO(done[1])).size == target


def test_no_metadata_goes_along_not_even_where_a_photo_was_taken(tmp_path):
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 1
    exif[0x010F] = "PhoneMaker"  # Make
    exif[0x8825] = {1: "N", 2: (52.0, 22.0, 0.0)}  # GPS latitude
    Image.new("RGB", (3000, 2000), RED).save(tmp_path / "holiday.jpg", exif=exif, comment=b"secret")

    sent = sent_image(prepare(tmp_path, "holiday.jpg"))

    assert not sent.getexif() and "comment" not in sent.info and "icc_profile" not in sent.info


def test_cmyk_jpeg_is_sent_as_rgb_with_its_colour(tmp_path):
    Image.new("CMYK", (300, 200), (0, 255, 255, 0)).save(tmp_path / "print.jpg")  # pure red in ink

    sent = sent_image(prepare(tmp_path, "print.jpg"))

    assert sent.mode == "RGB"
    assert near(sent.getpixel((150, 100)), RED)


def test_rgba_png_is_flattened_onto_white(tmp_path):
    image = Image.new("RGBA", (200, 200), (0, 0, 0, 0))
    image.paste((255, 0, 0, 255), (0, 0, 100, 200))
    image.save(tmp_path / "logo.png")

    sent = sent_image(prepare(tmp_path, "logo.png"))

    assert near(sent.getpixel((50, 100)), RED)
    assert near(sent.getpixel((150, 100)), WHITE)  # transparent black would otherwise come out black


def test_la_and_transparent_palette_images_are_flattened_onto_white(tmp_path):
    Image.new("LA", (50, 50), (0, 0)).save(tmp_path / "grey.png")
    palette = Image.new("P", (50, 50), 0)
    palette.putpalette([0, 0, 0] * 256)
    palette.save(tmp_path / "clear.gif", transparency=0)

    grey, gif = sent_image(prepare(tmp_path, "grey.png")), sent_image(prepare(tmp_path, "clear.gif"))

    assert near(grey.getpixel((25, 25)), WHITE)
    assert near(gif.getpixel((25, 25)), WHITE)


def test_16_bit_greyscale_png_is_scaled_not_clipped_to_white(tmp_path):
    Image.new("I;16", (64, 64), 32768).save(tmp_path / "depth16.png")  # half of full scale

    sent = sent_image(prepare(tmp_path, "depth16.png"))

    assert near(sent.getpixel((32, 32)), (128, 128, 128), tolerance=4)


def test_gif_sends_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (80, 60), RED), Image.new("RGB", (80, 60), BLUE)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100)

    sent = sent_image(prepare(tmp_path, "anim.gif"))

    assert near(sent.getpixel((40, 30)), RED)


@pytest.mark.parametrize(
    ("name", "save_as"), [("photo.webp", "WEBP"), ("scan.tif", "TIFF"), ("chart.bmp", "BMP")]
)
def test_webp_tiff_and_bmp_are_sent_as_jpeg(tmp_path, name, save_as):
    Image.new("RGB", (120, 90), RED).save(tmp_path / name, save_as)

    prepared = prepare(tmp_path, name)

    assert (prepared.width, prepared.height) == sent_image(prepared).size == (120, 90)


def test_mpo_from_a_3d_camera_counts_as_jpeg(tmp_path):
    left, right = Image.new("RGB", (640, 480), RED), Image.new("RGB", (640, 480), BLUE)
    left.save(tmp_path / "stereo.mpo", "MPO", save_all=True, append_images=[right])

    sent = sent_image(prepare(tmp_path, "stereo.mpo"))

    assert near(sent.getpixel((320, 240)), RED)


def test_png_named_jpg_is_refused_naming_both_formats(tmp_path):
    Image.new("RGB", (100, 80), RED).save(tmp_path / "mislabelled.jpg", "PNG")

    with pytest.raises(ImageError) as caught:
        prepare(tmp_path, "mislabelled.jpg")

    assert str(caught.value) == (
        "row 'row-1': image 'mislabelled.jpg': named .jpg but the bytes are PNG: rename the file, "
        "or set images.extension_must_match = false to go by the bytes"
    )


def test_png_named_jpg_is_sent_from_its_bytes_when_extensions_need_not_match(tmp_path):
    Image.new("RGB", (100, 80), RED).save(tmp_path / "mislabelled.jpg", "PNG")
    cfg = dataclasses.replace(CFG, extension_must_match=False)

    prepared = prepare(tmp_path, "mislabelled.jpg", cfg=cfg)

    assert near(sent_image(prepared).getpixel((50, 40)), RED)


@pytest.mark.parametrize(
    ("name", "save_as"),
    [
        ("no_extension", "PNG"),
        ("photo.JPEG", "JPEG"),
        ("stereo.jpg", "MPO"),
        ("scan.tif", "TIFF"),
        ("x.data", "PNG"),
    ],
)
def test_an_extension_that_agrees_or_names_no_image_format_is_accepted(tmp_path, name, save_as):
    Image.new("RGB", (100, 80), RED).save(tmp_path / name, save_as)

    assert near(sent_image(prepare(tmp_path, name)).getpixel((50, 40)), RED)


def test_a_format_pillow_reads_but_the_service_does_not_is_refused(tmp_path):
    Image.new("RGB", (10, 10), RED).save(tmp_path / "image.jpg", "PPM")

    with pytest.raises(ImageError, match="not a JPEG, PNG, WebP, GIF, BMP, TIFF, AVIF or HEIC image"):
        prepare(tmp_path, "image.jpg")


def test_avif_is_read_natively(tmp_path):
    Image.new("RGB", (120, 90), RED).save(tmp_path / "modern.avif", "AVIF", quality=90)

    prepared = prepare(tmp_path, "modern.avif")

    assert (prepared.width, prepared.height) == (120, 90)
    assert near(sent_image(prepared).getpixel((60, 45)), RED, tolerance=32)


def test_heic_from_a_phone_is_read_and_sent_as_jpeg(tmp_path):
    (tmp_path / "IMG_0001.HEIC").write_bytes(TINY_HEIC)

    sent = sent_image(prepare(tmp_path, "IMG_0001.HEIC"))

    assert sent.size == (64, 48)
    assert near(sent.getpixel((8, 24)), RED, tolerance=40)
    assert near(sent.getpixel((56, 24)), BLUE, tolerance=40)


@pytest.mark.parametrize(("name", "missing", "reason"), [
    ("IMG_0001.HEIC", "HEIF", "HEIC/HEIF image, but no HEIF reader is installed: pip install pi-heif"),
    ("modern.avif", "AVIF", "AVIF image, but this Pillow cannot read AVIF"),
])  # fmt: skip
def test_heic_or_avif_without_a_reader_is_refused_saying_what_to_install(
    tmp_path, monkeypatch, name, missing, reason
):
    """Where Pillow has no plugin for the format, the row says which package would read it."""
    if name.endswith(".avif"):
        Image.new("RGB", (32, 32), RED).save(tmp_path / name, "AVIF")
    else:
        (tmp_path / name).write_bytes(TINY_HEIC)
    without = tuple(f for f in pipeline.sniff.SNIFFED_FORMATS if f != missing)
    monkeypatch.setattr(pipeline.sniff, "SNIFFED_FORMATS", without)

    with pytest.raises(ImageError, match=reason):
        prepare(tmp_path, name)


# Encoding and transparency


def test_png_encoding_sends_the_viewed_pixels_losslessly(tmp_path):
    original = Image.effect_noise((300, 200), 80).convert("RGB")
    original.save(tmp_path / "noise.png")
    cfg = dataclasses.replace(CFG, encoding="png")

    prepared = prepare(tmp_path, "noise.png", cfg=cfg)

    sent = sent_image(prepared, "PNG")
    assert sent.mode == "RGB" and sent.tobytes() == original.tobytes()


def test_keep_alpha_sends_a_transparent_image_as_png_with_its_alpha_even_when_encoding_is_jpeg(tmp_path):
    image = Image.new("RGBA", (200, 100), (0, 0, 0, 0))
    image.paste((255, 0, 0, 255), (0, 0, 100, 100))
    image.save(tmp_path / "logo.png")
    cfg = dataclasses.replace(CFG, keep_alpha=True)

    sent = sent_image(prepare(tmp_path, "logo.png", cfg=cfg), "PNG")

    assert sent.mode == "RGBA"
    assert sent.getpixel((50, 50)) == (255, 0, 0, 255) and sent.getpixel((150, 50))[3] == 0


def test_an_alpha_channel_that_hides_nothing_is_dropped_even_with_keep_alpha(tmp_path):
    Image.new("RGBA", (64, 64), (255, 0, 0, 255)).save(tmp_path / "opaque.png")
    cfg = dataclasses.replace(CFG, keep_alpha=True)

    sent = sent_image(prepare(tmp_path, "opaque.png", cfg=cfg))  # JPEG: no alpha worth a PNG

    assert sent.mode == "RGB" and near(sent.getpixel((32, 32)), RED)


# Size: the tokens never change, the pixels never grow


TOKEN_GRID_SIZES = [
    (1, 1),
    (512, 512),
    (513, 513),
    (1024, 1024),
    (2048, 4096),
    (600, 900),
    (1, 4000),
    (10000, 20),
]


@pytest.mark.parametrize("encoding", ["jpeg", "png"])
@pytest.mark.parametrize("detail", ["low", "high", "auto"])
@pytest.mark.parametrize(("width", "height"), TOKEN_GRID_SIZES)
def test_preparing_an_image_never_changes_its_token_count(tmp_path, width, height, detail, encoding):
    Image.new("RGB", (width, height), RED).save(tmp_path / "image.png")
    cfg = dataclasses.replace(CFG, encoding=encoding)

    prepared = prepare(tmp_path, "image.png", detail=detail, cfg=cfg)

    sent = sent_image(prepared, encoding.upper())
    assert (prepared.width, prepared.height) == sent.size == viewed_size(width, height, detail)
    assert image_tokens(prepared.width, prepared.height, detail) == image_tokens(width, height, detail)
    assert prepared.width <= width and prepared.height <= height


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    width=st.integers(1, 3000), height=st.integers(1, 3000), detail=st.sampled_from(["low", "high", "auto"])
)
def test_sent_size_is_the_viewed_size_and_costs_what_the_original_costs(tmp_path, width, height, detail):
    Image.new("RGB", (width, height), BLUE).save(tmp_path / "image.png")

    prepared = prepare(tmp_path, "image.png", detail=detail)

    assert (
        sent_image(prepared).size == (prepared.width, prepared.height) == viewed_size(width, height, detail)
    )
    assert image_tokens(prepared.width, prepared.height, detail) == image_tokens(width, height, detail)


@pytest.mark.parametrize(("width", "height"), [(500, 400), (512, 512), (513, 200), (800, 600), (4000, 3000),
                                             (700, 9000), (100, 3000)])  # fmt: skip
def test_auto_detail_keeps_what_the_services_size_rule_looks_at(tmp_path, width, height):
    """The service picks low or high "based on the size of the image input": an image that fits the 512×512
    low view still fits it after preparation, one that does not still does not."""
    Image.new("RGB", (width, height), RED).save(tmp_path / "image.png")

    prepared = prepare(tmp_path, "image.png", detail="auto")

    fits_low_view = max(width, height) <= 512
    assert (max(prepared.width, prepared.height) <= 512) == fits_low_view
    assert (prepared.width, prepared.height) == viewed_size(width, height, "high")


def test_a_big_jpeg_is_shrunk_and_reports_both_byte_counts(tmp_path):
    Image.linear_gradient("L").resize((4000, 3000)).convert("RGB").save(tmp_path / "big.jpg")

    prepared = prepare(tmp_path, "big.jpg", detail="low")

    assert (prepared.width, prepared.height) == (512, 384)
    assert prepared.source_bytes == (tmp_path / "big.jpg").stat().st_size
    assert prepared.sent_bytes == len(base64.b64decode(prepared.url.partition(",")[2]))
    assert prepared.sent_bytes < prepared.source_bytes


# Refusals: one line, naming the row and the reference


def test_truncated_jpeg_is_a_row_error(tmp_path):
    Image.radial_gradient("L").resize((600, 600)).convert("RGB").save(tmp_path / "photo.jpg")
    whole = (tmp_path / "photo.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(whole[: len(whole) // 2])

    with pytest.raises(ImageError, match="truncated") as caught:
        prepare(tmp_path, "cut.jpg")

    assert caught.value.row_id == "row-1" and caught.value.path == "cut.jpg"
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("mode", ["RGB", "L"])  # read by libvips, and by Pillow
def test_jpeg_with_corrupt_data_is_a_row_error_not_a_smeared_picture(tmp_path, mode):
    Image.radial_gradient("L").resize((600, 600)).convert(mode).save(tmp_path / "photo.jpg")
    damaged = bytearray((tmp_path / "photo.jpg").read_bytes())
    damaged[2000:2400] = b"\xff" * 400  # a run of marker bytes in the middle of the scan
    (tmp_path / "damaged.jpg").write_bytes(bytes(damaged))

    with pytest.raises(ImageError, match="damaged or truncated image") as caught:
        prepare(tmp_path, "damaged.jpg")

    assert "\n" not in str(caught.value) and str(tmp_path) not in str(caught.value)


def test_a_jpeg_with_padding_between_its_headers_is_read_as_pillow_reads_it(tmp_path):
    """libjpeg warns of "extraneous bytes before marker"; the picture itself is whole."""
    Image.new("RGB", (1200, 900), RED).save(tmp_path / "photo.jpg")
    whole = (tmp_path / "photo.jpg").read_bytes()
    tables = whole.index(b"\xff\xdb")
    (tmp_path / "padded.jpg").write_bytes(whole[:tables] + b"\0\0\0" + whole[tables:])

    sent = sent_image(prepare(tmp_path, "padded.jpg"))

    assert sent.size == (1024, 768) and near(sent.getpixel((512, 384)), RED)


def test_reasons_for_damaged_images_are_the_same_when_prepared_in_parallel(tmp_path):
    Image.radial_gradient("L").resize((1200, 900)).convert("RGB").save(tmp_path / "whole.jpg")
    whole = (tmp_path / "whole.jpg").read_bytes()
    for n in range(8):
        (tmp_path / f"cut-{n}.jpg").write_bytes(whole[: len(whole) * (n + 1) // 10])
        (tmp_path / f"fine-{n}.jpg").write_bytes(whole)
    names = [f"{kind}-{n}.jpg" for n in range(8) for kind in ("cut", "fine")] * 4

    def outcome(name: str) -> str:
        try:
            return f"{prepare(tmp_path, name).width}"
        except ImageError as err:
            return str(err)

    alone = [outcome(name) for name in names]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(outcome, names))

    assert together == alone
    assert all(
        "truncated" in reason for name, reason in zip(names, alone, strict=True) if name.startswith("cut")
    )


def test_a_file_name_that_is_not_utf8_is_read_all_the_same(tmp_path):
    name = os.fsdecode(b"caf\xe9.jpg")  # Latin-1 bytes on a UTF-8 file system
    Image.new("RGB", (1200, 900), RED).save(tmp_path / name)

    prepared = prepare(tmp_path, name)

    assert (prepared.width, prepared.height) == (1024, 768)


def test_zero_byte_file_is_a_row_error(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")

    with pytest.raises(ImageError, match="empty"):
        prepare(tmp_path, "empty.jpg")


def test_missing_file_is_a_row_error_naming_row_and_path(tmp_path):
    with pytest.raises(ImageError) as caught:
        prepare(tmp_path, "photos/nowhere.jpg")

    assert str(caught.value) == "row 'row-1': image 'photos/nowhere.jpg': file not found"


def test_a_folder_is_not_an_image(tmp_path):
    (tmp_path / "photos").mkdir()

    with pytest.raises(ImageError, match="folder"):
        prepare(tmp_path, "photos")


def test_a_30000_px_square_is_refused_from_its_header_without_decoding(tmp_path):
    """The file declares 900 Mpx but holds no pixels: decoding would fail as truncated, not as too large."""
    (tmp_path / "bomb.png").write_bytes(png_header_only(30000, 30000))

    with pytest.raises(ImageError, match="too many pixels"):
        prepare(tmp_path, "bomb.png")


def test_images_over_max_pixels_are_refused_before_decoding(tmp_path):
    (tmp_path / "large.png").write_bytes(png_header_only(5000, 4000))
    cfg = dataclasses.replace(CFG, max_pixels=10_000_000)

    with pytest.raises(ImageError, match=r"5000×4000 is more than images\.max_pixels"):
        prepare(tmp_path, "large.png", cfg=cfg)


def test_downloaded_bytes_are_prepared_like_a_file_and_named_without_their_query(tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (4000, 3000), BLUE).save(buffer, "JPEG")

    prepared = prepare_image_bytes(buffer.getvalue(), ref="https://cdn.example/a.jpg?sig=SECRET", detail="low",
                                   cfg=CFG, row_id="row-1")  # fmt: skip

    assert (prepared.width, prepared.height) == sent_image(prepared).size == (512, 384)
    assert prepared.source_bytes == len(buffer.getvalue())
    with pytest.raises(ImageError, match="download is empty") as caught:
        prepare_image_bytes(
            b"", ref="https://cdn.example/a.jpg?sig=SECRET", detail="low", cfg=CFG, row_id="r"
        )
    assert "SECRET" not in str(caught.value)


def test_an_image_larger_than_max_image_bytes_once_encoded_is_refused(tmp_path):
    Image.effect_noise((400, 400), 100).convert("RGB").save(tmp_path / "noise.png")
    cfg = dataclasses.replace(CFG, max_image_bytes=1000)

    with pytest.raises(ImageError, match=r"images\.max_image_bytes"):
        prepare(tmp_path, "noise.png", cfg=cfg)


def test_path_escaping_the_manifest_folder_with_dotdot_is_refused(tmp_path):
    (tmp_path / "manifests").mkdir()
    Image.new("RGB", (10, 10), RED).save(tmp_path / "secret.png")

    with pytest.raises(ImageError, match="outside the manifest's folder"):
        prepare(tmp_path / "manifests", "../secret.png")


def test_symlink_escaping_the_manifest_folder_is_refused(tmp_path):
    (tmp_path / "manifests").mkdir()
    Image.new("RGB", (10, 10), RED).save(tmp_path / "secret.png")
    (tmp_path / "manifests" / "link.png").symlink_to(tmp_path / "secret.png")

    with pytest.raises(ImageError, match="outside the manifest's folder"):
        prepare(tmp_path / "manifests", "link.png")


def test_allowed_roots_replace_the_manifest_folder_and_relative_ones_start_there(tmp_path):
    (tmp_path / "manifests").mkdir()
    make_image(tmp_path / "shared" / "cat.png")
    make_image(tmp_path / "manifests" / "local.png")
    cfg = dataclasses.replace(CFG, allowed_roots=("../shared",))

    prepared = prepare(tmp_path / "manifests", "../shared/cat.png", cfg=cfg)

    assert (prepared.width, prepared.height) == (64, 48)
    with pytest.raises(ImageError, match=r"outside images\.allowed_roots"):
        prepare(tmp_path / "manifests", "local.png", cfg=cfg)


@pytest.mark.parametrize(
    "ref", ["../../etc/passwd", "photos/../../secret.png", "/etc/passwd", "photos/../../shared/../secret.png"]
)
def test_no_path_with_dotdot_or_absolute_reads_outside_the_allowed_roots(tmp_path, ref):
    make_image(tmp_path / "secret.png")
    make_image(tmp_path / "shared" / "photos" / "a.png")
    cfg = dataclasses.replace(CFG, allowed_roots=(str(tmp_path / "shared"),))

    with pytest.raises(ImageError, match="outside images.allowed_roots") as caught:
        prepare(tmp_path / "shared", ref, cfg=cfg)

    assert caught.value.path == ref and "\n" not in str(caught.value)


def test_allowed_roots_is_a_toml_list_and_anything_else_is_refused_naming_the_setting():
    cfg = config_from_mapping({"images": {"allowed_roots": ["/data/photos", "../shared"]}})

    assert cfg.images.allowed_roots == ("/data/photos", "../shared")
    with pytest.raises(ConfigError, match=r"images\.allowed_roots = '/data/photos': must be a list"):
        config_from_mapping({"images": {"allowed_roots": "/data/photos"}})
    with pytest.raises(ConfigError, match=r"images\.allowed_roots\[1\] is empty"):
        config_from_mapping({"images": {"allowed_roots": ["/data", " "]}})


def test_absolute_path_inside_the_folder_is_accepted(tmp_path):
    Image.new("RGB", (10, 10), RED).save(tmp_path / "inside.png")

    prepared = prepare(tmp_path, str(tmp_path / "inside.png"))

    assert (prepared.width, prepared.height) == (10, 10)


@pytest.mark.parametrize("ref", ["file:///etc/passwd", "ftp://example.com/a.jpg", "s3://bucket/a.jpg"])
def test_urls_other_than_http_and_data_are_refused(tmp_path, ref):
    with pytest.raises(ImageError, match="URLs are not supported"):
        prepare(tmp_path, ref)


def test_a_colon_in_a_file_name_is_a_path_not_a_url(tmp_path):
    Image.new("RGB", (10, 10), RED).save(tmp_path / "shot 12:30.png")

    prepared = prepare(tmp_path, "shot 12:30.png")

    assert prepared.url.startswith("data:image/jpeg;base64,")


# URLs that pass through


def test_http_urls_pass_through_untouched_with_unknown_size(tmp_path):
    url = "https://acct.blob.core.windows.net/images/cat.jpg?sv=2024&sig=SECRET"

    prepared = prepare(tmp_path, url)

    assert prepared == PreparedImage(url=url, width=None, height=None)


def test_data_url_passes_through_with_its_size_from_the_header(tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (320, 200), RED).save(buffer, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()

    prepared = prepare(tmp_path, url)

    assert (prepared.url, prepared.width, prepared.height) == (url, 320, 200)


def test_bad_data_url_error_never_contains_the_payload(tmp_path):
    url = "data:image/png;base64," + "A" * 5000 + "!!"

    with pytest.raises(ImageError, match="not valid base64") as caught:
        prepare(tmp_path, url)

    assert "AAAA" not in str(caught.value)
    assert caught.value.path == "data:image/png;base64,<4 kB>"  # 5002 base64 chars: ~3.75 kB


def test_data_url_of_a_non_image_is_refused(tmp_path):
    url = "data:image/png;base64," + base64.b64encode(b"hello, not an image").decode()

    with pytest.raises(ImageError, match="not a JPEG, PNG"):
        prepare(tmp_path, url)


def test_image_threads_are_as_configured_or_one_more_than_the_usable_cores():
    assert image_threads(dataclasses.replace(CFG, threads=5)) == 5
    assert image_threads(CFG) == len(os.sched_getaffinity(0)) + 1


def test_a_negative_thread_count_is_refused_naming_the_setting():
    with pytest.raises(ConfigError, match="images.threads = -1: must not be negative"):
        config_from_mapping({"images": {"threads": -1}})


# Setup: nothing happens on import; the entry points set up what they need


def test_importing_images_changes_neither_pillow_nor_libvips_until_setup():
    """Plugins, libvips' threads and cache, its logger and a warnings filter are the whole process's: importing
    the module leaves them alone; setup() sets them, and a second call changes nothing more."""
    before, imported, ready, again = in_fresh_python("""
        import json, logging, warnings
        import pyvips
        from PIL import Image

        def state():
            return {
                "formats": sorted(Image.OPEN),
                "vips_threads": pyvips.concurrency_get(),
                "vips_cache_max": pyvips.cache_get_max(),
                "vips_log_level": logging.getLogger("pyvips").level,
                "bomb_filters": len([f for f in warnings.filters if f[2] is Image.DecompressionBombWarning]),
            }

        before = state()
        import pipeline.images
        imported = state()
        pipeline.images.setup()
        ready = state()
        pipeline.images.setup()
        print(json.dumps([before, imported, ready, state()]))
    """)

    assert imported == before and "HEIF" not in before["formats"]
    assert "HEIF" in ready["formats"] and {"JPEG", "PNG", "WEBP"} <= set(ready["formats"])
    assert (ready["vips_threads"], ready["vips_cache_max"], ready["bomb_filters"]) == (1, 0, 1)
    assert ready["vips_log_level"] == logging.ERROR
    assert again == ready


def test_prepare_image_sets_itself_up_when_nobody_called_setup(tmp_path):
    (tmp_path / "IMG_0001.HEIC").write_bytes(TINY_HEIC)

    size, vips_cache_max = in_fresh_python(f"""
        import json
        from pathlib import Path
        import pyvips
        from pipeline.config import ImagesConfig
        from pipeline.images import prepare_image

        image = prepare_image("IMG_0001.HEIC", base_dir=Path({str(tmp_path)!r}), detail="high",
                              cfg=ImagesConfig(), row_id="r")
        print(json.dumps([[image.width, image.height], pyvips.cache_get_max()]))
    """)

    assert size == [64, 48] and vips_cache_max == 0


# End to end: a run over good and bad images


async def test_each_bad_image_is_one_error_row_with_a_one_line_reason_and_the_rest_succeed(
    tmp_path, emulator, key_in_env
):
    """The acceptance run: the real runner, client and emulator; every good row costs what its original costs."""
    root = tmp_path / "data"
    root.mkdir()
    Image.linear_gradient("L").resize((4000, 3000)).convert("RGB").save(root / "photo.jpg", quality=92)
    make_image(root / "small.png", (640, 480))
    make_image(root / "mislabelled.jpg", (300, 200), fmt="PNG")
    make_image(root / "named-nothing", (300, 200), fmt="PNG")  # no extension: the bytes decide
    (root / "IMG_0001.HEIC").write_bytes(TINY_HEIC)
    Image.radial_gradient("L").resize((600, 600)).convert("RGB").save(root / "whole.jpg")
    (root / "truncated.jpg").write_bytes((root / "whole.jpg").read_bytes()[:3000])
    (root / "empty.jpg").write_bytes(b"")
    (root / "bomb.png").write_bytes(png_header_only(30000, 30000))  # over Pillow's own bomb limit
    (root / "large.png").write_bytes(png_header_only(5000, 4100))  # over images.max_pixels below
    Image.effect_noise((1200, 900), 100).convert("RGB").save(root / "noise.png")  # ~600 kB once prepared
    make_image(tmp_path / "secret.png")
    rows = {
        "photo": "photo.jpg",
        "small": "small.png",
        "mislabelled": "mislabelled.jpg",
        "no-extension": "named-nothing",
        "heic": "IMG_0001.HEIC",
        "truncated": "truncated.jpg",
        "empty": "empty.jpg",
        "bomb": "bomb.png",
        "too-many-pixels": "large.png",
        "over-limit": "noise.png",
        "file-url": "file:///etc/passwd",
        "escape": "../secret.png",
    }
    lines = [json.dumps({"id": row_id, "image": ref, "detail": "high"}) for row_id, ref in rows.items()]
    lines.append(json.dumps({"id": "eleven", "images": ["small.png"] * 11}))
    lines.append(json.dumps({"id": "too-much-together", "images": ["noise.png"] * 3, "detail": "low"}))
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    # a low-detail noise.png is a ~150 kB data URL: one fits a request of 400 kB, three do not
    limits = {"max_image_bytes": 200_000, "max_request_bytes": 400_000, "max_pixels": 20_000_000}
    cfg = azure_config(emulator, images=limits)

    summary = await run(cfg, RunOptions(root / "manifest.jsonl", tmp_path / "out", handle_signals=False))

    out = {row["id"]: row for row in ds.dataset(tmp_path / "out").to_table().to_pylist()}
    good = {"photo", "small", "no-extension", "heic"}
    reasons = {
        "mislabelled": "named .jpg but the bytes are PNG",
        "truncated": "damaged or truncated image",
        "empty": "file is empty (0 bytes)",
        "bomb": "too many pixels to decode safely: Image size (900000000 pixels)",
        "too-many-pixels": "too many pixels: 5000×4100 is more than images.max_pixels = 20,000,000",
        "over-limit": "images.max_image_bytes",
        "file-url": "file: URLs are not supported",
        "escape": "outside the manifest's folder",
        "eleven": "11 images: the service takes at most 10 per request",
        "too-much-together": "3 images come to",
    }
    assert summary.exit_code == EXIT_ROW_ERRORS and len(out) == len(good) + len(reasons)
    assert {row_id for row_id, row in out.items() if row["status"] == "ok"} == good
    for row_id, reason in reasons.items():
        error = out[row_id]["error"]
        assert out[row_id]["status"] == "error" and reason in error and f"row {row_id!r}" in error
        assert "\n" not in error and "base64" not in error
    assert len(emulator.requests) == len(good)  # no bad row reached the endpoint
    originals = {
        (1024, 768): (4000, 3000),
        (640, 480): (640, 480),
        (300, 200): (300, 200),
        (64, 48): (64, 48),
    }
    for request in emulator.requests:  # each billed exactly as its original would have been
        messages = request.body["messages"]
        sent = sent_image(PreparedImage(messages[-1]["content"][1]["image_url"]["url"], None, None))
        assert request.prompt_tokens == count_prompt_tokens(messages, [originals[sent.size]])
    assert all(
        row["prompt_tokens"] == row["estimated_prompt_tokens"]
        for row_id, row in out.items()
        if row_id in good
    )
