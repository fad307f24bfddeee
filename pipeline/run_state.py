"""Run-level in-progress records: which stage is computing which shards right now, and since when.

Manifests say what is committed, not what is being recomputed: during ``run --force caption`` every
old caption manifest is still fresh, so a status read from manifests alone says ``done``. The executor
therefore writes ``_running/<stage>.json`` when it starts a stage's shards, refreshes its heartbeat
while it runs, and deletes it when the stage ends (one stopped by Ctrl-C or a crash is marked stopped
and kept, so status says ``interrupted`` at once). ``status`` counts a listed shard as done
only when its manifest was committed after ``started_at``; a record whose heartbeat is older than
:data:`STALE_AFTER_S` belongs to a driver that died (the stage is then ``interrupted``). The heartbeat is
a thread of the driver, not the shard reports: one shard can take longer than that (a caption shard of a
large model), and in a pipelined run a downstream stage reports nothing until a whole dedup wave is crawled.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

from ps3_engine.infra.storage import Storage

logger = logging.getLogger(__name__)

RUNNING_PREFIX = "_running/"
HEARTBEAT_INTERVAL_S = 30.0
STALE_AFTER_S = 180.0


@dataclass
class RunningRecord:
    """One stage being computed. Times are ISO 8601 UTC; ``shard_ids`` are the shards it will commit."""

    stage: str
    shard_ids: list[str]
    started_at: str
    updated_at: str
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    reported: int = 0
    stopped_at: str | None = None  # set by a driver that stopped on an exception (Ctrl-C, a crash)

    @property
    def started(self) -> datetime:
        return datetime.fromisoformat(self.started_at)

    def is_alive(self, now: datetime | None = None) -> bool:
        """True while the heartbeat is recent (the driver may be on another machine, so no pid check)."""
        if self.stopped_at is not None:
            return False
        now = now or datetime.now(UTC)
        return (now - datetime.fromisoformat(self.updated_at)).total_seconds() < STALE_AFTER_S


def running_key(stage: str) -> str:
    return f"{RUNNING_PREFIX}{stage}.json"


class RunningMarker:
    """Context manager around one stage execution: writes, heartbeats and finally removes the record."""

    def __init__(self, storage: Storage, stage: str, shard_ids: list[str]) -> None:
        now = datetime.now(UTC).isoformat()
        self.storage = storage
        self.record = RunningRecord(stage, sorted(shard_ids), started_at=now, updated_at=now)
        self._last_write = 0.0
        self._lock = threading.Lock()  # the heartbeat thread and shard_reported both rewrite the record
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def __enter__(self) -> RunningMarker:
        self._write()
        self._heartbeat = threading.Thread(target=self._beat, name=f"heartbeat-{self.record.stage}", daemon=True)
        self._heartbeat.start()
        return self

    def shard_reported(self) -> None:
        """Count a finished shard; rewrites the record at most every :data:`HEARTBEAT_INTERVAL_S`."""
        with self._lock:
            self.record.reported += 1
            if time.monotonic() - self._last_write >= HEARTBEAT_INTERVAL_S:
                self._write()

    def _beat(self) -> None:
        """Rewrite the record every :data:`HEARTBEAT_INTERVAL_S` while the driver lives (a killed one stops)."""
        while not self._stop.wait(HEARTBEAT_INTERVAL_S):
            try:
                with self._lock:
                    if time.monotonic() - self._last_write >= HEARTBEAT_INTERVAL_S:
                        self._write()
            except OSError as exc:  # a transient storage error must not end the heartbeat for good
                logger.warning("could not refresh the in-progress record of %s: %s", self.record.stage, exc)

    def _write(self) -> None:
        self.record.updated_at = datetime.now(UTC).isoformat()
        self.storage.write_json_atomic(running_key(self.record.stage), asdict(self.record))
        self._last_write = time.monotonic()

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()  # no heartbeat may rewrite the record after it is deleted
        # Left in place when the driver is interrupted (Ctrl-C, a crash): status then says "interrupted".
        if exc_type is None or exc_type is GeneratorExit:
            self.storage.delete(running_key(self.record.stage))
            return
        # Marked stopped at once: with only the heartbeat to go by, status said "running" for
        # STALE_AFTER_S after a Ctrl-C. A killed driver cannot do this; its heartbeat just stops.
        try:
            self.record.stopped_at = datetime.now(UTC).isoformat()
            self._write()
        except OSError as exc:
            logger.warning("could not mark the in-progress record of %s stopped: %s", self.record.stage, exc)


def read_running(storage: Storage) -> dict[str, RunningRecord]:
    """Every in-progress record of a run root, by stage (unreadable ones are skipped with a warning)."""
    records = {}
    for obj in storage.list(RUNNING_PREFIX):
        try:
            record = RunningRecord(**storage.read_json(obj.key))
        except (TypeError, ValueError) as exc:
            logger.warning("ignoring the unreadable in-progress record %s: %s", obj.key, exc)
            continue
        records[record.stage] = record
    return records
