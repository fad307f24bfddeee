"""Generated PDFs with known text at known positions, for the document tests and the benchmark.

``text_pdf`` writes pages of paragraphs with reportlab (Helvetica, standard font metrics): every sentence
sits on one line, so its known box is exact: from its start to start + string width, from the font's
descent below the baseline to its ascent above it. ``scanned_pdf`` turns such a document into an image-only
one (each page rasterised by pdfium and embedded as a full-page image, no text layer) for the OCR path.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass

import pypdfium2 as pdfium
from reportlab.lib.utils import ImageReader
from reportlab.pdfbase.pdfmetrics import getAscentDescent, stringWidth
from reportlab.pdfgen import canvas

from ps3_engine.stages.geometry import BoxXYXY

FONT = "Helvetica"
LETTER = (612.0, 792.0)
_WORDS = (
    "able about above across after again against almost along also always among animal answer around "
    "basket before behind below between black bridge bright brown build called carry center change "
    "children circle city close color common country course cover cross current dark deep different "
    "distance door early earth engine enough even every example face family farm father field final "
    "follow forest found friend garden general given glass golden good green ground group happen heavy "
    "horse house hundred island known large later laugh learn letter light little longer machine market "
    "measure middle minute money morning mother mountain music nation never number object ocean office "
    "often order paper people picture place plain plant point power present question quick quiet river "
    "round second silver simple small sound south space special spring square station stone story street "
    "strong summer table thousand together travel under until valley village water weather window winter "
    "wonder world yellow young"
)
VOCABULARY = tuple(_WORDS.split())


@dataclass(frozen=True)
class PlacedWord:
    text: str
    box_pt: tuple[float, float, float, float]  # left, bottom, right, top in PDF points (bottom-up)
    line: int
    block: int


@dataclass(frozen=True)
class PlacedSentence:
    text: str
    box_pt: tuple[float, float, float, float]
    words: tuple[PlacedWord, ...]


@dataclass
class GeneratedPdf:
    data: bytes
    page_size: tuple[float, float]
    pages: list[list[PlacedSentence]]  # per page, in reading order

    def words(self, page: int) -> list[PlacedWord]:
        return [w for s in self.pages[page] for w in s.words]


def to_pixels(box_pt: tuple[float, float, float, float], page_height_pt: float, dpi: float) -> BoxXYXY:
    """A known PDF-space box on an unrotated page in rendered pixels (rounded to the nearest pixel)."""
    scale = dpi / 72.0
    left, bottom, right, top = box_pt
    return BoxXYXY(
        round(left * scale),
        round((page_height_pt - top) * scale),
        round(right * scale),
        round((page_height_pt - bottom) * scale),
    )


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(VOCABULARY) for _ in range(rng.randint(3, 7))]
    return " ".join([words[0].capitalize(), *words[1:]]) + "."


def text_pdf(
    num_pages: int = 1,
    *,
    paragraphs: int = 3,
    lines_per_paragraph: int = 4,
    font_size: float = 12.0,
    page_size: tuple[float, float] = LETTER,
    encrypt: str | None = None,
    seed: int = 0,
) -> GeneratedPdf:
    """Pages of paragraphs; each line holds one or two whole sentences, paragraphs separated by a blank line."""
    rng = random.Random(seed)
    buffer = io.BytesIO()
    pdf = canvas.Canvas(buffer, pagesize=page_size, encrypt=encrypt, invariant=1)
    ascent, descent = getAscentDescent(FONT, font_size)
    leading = font_size * 1.4
    margin = 72.0
    pages: list[list[PlacedSentence]] = []
    for _ in range(num_pages):
        pdf.setFont(FONT, font_size)
        placed: list[PlacedSentence] = []
        baseline = page_size[1] - margin
        line_index = 0
        for block in range(paragraphs):
            for _ in range(lines_per_paragraph):
                x = margin
                for count in range(rng.randint(1, 2)):
                    sentence = _sentence(rng)
                    if count and x + stringWidth(sentence, FONT, font_size) > page_size[0] - margin:
                        break
                    pdf.drawString(x, baseline, sentence)
                    placed.append(_place(sentence, x, baseline, font_size, ascent, descent, line_index, block))
                    x += stringWidth(sentence + " ", FONT, font_size)
                baseline -= leading
                line_index += 1
            baseline -= leading  # blank line between paragraphs
        pages.append(placed)
        pdf.showPage()
    pdf.save()
    return GeneratedPdf(buffer.getvalue(), page_size, pages)


def _place(
    sentence: str, x: float, baseline: float, size: float, ascent: float, descent: float, line: int, block: int
) -> PlacedSentence:
    words = []
    cursor = x
    for token in sentence.split(" "):
        width = stringWidth(token, FONT, size)
        words.append(PlacedWord(token, (cursor, baseline + descent, cursor + width, baseline + ascent), line, block))
        cursor += width + stringWidth(" ", FONT, size)
    box = (x, baseline + descent, x + stringWidth(sentence, FONT, size), baseline + ascent)
    return PlacedSentence(sentence, box, tuple(words))


def scanned_pdf(source: GeneratedPdf, dpi: float = 200.0) -> bytes:
    """The same pages as images only: rasterised at ``dpi`` and embedded full-page, no text layer."""
    document = pdfium.PdfDocument(source.data)
    buffer = io.BytesIO()
    pdf = canvas.Canvas(buffer, pagesize=source.page_size, invariant=1)
    for index in range(len(document)):
        image = document[index].render(scale=dpi / 72.0).to_pil().convert("L")
        pdf.drawImage(ImageReader(image), 0, 0, width=source.page_size[0], height=source.page_size[1])
        pdf.showPage()
    pdf.save()
    document.close()
    return buffer.getvalue()


def rotated_pdf(data: bytes, rotation: int) -> bytes:
    """The same document with every page's ``/Rotate`` set to ``rotation`` (clockwise degrees)."""
    document = pdfium.PdfDocument(data)
    for index in range(len(document)):
        document[index].set_rotation(rotation)
    buffer = io.BytesIO()
    document.save(buffer)
    document.close()
    return buffer.getvalue()


def rotate_box(box: BoxXYXY, rotation: int, width: int, height: int) -> BoxXYXY:
    """A pixel box of an unrotated ``width x height`` page on the page displayed rotated clockwise."""
    x0, y0, x1, y1 = box
    if rotation == 90:
        return BoxXYXY(height - y1, x0, height - y0, x1)
    if rotation == 180:
        return BoxXYXY(width - x1, height - y1, width - x0, height - y0)
    if rotation == 270:
        return BoxXYXY(y0, width - x1, y1, width - x0)
    return box


def blank_pdf(num_pages: int = 1, page_size: tuple[float, float] = LETTER) -> bytes:
    """Pages with a drawn rectangle and no text at all."""
    buffer = io.BytesIO()
    pdf = canvas.Canvas(buffer, pagesize=page_size, invariant=1)
    for _ in range(num_pages):
        pdf.rect(100, 100, 200, 150, fill=1)
        pdf.showPage()
    pdf.save()
    return buffer.getvalue()
