"""Image decoding and validation shared by the stages.

The crawl stage keeps original bytes; every later stage decodes them through :func:`load_rgb`, so the
one place that knows about EXIF orientation and colour modes (CMYK, 16-bit, palette, alpha) is here.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from functools import cache

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

EXIF_ORIENTATION_TAG = 0x0112
TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})
PHASH_SIZE = 32
PHASH_BITS_SIDE = 8
# Validation decodes JPEGs with libjpeg's DCT scaling to at least this size: every entropy-coded
# byte is still decoded (so truncation and corruption are caught) at a fraction of a full decode.
VALIDATION_DRAFT_SIDE = 256


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


def _open(data: bytes, content_type: str | None) -> Image.Image:
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
        peak = 65535.0 if img.mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
        grey = Image.fromarray(np.clip(array * (255.0 / peak), 0, 255).astype(np.uint8), mode="L")
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


@cache
def _dct_matrix(size: int) -> np.ndarray:
    n = np.arange(size)
    matrix = np.cos(np.pi * (2 * n[None, :] + 1) * n[:, None] / (2 * size))
    matrix[0] *= 1 / np.sqrt(2)
    return matrix * np.sqrt(2 / size)


def perceptual_hash(img: Image.Image) -> int:
    """64-bit DCT perceptual hash (pHash): low 8x8 DCT coefficients of a 32x32 grey image vs their median."""
    grey = img.convert("L").resize((PHASH_SIZE, PHASH_SIZE), Image.Resampling.BOX)
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
) -> ImageFacts:
    """Fully validate ``data`` as an image and measure it. Raises :class:`ImageRejected`."""
    img = _open(data, content_type)
    fmt = (img.format or "").upper()
    if fmt not in allowed_formats:
        raise ImageRejected("unsupported_format", f"format {fmt or 'unknown'} is not in {sorted(allowed_formats)}")
    stored_w, stored_h = img.size
    if stored_w * stored_h > max_pixels:
        raise ImageRejected(
            "decompression_bomb", f"{stored_w}x{stored_h} = {stored_w * stored_h} px exceeds the {max_pixels} px cap"
        )
    orientation = exif_orientation(img)
    mode = img.mode
    try:
        if fmt == "JPEG":
            img.draft("RGB", (VALIDATION_DRAFT_SIDE, VALIDATION_DRAFT_SIDE))
        img.load()
        rgb = to_rgb(ImageOps.exif_transpose(img) if orientation != 1 else img)
    except OSError as exc:
        text = str(exc).lower()
        reason = "truncated" if "truncat" in text or "broken data stream" in text else "corrupt"
        raise ImageRejected(reason, f"{fmt} decode failed: {exc}") from exc
    except (SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise ImageRejected("corrupt", f"{fmt} decode failed: {exc}") from exc
    width, height = (stored_h, stored_w) if orientation in TRANSPOSING_ORIENTATIONS else (stored_w, stored_h)
    return ImageFacts(width, height, fmt, mode, orientation, perceptual_hash(rgb))


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
