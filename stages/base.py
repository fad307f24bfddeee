"""The stage contract: a named, typed, resource-declaring batch -> batch transform.

A stage never knows how it is executed. ``pipeline/`` constructs it (cheap, picklable), calls
:meth:`Stage.setup` once per worker (heavy: models, clients), then feeds it Arrow batches of one
shard at a time and collects a :class:`BatchResult` per batch: output rows in ``output_schema`` and
error rows in ``ERROR_SCHEMA``. Every input item leaves as output or as an error row.
"""

from __future__ import annotations

import hashlib
import json
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar

import pyarrow as pa
from pydantic import BaseModel

from ps3_engine.schemas import ERROR_SCHEMA, rows_to_table

logger = logging.getLogger(__name__)

# Reason of an item whose processing raised something the stage did not anticipate (usually a bug, or
# an input no one foresaw). Per-item isolation is the rule in every stage's item loop: one item's
# exception becomes that item's error row, and only shard-level causes (reading input, committing
# output) fail a shard.
UNEXPECTED_ERROR = "unexpected_error"


@dataclass(frozen=True)
class Resources:
    """What one worker of a stage needs. ``uses_model`` stages run in a Ray actor pool."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    memory_bytes: int | None = None
    max_workers: int | None = None
    uses_model: bool = False
    batch_size: int = 64
    # When True the stage also runs without a GPU (e.g. SAM2 with device "auto"): the executor drops
    # the GPU request on a cluster that has none instead of waiting forever for one.
    gpu_optional: bool = False


@dataclass(frozen=True)
class ShardContext:
    stage: str
    shard_id: str
    attempt: int


@dataclass(frozen=True)
class BatchResult:
    output: pa.Table
    errors: pa.Table


def error_row(
    context: ShardContext,
    *,
    item_id: str,
    input_ref: str,
    reason: str,
    message: str,
    category: str = "failed",
    transient: bool = False,
    attempts: int = 1,
) -> dict[str, Any]:
    """One row of ``ERROR_SCHEMA`` for an item of the current shard."""
    return {
        "item_id": item_id,
        "stage": context.stage,
        "shard_id": context.shard_id,
        "input_ref": input_ref,
        "category": category,
        "reason": reason,
        "transient": transient,
        "message": message[:2000],
        "attempts": attempts,
        "created_at": datetime.now(UTC),
    }


def unexpected_error_row(
    context: ShardContext, *, item_id: str, input_ref: str, exc: BaseException, attempts: int = 1
) -> dict[str, Any]:
    """The error row of an item whose processing raised ``exc`` unexpectedly; logs the traceback.

    Permanent (``transient=False``): rerunning the same code on the same bytes raises again.
    """
    logger.warning("%s/%s: item %s failed unexpectedly", context.stage, context.shard_id, item_id, exc_info=exc)
    return error_row(
        context,
        item_id=item_id,
        input_ref=input_ref,
        reason=UNEXPECTED_ERROR,
        message=f"{type(exc).__name__}: {exc}",
        attempts=attempts,
    )


def errors_table(rows: list[dict[str, Any]]) -> pa.Table:
    return rows_to_table(rows, ERROR_SCHEMA)


class Stage(ABC):
    """Base class of every stage; subclasses set the class attributes and implement ``process_batch``."""

    name: ClassVar[str]
    input_schema: ClassVar[pa.Schema]
    output_schema: ClassVar[pa.Schema]
    config_model: ClassVar[type[BaseModel]]
    # Config fields that change how fast or where work runs but never what it produces; they are left
    # out of the fingerprint so tuning them does not make finished shards stale.
    operational_fields: ClassVar[frozenset[str]] = frozenset()
    code_version: ClassVar[int] = 1
    # Stages with a CPU phase ahead of the model set this to the schema ``prepare_batch`` returns; the
    # executor then runs ``prepare_batch`` on CPU workers and ``process_batch`` on the model workers.
    prepared_schema: ClassVar[pa.Schema | None] = None

    def __init__(self, config: BaseModel) -> None:
        if not isinstance(config, self.config_model):
            raise TypeError(f"{self.name} expects a {self.config_model.__name__}, got {type(config).__name__}")
        self.config = config

    @property
    @abstractmethod
    def resources(self) -> Resources: ...

    def preflight(self) -> None:
        """Cheap checks run once in the driver before any worker starts (e.g. weights exist)."""

    def setup(self) -> None:
        """Load heavy state (models, clients) once per worker. Default: nothing."""

    def teardown(self) -> None:
        """Release what :meth:`setup` acquired."""

    def join_inputs(self, primary: pa.Table, side: list[pa.Table]) -> pa.Table:
        """Combine the shard's primary input with its side inputs (e.g. regions with their images)."""
        if side:
            raise NotImplementedError(f"{self.name} takes no side inputs")
        return primary

    def prepare_batch(self, batch: pa.Table, context: ShardContext) -> BatchResult:
        """CPU phase (decode, crop, resize): rows in ``prepared_schema`` plus error rows."""
        raise NotImplementedError(f"{self.name} has no prepare phase")

    @abstractmethod
    def process_batch(self, batch: pa.Table, context: ShardContext) -> BatchResult: ...

    def fingerprint(self) -> str:
        """Hash of everything that decides this stage's output: semantic config, schema, code version."""
        semantic = self.config.model_dump(mode="json", exclude=set(self.operational_fields))
        payload = {
            "stage": self.name,
            "config": semantic,
            "output_schema": self.output_schema.to_string(show_schema_metadata=True),
            "code_version": self.code_version,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]
