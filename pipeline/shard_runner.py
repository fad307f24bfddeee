"""Run one shard of one stage: read input, stream it through the stage in batches, commit."""

from __future__ import annotations

import logging
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel

from ps3_engine.pipeline.layout import RunLayout, ShardTask
from ps3_engine.schemas import ERROR_SCHEMA, conform_table
from ps3_engine.schemas.error import redact_secrets
from ps3_engine.stages.base import ShardContext, Stage
from ps3_engine.stages.joins import first_row_per_image

logger = logging.getLogger(__name__)

# Called after every batch with (phase, input rows, output rows, error rows); phase is "input" (the shard's
# input is loaded), "prepare" (CPU phase) or "process". It feeds the console's item progress while a shard runs.
BatchCallback = Callable[[str, int, int, int], None]


@dataclass(frozen=True)
class StageSpec:
    """Everything a worker needs to build its own stage instance (picklable)."""

    stage_cls: type[Stage]
    config: BaseModel

    def build(self) -> Stage:
        return self.stage_cls(self.config)


@dataclass
class ShardReport:
    stage: str
    shard_id: str
    status: str  # "computed" | "failed"
    input_rows: int = 0
    output_rows: int = 0
    error_rows: int = 0
    errors_by_reason: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    busy_s: float = 0.0
    message: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def process_table(
    stage: Stage, table: pa.Table, context: ShardContext, phase: str = "process", on_batch: BatchCallback | None = None
) -> tuple[pa.Table, pa.Table, float]:
    """Feed ``table`` through the stage's ``phase`` in batches; returns (output, errors, seconds inside it)."""
    batch_size = stage.resources.batch_size
    transform = stage.prepare_batch if phase == "prepare" else stage.process_batch
    schema = stage.prepared_schema if phase == "prepare" else stage.output_schema
    assert schema is not None
    outputs, errors, busy_s = [], [], 0.0
    for start in range(0, table.num_rows, batch_size):
        batch = table.slice(start, batch_size)
        began = time.perf_counter()
        result = transform(batch, context)
        busy_s += time.perf_counter() - began
        outputs.append(conform_table(result.output, schema))
        errors.append(conform_table(result.errors, ERROR_SCHEMA))
        if on_batch is not None:
            on_batch(phase, batch.num_rows, result.output.num_rows, result.errors.num_rows)
    output = pa.concat_tables(outputs) if outputs else schema.empty_table()
    error_table = pa.concat_tables(errors) if errors else ERROR_SCHEMA.empty_table()
    return output, error_table, busy_s


@dataclass
class PreparedShard:
    """A shard's input after the CPU phase (or its plain input when the stage has none)."""

    table: pa.Table
    errors: pa.Table
    input_rows: int
    prepare_s: float = 0.0

    def to_ipc(self) -> tuple[bytes, bytes]:
        return _table_bytes(self.table), _table_bytes(self.errors)

    @classmethod
    def from_ipc(cls, table: bytes, errors: bytes, input_rows: int, prepare_s: float) -> PreparedShard:
        return cls(_bytes_table(table), _bytes_table(errors), input_rows, prepare_s)


def _table_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def _bytes_table(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(pa.py_buffer(data)).read_all()


def load_input(stage: Stage, layout: RunLayout, task: ShardTask) -> pa.Table:
    """The shard's input rows: the primary input joined with side inputs, minus excluded items."""
    table = layout.storage.read_parquet(task.input_key)
    if task.side_input_keys:
        side = [layout.storage.read_parquet(key) for key in task.side_input_keys]
        table = stage.join_inputs(table, side)
    table = conform_table(table, stage.input_schema)
    if task.exclude_item_ids:
        keep = pc.invert(pc.is_in(table.column("item_id"), pa.array(list(task.exclude_item_ids), pa.string())))
        table = table.filter(keep)
    if "image_id" in table.column_names:
        # An image enters a stage once, however many crawl rows hold its bytes (rows the planner did not
        # exclude: a repeat inside one shard); the stages' output and error rows are keyed by image id.
        unique = first_row_per_image(table)
        if unique.num_rows < table.num_rows:
            repeats = table.num_rows - unique.num_rows
            logger.info("%s/%s: %d repeated image rows enter once", task.stage, task.shard_id, repeats)
        table = unique
    return table


def prepare_shard(
    stage: Stage, layout: RunLayout, task: ShardTask, attempt: int = 1, on_batch: BatchCallback | None = None
) -> PreparedShard:
    table = load_input(stage, layout, task)
    if on_batch is not None:
        on_batch("input", table.num_rows, 0, 0)
    if stage.prepared_schema is None:
        return PreparedShard(table, ERROR_SCHEMA.empty_table(), table.num_rows)
    context = ShardContext(stage=task.stage, shard_id=task.shard_id, attempt=attempt)
    prepared, errors, prepare_s = process_table(stage, table, context, phase="prepare", on_batch=on_batch)
    return PreparedShard(prepared, errors, table.num_rows, prepare_s)


def failed_report(task: ShardTask, exc: BaseException, wall_s: float) -> ShardReport:
    # The message is logged and stored in summary.json: no secret a service echoed may go with it.
    logger.error("shard %s/%s failed: %s", task.stage, task.shard_id, redact_secrets(str(exc)))
    return ShardReport(
        task.stage,
        task.shard_id,
        "failed",
        wall_s=wall_s,
        message=redact_secrets(f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=5)}"),
    )


def run_shard(
    stage: Stage,
    layout: RunLayout,
    task: ShardTask,
    fingerprint: str,
    attempt: int = 1,
    prepared: PreparedShard | None = None,
    on_batch: BatchCallback | None = None,
) -> ShardReport:
    """Compute and commit one shard. A bug or infrastructure failure yields a ``failed`` report.

    ``prepared`` is the shard after the stage's CPU phase when an earlier worker already ran it;
    ``on_batch`` hears about every batch (item progress).
    """
    began = time.perf_counter()
    try:
        if task.mode == "retry_transient":
            table = load_input(stage, layout, task)
            return _retry_transient(stage, layout, task, fingerprint, table, began, on_batch)
        if prepared is None:
            prepared = prepare_shard(stage, layout, task, attempt, on_batch)
        context = ShardContext(stage=task.stage, shard_id=task.shard_id, attempt=attempt)
        output, errors, busy_s = process_table(stage, prepared.table, context, on_batch=on_batch)
        errors = pa.concat_tables([prepared.errors, errors])
        wall_s = time.perf_counter() - began + prepared.prepare_s
        layout.commit_shard(
            task, fingerprint=fingerprint, output=output, errors=errors, attempt=attempt, wall_seconds=wall_s
        )
    except Exception as exc:
        return failed_report(task, exc, time.perf_counter() - began)
    return ShardReport(
        stage=task.stage,
        shard_id=task.shard_id,
        status="computed",
        input_rows=prepared.input_rows,
        output_rows=output.num_rows,
        error_rows=errors.num_rows,
        errors_by_reason=dict(Counter(errors.column("reason").to_pylist())),
        wall_s=wall_s,
        # Time inside the stage's model phase only: the CPU phase runs on other workers ahead of it.
        busy_s=busy_s,
    )


def _retry_transient(
    stage: Stage,
    layout: RunLayout,
    task: ShardTask,
    fingerprint: str,
    table: pa.Table,
    began: float,
    on_batch: BatchCallback | None = None,
) -> ShardReport:
    """Re-run the shard's transiently failed items and merge them into the committed shard."""
    entry = layout.read_manifest(task.stage, task.shard_id)
    if entry is None:
        raise RuntimeError(f"shard {task.shard_id} has no committed manifest to retry")
    old_output = layout.read_output(task.stage, task.shard_id)
    old_errors = layout.read_shard_errors(task.stage, task.shard_id)
    retry_ids = {r["item_id"] for r in old_errors.to_pylist() if r["transient"]}
    is_retried = pa.array([item in retry_ids for item in old_errors.column("item_id").to_pylist()])
    to_retry = table.filter(pa.array([item in retry_ids for item in table.column("item_id").to_pylist()]))
    context = ShardContext(stage=task.stage, shard_id=task.shard_id, attempt=entry.attempt + 1)
    if on_batch is not None:
        on_batch("input", to_retry.num_rows, 0, 0)
    new_output, new_errors, busy_s = process_table(stage, to_retry, context, on_batch=on_batch)
    output = pa.concat_tables([old_output, new_output])
    errors = pa.concat_tables([old_errors.filter(pc.invert(is_retried)), new_errors])
    wall_s = time.perf_counter() - began
    layout.commit_shard(
        task, fingerprint=fingerprint, output=output, errors=errors, attempt=entry.attempt + 1, wall_seconds=wall_s
    )
    return ShardReport(
        stage=task.stage,
        shard_id=task.shard_id,
        status="computed",
        input_rows=to_retry.num_rows,
        output_rows=new_output.num_rows,
        error_rows=new_errors.num_rows,
        errors_by_reason=dict(Counter(new_errors.column("reason").to_pylist())),
        wall_s=wall_s,
        busy_s=busy_s,
    )
