"""PDF access through pdfium (pypdfium2): open with typed rejections, rasterise a page, read its text layer.

pdfium is not thread-safe: one worker uses it from one thread at a time (the render stage fetches in
threads but opens and renders sequentially). Text-layer words come from pdfium's character list: loose
character boxes (font ascent to descent, so every word on a line gets the line's height), split at
whitespace and at the line breaks pdfium inserts, mapped into rendered-page pixels with
:func:`~ps3_engine.stages.documents.text_regions.points_to_pixels`.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, replace

import numpy as np
import pypdfium2 as pdfium
import pypdfium2.raw as pdfium_c
from PIL import Image

from ps3_engine.stages.documents.text_regions import (
    PageGeometry,
    Word,
    assign_blocks,
    points_to_pixels,
    rendered_size,
    union_box,
)

PDFIUM_VERSION = f"pdfium {pdfium.version.PDFIUM_INFO.tag} (pypdfium2 {pdfium.version.PYPDFIUM_INFO.version})"
_LINE_BREAK = 0x0A
_SPACES = frozenset({0x09, 0x0A, 0x0D, 0x20, 0xA0, 0x3000, *range(0x2000, 0x200C)})


@dataclass
class DocumentRejected(Exception):
    """A document (or page) that cannot become page rows; ``reason`` is the error row's reason."""

    reason: str
    message: str
    category: str = "failed"

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"


def open_pdf(data: bytes) -> pdfium.PdfDocument:
    """Open PDF bytes; raise ``DocumentRejected`` with ``encrypted`` or ``broken_pdf``.

    A document encrypted with only an owner password (permissions, empty user password) opens and
    renders; one that needs a user password, or uses a security handler pdfium lacks, is ``encrypted``.
    """
    try:
        document = pdfium.PdfDocument(data)
    except pdfium.PdfiumError as exc:
        if exc.err_code in (pdfium_c.FPDF_ERR_PASSWORD, pdfium_c.FPDF_ERR_SECURITY):
            raise DocumentRejected("encrypted", f"needs a password or an unsupported security handler: {exc}") from exc
        raise DocumentRejected("broken_pdf", str(exc)) from exc
    if len(document) == 0:
        document.close()
        raise DocumentRejected("broken_pdf", "the document has no pages")
    return document


def load_page(document: pdfium.PdfDocument, index: int) -> pdfium.PdfPage:
    """Page ``index`` of ``document``; a page pdfium cannot load is ``broken_pdf``."""
    try:
        return document[index]
    except pdfium.PdfiumError as exc:
        raise DocumentRejected("broken_pdf", f"page {index + 1}: {exc}") from exc


def page_geometry(page: pdfium.PdfPage, dpi: float) -> PageGeometry:
    """The page's visible box, rotation and bitmap size at ``dpi`` (without rendering)."""
    page_box = page.get_bbox()
    rotation = page.get_rotation()
    width, height = rendered_size(page_box, rotation, dpi)
    return PageGeometry(page_box, rotation, width, height)


def render_page(page: pdfium.PdfPage, geometry: PageGeometry) -> Image.Image:
    """Rasterise ``page`` to an RGB image of exactly ``geometry.width x geometry.height`` on white.

    Renders through ``FPDF_RenderPageBitmap`` directly (annotations drawn, page rotation applied by
    pdfium) so the bitmap size is the rounded ``points x dpi / 72`` that the boxes are mapped onto.
    """
    bitmap = pdfium.PdfBitmap.new_native(geometry.width, geometry.height, pdfium_c.FPDFBitmap_BGR, rev_byteorder=True)
    bitmap.fill_rect((255, 255, 255, 255), 0, 0, geometry.width, geometry.height)
    flags = pdfium_c.FPDF_ANNOT | pdfium_c.FPDF_REVERSE_BYTE_ORDER
    pdfium_c.FPDF_RenderPageBitmap(bitmap, page, 0, 0, geometry.width, geometry.height, 0, flags)
    return Image.fromarray(np.array(bitmap.to_numpy(), copy=True), "RGB")


def text_layer_words(page: pdfium.PdfPage, geometry: PageGeometry, block_gap_factor: float = 0.8) -> list[Word]:
    """Words of the page's visible text layer in reading order, boxes in rendered-page pixels.

    Reading order is the page's own, whatever its ``/Rotate``: pdfium orders the characters of a
    rotated page by their displayed position (a page shown upside down came back with its lines in
    reverse and every line a new block), so the characters are read with the rotation lifted, and
    blocks are found on the unrotated page; only the boxes are mapped onto the displayed bitmap.
    Words outside the visible page box (text drawn off the page, or cropped away) are dropped: they
    are not on the rendered image.
    """
    rotation = page.get_rotation()
    try:
        if rotation:
            page.set_rotation(0)
        try:
            textpage = page.get_textpage()
        except pdfium.PdfiumError as exc:
            raise DocumentRejected("broken_pdf", f"unreadable text layer: {exc}") from exc
        try:
            spans = _char_spans(textpage)
        finally:
            textpage.close()
    finally:
        if rotation:
            page.set_rotation(rotation)
    if not spans:
        return []
    boxes_pt = np.array([box for _, box, _ in spans])
    # The same bitmap scale with the page unrotated: the frame in which lines run down the page.
    turned = geometry.rotation in (90, 270)
    upright = replace(
        geometry,
        rotation=0,
        width=geometry.height if turned else geometry.width,
        height=geometry.width if turned else geometry.height,
    )
    displayed = points_to_pixels(boxes_pt, geometry)
    reading = [
        Word(text, float(b[0]), float(b[1]), float(b[2]), float(b[3]), line, 0)
        for (text, _, line), b in zip(spans, points_to_pixels(boxes_pt, upright), strict=True)
    ]
    words = [
        replace(word, x0=float(b[0]), y0=float(b[1]), x1=float(b[2]), y1=float(b[3]))
        for word, b in zip(assign_blocks(reading, block_gap_factor), displayed, strict=True)
    ]
    return [w for w in words if union_box([w], geometry.width, geometry.height) is not None]


def _char_spans(textpage: pdfium.PdfTextPage) -> list[tuple[str, tuple[float, float, float, float], int]]:
    """``(word text, (left, bottom, right, top) in points, line index)`` per word of the text page."""
    spans: list[tuple[str, tuple[float, float, float, float], int]] = []
    chars: list[str] = []
    box = [0.0, 0.0, 0.0, 0.0]
    line = 0
    rect = pdfium_c.FS_RECTF()

    def flush() -> None:
        text = unicodedata.normalize("NFKC", "".join(chars)).strip()
        if text:
            spans.append((text, (box[0], box[1], box[2], box[3]), line))
        chars.clear()

    for index in range(textpage.count_chars()):
        code = pdfium_c.FPDFText_GetUnicode(textpage, index)
        if code in _SPACES or code == 0 or not pdfium_c.FPDFText_GetLooseCharBox(textpage, index, rect):
            flush()
            line += code == _LINE_BREAK
            continue
        char = chr(code)
        if unicodedata.category(char).startswith("C"):
            continue
        left, bottom, right, top = rect.left, rect.bottom, rect.right, rect.top
        if chars and (bottom >= box[3] or top <= box[1]):  # no vertical overlap: a new line without a break
            flush()
            line += 1
        if not chars:
            box[:] = [left, bottom, right, top]
        else:
            box[:] = [min(box[0], left), min(box[1], bottom), max(box[2], right), max(box[3], top)]
        chars.append(char)
    flush()
    return spans
