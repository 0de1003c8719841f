"""Write the demo's sample images and manifests into this folder: deterministic, offline, small.

Run with the project's Python (``make sample-data``). Every image is drawn with Pillow, so the files are
the same on every run with the same Pillow, and free of any licence but CC0. Together they cover what
``pipeline/images.py`` must handle: JPEG of several sizes (one 4000×3000, kept small by smooth content),
PNG with alpha, a palette GIF, WebP, BMP, TIFF, a tall panorama, a tiny icon, a JPEG stored sideways with
EXIF orientation 6, a CMYK JPEG and a 16-bit PNG.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

HERE = Path(__file__).resolve().parent
MAX_TOTAL_BYTES = 1_500_000  # the repo refuses files over 2 MiB; the whole set stays well under
EXIF_ORIENTATION_TAG = 0x0112
LICENSE = "CC0-1.0"
FILTER_MARKER = "[[filter]]"  # the emulator answers a prompt holding this as the content filter would

SKY_TOP, SKY_BOTTOM = (70, 130, 200), (190, 220, 250)
GRASS, ROOF, WALL, SUN = (70, 150, 60), (170, 50, 40), (235, 215, 170), (250, 210, 60)


def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's own default font at `size` px (bitmap fallback when Pillow lacks FreeType)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ValueError, OSError):
        return ImageFont.load_default()


def vertical_gradient(
    size: tuple[int, int], top: tuple[int, int, int], bottom: tuple[int, int, int]
) -> Image.Image:
    """A smooth top-to-bottom blend: compresses to almost nothing as JPEG."""
    mask = Image.linear_gradient("L").resize(size)
    return Image.composite(Image.new("RGB", size, bottom), Image.new("RGB", size, top), mask)


def landscape(width: int, height: int) -> Image.Image:
    """Sky, sun, two hills and a house: the 'photo' most samples are variations of."""
    image = vertical_gradient((width, height), SKY_TOP, SKY_BOTTOM)
    draw = ImageDraw.Draw(image)
    unit = width / 100
    draw.ellipse([78 * unit, 8 * unit, 90 * unit, 20 * unit], fill=SUN)
    draw.ellipse([-30 * unit, height * 0.55, 70 * unit, height * 1.6], fill=GRASS)
    draw.ellipse([40 * unit, height * 0.6, 140 * unit, height * 1.5], fill=(90, 165, 70))
    house_x, house_y = 30 * unit, height * 0.55
    draw.rectangle([house_x, house_y, house_x + 18 * unit, house_y + 14 * unit], fill=WALL)
    draw.polygon(
        [
            (house_x - 2 * unit, house_y),
            (house_x + 9 * unit, house_y - 9 * unit),
            (house_x + 20 * unit, house_y),
        ],
        fill=ROOF,
    )
    draw.rectangle(
        [house_x + 7 * unit, house_y + 6 * unit, house_x + 11 * unit, house_y + 14 * unit], fill=(110, 70, 40)
    )
    return image


def photo_landscape() -> Image.Image:
    image = landscape(1024, 768)
    ImageDraw.Draw(image).text((24, 24), "A house on a hill", fill="white", font=font(40))
    return image


def poster_4000x3000() -> Image.Image:
    """A camera-sized picture whose smooth content keeps the JPEG small."""
    image = landscape(4000, 3000)
    draw = ImageDraw.Draw(image)
    for n in range(5):  # a flight of birds, as V shapes
        x, y = 600 + n * 420, 500 + (n % 2) * 160
        draw.line([(x, y), (x + 60, y + 40), (x + 120, y)], fill=(40, 40, 40), width=14)
    draw.text((120, 120), "4000 x 3000", fill="white", font=font(160))
    return image


def street_640x480() -> Image.Image:
    image = vertical_gradient((640, 480), (120, 160, 210), (200, 210, 220))
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, 380, 640, 480], fill=(60, 60, 65))
    for n in range(0, 640, 80):
        draw.rectangle([n + 20, 425, n + 60, 432], fill="white")  # lane markings
    for n, (left, top, colour) in enumerate(
        [
            (20, 140, (180, 90, 70)),
            (170, 80, (200, 180, 120)),
            (330, 180, (120, 140, 170)),
            (470, 110, (160, 120, 150)),
        ]
    ):
        draw.rectangle([left, top, left + 130, 380], fill=colour)
        for wy in range(top + 20, 360, 40):
            for wx in range(left + 15, left + 115, 35):
                draw.rectangle(
                    [wx, wy, wx + 18, wy + 22], fill=(250, 240, 180) if (wx + wy + n) % 3 else (60, 70, 90)
                )
    draw.text((20, 20), "Main Street", fill="white", font=font(32))
    return image


def logo_alpha() -> Image.Image:
    """An RGBA logo on a transparent background: the pipeline flattens it onto white."""
    image = Image.new("RGBA", (400, 400), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    draw.ellipse([30, 30, 370, 370], outline=(20, 90, 200, 255), width=28)
    points = [
        (200 + r * math.sin(a * math.pi / 5), 175 - r * math.cos(a * math.pi / 5))
        for a, r in zip(range(10), [110, 45] * 5, strict=True)
    ]
    draw.polygon(points, fill=(240, 170, 20, 230))
    draw.text((200, 305), "STAR CO", fill=(20, 90, 200, 255), font=font(36), anchor="mm")
    return image


def flag_palette() -> Image.Image:
    """A flag in a 16-colour palette, saved as GIF."""
    image = Image.new("RGB", (320, 200), (0, 80, 160))
    draw = ImageDraw.Draw(image)
    for n in range(0, 200, 40):
        draw.rectangle([0, n, 320, n + 20], fill=(230, 230, 230))
    draw.ellipse([110, 50, 210, 150], fill=(220, 30, 40))
    return image.quantize(colors=16, dither=Image.Dither.NONE)


def fruit_webp() -> Image.Image:
    image = vertical_gradient((800, 600), (240, 235, 225), (200, 190, 175))
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, 420, 800, 600], fill=(140, 95, 60))  # the table
    for x, colour in [(140, (200, 30, 30)), (330, (250, 150, 20)), (520, (120, 180, 40))]:
        draw.ellipse([x, 290, x + 150, 440], fill=colour)
        draw.line([(x + 75, 295), (x + 85, 260)], fill=(90, 60, 30), width=8)
    draw.text((30, 30), "Three fruits", fill=(60, 40, 30), font=font(40))
    return image


def bar_chart_bmp() -> Image.Image:
    image = Image.new("RGB", (200, 140), "white")
    draw = ImageDraw.Draw(image)
    draw.line([(20, 10), (20, 120), (190, 120)], fill="black", width=2)
    for n, (value, colour) in enumerate(
        [(60, "steelblue"), (95, "orange"), (40, "seagreen"), (80, "crimson")]
    ):
        draw.rectangle([30 + n * 40, 120 - value, 58 + n * 40, 119], fill=colour)
    draw.text((24, 124), "Q1  Q2  Q3  Q4", fill="black", font=font(11))
    return image


def document_scan_tiff() -> Image.Image:
    """A greyscale page of 'text', like a scanner makes."""
    image = Image.new("L", (600, 800), 245)
    draw = ImageDraw.Draw(image)
    draw.text((60, 50), "MEETING NOTES", fill=20, font=font(36))
    for n, line in enumerate(
        [
            "1. Order more coffee.",
            "2. Fix the printer on floor 3.",
            "3. Caption every photo in the archive.",
            "4. Go home early on Friday.",
        ]
    ):
        draw.text((60, 140 + n * 50), line, fill=40, font=font(22))
    for y in range(380, 740, 30):
        draw.line([(60, y), (540 - (y * 7) % 160, y)], fill=150, width=6)  # lines of 'text' seen from afar
    return image


def tower_panorama() -> Image.Image:
    """A tall 300×2000 picture: a lighthouse against the sky."""
    image = vertical_gradient((300, 2000), (30, 60, 140), (250, 200, 150))
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, 1850, 300, 2000], fill=(40, 90, 150))  # the sea
    draw.polygon([(120, 500), (180, 500), (210, 1850), (90, 1850)], fill="white")
    for y in range(650, 1800, 260):
        draw.polygon(
            [
                (125 - (y - 500) * 0.02, y),
                (175 + (y - 500) * 0.02, y),
                (180 + (y - 500) * 0.02, y + 110),
                (120 - (y - 500) * 0.02, y + 110),
            ],
            fill=(200, 30, 30),
        )
    draw.rectangle([110, 420, 190, 500], fill=(250, 230, 120))  # the lamp
    draw.polygon([(100, 420), (150, 360), (200, 420)], fill=(40, 40, 40))
    return image


def icon_64() -> Image.Image:
    """A 64×64 smiley: smaller than any view, so it is sent at its own size."""
    image = Image.new("RGB", (64, 64), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse([4, 4, 60, 60], fill=(255, 210, 40), outline="black", width=2)
    draw.ellipse([20, 20, 26, 28], fill="black")
    draw.ellipse([38, 20, 44, 28], fill="black")
    draw.arc([16, 24, 48, 50], start=20, end=160, fill="black", width=3)
    return image


def arrow_upright() -> Image.Image:
    """An arrow that must point up once the EXIF orientation is applied."""
    image = Image.new("RGB", (640, 480), (235, 240, 245))
    draw = ImageDraw.Draw(image)
    draw.polygon(
        [(320, 40), (450, 200), (370, 200), (370, 400), (270, 400), (270, 200), (190, 200)],
        fill=(30, 120, 60),
    )
    draw.text((320, 440), "THIS WAY UP", fill="black", font=font(32), anchor="mm")
    return image


def cmyk_swatches() -> Image.Image:
    """Print-style swatches in CMYK: cyan, magenta, yellow, black."""
    image = Image.new("CMYK", (500, 350), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    for n, ink in enumerate([(255, 0, 0, 0), (0, 255, 0, 0), (0, 0, 255, 0), (0, 0, 0, 255)]):
        draw.rectangle([25 + n * 120, 60, 115 + n * 120, 290], fill=ink)
    draw.text((25, 15), "C M Y K", fill=(0, 0, 0, 255), font=font(32))
    return image


def depth16() -> Image.Image:
    """A 16-bit greyscale gradient (PNG mode I;16): a plain 8-bit convert would turn it white."""
    return Image.linear_gradient("L").resize((256, 256)).convert("I").point(lambda v: v * 257).convert("I;16")


def save_jpeg(image: Image.Image, path: Path) -> None:
    image.save(path, "JPEG", quality=85)


def save_sideways_jpeg(image: Image.Image, path: Path) -> None:
    """Stored turned a quarter anticlockwise, with orientation 6 telling viewers to turn it back."""
    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = 6
    image.transpose(Image.Transpose.ROTATE_90).save(path, "JPEG", quality=85, exif=exif)


# name, drawing, how to save it, the manifest's prompt and detail (empty: the config's)
SAMPLES: list[tuple[str, Callable[[], Image.Image], Callable[[Image.Image, Path], None], str, str]] = [
    ("landscape.jpg", photo_landscape, save_jpeg, "", "high"),
    ("poster_4000x3000.jpg", poster_4000x3000, lambda im, p: im.save(p, "JPEG", quality=70), "", ""),
    ("street_640x480.jpg", street_640x480, save_jpeg, "", ""),
    ("logo_alpha.png", logo_alpha, lambda im, p: im.save(p, "PNG", optimize=True), "", ""),
    ("flag_palette.gif", flag_palette, lambda im, p: im.save(p, "GIF"), "", ""),
    (
        "fruit.webp",
        fruit_webp,
        lambda im, p: im.save(p, "WEBP", quality=80),
        f"{FILTER_MARKER} Describe this image.",
        "",
    ),
    ("bar_chart.bmp", bar_chart_bmp, lambda im, p: im.save(p, "BMP"), "What does this chart show?", ""),
    (
        "document_scan.tif",
        document_scan_tiff,
        lambda im, p: im.save(p, "TIFF", compression="tiff_deflate"),
        "",
        "",
    ),
    ("tower_panorama_300x2000.jpg", tower_panorama, save_jpeg, "", ""),
    ("icon_64.png", icon_64, lambda im, p: im.save(p, "PNG"), "", "low"),
    ("rotated_exif6.jpg", arrow_upright, save_sideways_jpeg, "Which way does the arrow point?", ""),
    ("cmyk_swatches.jpg", cmyk_swatches, save_jpeg, "", ""),
    ("depth16.png", depth16, lambda im, p: im.save(p, "PNG"), "", ""),
]
PAIR = ("pair-house-arrow", ["landscape.jpg", "rotated_exif6.jpg"], "Compare these two images.")


def row_id(name: str) -> str:
    return Path(name).stem.replace("_", "-")


def write_manifests() -> None:
    with open(HERE / "manifest.csv", "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["id", "image", "prompt", "detail", "license"])
        for name, _, _, prompt, detail in SAMPLES:
            writer.writerow([row_id(name), name, prompt, detail, LICENSE])
    with open(HERE / "manifest.jsonl", "w", encoding="utf-8", newline="\n") as f:
        for name, _, _, prompt, detail in SAMPLES:
            row = {"id": row_id(name), "image": name, "prompt": prompt, "detail": detail, "license": LICENSE}
            f.write(json.dumps({k: v for k, v in row.items() if v}, ensure_ascii=False) + "\n")
        pair_id, images, prompt = PAIR
        f.write(json.dumps({"id": pair_id, "images": images, "prompt": prompt, "license": LICENSE}) + "\n")


def main() -> None:
    total = 0
    for name, draw, save, _, _ in SAMPLES:
        path = HERE / name
        save(draw(), path)
        size = path.stat().st_size
        total += size
        with Image.open(path) as im:
            print(f"{name:30} {im.format:5} {im.mode:6} {im.width:>4}×{im.height:<4} {size / 1000:7.1f} kB")
    write_manifests()
    print(f"{'total':30} {total / 1000:.1f} kB in {len(SAMPLES)} images; manifest.csv, manifest.jsonl")
    if total > MAX_TOTAL_BYTES:
        raise SystemExit(
            f"sample images total {total:,} bytes, more than {MAX_TOTAL_BYTES:,}: make them smaller"
        )


if __name__ == "__main__":
    main()
