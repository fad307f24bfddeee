"""Render stage: PDF items (URLs, local files, S3 objects) -> one row per page with its text regions.

Per document: fetch (guarded HTTP client honouring ``X-Robots-Tag: noai``, or the storage seam for files
and S3 objects), open with pdfium (``encrypted`` and ``broken_pdf`` become error rows), apply the page-count
cap, then per page: apply the page-size cap at the configured DPI (paper: 150), rasterise, take the words
from the text layer, or from tesseract OCR when the page has none (scans), build the region-caption pairs
(sentences and runs of 15 words, the paper's IDL and PDFA schemes) in rendered-page pixels, encode the
image. A page that yields no words is a ``no_text`` error row. Downloads run in threads; pdfium is not
thread-safe, so opening and rendering stay on the worker's own thread.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal

import pyarrow as pa
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ps3_engine.infra.http import FetchError, GuardedHttpClient
from ps3_engine.infra.storage import S3Settings, read_uri_bytes
from ps3_engine.schemas import CRAWL_ITEM_SCHEMA, rows_to_table
from ps3_engine.schemas.document import DOCUMENT_PAGE_SCHEMA
from ps3_engine.stages.base import (
    UNEXPECTED_ERROR,
    BatchResult,
    Resources,
    ShardContext,
    Stage,
    error_row,
    errors_table,
    unexpected_error_row,
)
from ps3_engine.stages.crawl import PIL_HARD_PIXEL_LIMIT, HttpConfig, parse_opt_out, source_policy_error
from ps3_engine.stages.documents.ocr import OcrFailed, TesseractOcr, TesseractSettings
from ps3_engine.stages.documents.pdf import (
    PDFIUM_VERSION,
    DocumentRejected,
    load_page,
    open_pdf,
    page_geometry,
    render_page,
    text_layer_words,
)
from ps3_engine.stages.documents.text_regions import (
    SCHEMES,
    PageGeometry,
    Scheme,
    Word,
    sentence_regions,
    word_run_regions,
)

logger = logging.getLogger(__name__)


class RenderConfig(BaseModel):
    """Rasterisation, caps, word source and region schemes of the document branch."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dpi: float = Field(150.0, gt=0, le=1200, description="paper: 150")
    max_pages: int = Field(1000, ge=1, description="documents with more pages are capped (see over_page_limit)")
    over_page_limit: Literal["reject", "truncate"] = Field(
        "reject", description="reject: the whole document is a too_many_pages error; truncate: keep the first pages"
    )
    max_page_pixels: int = Field(40_000_000, ge=1, le=PIL_HARD_PIXEL_LIMIT, description="rendered pixels per page")
    max_page_side: int = Field(16_384, ge=1, description="longest rendered side in pixels")
    image_format: Literal["PNG", "JPEG"] = "PNG"
    jpeg_quality: int = Field(90, ge=1, le=100)
    text_source: Literal["auto", "text_layer", "ocr"] = Field(
        "auto", description="auto: text layer, OCR for pages without one; text_layer: never OCR; ocr: always"
    )
    min_text_layer_words: int = Field(1, ge=1, description="fewer text-layer words than this counts as no layer")
    schemes: tuple[Scheme, ...] = SCHEMES
    max_sentence_words: int = Field(64, ge=1, description="a run-on sentence is cut after this many words")
    word_run_length: int = Field(15, ge=1, description="paper: 15 consecutive words")
    word_run_stride: int = Field(15, ge=1, description="words between run starts (= length: disjoint runs)")
    min_word_run_words: int = Field(5, ge=1, description="shortest run kept at the end of a text block")
    block_gap_factor: float = Field(0.8, gt=0, description="text-layer line gap (x line height) that starts a block")
    ocr: TesseractSettings = TesseractSettings()
    tesseract_cmd: str = "tesseract"
    ocr_threads: int = Field(1, ge=1, description="OpenMP threads per tesseract process")
    ocr_timeout_s: float = Field(120.0, gt=0)
    honour_opt_out: bool = True
    opt_out_tokens: tuple[str, ...] = ("noai", "noimageai")
    shard_size: int = Field(32, ge=1, description="documents per shard")
    batch_size: int = Field(4, ge=1, description="documents handed to the stage at a time")
    download_threads: int = Field(8, ge=1)
    max_workers: int | None = Field(None, ge=1)
    allow_local_files: bool = Field(
        False, description="let URL lists name local files (file://, /abs, ../rel); folder sources always work"
    )
    http: HttpConfig = HttpConfig()
    s3: S3Settings = S3Settings()

    @model_validator(mode="after")
    def _check(self) -> RenderConfig:
        if not self.schemes or len(set(self.schemes)) != len(self.schemes):
            raise ValueError(f"schemes must name at least one of {SCHEMES} once each, got {self.schemes}")
        return self


def page_id_for(item_id: str, doc_sha256: str, page_index: int, dpi: float) -> str:
    """Stable id of a rendered page: the same input item with the same bytes gives the same ids on a rerun.

    The item id is part of it, so one PDF listed under two URLs yields distinct pages (documents are not
    deduplicated, as in the paper); the split still follows the document hash, so both copies share one.
    """
    return hashlib.sha256(f"{item_id}:{doc_sha256}:{page_index}:{dpi:g}".encode()).hexdigest()[:32]


def region_id_for(page_id: str, scheme: str, first_word: int, num_words: int) -> str:
    return hashlib.sha256(f"{page_id}:{scheme}:{first_word}:{num_words}".encode()).hexdigest()[:32]


class RenderStage(Stage):
    name: ClassVar[str] = "render"
    input_schema: ClassVar[pa.Schema] = CRAWL_ITEM_SCHEMA
    output_schema: ClassVar[pa.Schema] = DOCUMENT_PAGE_SCHEMA
    config_model: ClassVar[type[BaseModel]] = RenderConfig
    operational_fields: ClassVar[frozenset[str]] = frozenset(
        {"shard_size", "batch_size", "download_threads", "max_workers", "http", "s3"}
        | {"tesseract_cmd", "ocr_threads", "ocr_timeout_s"}
    )

    config: RenderConfig

    def __init__(self, config: RenderConfig) -> None:
        super().__init__(config)
        self._client: GuardedHttpClient | None = None
        self._threads: ThreadPoolExecutor | None = None
        self._ocr: TesseractOcr | None = None

    @property
    def resources(self) -> Resources:
        return Resources(num_cpus=1.0, max_workers=self.config.max_workers, batch_size=self.config.batch_size)

    def _make_ocr(self) -> TesseractOcr | None:
        if self.config.text_source == "text_layer":
            return None
        return TesseractOcr(
            self.config.ocr, self.config.tesseract_cmd, self.config.ocr_threads, self.config.ocr_timeout_s
        )

    def preflight(self) -> None:
        """Fail in the driver when OCR is configured but tesseract (or its language data) is missing."""
        ocr = self._make_ocr()
        if ocr is not None:
            ocr.check()

    def setup(self) -> None:
        self._client = GuardedHttpClient(self.config.http.to_settings())
        self._threads = ThreadPoolExecutor(self.config.download_threads, thread_name_prefix="render-fetch")
        self._ocr = self._make_ocr()
        if self._ocr is not None:
            self._ocr.check()

    def teardown(self) -> None:
        if self._threads is not None:
            self._threads.shutdown(wait=True)
        if self._client is not None:
            self._client.close()
        self._client, self._threads, self._ocr = None, None, None

    def process_batch(self, batch: pa.Table, context: ShardContext) -> BatchResult:
        if self._threads is None:
            self.setup()
        assert self._threads is not None
        items = batch.to_pylist()
        pages: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        for item, fetched in zip(items, self._threads.map(self._fetch_or_error, items), strict=True):
            if isinstance(fetched, FetchError):
                errors.append(self._fetch_error_row(context, item, fetched))
                continue
            num_pages, num_errors = len(pages), len(errors)
            try:
                self._render_document(item, *fetched, context, pages, errors)
            except Exception as exc:  # per-item isolation: drop the document's partial rows, keep one error row
                del pages[num_pages:], errors[num_errors:]
                errors.append(
                    unexpected_error_row(context, item_id=item["item_id"], input_ref=item["source_ref"], exc=exc)
                )
        return BatchResult(rows_to_table(pages, DOCUMENT_PAGE_SCHEMA), errors_table(errors))

    # -- fetching ------------------------------------------------------------------------------
    def _fetch_or_error(self, item: dict[str, Any]) -> tuple[bytes, str | None] | FetchError:
        """``(body, final_url)`` of the item, or the ``FetchError`` that stopped it."""
        ref = item["source_ref"]
        refused = source_policy_error(
            item, allow_local_files=self.config.allow_local_files, option="render.allow_local_files"
        )
        if refused is not None:
            return refused
        try:
            if item["source_kind"] == "http":
                assert self._client is not None
                result = self._client.fetch(ref, header_filter=self._opt_out_filter)
                return result.body, result.final_url
            return read_uri_bytes(ref, self.config.s3), None
        except FetchError as exc:
            return exc
        except FileNotFoundError as exc:
            return FetchError("not_found", str(exc), transient=False)
        except OSError as exc:
            return FetchError("storage_error", f"{type(exc).__name__}: {exc}", transient=True)
        except Exception as exc:  # per-item isolation: one document never fails its shard
            logger.warning("render: fetching %s failed unexpectedly", ref, exc_info=exc)
            return FetchError(UNEXPECTED_ERROR, f"{type(exc).__name__}: {exc}", transient=False)

    def _opt_out_filter(self, headers: Mapping[str, str]) -> FetchError | None:
        directive = parse_opt_out(headers, self.config.opt_out_tokens) if self.config.honour_opt_out else None
        if directive is None:
            return None
        return FetchError("opt_out", f"X-Robots-Tag: {headers.get('x-robots-tag')}", False, category="filtered")

    @staticmethod
    def _fetch_error_row(context: ShardContext, item: dict[str, Any], exc: FetchError) -> dict[str, Any]:
        return error_row(
            context,
            item_id=item["item_id"],
            input_ref=item["source_ref"],
            reason=exc.reason,
            message=exc.message,
            category=exc.category,
            transient=exc.transient,
            attempts=exc.attempts,
        )

    # -- one document --------------------------------------------------------------------------
    def _render_document(
        self,
        item: dict[str, Any],
        body: bytes,
        final_url: str | None,
        context: ShardContext,
        pages: list[dict[str, Any]],
        errors: list[dict[str, Any]],
    ) -> None:
        def reject(exc: DocumentRejected, page_index: int | None = None) -> None:
            ref = item["source_ref"] if page_index is None else f"{item['source_ref']}#page={page_index + 1}"
            errors.append(
                error_row(
                    context,
                    item_id=item["item_id"],
                    input_ref=ref,
                    reason=exc.reason,
                    message=exc.message,
                    category=exc.category,
                )
            )

        try:
            document = open_pdf(body)
        except DocumentRejected as exc:
            reject(exc)
            return
        try:
            num_pages = len(document)
            if num_pages > self.config.max_pages and self.config.over_page_limit == "reject":
                message = f"{num_pages} pages exceeds render.max_pages {self.config.max_pages}"
                reject(DocumentRejected("too_many_pages", message, "filtered"))
                return
            doc_sha256 = hashlib.sha256(body).hexdigest()
            base = self._base_row(item, doc_sha256, final_url, num_pages, context)
            for page_index in range(min(num_pages, self.config.max_pages)):
                try:
                    pages.append(self._render_page(document, page_index, base))
                except DocumentRejected as exc:
                    reject(exc, page_index)
                except Exception as exc:  # per-page isolation: the document's other pages still count
                    logger.warning("render: page %d of %s failed", page_index + 1, item["source_ref"], exc_info=exc)
                    reject(DocumentRejected(UNEXPECTED_ERROR, f"{type(exc).__name__}: {exc}"), page_index)
        finally:
            document.close()

    def _base_row(
        self, item: dict[str, Any], doc_sha256: str, final_url: str | None, num_pages: int, context: ShardContext
    ) -> dict[str, Any]:
        return {
            "item_id": item["item_id"],
            "shard_id": context.shard_id,
            "doc_sha256": doc_sha256,
            "final_url": final_url,
            "num_pages": num_pages,
            "dpi": self.config.dpi,
            **{k: item[k] for k in ("source_ref", "source_kind", "source_list", "license", "attribution")},
            "metadata_json": item["metadata_json"],
        }

    def _render_page(self, document: Any, page_index: int, base: dict[str, Any]) -> dict[str, Any]:
        config = self.config
        page = load_page(document, page_index)
        try:
            geometry = page_geometry(page, config.dpi)
            self._check_size(geometry)
            try:
                image = render_page(page, geometry)
            except MemoryError as exc:
                raise DocumentRejected("page_too_large", f"out of memory rendering the page: {exc}") from exc
            words, text_source, engine = self._words(page, image, geometry)
        finally:
            page.close()
        if not words:
            raise DocumentRejected("no_text", f"no words from {text_source} ({engine})", "filtered")
        page_id = page_id_for(base["item_id"], base["doc_sha256"], page_index, config.dpi)
        regions = self._regions(words, geometry, page_id)
        if not regions:  # e.g. 3 words and only word runs of at least 5 chosen: nothing to caption
            raise DocumentRejected(
                "no_text", f"{len(words)} words form no {'/'.join(config.schemes)} region", "filtered"
            )
        width_pt, height_pt = geometry.displayed_size_pt
        return {
            **base,
            "page_id": page_id,
            "page_index": page_index,
            "image_bytes": self._encode(image),
            "image_format": config.image_format,
            "width": geometry.width,
            "height": geometry.height,
            "page_width_pt": width_pt,
            "page_height_pt": height_pt,
            "rotation": geometry.rotation,
            "text_source": text_source,
            "text_engine": engine,
            "num_words": len(words),
            "regions": regions,
            "rendered_at": datetime.now(UTC),
        }

    def _check_size(self, geometry: PageGeometry) -> None:
        pixels = geometry.width * geometry.height
        if pixels > self.config.max_page_pixels or max(geometry.width, geometry.height) > self.config.max_page_side:
            raise DocumentRejected(
                "page_too_large",
                f"{geometry.width}x{geometry.height} at {self.config.dpi:g} dpi exceeds render.max_page_pixels "
                f"{self.config.max_page_pixels} or render.max_page_side {self.config.max_page_side}",
                "filtered",
            )

    def _words(self, page: Any, image: Image.Image, geometry: PageGeometry) -> tuple[list[Word], str, str]:
        """``(words, text_source, engine)``: the text layer, or OCR when it has too few words."""
        if self.config.text_source != "ocr":
            words = text_layer_words(page, geometry, self.config.block_gap_factor)
            if len(words) >= self.config.min_text_layer_words or self._ocr is None:
                return words, "text_layer", PDFIUM_VERSION
        assert self._ocr is not None
        try:
            return self._ocr.words(image), "ocr", self._ocr.check()
        except OcrFailed as exc:
            raise DocumentRejected("ocr_error", str(exc)) from exc

    def _regions(self, words: list[Word], geometry: PageGeometry, page_id: str) -> list[dict[str, Any]]:
        config = self.config
        found = []
        if "sentence" in config.schemes:
            found += sentence_regions(words, geometry.width, geometry.height, config.max_sentence_words)
        if "word_run" in config.schemes:
            found += word_run_regions(
                words,
                geometry.width,
                geometry.height,
                config.word_run_length,
                config.word_run_stride,
                config.min_word_run_words,
            )
        return [
            {
                "region_id": region_id_for(page_id, r.scheme, r.first_word, r.num_words),
                "scheme": r.scheme,
                **r.box._asdict(),
                "text": r.text,
                "num_words": r.num_words,
            }
            for r in found
        ]

    def _encode(self, image: Image.Image) -> bytes:
        buffer = io.BytesIO()
        if self.config.image_format == "JPEG":
            image.save(buffer, "JPEG", quality=self.config.jpeg_quality)
        else:
            image.save(buffer, "PNG")
        return buffer.getvalue()
