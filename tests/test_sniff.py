"""sniff.py: what an image is, read from its header without decoding it, with the refusals that allows."""

from __future__ import annotations

import base64

import pytest
from conftest import TINY_HEIC, in_fresh_python, png_header_only
from PIL import Image

from pipeline.config import ImagesConfig
from pipeline.images import prepare_image
from pipeline.records import ImageError
from pipeline.sniff import measure_image, read_image_size

CFG = ImagesConfig()
RED = (255, 0, 0)


def test_the_estimate_refuses_a_png_named_jpg_in_the_same_words(tmp_path):
    Image.new("RGB", (100, 80), RED).save(tmp_path / "mislabelled.jpg", "PNG")

    with pytest.raises(ImageError, match="named .jpg but the bytes are PNG"):
        measure_image("mislabelled.jpg", base_dir=tmp_path, cfg=CFG, row_id="row-1")


def test_measure_image_honours_the_same_allowed_roots(tmp_path):
    (tmp_path / "manifests").mkdir()
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "header.png").write_bytes(png_header_only(5000, 4000))

    size = measure_image("../shared/header.png", base_dir=tmp_path / "manifests", row_id="r",
                         cfg=ImagesConfig(allowed_roots=("../shared",)))  # fmt: skip

    assert size == (5000, 4000)


def test_read_image_size_reads_the_header_only(tmp_path):
    (tmp_path / "header.png").write_bytes(png_header_only(5000, 4000))

    assert read_image_size(tmp_path / "header.png") == (5000, 4000)


@pytest.mark.parametrize("ref", ["huge.png", "pixels-data-url", "bytes-data-url"])
def test_measure_image_refuses_what_prepare_image_refuses_in_the_same_words(tmp_path, ref):
    """The estimate counts these rows as failing with the run's own error, read from headers only."""
    (tmp_path / "huge.png").write_bytes(png_header_only(5000, 5000))
    ref = {
        "pixels-data-url": "data:image/png;base64," + base64.b64encode(png_header_only(5000, 5000)).decode(),
        "bytes-data-url": "data:image/png;base64," + base64.b64encode(b"\x89PNG" + b"\0" * 3000).decode(),
    }.get(ref, ref)
    cfg = ImagesConfig(max_pixels=20_000_000, max_image_bytes=2_000)

    with pytest.raises(ImageError) as measured:
        measure_image(ref, base_dir=tmp_path, cfg=cfg, row_id="r")
    with pytest.raises(ImageError) as prepared:
        prepare_image(ref, base_dir=tmp_path, detail="high", cfg=cfg, row_id="r")

    assert str(measured.value) == str(prepared.value)
    assert "images.max_pixels" in str(measured.value) or "images.max_image_bytes" in str(measured.value)


def test_read_image_size_of_a_non_image_raises_oserror(tmp_path):
    (tmp_path / "notes.jpg").write_text("not an image")

    with pytest.raises(OSError):
        read_image_size(tmp_path / "notes.jpg")


def test_measure_image_follows_the_same_reference_rules_as_prepare_image(tmp_path):
    (tmp_path / "header.png").write_bytes(png_header_only(5000, 4000))

    sizes = (
        measure_image("header.png", base_dir=tmp_path, cfg=CFG, row_id="r"),
        measure_image("https://example.com/a.jpg", base_dir=tmp_path, cfg=CFG, row_id="r"),
    )

    assert sizes == ((5000, 4000), None)
    with pytest.raises(ImageError, match="outside"):
        measure_image("../elsewhere.png", base_dir=tmp_path, cfg=CFG, row_id="r")


def test_importing_sniff_changes_nothing_until_an_image_is_measured_which_needs_no_setup_call(tmp_path):
    """Registering Pillow's plugins is process-wide: it happens on first use, and never loads libvips."""
    (tmp_path / "IMG_0001.HEIC").write_bytes(TINY_HEIC)

    before, size, after = in_fresh_python(f"""
        import json, sys, warnings
        from pathlib import Path
        from PIL import Image
        import pipeline.sniff
        from pipeline.config import ImagesConfig

        def state():
            bomb_filters = [f for f in warnings.filters if f[2] is Image.DecompressionBombWarning]
            return {{"heif": "HEIF" in Image.OPEN, "bomb_filters": len(bomb_filters), "pyvips": "pyvips" in sys.modules}}

        before = state()
        size = pipeline.sniff.measure_image("IMG_0001.HEIC", base_dir=Path({str(tmp_path)!r}), cfg=ImagesConfig(),
                                            row_id="r")
        pipeline.sniff.register_formats()
        print(json.dumps([before, size, state()]))
    """)

    assert before == {"heif": False, "bomb_filters": 0, "pyvips": False}
    assert size == [64, 48]
    assert after == {"heif": True, "bomb_filters": 1, "pyvips": False}


def test_the_supported_names_read_before_any_setup_already_count_the_heif_plugin():
    """A module that reads the names before anything was prepared gets the whole list, not a partial one."""
    names = in_fresh_python(
        "import json; from pipeline.sniff import SUPPORTED_NAMES; print(json.dumps(SUPPORTED_NAMES))"
    )

    assert names == "JPEG, PNG, WebP, GIF, BMP, TIFF, AVIF or HEIC"
