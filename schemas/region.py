"""Region record: one selected salient box of an image (segment stage output)."""

from __future__ import annotations

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, model_validator

SCHEMA_VERSION = 1


class RegionRecord(BaseModel):
    """A box ``(x0, y0, x1, y1)`` in original-image pixels (after EXIF orientation), half-open."""

    model_config = ConfigDict(frozen=True)

    region_id: str
    image_id: str
    shard_id: str
    x0: int
    y0: int
    x1: int
    y1: int
    score: float
    rank: int
    backend: str
    backend_settings_json: str

    @model_validator(mode="after")
    def _box_is_ordered(self) -> RegionRecord:
        if not (0 <= self.x0 < self.x1 and 0 <= self.y0 < self.y1):
            raise ValueError(f"box ({self.x0}, {self.y0}, {self.x1}, {self.y1}) is not a valid xyxy box")
        return self


REGION_SCHEMA = pa.schema(
    [
        pa.field("region_id", pa.string(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("shard_id", pa.string(), nullable=False),
        pa.field("x0", pa.int32(), nullable=False),
        pa.field("y0", pa.int32(), nullable=False),
        pa.field("x1", pa.int32(), nullable=False),
        pa.field("y1", pa.int32(), nullable=False),
        pa.field("score", pa.float64(), nullable=False),
        pa.field("rank", pa.int16(), nullable=False),
        pa.field("backend", pa.string(), nullable=False),
        pa.field("backend_settings_json", pa.string(), nullable=False),
    ],
    metadata={"record_kind": "region", "schema_version": str(SCHEMA_VERSION)},
)
