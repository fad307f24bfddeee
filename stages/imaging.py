"""Image decoding and validation shared by the stages.

The crawl stage keeps original bytes; every later stage decodes them through :func:`load_rgb`, so the
one place that knows about EXIF orientation and colour modes (CMYK, 16-bit, palette, alpha) is here.
"""

from __future__ import annotations

import io
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache

import numpy as np
import simplejpeg
from PIL import Image, ImageOps, UnidentifiedImageError

EXIF_ORIENTATION_TAG = 0x0112
TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})
PHASH_SIZE = 32
PHASH_BITS_SIDE = 8
# Validation decodes JPEGs with libjpeg's DCT scaling to at least this size: every entropy-coded
# byte is still decoded (so truncation and corruption are caught) at a fraction of a full decode.
VALIDATION_DRAFT_SIDE = 256
# Formats that may hold several frames without being an animation (MPO: a photo plus previews/stereo pair).
MULTI_PICTURE_FORMATS = frozenset({"MPO"})
# EXIF orientation -> the transpose that displays the stored pixels upright (EXIF 2.3, tag 0x0112).
ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# Validation hashes a copy reduced to at most this long side: the 32x32 pHash does not need more, and
# converting a full 64 MP decode to RGB would hold two more full-size copies.
VALIDATION_HASH_SIDE = 1024


class ImageRejected(Exception):
    """Bytes that cannot become a training image; ``reason`` is a short machine code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class ImageFacts:
    """What validation learned about one image. Sizes are as displayed (EXIF orientation applied)."""

    width: int
    height: int
    format: str
    mode: str
    exif_orientation: int
    phash: int


def _looks_like_markup(data: bytes) -> bool:
    head = data[:512].lstrip().lower()
    return head.startswith((b"<!doctype", b"<html", b"<?xml", b"<svg", b"{", b"["))


# Pillow allocates image memory in blocks of 16 MB by default. glibc serves blocks up to 32 MB from
# per-thread arenas once its dynamic mmap threshold has risen, and keeps what was freed there: sixteen
# download threads each kept ~200 MB after validating one 64 MP PNG, whatever the pixel budget. Blocks
# above 32 MB are always mmapped and go back to the OS when freed.
DECODE_BLOCK_BYTES = 64 * 1024 * 1024


def use_large_decode_blocks() -> None:
    """Make Pillow allocate large decodes in blocks glibc returns to the OS (process-wide; call per worker)."""
    if Image.core.get_block_size() < DECODE_BLOCK_BYTES:
        Image.core.set_block_size(DECODE_BLOCK_BYTES)


class PixelBudget:
    """Bounds the pixels being decoded at once by the threads of one worker (a semaphore weighted by pixels).

    A 187 KB PNG can claim 64 MP (~310 MB decoded); sixteen download threads validating such images at
    once would need ~5 GB. Holders wait until their pixels fit under ``max_pixels``; one image larger than
    the whole budget still runs, alone, so nothing waits forever.
    """

    def __init__(self, max_pixels: int) -> None:
        self.max_pixels = max_pixels
        self._in_use = 0
        self._condition = threading.Condition()

    @contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        with self._condition:
            self._condition.wait_for(lambda: self._in_use == 0 or self._in_use + pixels <= self.max_pixels)
            self._in_use += pixels
        try:
            yield
        finally:
            with self._condition:
                self._in_use -= pixels
                self._condition.notify_all()


def _open(data: bytes, content_type: str | None) -> Image.Image:
    """Open (headers only) or raise :class:`ImageRejected`; any parser exception is the bytes' fault."""
    if not data:
        raise ImageRejected("empty_body", "zero-byte body")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageRejected("decompression_bomb", str(exc)) from exc
    except UnidentifiedImageError as exc:
        if b"<svg" in data[:2048].lower() or (content_type or "").startswith("image/"):
            raise ImageRejected("unsupported_format", f"not a decodable raster image ({content_type})") from exc
        kind = "markup/text" if _looks_like_markup(data) else "unknown bytes"
        raise ImageRejected("not_an_image", f"{kind} with content type {content_type!r}") from exc
    except MemoryError:
        raise
    except Exception as exc:
        # Pillow's plugins raise ValueError, SyntaxError, struct.error, ... for what they cannot parse;
        # a text/XMP chunk that inflates past Pillow's 1 MB safety limit is one such ValueError.
        reason = "oversized_metadata" if "decompressed data too large" in str(exc).lower() else "corrupt"
        if _riff_cut_short(data):
            # libwebp refuses a cut-short file at open ("could not create decoder object"), unlike Pillow's
            # own decoders, which fail in load(); the RIFF size says which it is.
            reason = "truncated"
        raise ImageRejected(reason, f"header could not be parsed: {type(exc).__name__}: {exc}") from exc


def _riff_cut_short(data: bytes) -> bool:
    """True when ``data`` is a RIFF/WebP file shorter than the size its RIFF header declares."""
    if data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        return False
    return int.from_bytes(data[4:8], "little") + 8 > len(data)


def exif_orientation(img: Image.Image) -> int:
    try:
        value = int(img.getexif().get(EXIF_ORIENTATION_TAG, 1))
    except (ValueError, TypeError, OSError):
        return 1
    return value if 1 <= value <= 8 else 1


# Modes whose transparency is a single colour key (PNG tRNS, GIF) rather than a palette or an alpha channel.
COLOUR_KEY_ALPHA_MODES = {"1": "LA", "L": "LA", "RGB": "RGBA"}
SIXTEEN_BIT_AND_WIDER_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def _colour_key(img: Image.Image) -> int | tuple[int, int, int] | None:
    """The pixel value that ``img.info["transparency"]`` marks fully transparent, if it is a usable colour key."""
    key = img.info.get("transparency")
    if img.mode == "RGB":
        usable = isinstance(key, tuple) and len(key) == 3 and all(isinstance(v, int) for v in key)
    else:
        grey_mode = img.mode in COLOUR_KEY_ALPHA_MODES or img.mode in SIXTEEN_BIT_AND_WIDER_MODES
        usable = grey_mode and isinstance(key, int) and not isinstance(key, bool)
    return key if usable else None


def to_rgb(img: Image.Image) -> Image.Image:
    """Normalise any PIL mode to 8-bit RGB; transparency (alpha, palette or colour key) is composited on white."""
    key = _colour_key(img)
    if img.mode == "RGB" and key is None:
        return img
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif key is not None and img.mode in COLOUR_KEY_ALPHA_MODES:
        # Pillow turns the colour key into an alpha channel (pixels equal to the key get alpha 0).
        img = img.convert(COLOUR_KEY_ALPHA_MODES[img.mode])
    if img.mode in SIXTEEN_BIT_AND_WIDER_MODES:
        array = np.asarray(img, dtype=np.float64)
        grey = Image.fromarray(_grey_levels(img.mode, array).astype(np.uint8), mode="L")
        if key is None:
            img = grey
        else:
            # The key is in the stored (16-bit) value space, so match it before scaling down.
            alpha = Image.fromarray(np.where(array == key, 0, 255).astype(np.uint8), mode="L")
            img = Image.merge("LA", (grey, alpha))
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _grey_levels(mode: str, array: np.ndarray) -> np.ndarray:
    """A wide-mode image's values mapped onto [0, 255] as floats (not rounded), by :func:`_value_range`."""
    low, peak = _value_range(mode, array)
    scaled = np.nan_to_num((array - low) * (255.0 / (peak - low)), nan=0.0, posinf=255.0, neginf=0.0)
    return np.clip(scaled, 0.0, 255.0)


def _hash_source(img: Image.Image) -> Image.Image:
    """What :func:`perceptual_hash` reads: ``to_rgb(img)``, except for wide grey modes without a colour key.

    Those are hashed from their unrounded levels (mode ``F``): a 16-bit image whose values stay below 256
    renders as 8-bit zeros, and its hash from that rendering was all zeros, so unrelated such images were
    near-duplicates of each other. pHash ignores the brightness scale, so the hash equals the 8-bit copy's.
    """
    if img.mode not in SIXTEEN_BIT_AND_WIDER_MODES or _colour_key(img) is not None:
        return to_rgb(img)
    levels = _grey_levels(img.mode, np.asarray(img, dtype=np.float64))
    return Image.fromarray(levels.astype(np.float32), mode="F")


def _value_range(mode: str, array: np.ndarray) -> tuple[float, float]:
    """The stored values that map to black and white for a 16-bit, 32-bit integer or float grey image.

    16-bit: the full 0-65535 range (a dark 16-bit image stays dark). Floats in [0, 1]: that range (a float32
    TIFF in [0, 1] must not turn black). Otherwise, values that fit 8 bits: 0-255; that fit 16 bits:
    0-65535; anything else (negative, larger): their own finite range, so nothing is clipped to black/white.
    """
    if mode.startswith("I;16"):
        return 0.0, 65535.0
    finite = array[np.isfinite(array)]
    if finite.size == 0:
        raise ImageRejected("corrupt", f"{mode} image holds no finite pixel value")
    low, high = float(finite.min()), float(finite.max())
    if low >= 0.0:
        if mode == "F" and high <= 1.0:
            return 0.0, 1.0
        if high <= 255.0:
            return 0.0, 255.0
        if high <= 65535.0:
            return 0.0, 65535.0
    return (low, high) if high > low else (low - 1.0, high)


@cache
def _dct_matrix(size: int) -> np.ndarray:
    n = np.arange(size)
    matrix = np.cos(np.pi * (2 * n[None, :] + 1) * n[:, None] / (2 * size))
    matrix[0] *= 1 / np.sqrt(2)
    return matrix * np.sqrt(2 / size)


def perceptual_hash(img: Image.Image) -> int:
    """64-bit DCT perceptual hash (pHash): low 8x8 DCT coefficients of a 32x32 grey image vs their median.

    A mode ``F`` image is read as grey levels without rounding them to 8 bits (see :func:`_hash_source`).
    """
    grey = (img if img.mode == "F" else img.convert("L")).resize((PHASH_SIZE, PHASH_SIZE), Image.Resampling.BOX)
    pixels = np.asarray(grey, dtype=np.float64)
    dct = _dct_matrix(PHASH_SIZE)
    low = (dct @ pixels @ dct.T)[:PHASH_BITS_SIDE, :PHASH_BITS_SIDE].flatten()
    bits = low > np.median(low[1:])
    return int(sum(1 << i for i, bit in enumerate(bits) if bit))


def hamming_distance(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def inspect_image(
    data: bytes,
    *,
    content_type: str | None,
    max_pixels: int,
    allowed_formats: frozenset[str],
    budget: PixelBudget | None = None,
) -> ImageFacts:
    """Fully validate ``data`` as an image and measure it. Raises :class:`ImageRejected`.

    Every byte of the pixel data is decoded, so truncation and corruption are caught: JPEGs by
    libjpeg-turbo in strict mode (its "Corrupt JPEG data" warnings are errors) at DCT-scaled size,
    other formats by Pillow at full size, holding ``budget`` for their stored pixels meanwhile.
    Animations of every format are refused alike (``animated``); multi-picture JPEGs (MPO) are photos.
    """
    img = _open(data, content_type)
    fmt = (img.format or "").upper()
    if getattr(img, "is_animated", False) and fmt not in MULTI_PICTURE_FORMATS:
        frames = getattr(img, "n_frames", "several")
        raise ImageRejected(
            "animated", f"{fmt or 'image'} with {frames} frames: animations and multi-page images are not kept"
        )
    if fmt not in allowed_formats:
        raise ImageRejected("unsupported_format", f"format {fmt or 'unknown'} is not in {sorted(allowed_formats)}")
    stored_w, stored_h = img.size
    if stored_w * stored_h > max_pixels:
        raise ImageRejected(
            "decompression_bomb", f"{stored_w}x{stored_h} = {stored_w * stored_h} px exceeds the {max_pixels} px cap"
        )
    mode = img.mode
    is_jpeg = fmt in ("JPEG", "MPO")
    # Non-JPEG formats are decoded at full size, and that starts at the EXIF lookup: Pillow loads a whole
    # PNG to look for an eXIf chunk after its pixel data. So the budget covers everything from there on.
    held = budget.hold(stored_w * stored_h) if budget is not None and not is_jpeg else _no_budget()
    with held:
        try:
            if is_jpeg:
                orientation = exif_orientation(img)
                phash = _oriented_phash(_validate_jpeg(data, img), orientation)
            else:
                # Load first: Pillow's PNG getexif() loads the pixels itself, exif_orientation() swallows
                # the decode error, and a second load() then "succeeds" on half-decoded pixels.
                img.load()
                orientation = exif_orientation(img)
                phash = _oriented_phash(_hash_source(_reduced(img)), orientation)
        except (ImageRejected, MemoryError):
            raise
        except Exception as exc:
            # Whatever the decoder raises (OSError, ValueError, SyntaxError, struct.error, ...) is about these bytes.
            raise ImageRejected(_decode_reason(exc, fmt, data), f"{fmt} decode failed: {exc}") from exc
        finally:
            img.close()  # frees the full-size decode before the budget is released
    width, height = (stored_h, stored_w) if orientation in TRANSPOSING_ORIENTATIONS else (stored_w, stored_h)
    return ImageFacts(width, height, fmt, mode, orientation, phash)


def _oriented_phash(img: Image.Image, orientation: int) -> int:
    """pHash of ``img`` as displayed (EXIF orientation applied), so a rotated copy hashes alike."""
    return perceptual_hash(img.transpose(ORIENTATION_TRANSPOSE[orientation]) if orientation != 1 else img)


@contextmanager
def _no_budget() -> Iterator[None]:
    yield


def _decode_reason(exc: BaseException, fmt: str, data: bytes) -> str:
    """``truncated`` when the data ends early, else ``corrupt``.

    Pillow says "broken data stream" for a PNG cut short and for damaged compressed data alike; a PNG
    that still ends with its IEND chunk was not cut short.
    """
    text = str(exc).lower()
    if _riff_cut_short(data):
        return "truncated"
    truncated = ("truncat", "broken data stream", "premature end of jpeg file")
    if not any(marker in text for marker in truncated):
        return "corrupt"
    damaged_png = fmt == "PNG" and "broken data stream" in text and data[-8:-4] == b"IEND"
    return "corrupt" if damaged_png else "truncated"


def _validate_jpeg(data: bytes, img: Image.Image) -> Image.Image:
    """Decode every scan of a JPEG strictly at DCT-scaled size; return a small image to hash (unoriented).

    Pillow's decoder ignores libjpeg's recoverable-corruption warnings, so a JPEG with garbage written
    over part of its entropy-coded data decodes "fine" with hundreds of garbled rows; simplejpeg runs the
    same libjpeg-turbo with warnings raised as errors, and its scaled greyscale decode is faster than
    Pillow's draft. CMYK/YCCK JPEGs are checked the same way and hashed from Pillow's draft (Pillow knows
    Adobe's inverted CMYK).
    """
    side = VALIDATION_DRAFT_SIDE
    colorspace = simplejpeg.decode_jpeg_header(data)[2]
    if colorspace in ("CMYK", "YCCK"):
        simplejpeg.decode_jpeg(data, colorspace="CMYK", min_height=side, min_width=side, strict=True)
        img.draft("RGB", (side, side))
        img.load()
        return to_rgb(img)
    luma = simplejpeg.decode_jpeg(data, colorspace="GRAY", min_height=side, min_width=side, strict=True)
    return Image.fromarray(luma[:, :, 0], mode="L")


# Modes Pillow's ``reduce`` averages correctly (palette and 1-bit images are converted first).
REDUCIBLE_MODES = frozenset({"L", "LA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "I", "F"})


def _reduced(img: Image.Image) -> Image.Image:
    """``img`` box-reduced so its long side is about :data:`VALIDATION_HASH_SIDE` (unchanged when small)."""
    factor = max(img.size) // VALIDATION_HASH_SIDE
    if factor < 2:
        return img
    if img.mode.startswith("I;16"):
        # Pillow cannot reduce 16-bit images, and to_rgb's float64 copies of a full 64 MP one took ~1.9 GB:
        # box-average the 2-byte values here instead (the result keeps the mode, so the scaling is unchanged).
        values = np.asarray(img)
        height, width = (values.shape[0] // factor) * factor, (values.shape[1] // factor) * factor
        blocks = values[:height, :width].reshape(height // factor, factor, width // factor, factor)
        return Image.fromarray(blocks.mean(axis=(1, 3)).round().astype(np.uint16))
    return img.reduce(factor) if img.mode in REDUCIBLE_MODES else img


def load_rgb(data: bytes, max_side: int | None = None) -> Image.Image:
    """Decode bytes to an oriented RGB image, optionally downscaled so its long side is <= ``max_side``."""
    img = _open(data, None)
    if max_side is not None and img.format == "JPEG":
        img.draft("RGB", (max_side, max_side))
    img = to_rgb(ImageOps.exif_transpose(img))
    if max_side is not None and max(img.size) > max_side:
        img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return img


def stored_image_bytes(row: dict, s3=None) -> bytes:
    """An image row's original bytes: kept in the row, or read from its local/S3 ``image_ref``.

    Images crawled from http(s) with ``crawl.image_storage=reference`` are not fetched again here: a later
    stage must not depend on a third-party server still serving the same bytes.
    """
    from ps3_engine.infra.storage import read_uri_bytes

    if row["image_bytes"] is not None:
        return row["image_bytes"]
    ref = row.get("image_ref") or ""
    if ref.startswith(("http://", "https://")):
        raise ValueError("image is stored as an http reference; crawl with crawl.image_storage=bytes")
    return read_uri_bytes(ref, s3)
