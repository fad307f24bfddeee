"""Tesseract OCR for pages without a text layer (scans), behind the same word-box interface.

``TesseractOcr.words(image)`` returns the same :class:`~ps3_engine.stages.documents.text_regions.Word` list as the
text layer does, boxes in the pixels of the image it was given (the rendered page), with tesseract's
block/paragraph numbers as text blocks. pytesseract is imported lazily and the tesseract binary is
checked once in :meth:`TesseractOcr.check`, so a worker without OCR never needs either, and a missing
binary fails with an instruction instead of deep inside a batch. Install: Debian's ``tesseract-ocr``
(English data included) and ``pip install pytesseract``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from ps3_engine.stages.documents.text_regions import Word


class OcrUnavailable(RuntimeError):
    """pytesseract or the tesseract binary (or its language data) is missing."""


class OcrFailed(RuntimeError):
    """Tesseract ran but failed (or timed out) on one page."""


class TesseractSettings(BaseModel):
    """How tesseract reads a page. Everything here decides the output, so all of it is fingerprinted."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    language: str = Field("eng", min_length=1, description="tesseract -l, e.g. 'eng' or 'eng+deu'")
    psm: int = Field(3, ge=0, le=13, description="page segmentation mode (3: automatic, no OSD)")
    min_confidence: float = Field(30.0, ge=-1, le=100, description="words below this confidence are dropped")


def words_from_tesseract_data(data: Mapping[str, Sequence[Any]], min_confidence: float) -> list[Word]:
    """Words of a pytesseract ``image_to_data(..., output_type=DICT)`` result, in tesseract's reading order.

    Level-5 entries are words; lines are ``(block, paragraph, line)`` and text blocks are tesseract's
    blocks, renumbered from 0 in order of appearance. Tesseract's paragraphs are not used as blocks: it
    splits a paragraph at every line of a different length, which would cut word runs short.
    """
    words: list[Word] = []
    lines: dict[tuple[int, int, int], int] = {}
    blocks: dict[int, int] = {}
    for i, level in enumerate(data["level"]):
        text = str(data["text"][i]).strip()
        if int(level) != 5 or not text or float(data["conf"][i]) < min_confidence:
            continue
        block_key = int(data["block_num"][i])
        line_key = (block_key, int(data["par_num"][i]), int(data["line_num"][i]))
        blocks.setdefault(block_key, len(blocks))
        lines.setdefault(line_key, len(lines))
        left, top = float(data["left"][i]), float(data["top"][i])
        width, height = float(data["width"][i]), float(data["height"][i])
        if width <= 0 or height <= 0:
            continue
        words.append(Word(text, left, top, left + width, top + height, lines[line_key], blocks[block_key]))
    return words


class TesseractOcr:
    """One tesseract configuration; cheap to build, :meth:`check` before the first page."""

    def __init__(
        self, settings: TesseractSettings, command: str = "tesseract", threads: int = 1, timeout_s: float = 120.0
    ):
        self.settings = settings
        self.command = command
        self.threads = threads
        self.timeout_s = timeout_s
        self._version: str | None = None

    def check(self) -> str:
        """Import pytesseract, find the binary and the language data; return e.g. ``"tesseract 5.3.0"``.

        Raises:
            OcrUnavailable: with what to install when any of them is missing.
        """
        if self._version is not None:
            return self._version
        pytesseract = _import_pytesseract()
        pytesseract.pytesseract.tesseract_cmd = self.command
        try:
            version = pytesseract.get_tesseract_version()
            languages = set(pytesseract.get_languages())
        except pytesseract.TesseractNotFoundError as exc:
            raise OcrUnavailable(
                f"the tesseract binary {self.command!r} was not found on PATH; install it "
                "(Debian/Ubuntu: apt-get install tesseract-ocr) or set render.tesseract_cmd"
            ) from exc
        missing = [lang for lang in self.settings.language.split("+") if lang not in languages]
        if missing:
            raise OcrUnavailable(
                f"tesseract has no language data for {missing} (installed: {sorted(languages)}); install "
                f"e.g. apt-get install {' '.join('tesseract-ocr-' + m for m in missing)}"
            )
        # Tesseract's OpenMP threads compete with the worker pool's own parallelism; one per page by default.
        os.environ.setdefault("OMP_THREAD_LIMIT", str(self.threads))
        self._version = f"tesseract {version}"
        return self._version

    def words(self, image: Image.Image) -> list[Word]:
        """OCR ``image``; word boxes in its pixels. Raises ``OcrFailed`` on a tesseract error or timeout."""
        self.check()
        pytesseract = _import_pytesseract()
        # pytesseract hands the image to tesseract through a temporary file in ``image.format``; an
        # uncompressed BMP costs a few ms where its PNG default costs ~80 ms for a 150 dpi letter page.
        scan = image.copy()
        scan.format = "BMP"
        try:
            data = pytesseract.image_to_data(
                scan,
                lang=self.settings.language,
                config=f"--psm {self.settings.psm}",
                output_type=pytesseract.Output.DICT,
                timeout=self.timeout_s,
            )
        except (pytesseract.TesseractError, RuntimeError) as exc:
            raise OcrFailed(f"{type(exc).__name__}: {exc}") from exc
        return words_from_tesseract_data(data, self.settings.min_confidence)


def _import_pytesseract():
    try:
        import pytesseract
    except ImportError as exc:
        raise OcrUnavailable(
            "OCR needs pytesseract: pip install 'ps3-engine[documents]' (and the tesseract-ocr binary)"
        ) from exc
    return pytesseract
