"""Caption record: one local caption per region, or one global caption per image (region_id null)."""

from __future__ import annotations

import pyarrow as pa
from pydantic import BaseModel, ConfigDict

SCHEMA_VERSION = 1


class CaptionRecord(BaseModel):
    """Raw and cleaned MLLM output with everything needed to reproduce the request."""

    model_config = ConfigDict(frozen=True)

    caption_id: str
    image_id: str
    region_id: str | None
    shard_id: str
    kind: str  # "local" | "global"
    raw_text: str
    clean_text: str
    model: str
    prompt_version: str
    sampling_json: str
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float


CAPTION_SCHEMA = pa.schema(
    [
        pa.field("caption_id", pa.string(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("region_id", pa.string()),
        pa.field("shard_id", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("raw_text", pa.string(), nullable=False),
        pa.field("clean_text", pa.string(), nullable=False),
        pa.field("model", pa.string(), nullable=False),
        pa.field("prompt_version", pa.string(), nullable=False),
        pa.field("sampling_json", pa.string(), nullable=False),
        pa.field("prompt_tokens", pa.int32(), nullable=False),
        pa.field("completion_tokens", pa.int32(), nullable=False),
        pa.field("latency_ms", pa.float64(), nullable=False),
    ],
    metadata={"record_kind": "caption", "schema_version": str(SCHEMA_VERSION)},
)
