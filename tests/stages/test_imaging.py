"""Image validation and decoding: orientation, colour modes, rejections with reasons, perceptual hashes.

Every image is built in memory with PIL; nothing here touches the network or the disk.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from ps3_engine.pipeline.samples import synthetic_scene
from ps3_engine.stages.crawl import CrawlConfig
from ps3_engine.stages.imaging import (
    ImageRejected,
    exif_orientation,
    hamming_distance,
    inspect_image,
    load_rgb,
    perceptual_hash,
    to_rgb,
)

ALLOWED = frozenset(CrawlConfig().allowed_formats)
RED, BLUE, GREY, WHITE = (255, 0, 0), (0, 0, 255), (128, 128, 128), (255, 255, 255)
UINT64 = st.integers(min_value=0, max_value=2**64 - 1)


def encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **params)
    return buffer.getvalue()


def inspect(data: bytes, *, content_type: str | None = None, max_pixels: int = 10_000_000, allowed=ALLOWED):
    return inspect_image(data, content_type=content_type, max_pixels=max_pixels, allowed_formats=allowed)


def rejection(data: bytes, **kwargs: object) -> ImageRejected:
    with pytest.raises(ImageRejected) as info:
        inspect(data, **kwargs)
    return info.value


def close(pixel: object, expected: tuple[int, ...], tolerance: int = 3) -> bool:
    return bool(np.all(np.abs(np.asarray(pixel, dtype=int) - np.asarray(expected)) <= tolerance))


def red_corner_image(size: tuple[int, int] = (64, 48), block: int = 16) -> Image.Image:
    """Grey image with a red square in the stored top-left corner."""
    img = Image.new("RGB", size, GREY)
    img.paste(RED, (0, 0, block, block))
    return img


def exif_jpeg(img: Image.Image, orientation: int, quality: int = 95) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(img, "JPEG", quality=quality, exif=exif.tobytes())


def red_corners(img: Image.Image, inset: int = 4) -> set[str]:
    pixels = np.asarray(img)
    height, width = pixels.shape[:2]
    corners = {
        "TL": pixels[inset, inset],
        "TR": pixels[inset, width - 1 - inset],
        "BL": pixels[height - 1 - inset, inset],
        "BR": pixels[height - 1 - inset, width - 1 - inset],
    }
    return {name for name, p in corners.items() if p[0] > 200 and p[1] < 80 and p[2] < 80}


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR claiming ``width`` x ``height``, with a 64-byte (incomplete) body."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# -- EXIF orientation ------------------------------------------------------------------------------

# Where the stored top-left corner is displayed under each EXIF orientation (TIFF/EXIF spec).
DISPLAYED_CORNER = {1: "TL", 2: "TR", 3: "BR", 4: "BL", 5: "TL", 6: "TR", 7: "BR", 8: "BL"}


@pytest.mark.parametrize("orientation", sorted(DISPLAYED_CORNER))
def test_exif_orientation_sets_displayed_size_and_rotates_pixels(orientation):
    data = exif_jpeg(red_corner_image((64, 48)), orientation)
    facts = inspect(data)
    transposed = orientation in (5, 6, 7, 8)
    assert facts.exif_orientation == orientation == exif_orientation(Image.open(io.BytesIO(data)))
    assert (facts.width, facts.height) == ((48, 64) if transposed else (64, 48))
    assert (facts.format, facts.mode) == ("JPEG", "RGB")
    rgb = load_rgb(data)
    assert rgb.mode == "RGB"
    assert rgb.size == (facts.width, facts.height)
    assert red_corners(rgb) == {DISPLAYED_CORNER[orientation]}


@pytest.mark.parametrize("value", [0, 9, 255])
def test_out_of_range_exif_orientation_is_treated_as_upright(value):
    data = exif_jpeg(red_corner_image((64, 48)), value)
    facts = inspect(data)
    assert facts.exif_orientation == 1
    assert (facts.width, facts.height) == (64, 48)
    assert red_corners(load_rgb(data)) == {"TL"}


def test_image_without_exif_is_upright():
    assert exif_orientation(Image.open(io.BytesIO(encode(red_corner_image(), "PNG")))) == 1


# -- colour modes ---------------------------------------------------------------------------------


def test_cmyk_jpeg_decodes_to_rgb_with_its_colours():
    img = Image.new("RGB", (32, 32), RED)
    img.paste(BLUE, (16, 0, 32, 32))
    data = encode(img.convert("CMYK"), "JPEG", quality=95)
    facts = inspect(data)
    assert (facts.format, facts.mode) == ("JPEG", "CMYK")
    rgb = load_rgb(data)
    assert rgb.mode == "RGB"
    assert close(rgb.getpixel((4, 16)), RED, tolerance=30)
    assert close(rgb.getpixel((28, 16)), BLUE, tolerance=30)


def test_16_bit_grey_png_maps_the_full_16_bit_range_to_8_bits():
    values = np.array([[0, 200, 32768, 65535]], dtype=np.uint16).repeat(4, axis=0)
    data = encode(Image.fromarray(values), "PNG")
    facts = inspect(data)
    assert facts.mode == "I;16"
    rgb = np.asarray(load_rgb(data))
    assert rgb.shape == (4, 4, 3)
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    # 200/65535 is nearly black: the scale is the 16-bit range, not the image's own maximum.
    assert [int(v) for v in rgb[0, :, 0]] in ([0, 0, 127, 255], [0, 0, 128, 255], [0, 1, 127, 255], [0, 1, 128, 255])


def test_dark_16_bit_grey_png_stays_dark():
    data = encode(Image.fromarray(np.full((8, 8), 200, dtype=np.uint16)), "PNG")
    assert int(np.asarray(load_rgb(data)).max()) <= 1


def test_palette_png_transparency_is_composited_on_white():
    img = Image.new("P", (8, 8), 0)
    img.putpalette([*RED, *BLUE])
    img.paste(1, (4, 0, 8, 8))
    data = encode(img, "PNG", transparency=0)
    facts = inspect(data)
    assert (facts.format, facts.mode) == ("PNG", "P")
    rgb = load_rgb(data)
    assert rgb.mode == "RGB"
    assert rgb.getpixel((1, 1)) == WHITE  # transparent red
    assert rgb.getpixel((6, 6)) == BLUE


def test_opaque_palette_png_keeps_its_colours():
    img = Image.new("P", (8, 8), 0)
    img.putpalette([*RED, *BLUE])
    rgb = load_rgb(encode(img, "PNG"))
    assert rgb.getpixel((3, 3)) == RED


def test_rgba_png_alpha_is_composited_on_white():
    img = Image.new("RGBA", (3, 1))
    img.putdata([(255, 0, 0, 255), (0, 0, 0, 0), (0, 0, 255, 128)])
    data = encode(img, "PNG")
    assert inspect(data).mode == "RGBA"
    rgb = load_rgb(data)
    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == RED
    assert rgb.getpixel((1, 0)) == WHITE
    assert close(rgb.getpixel((2, 0)), (127, 127, 255), tolerance=2)


def test_la_png_alpha_is_composited_on_white():
    img = Image.new("LA", (4, 1))
    img.putdata([(0, 0), (0, 255), (100, 255), (0, 128)])
    data = encode(img, "PNG")
    assert inspect(data).mode == "LA"
    rgb = load_rgb(data)
    assert rgb.mode == "RGB"
    assert [rgb.getpixel((x, 0)) for x in range(3)] == [WHITE, (0, 0, 0), (100, 100, 100)]
    assert close(rgb.getpixel((3, 0)), (127, 127, 127), tolerance=2)


@pytest.mark.parametrize("mode", ["1", "L", "RGB", "RGBA", "LA", "P", "CMYK", "I;16", "I", "YCbCr"])
def test_to_rgb_returns_8_bit_rgb_of_the_same_size(mode):
    img = Image.new(mode, (5, 3))
    out = to_rgb(img)
    assert out.mode == "RGB"
    assert out.size == (5, 3)


def test_to_rgb_returns_rgb_images_unchanged():
    img = red_corner_image()
    assert to_rgb(img) is img


@pytest.mark.parametrize(("mode", "key"), [("L", 0), ("RGB", (0, 0, 0))])
def test_colour_key_transparency_is_composited_on_white(mode, key):
    img = Image.new(mode, (8, 8), key)
    img.paste(255 if mode == "L" else RED, (4, 0, 8, 8))
    data = encode(img, "PNG", transparency=key)
    assert "transparency" in Image.open(io.BytesIO(data)).info
    rgb = load_rgb(data)
    assert rgb.getpixel((1, 1)) == WHITE
    assert rgb.getpixel((6, 6)) == (WHITE if mode == "L" else RED)


@pytest.mark.parametrize(("mode", "key", "opaque", "expected"), [("1", 0, 255, WHITE), ("I;16", 1000, 0, (0, 0, 0))])
def test_colour_key_transparency_of_1_bit_and_16_bit_grey_is_composited_on_white(mode, key, opaque, expected):
    # The 16-bit key (1000) would round to 4 in 8 bits: it must be matched before scaling, and only exactly.
    img = Image.new(mode, (8, 8), key)
    img.paste(opaque, (4, 0, 8, 8))
    if mode == "I;16":
        img.paste(Image.new(mode, (4, 4), 1001), (0, 4))  # pasting a bare int would keep only its low byte
    data = encode(img, "PNG", transparency=key)
    opened = Image.open(io.BytesIO(data))
    assert (opened.mode, "transparency" in opened.info) == (mode, True)
    rgb = load_rgb(data)
    assert rgb.mode == "RGB"
    assert rgb.getpixel((1, 1)) == WHITE
    assert rgb.getpixel((6, 6)) == expected
    if mode == "I;16":
        assert close(rgb.getpixel((1, 6)), (4, 4, 4), tolerance=1)


def test_colour_key_that_matches_no_pixel_changes_nothing():
    img = red_corner_image()
    data = encode(img, "PNG", transparency=(1, 2, 3))
    assert np.array_equal(np.asarray(load_rgb(data)), np.asarray(img))


# -- rejections -----------------------------------------------------------------------------------


def noise_image(size: tuple[int, int] = (256, 256), seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_image_is_rejected_as_truncated(fmt):
    data = encode(noise_image(), fmt)
    inspect(data)  # the whole file is fine
    error = rejection(data[: len(data) // 2])
    assert error.reason == "truncated"
    assert error.message.startswith(f"{fmt} decode failed")


def test_zero_byte_body_is_rejected_as_empty():
    assert rejection(b"", content_type="image/jpeg").reason == "empty_body"
    with pytest.raises(ImageRejected) as info:
        load_rgb(b"")
    assert info.value.reason == "empty_body"


@pytest.mark.parametrize(
    ("data", "content_type", "kind"),
    [
        (b"<!doctype html><html><body>not an image</body></html>", "text/html", "markup/text"),
        (b"  \n<HTML><head></head></HTML>", None, "markup/text"),
        (b'<?xml version="1.0"?><error>denied</error>', "application/xml", "markup/text"),
        (b'{"error": "rate limited"}', "application/json", "markup/text"),
        (b"\x00\x01\x02 definitely not pixels " * 8, "application/octet-stream", "unknown bytes"),
    ],
)
def test_markup_and_unknown_bytes_are_not_images(data, content_type, kind):
    error = rejection(data, content_type=content_type)
    assert error.reason == "not_an_image"
    assert error.message.startswith(kind)
    assert str(error) == f"not_an_image: {error.message}"


def test_undecodable_bytes_labelled_as_an_image_are_an_unsupported_format():
    error = rejection(b"\x00\x01\x02 definitely not pixels " * 8, content_type="image/heic")
    assert error.reason == "unsupported_format"
    assert "image/heic" in error.message


def test_svg_is_an_unsupported_format():
    svg = b'<svg xmlns="http://www.w3.org/2000/svg" width="4096" height="4096"></svg>'
    assert rejection(svg, content_type="image/svg+xml").reason == "unsupported_format"
    assert rejection(svg, content_type=None).reason == "unsupported_format"


def test_decodable_format_outside_the_allowlist_is_rejected():
    gif = encode(Image.new("P", (16, 16)), "GIF")
    error = rejection(gif, content_type="image/gif")
    assert error.reason == "unsupported_format"
    assert "GIF" in error.message
    png = encode(red_corner_image(), "PNG")
    assert inspect(png).format == "PNG"
    assert rejection(png, allowed=frozenset({"JPEG"})).reason == "unsupported_format"


def test_header_beyond_pils_own_limit_is_a_decompression_bomb():
    error = rejection(png_header_only(30_000, 30_000), max_pixels=10_000_000)
    assert error.reason == "decompression_bomb"


def test_pixel_cap_rejects_from_the_header_without_decoding():
    # The body holds 64 bytes of pixel data: decoding it would fail as truncated, as it does under the cap.
    assert rejection(png_header_only(3_000, 3_000), max_pixels=10_000_000).reason == "truncated"
    error = rejection(png_header_only(5_000, 5_000), max_pixels=10_000_000)
    assert error.reason == "decompression_bomb"
    assert "5000x5000" in error.message and "10000000" in error.message


def test_pixel_cap_is_inclusive_and_counts_stored_pixels():
    data = exif_jpeg(red_corner_image((120, 100)), 6)
    assert inspect(data, max_pixels=120 * 100).width == 100
    assert rejection(data, max_pixels=120 * 100 - 1).reason == "decompression_bomb"


# -- perceptual hash ------------------------------------------------------------------------------

SCENE_SIZE = (512, 384)


def phash_of(data: bytes) -> int:
    return inspect(data).phash


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_phash_survives_reencoding_resizing_and_format_change(seed):
    scene = synthetic_scene(*SCENE_SIZE, seed)
    reference = phash_of(encode(scene, "JPEG", quality=95))
    variants = [
        encode(scene, "JPEG", quality=60),
        encode(scene.resize((448, 336)), "JPEG", quality=75),
        encode(scene.resize((256, 192)), "PNG"),
        encode(scene, "PNG"),
    ]
    assert [hamming_distance(reference, phash_of(v)) for v in variants] == pytest.approx([0] * 4, abs=6)


def test_phash_separates_different_images():
    hashes = [phash_of(encode(synthetic_scene(*SCENE_SIZE, seed), "JPEG", quality=90)) for seed in range(4)]
    hashes.append(phash_of(encode(noise_image(SCENE_SIZE), "PNG")))
    assert all(0 <= h < 2**64 for h in hashes)
    distances = [hamming_distance(a, b) for i, a in enumerate(hashes) for b in hashes[i + 1 :]]
    assert min(distances) >= 12


def test_phash_is_taken_after_exif_orientation():
    scene = synthetic_scene(*SCENE_SIZE, 3)
    tagged = exif_jpeg(scene, 6, quality=90)
    rotated = encode(scene.transpose(Image.Transpose.ROTATE_270), "JPEG", quality=90)
    assert hamming_distance(phash_of(tagged), phash_of(rotated)) <= 4
    assert hamming_distance(phash_of(tagged), phash_of(encode(scene, "JPEG", quality=90))) > 12


def test_validation_phash_matches_the_hash_of_the_decoded_image():
    scene = synthetic_scene(*SCENE_SIZE, 4)
    png = encode(scene, "PNG")
    assert phash_of(png) == perceptual_hash(load_rgb(png)) == perceptual_hash(scene)
    jpeg = encode(scene, "JPEG", quality=90)  # validated from a DCT-scaled draft
    assert hamming_distance(phash_of(jpeg), perceptual_hash(load_rgb(jpeg))) <= 4


# -- hamming distance -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [(0, 0, 0), (0b1011, 0b0001, 2), (0, 2**64 - 1, 64), (1 << 63, 1, 2), (0xF0F0, 0x0F0F, 16)],
)
def test_hamming_distance_counts_differing_bits(a, b, expected):
    assert hamming_distance(a, b) == expected


@given(UINT64, UINT64, UINT64)
def test_hamming_distance_is_a_metric_on_64_bit_hashes(a, b, c):
    d = hamming_distance(a, b)
    assert d == bin(a ^ b).count("1") == hamming_distance(b, a)
    assert 0 <= d <= 64
    assert (d == 0) == (a == b)
    assert hamming_distance(a, c) <= d + hamming_distance(b, c)


# -- load_rgb downscaling -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "stored", "orientation", "max_side", "expected"),
    [
        ("PNG", (400, 200), 1, 100, (100, 50)),
        ("JPEG", (400, 300), 1, 100, (100, 75)),
        ("JPEG", (300, 400), 1, 100, (75, 100)),
        ("JPEG", (400, 300), 6, 100, (75, 100)),
        ("JPEG", (400, 300), 1, 37, (37, 28)),
        ("JPEG", (400, 300), 1, 400, (400, 300)),
        ("PNG", (400, 300), 1, 1000, (400, 300)),
    ],
)
def test_load_rgb_max_side_keeps_aspect_ratio_and_content(fmt, stored, orientation, max_side, expected):
    img = red_corner_image(stored, block=stored[0] // 4)
    data = (
        exif_jpeg(img, orientation)
        if orientation != 1
        else encode(img, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    )
    out = load_rgb(data, max_side=max_side)
    assert out.mode == "RGB"
    assert out.size == expected
    assert red_corners(out, inset=1) == {DISPLAYED_CORNER[orientation]}


@given(
    width=st.integers(min_value=1, max_value=240),
    height=st.integers(min_value=1, max_value=240),
    max_side=st.integers(min_value=1, max_value=260),
)
def test_load_rgb_long_side_never_exceeds_max_side(width, height, max_side):
    out = load_rgb(encode(Image.new("RGB", (width, height), GREY), "PNG"), max_side=max_side)
    long_side, short_side = max(width, height), min(width, height)
    if long_side <= max_side:
        assert out.size == (width, height)
        return
    assert max(out.size) == max_side
    assert abs(min(out.size) - short_side * max_side / long_side) <= 1
    out_width, out_height = out.size
    assert out_width >= out_height if width >= height else out_width <= out_height
