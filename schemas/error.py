"""Error row: an item that entered a stage and did not leave it as output, with the reason.

``category`` separates policy decisions ("filtered": too small, opted out, duplicate) from failures
("failed": HTTP errors, undecodable bytes). ``transient`` marks failures worth retrying.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict

SCHEMA_VERSION = 1

ErrorCategory = Literal["failed", "filtered"]


class ErrorRecord(BaseModel):
    model_config = ConfigDict(frozen=True)

    item_id: str
    stage: str
    shard_id: str
    input_ref: str
    category: ErrorCategory
    reason: str
    transient: bool
    message: str
    attempts: int
    created_at: datetime


ERROR_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("shard_id", pa.string(), nullable=False),
        pa.field("input_ref", pa.string(), nullable=False),
        pa.field("category", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("transient", pa.bool_(), nullable=False),
        pa.field("message", pa.string(), nullable=False),
        pa.field("attempts", pa.int16(), nullable=False),
        pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ],
    metadata={"record_kind": "error", "schema_version": str(SCHEMA_VERSION)},
)
