"""Item progress of a stage run: running totals, rate and ETA, fed by the workers while shards run.

A shard holds 100-300 items, so a bar that ticks per shard says little; this one ticks per batch.
Workers call a :data:`~ps3_engine.pipeline.shard_runner.BatchCallback` after every batch. The
in-process executor passes :meth:`ItemProgress.on_batch` itself; Ray workers get a
:class:`RemoteProgress` that forwards the counts (fire and forget) to a small :class:`ProgressActor`,
which a driver thread polls twice a second. The bar's total is an estimate until every shard's input
is loaded: the items of the loaded shards plus their mean for each shard not started yet.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

logger = logging.getLogger(__name__)

# Stage -> (what an input item is, what an output row is), for the bar's unit and its running totals.
UNITS: dict[str, tuple[str, str]] = {
    "crawl": ("items", "images"),
    "segment": ("images", "regions"),
    "caption": ("images", "captions"),
    "corpus": ("images", "rows"),
    "render": ("PDFs", "pages"),
    "document-corpus": ("pages", "rows"),
    "pack": ("images", "rows"),  # build-corpus packing the per-shard corpus rows into dataset shards
}
POLL_INTERVAL_S = 0.5
# rate_noinv_fmt: always "N images/s" (tqdm would switch to "s/ images" below one item a second).
FORMAT_UNKNOWN_TOTAL = "{desc}: {n_fmt}{unit} [{elapsed}, {rate_noinv_fmt}{postfix}]"
FORMAT_KNOWN_TOTAL = (
    "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt}{unit} [{elapsed}<{remaining}, {rate_noinv_fmt}{postfix}]"
)
# Without a terminal: the same fields on a plain line, no bar.
LINE_KNOWN_TOTAL = (
    "{desc}: {n_fmt}/{total_fmt}{unit} ({percentage:.0f}%) [{elapsed}<{remaining}, {rate_noinv_fmt}{postfix}]"
)
LOG_LINE_INTERVAL_S = 10.0


@dataclass
class ItemCounts:
    """Running totals of one stage run (only this run's shards, not those already done)."""

    shards_started: int = 0
    loaded_items: int = 0  # input rows of the shards whose input has been loaded
    items: int = 0  # input items that have left the stage (as output or as an error row)
    outputs: int = 0
    errors: int = 0

    def add(self, phase: str, input_rows: int, output_rows: int, error_rows: int) -> None:
        if phase == "input":
            self.shards_started += 1
            self.loaded_items += input_rows
        elif phase == "prepare":
            # Items rejected in the CPU phase are done; the rest are counted when the model phase ends them.
            self.items += input_rows - output_rows
            self.errors += error_rows
        else:
            self.items += input_rows
            self.outputs += output_rows
            self.errors += error_rows

    def estimated_total(self, num_shards: int) -> int | None:
        """Items of the loaded shards plus their mean for each shard not loaded yet (None before any)."""
        if not self.shards_started:
            return None
        remaining = max(0, num_shards - self.shards_started)
        return self.loaded_items + round(remaining * self.loaded_items / self.shards_started)


class ItemProgress:
    """The driver's progress for one stage run: items done / estimated total, rate, ETA, outputs and errors.

    On a terminal a tqdm bar (one line per stage; a pipelined run shows its stages' bars at once). Else
    (a log file: CI, a cluster job, ``ray job logs``) plain lines, one every :data:`LOG_LINE_INTERVAL_S`
    and a last one at the end: tqdm there redraws with carriage returns and, with several bars open at
    once, cursor-up escapes that a log shows as ``[A`` garbage.
    """

    def __init__(
        self, stage: str, num_shards: int, enabled: bool, position: int | None = None, interactive: bool | None = None
    ) -> None:
        self.stage = stage
        self.num_shards = num_shards
        self.enabled = enabled
        self.counts = ItemCounts()
        self._lock = threading.Lock()
        self._unit, self._output_unit = UNITS.get(stage, ("items", "rows"))
        self._interactive = sys.stderr.isatty() if interactive is None else interactive
        self._started = time.monotonic()
        self._last_line = -LOG_LINE_INTERVAL_S
        self._total: int | None = None
        self.failed_shards = 0
        self.bar = None
        if self._interactive:
            self.bar = tqdm(
                total=None,
                desc=stage,
                unit=f" {self._unit}",
                disable=not enabled,
                leave=True,
                dynamic_ncols=True,
                bar_format=FORMAT_UNKNOWN_TOTAL,
                position=position,
                mininterval=0.1,
            )

    def on_batch(self, phase: str, input_rows: int, output_rows: int, error_rows: int) -> None:
        """The in-process executor's callback: count and redraw."""
        with self._lock:
            self.counts.add(phase, input_rows, output_rows, error_rows)
            self._show(self.counts)

    def show(self, counts: ItemCounts) -> None:
        """Redraw from counts gathered elsewhere (the Ray progress actor)."""
        with self._lock:
            self.counts = counts
            self._show(counts)

    def _show(self, counts: ItemCounts) -> None:
        total = counts.estimated_total(self.num_shards)
        if total is not None:
            self._total = max(total, counts.items)
        if self.bar is None:
            now = time.monotonic()
            if self.enabled and now - self._last_line >= LOG_LINE_INTERVAL_S and counts.items:
                self._write_line(now)
            return
        if self._total is not None and self._total != self.bar.total:
            self.bar.total = self._total
            self.bar.bar_format = FORMAT_KNOWN_TOTAL
        self.bar.set_postfix({self._output_unit: counts.outputs, "errors": counts.errors}, refresh=False)
        # update() (rather than setting n) keeps tqdm's rate and ETA estimates right.
        self.bar.update(counts.items - self.bar.n)

    @property
    def total(self) -> int | None:
        """The estimated (once every shard has reported: exact) number of items of this run."""
        return self._total

    def note(self, message: str) -> None:
        """A line between the progress output (a failed shard, say), without breaking a bar."""
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            sys.stderr.write(message + "\n")

    def mark_failed(self, failed_shards: int) -> None:
        """Show the number of failed shards beside the totals."""
        with self._lock:
            self.failed_shards = failed_shards
            if self.bar is not None:
                self.bar.set_postfix_str(f"{self._postfix()}, failed shards={failed_shards}")

    def _postfix(self) -> str:
        return f"{self._output_unit}={self.counts.outputs}, errors={self.counts.errors}"

    def _write_line(self, now: float) -> None:
        counts, elapsed = self.counts, now - self._started
        line = tqdm.format_meter(
            counts.items,
            self._total,
            elapsed,
            prefix=self.stage,
            unit=f" {self._unit}",
            bar_format=LINE_KNOWN_TOTAL if self._total else FORMAT_UNKNOWN_TOTAL,
            postfix=self._postfix() + (f", failed shards={self.failed_shards}" if self.failed_shards else ""),
        )
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
        self._last_line = now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            with self._lock:
                self._write_line(time.monotonic())


class RemoteProgress:
    """A picklable batch callback for Ray workers: forwards each batch's counts to the progress actor."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor

    def __call__(self, phase: str, input_rows: int, output_rows: int, error_rows: int) -> None:
        # Fire and forget: the worker never waits on the console.
        self.actor.add.remote(phase, input_rows, output_rows, error_rows)


class _ProgressActorImpl:
    """Holds the running totals of one stage run on the Ray cluster."""

    def __init__(self) -> None:
        self.counts = ItemCounts()

    def add(self, phase: str, input_rows: int, output_rows: int, error_rows: int) -> None:
        self.counts.add(phase, input_rows, output_rows, error_rows)

    def snapshot(self) -> ItemCounts:
        return self.counts


class RayProgressPoller:
    """Starts a progress actor, polls it from a driver thread into an :class:`ItemProgress`, stops it."""

    def __init__(self, progress: ItemProgress) -> None:
        import ray

        self._ray = ray
        self.progress = progress
        # num_cpus=0: the bookkeeping must never take a slot from a stage worker.
        self.actor = ray.remote(num_cpus=0)(_ProgressActorImpl).remote()
        self.callback = RemoteProgress(self.actor)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name=f"progress-{progress.stage}", daemon=True)

    def __enter__(self) -> RayProgressPoller:
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(POLL_INTERVAL_S):
            try:
                self.progress.show(self._ray.get(self.actor.snapshot.remote(), timeout=10))
            except Exception as exc:  # a slow or restarting cluster must not end the run over a progress bar
                logger.debug("progress poll failed: %s", exc)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._ray.kill(self.actor)
