"""A model-like test stage: exercises actor pools, per-worker setup and per-item/shard failures."""

from __future__ import annotations

import os
from typing import ClassVar

import pyarrow as pa
from pydantic import BaseModel, ConfigDict

from ps3_engine.schemas import CRAWL_ITEM_SCHEMA
from ps3_engine.stages.base import BatchResult, Resources, ShardContext, Stage, error_row, errors_table

ECHO_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("shard_id", pa.string(), nullable=False),
        pa.field("upper_ref", pa.string(), nullable=False),
        pa.field("worker_pid", pa.int64(), nullable=False),
        pa.field("setup_calls", pa.int64(), nullable=False),
    ]
)


class EchoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_workers: int = 2
    batch_size: int = 3


class EchoModelStage(Stage):
    """Upper-cases source refs; refs containing 'bad' are error rows, 'crash' raises (a bug)."""

    name: ClassVar[str] = "echo"
    input_schema: ClassVar[pa.Schema] = CRAWL_ITEM_SCHEMA
    output_schema: ClassVar[pa.Schema] = ECHO_SCHEMA
    config_model: ClassVar[type[BaseModel]] = EchoConfig
    setup_calls: ClassVar[int] = 0

    @property
    def resources(self) -> Resources:
        return Resources(
            num_cpus=1, uses_model=True, max_workers=self.config.max_workers, batch_size=self.config.batch_size
        )

    def setup(self) -> None:
        type(self).setup_calls += 1

    def process_batch(self, batch: pa.Table, context: ShardContext) -> BatchResult:
        rows, errors = [], []
        for item in batch.to_pylist():
            ref = item["source_ref"]
            if "crash" in ref:
                raise RuntimeError(f"model blew up on {ref}")
            if "bad" in ref:
                errors.append(
                    error_row(context, item_id=item["item_id"], input_ref=ref, reason="bad_item", message="refused")
                )
                continue
            rows.append(
                {
                    "item_id": item["item_id"],
                    "shard_id": context.shard_id,
                    "upper_ref": ref.upper(),
                    "worker_pid": os.getpid(),
                    "setup_calls": type(self).setup_calls,
                }
            )
        return BatchResult(pa.Table.from_pylist(rows, schema=ECHO_SCHEMA), errors_table(errors))
