"""Issue 14's image instances and their siblings: parser exceptions, silent corruption, float ranges,
animations of every format, and the pixel budget that bounds validation memory.

Every image is generated in memory; the JPEG corruption cases are checked against Pillow first, so a
test fails loudly if an instance stops being "Pillow decodes it without an error".
"""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from ps3_engine.pipeline.samples import synthetic_scene
from ps3_engine.stages.crawl import CrawlConfig
from ps3_engine.stages.imaging import ImageRejected, PixelBudget, hamming_distance, inspect_image, load_rgb
from tests.support.zoo import animation, big_text_chunk_png, corrupt_mid_stream, float_tiff

ALLOWED = frozenset(CrawlConfig().allowed_formats)


def encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **params)
    return buffer.getvalue()


def inspect(data: bytes, **kwargs: object):
    return inspect_image(data, content_type=None, max_pixels=64_000_000, allowed_formats=ALLOWED, **kwargs)


def rejection(data: bytes) -> ImageRejected:
    with pytest.raises(ImageRejected) as info:
        inspect(data)
    return info.value


def pillow_decodes(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
    except Exception:
        return False
    return True


# -- kind 1: any parser exception is this item's rejection ------------------------------------------


def test_png_with_a_2mb_zipped_itxt_chunk_is_rejected_not_raised():
    error = rejection(big_text_chunk_png())
    assert error.reason == "oversized_metadata"
    assert "MAX_TEXT_CHUNK" in error.message


def test_sibling_png_with_a_2mb_ztxt_chunk_is_rejected_the_same_way():
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", " " * (2 << 20), zip=True)
    assert rejection(encode(Image.new("RGB", (1300, 1100), "teal"), "PNG", pnginfo=info)).reason == "oversized_metadata"


def _tiff_with_tag_type(tag: int, tiff_type: int) -> bytes:
    """An uncompressed little-endian TIFF whose IFD entry ``tag`` claims ``tiff_type`` (e.g. 10, SRATIONAL)."""
    data = bytearray(encode(Image.new("RGB", (64, 48), "teal"), "TIFF"))
    ifd = struct.unpack_from("<I", data, 4)[0]
    for index in range(struct.unpack_from("<H", data, ifd)[0]):
        entry = ifd + 2 + 12 * index
        if struct.unpack_from("<H", data, entry)[0] == tag:
            struct.pack_into("<H", data, entry + 2, tiff_type)
            return bytes(data)
    raise AssertionError(f"tag {tag} not written")


def test_sibling_tiff_whose_strip_offsets_are_rationals_raises_typeerror_in_pillow_and_is_corrupt():
    data = _tiff_with_tag_type(273, 10)  # StripOffsets as SRATIONAL: Pillow raises a TypeError on load
    with pytest.raises(TypeError), Image.open(io.BytesIO(data)) as img:
        img.load()
    error = rejection(data)
    assert error.reason == "corrupt" and error.message.startswith("TIFF decode failed")


def test_load_rgb_downstream_rejects_what_validation_rejects():
    with pytest.raises(ImageRejected, match="oversized_metadata"):
        load_rgb(big_text_chunk_png())


# -- kind 3: damaged data is never kept as good ------------------------------------------------------


@pytest.fixture(scope="module")
def baseline_jpeg() -> bytes:
    return encode(synthetic_scene(1600, 1200, 3), "JPEG", quality=90)


@pytest.mark.parametrize("seed", [1, 3, 7, 9, 13])
def test_jpeg_with_400_bytes_overwritten_mid_stream_is_corrupt(baseline_jpeg, seed):
    damaged = corrupt_mid_stream(baseline_jpeg, seed=seed)
    error = rejection(damaged)
    assert error.reason in ("corrupt", "truncated")
    assert error.message.startswith("JPEG decode failed")


def test_the_instances_pillow_decodes_silently_are_corrupt(baseline_jpeg):
    silent = [s for s in range(12) if pillow_decodes(corrupt_mid_stream(baseline_jpeg, seed=s))]
    assert silent, "no seed gives a silently decodable JPEG any more; pick other seeds"
    for seed in silent:
        error = rejection(corrupt_mid_stream(baseline_jpeg, seed=seed))
        assert (error.reason, "Corrupt JPEG data" in error.message) == ("corrupt", True)


def test_sibling_progressive_jpeg_with_overwritten_bytes_is_corrupt():
    progressive = encode(synthetic_scene(1600, 1200, 5), "JPEG", quality=90, progressive=True)
    assert rejection(corrupt_mid_stream(progressive, seed=2)).reason == "corrupt"


def test_sibling_truncated_jpeg_is_still_truncated(baseline_jpeg):
    assert rejection(baseline_jpeg[: len(baseline_jpeg) * 2 // 3]).reason == "truncated"


def test_good_jpegs_including_cmyk_and_mpo_still_pass(baseline_jpeg):
    assert inspect(baseline_jpeg).format == "JPEG"
    assert inspect(encode(synthetic_scene(640, 480, 1).convert("CMYK"), "JPEG")).mode == "CMYK"
    frames = [synthetic_scene(640, 480, 1), synthetic_scene(640, 480, 2)]
    mpo = encode(frames[0], "MPO", save_all=True, append_images=frames[1:])
    facts = inspect(mpo)  # a multi-picture JPEG (stereo pair / previews) is a photo, not an animation
    assert (facts.format, facts.width) == ("MPO", 640)


def test_float32_tiff_in_0_1_keeps_its_brightness():
    scene = synthetic_scene(320, 240, 4)
    data = float_tiff(scene)
    assert inspect(data).mode == "F"
    rgb = np.asarray(load_rgb(data), dtype=np.int16)
    grey = np.asarray(scene.convert("L"), dtype=np.int16)
    assert np.abs(rgb[..., 0] - grey).max() <= 1  # before: everything <= 1 (black)


def test_sibling_float_tiff_outside_0_1_is_scaled_by_its_own_range():
    values = np.linspace(-50.0, 950.0, 64 * 48, dtype=np.float32).reshape(48, 64)
    rgb = np.asarray(load_rgb(encode(Image.fromarray(values, mode="F"), "TIFF")))
    assert rgb.min() == 0 and rgb.max() == 255


def test_sibling_32_bit_integer_tiff_beyond_16_bits_is_not_clipped_white():
    values = (np.arange(64 * 48, dtype=np.int32).reshape(48, 64) * 1000).astype(np.int32)  # up to ~3e6
    rgb = np.asarray(load_rgb(encode(Image.fromarray(values, mode="I"), "TIFF")))
    assert rgb.min() == 0 and rgb.max() == 255 and 100 < float(rgb.mean()) < 155  # before: ~all 255


def test_float_image_without_a_finite_value_is_corrupt():
    data = encode(Image.fromarray(np.full((48, 64), np.nan, dtype=np.float32), mode="F"), "TIFF")
    assert rejection(data).reason == "corrupt"


# -- kind 10: one verdict per kind of input ----------------------------------------------------------


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG", "TIFF"])
def test_animations_of_every_format_are_refused_alike(fmt):
    error = rejection(animation(fmt))
    assert error.reason == "animated"
    assert "3 frames" in error.message


@pytest.mark.parametrize("fmt", ["WEBP", "PNG"])
def test_single_frame_images_of_animation_capable_formats_are_kept(fmt):
    assert inspect(encode(synthetic_scene(320, 240, 6), fmt)).format == fmt


# -- kind 8: the pixel budget bounds what the threads decode at once ---------------------------------


def test_pixel_budget_never_exceeds_its_limit_and_lets_an_oversized_image_run_alone():
    budget = PixelBudget(100)
    in_use, peak, lock = [0], [0], threading.Lock()

    def hold(pixels: int) -> None:
        with budget.hold(pixels):
            with lock:
                in_use[0] += pixels
                peak[0] = max(peak[0], in_use[0])
            time.sleep(0.01)
            with lock:
                in_use[0] -= pixels

    threads = [threading.Thread(target=hold, args=(p,)) for p in [60, 60, 40, 30, 250, 10] * 3]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert not any(t.is_alive() for t in threads)
    assert peak[0] == 250  # the oversized one ran, alone; everything else stayed within 100


def test_validation_holds_the_budget_for_stored_pixels_and_releases_it():
    budget = PixelBudget(1)
    data = encode(synthetic_scene(320, 240, 7), "PNG")
    assert inspect(data, budget=budget).width == 320
    with budget.hold(1):  # released: a new holder does not wait
        pass


MEMORY_CHILD = """
import resource, sys
from PIL import Image
from ps3_engine.stages.imaging import inspect_image, use_large_decode_blocks
data = open(sys.argv[1], "rb").read()
use_large_decode_blocks()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
facts = inspect_image(data, content_type=None, max_pixels=64_000_000, allowed_formats=frozenset({"PNG"}))
print(facts.mode, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


@pytest.mark.parametrize("mode", ["I;16", pytest.param("RGBA", marks=pytest.mark.slow)])  # RGBA: ~25 s
def test_sibling_validating_a_64_mp_png_of_a_wide_mode_stays_near_its_decoded_size(tmp_path, mode):
    """A 16-bit grey 7999x7999 PNG (142 KB) took ~1.9 GB to validate (float64 copies); RGBA ~1 GB before."""
    if mode == "I;16":
        image = Image.fromarray(np.full((7999, 7999), 30000, dtype=np.uint16))
    else:
        image = Image.new("RGBA", (7999, 7999), (0, 128, 128, 200))
    path = tmp_path / "wide.png"
    image.save(path)
    del image
    done = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(path)], capture_output=True, text=True, check=True)
    found_mode, growth_mb = done.stdout.split()
    assert found_mode == mode
    assert int(growth_mb) < 600  # decoded size: 128 MB (I;16) / 256 MB (RGBA), plus a reduced copy


def test_reduced_16_bit_hash_matches_the_8_bit_rendering():
    scene = synthetic_scene(2100, 1500, 8).convert("L")
    sixteen = Image.fromarray(np.asarray(scene, dtype=np.uint16) * 257)  # full 16-bit range, same picture
    assert hamming_distance(inspect(encode(sixteen, "PNG")).phash, inspect(encode(scene, "PNG")).phash) <= 4


def test_sibling_float_tiff_holding_8_bit_values_keeps_them():
    data = encode(Image.fromarray(np.full((48, 64), 98.0, dtype=np.float32), mode="F"), "TIFF")
    assert load_rgb(data).getpixel((3, 3)) == (98, 98, 98)


@pytest.mark.parametrize("compress_level", [0, 6])
def test_sibling_png_with_damaged_pixel_data_is_corrupt_not_kept(compress_level):
    """Pillow raises on this PNG, but only once: the EXIF lookup's load swallowed it and validation kept it."""
    noise = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    data = bytearray(encode(Image.fromarray(noise), "PNG", compress_level=compress_level))
    middle = len(data) // 2
    data[middle : middle + 50] = bytes(50)
    assert not pillow_decodes(bytes(data))
    error = rejection(bytes(data))
    assert (error.reason, error.message) == ("corrupt", "PNG decode failed: broken data stream when reading image file")


def test_png_cut_short_is_still_truncated():
    noise = np.random.default_rng(1).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), "PNG")
    assert rejection(data[: len(data) // 2]).reason == "truncated"


def test_16_bit_images_holding_8_bit_values_get_distinct_hashes_not_zero():
    """Known bug: rendered to 8 bits over 0-65535 such images were all zeros, so every pHash was 0 (near-dups)."""
    scenes = [synthetic_scene(1300, 1100, seed).convert("L") for seed in (30, 31)]
    low_16 = [encode(Image.fromarray(np.asarray(s, dtype=np.uint16)), "PNG") for s in scenes]
    hashes = [inspect(data).phash for data in low_16]
    assert all(h != 0 for h in hashes)
    assert hamming_distance(*hashes) > 10
    assert hashes[0] == inspect(encode(scenes[0], "PNG")).phash  # same picture as its 8-bit copy


def test_sibling_dark_16_bit_values_up_to_1000_hash_like_the_full_range_copy():
    scene = np.asarray(synthetic_scene(1300, 1100, 32).convert("L"), dtype=np.uint16)
    dark, full = (encode(Image.fromarray(scene * k), "PNG") for k in (4, 257))
    assert hamming_distance(inspect(dark).phash, inspect(full).phash) <= 2
