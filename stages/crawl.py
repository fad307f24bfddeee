"""Crawl stage: source items (URLs, local files, S3 objects) -> validated high-resolution image rows.

Per item: fetch (guarded HTTP client, or the storage seam for files and S3 objects), honour an
``X-Robots-Tag: noai/noimageai`` opt-out before downloading the body, validate the bytes (decode
check, decompression-bomb guard, EXIF orientation, colour-mode normalisation), measure the displayed
size and filter by resolution, hash (sha256 + 64-bit pHash). Everything that does not become an image
row becomes an error row with a reason. Cross-shard dedup by the hashes runs after this stage
(``pipeline/dedup.py``) because it needs every shard's hashes.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ps3_engine.infra.host_limiter import cluster_limits
from ps3_engine.infra.http import FetchError, GuardedHttpClient, HttpSettings
from ps3_engine.infra.storage import S3Settings, read_uri_bytes
from ps3_engine.schemas import CRAWL_ITEM_SCHEMA, IMAGE_SCHEMA, rows_to_table
from ps3_engine.stages.base import (
    BatchResult,
    Resources,
    ShardContext,
    Stage,
    error_row,
    errors_table,
    unexpected_error_row,
)
from ps3_engine.stages.imaging import ImageRejected, PixelBudget, inspect_image, use_large_decode_blocks

logger = logging.getLogger(__name__)

# Keys of ``metadata_json`` on items planning could not use (``source_kind == "invalid"``).
INVALID_REASON_KEY = "_invalid_reason"
INVALID_MESSAGE_KEY = "_invalid_message"

# PIL raises its own DecompressionBombError above 2x its default limit (~179 MP); stay under it.
PIL_HARD_PIXEL_LIMIT = 178_956_970


class HttpConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    connect_timeout_s: float = Field(10.0, gt=0)
    read_timeout_s: float = Field(30.0, gt=0)
    total_timeout_s: float = Field(120.0, gt=0)
    max_retries: int = Field(3, ge=0)
    backoff_base_s: float = Field(0.5, ge=0)
    backoff_max_s: float = Field(30.0, ge=0)
    max_retry_after_s: float = Field(60.0, ge=0)
    max_bytes: int = Field(64 * 1024 * 1024, gt=0)
    max_redirects: int = Field(5, ge=0)
    per_host_concurrency: int = Field(8, ge=1)
    per_host_rate: float | None = Field(None, gt=0, description="requests/s per host (the whole Ray job)")
    allow_private_addresses: bool = Field(
        False, description="allow loopback/private targets (in-cluster sources, tests); not link-local/metadata"
    )
    allow_link_local_addresses: bool = Field(
        False, description="also allow link-local targets, cloud metadata services included (169.254.0.0/16, fe80::/10)"
    )
    user_agent: str = "ps3-engine/0.1 (+research crawler; honours X-Robots-Tag noai)"

    def to_settings(self) -> HttpSettings:
        return HttpSettings(**self.model_dump())


class CrawlConfig(BaseModel):
    """Crawl policy. Resolution thresholds apply to the displayed (EXIF-oriented) size."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_short_side: int = Field(1024, ge=1)
    min_long_side: int = Field(1024, ge=1)
    max_long_side: int | None = Field(None, ge=1)
    max_pixels: int = Field(64_000_000, ge=1, le=PIL_HARD_PIXEL_LIMIT)
    allowed_formats: tuple[str, ...] = ("BMP", "JPEG", "MPO", "PNG", "TIFF", "WEBP")  # sorted, as validated
    image_storage: Literal["bytes", "reference"] = "bytes"
    honour_opt_out: bool = True
    opt_out_tokens: tuple[str, ...] = ("noai", "noimageai")
    dedup: bool = True
    near_dup_max_distance: int = Field(4, ge=0, le=16)
    dedup_wave_shards: int = Field(64, ge=1, description="crawl shards per dedup wave (decisions final per wave)")
    shard_size: int = Field(128, ge=1, description="input items per shard")
    batch_size: int = Field(32, ge=1)
    download_threads: int = Field(16, ge=1)
    validation_pixel_budget: int = Field(
        96_000_000,
        ge=1,
        description="stored pixels decoded at once per worker, all download threads together (bounds memory)",
    )
    allow_local_files: bool = Field(
        False, description="let URL lists name local files (file://, /abs, ../rel); folder sources always work"
    )
    max_workers: int | None = Field(None, ge=1)
    http: HttpConfig = HttpConfig()
    s3: S3Settings = S3Settings()

    @field_validator("allowed_formats")
    @classmethod
    def _upper(cls, formats: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(sorted({f.upper() for f in formats}))

    @model_validator(mode="after")
    def _sides_consistent(self) -> CrawlConfig:
        if self.max_long_side is not None and self.max_long_side < self.min_long_side:
            raise ValueError(f"max_long_side {self.max_long_side} < min_long_side {self.min_long_side}")
        return self


def parse_opt_out(headers: Mapping[str, str], tokens: tuple[str, ...]) -> str | None:
    """Return the opt-out directive found in ``X-Robots-Tag`` (any user agent prefix), or None.

    ``X-Robots-Tag: noai`` and ``X-Robots-Tag: somebot: noimageai, nofollow`` both count: we do not
    claim to be a specific named bot, so agent-scoped opt-outs are honoured too.
    """
    value = headers.get("x-robots-tag", "")
    for part in value.replace(";", ",").split(","):
        directive = part.strip().lower().rsplit(":", 1)[-1].strip()
        if directive in tokens:
            return directive
    return None


def source_policy_error(
    item: Mapping[str, Any], *, allow_local_files: bool, option: str = "crawl.allow_local_files"
) -> FetchError | None:
    """Why an item planned from a source may not be fetched (a permanent FetchError), or None.

    Planning marks a URL-list row it could not use as ``source_kind="invalid"`` with the reason and
    message in ``metadata_json``, and a local path named by a URL list as ``"local"``: reading local
    files is opt-in, since a list from elsewhere could otherwise copy ``/etc/passwd`` into the run.
    """
    kind = item["source_kind"]
    if kind == "invalid":
        metadata = json.loads(item["metadata_json"] or "{}")
        return FetchError(
            metadata.get(INVALID_REASON_KEY, "invalid_url"),
            metadata.get(INVALID_MESSAGE_KEY, "unusable URL-list row"),
            transient=False,
        )
    if kind == "local" and not allow_local_files:
        return FetchError(
            "local_file_refused",
            f"URL lists fetch http(s) and s3:// only; set {option}=true to read local paths "
            "(or pass the folder itself as a source)",
            transient=False,
        )
    return None


def item_id_for(source_ref: str, occurrence: int) -> str:
    """Stable id of the ``occurrence``-th appearance of ``source_ref`` in the run's inputs."""
    return hashlib.sha256(f"{source_ref}\n{occurrence}".encode()).hexdigest()[:32]


class CrawlStage(Stage):
    name: ClassVar[str] = "crawl"
    input_schema: ClassVar[pa.Schema] = CRAWL_ITEM_SCHEMA
    output_schema: ClassVar[pa.Schema] = IMAGE_SCHEMA
    config_model: ClassVar[type[BaseModel]] = CrawlConfig
    operational_fields: ClassVar[frozenset[str]] = frozenset(
        {
            "shard_size",
            "batch_size",
            "download_threads",
            "validation_pixel_budget",
            "max_workers",
            "http",
            "s3",
            "dedup",
            "near_dup_max_distance",
            "dedup_wave_shards",
        }
    )

    config: CrawlConfig

    def __init__(self, config: CrawlConfig) -> None:
        super().__init__(config)
        self._client: GuardedHttpClient | None = None
        self._threads: ThreadPoolExecutor | None = None
        self._budget: PixelBudget | None = None

    @property
    def resources(self) -> Resources:
        return Resources(num_cpus=1.0, max_workers=self.config.max_workers, batch_size=self.config.batch_size)

    def setup(self) -> None:
        settings = self.config.http.to_settings()
        # On Ray, every crawl worker of the job shares one per-host limiter (issue 15 item 5).
        shared = cluster_limits(settings.per_host_concurrency, settings.per_host_rate)
        self._client = GuardedHttpClient(settings, shared)
        self._threads = ThreadPoolExecutor(self.config.download_threads, thread_name_prefix="crawl")
        self._budget = PixelBudget(self.config.validation_pixel_budget)
        use_large_decode_blocks()

    def teardown(self) -> None:
        if self._threads is not None:
            self._threads.shutdown(wait=True)
        if self._client is not None:
            self._client.close()
        self._client, self._threads = None, None

    def process_batch(self, batch: pa.Table, context: ShardContext) -> BatchResult:
        if self._threads is None:
            self.setup()
        assert self._threads is not None
        items = batch.to_pylist()
        outcomes = list(self._threads.map(lambda item: self._crawl_item(item, context), items))
        images = [row for kind, row in outcomes if kind == "image"]
        errors = [row for kind, row in outcomes if kind == "error"]
        return BatchResult(rows_to_table(images, IMAGE_SCHEMA), errors_table(errors))

    # -- one item ------------------------------------------------------------------------------
    def _crawl_item(self, item: dict[str, Any], context: ShardContext) -> tuple[str, dict[str, Any]]:
        """One item -> ``("image", row)`` or ``("error", row)``; never raises (per-item isolation)."""
        try:
            return self._crawl_item_checked(item, context)
        except Exception as exc:
            row = unexpected_error_row(context, item_id=item["item_id"], input_ref=item["source_ref"], exc=exc)
            return "error", row

    def _crawl_item_checked(self, item: dict[str, Any], context: ShardContext) -> tuple[str, dict[str, Any]]:
        try:
            fetched = self._fetch(item)
        except FetchError as exc:
            return "error", error_row(
                context,
                item_id=item["item_id"],
                input_ref=item["source_ref"],
                reason=exc.reason,
                message=exc.message,
                category=exc.category,
                transient=exc.transient,
                attempts=exc.attempts,
            )
        body, final_url, headers, status, attempts = fetched
        try:
            facts = inspect_image(
                body,
                content_type=headers.get("content-type"),
                max_pixels=self.config.max_pixels,
                allowed_formats=frozenset(self.config.allowed_formats),
                budget=self._budget,
            )
        except ImageRejected as exc:
            return "error", error_row(
                context,
                item_id=item["item_id"],
                input_ref=item["source_ref"],
                reason=exc.reason,
                message=exc.message,
                attempts=attempts,
            )
        rejection = self._resolution_rejection(facts.width, facts.height)
        if rejection is not None:
            return "error", error_row(
                context,
                item_id=item["item_id"],
                input_ref=item["source_ref"],
                reason=rejection[0],
                message=rejection[1],
                category="filtered",
                attempts=attempts,
            )
        digest = hashlib.sha256(body).hexdigest()
        keep_bytes = self.config.image_storage == "bytes"
        return "image", {
            "image_id": digest,
            "item_id": item["item_id"],
            "shard_id": context.shard_id,
            "source_ref": item["source_ref"],
            "source_kind": item["source_kind"],
            "source_list": item["source_list"],
            "final_url": final_url,
            "image_bytes": body if keep_bytes else None,
            "image_ref": None if keep_bytes else (final_url or item["source_ref"]),
            "num_bytes": len(body),
            "width": facts.width,
            "height": facts.height,
            "format": facts.format,
            "mode": facts.mode,
            "exif_orientation": facts.exif_orientation,
            "sha256": digest,
            "phash": facts.phash,
            "content_type": headers.get("content-type"),
            "http_status": status,
            "license": item["license"],
            "attribution": item["attribution"],
            "metadata_json": item["metadata_json"],
            "fetch_attempts": attempts,
            "fetched_at": datetime.now(UTC),
        }

    def _fetch(self, item: dict[str, Any]) -> tuple[bytes, str | None, Mapping[str, str], int | None, int]:
        """Return ``(body, final_url, headers, http_status, attempts)``; raise FetchError on failure."""
        ref = item["source_ref"]
        refused = source_policy_error(item, allow_local_files=self.config.allow_local_files)
        if refused is not None:
            raise refused
        if item["source_kind"] == "http":
            assert self._client is not None
            result = self._client.fetch(ref, header_filter=self._opt_out_filter)
            return result.body, result.final_url, result.headers, result.status, result.attempts
        try:
            return read_uri_bytes(ref, self.config.s3), None, {}, None, 1
        except FileNotFoundError as exc:
            raise FetchError("not_found", str(exc), transient=False) from exc
        except OSError as exc:
            raise FetchError("storage_error", f"{type(exc).__name__}: {exc}", transient=True) from exc

    def _opt_out_filter(self, headers: Mapping[str, str]) -> FetchError | None:
        if not self.config.honour_opt_out:
            return None
        directive = parse_opt_out(headers, self.config.opt_out_tokens)
        if directive is None:
            return None
        return FetchError(
            "opt_out", f"X-Robots-Tag: {headers.get('x-robots-tag')}", transient=False, category="filtered"
        )

    def _resolution_rejection(self, width: int, height: int) -> tuple[str, str] | None:
        short_side, long_side = min(width, height), max(width, height)
        if short_side < self.config.min_short_side or long_side < self.config.min_long_side:
            return "too_small", (
                f"{width}x{height} is below the short/long side minimum "
                f"{self.config.min_short_side}/{self.config.min_long_side}"
            )
        if self.config.max_long_side is not None and long_side > self.config.max_long_side:
            return "too_large_resolution", f"{width}x{height} exceeds max_long_side {self.config.max_long_side}"
        return None
