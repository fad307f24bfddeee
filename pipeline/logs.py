"""Logging for the command line: our own lines on the console, Ray's own lines in the run's log file.

``configure_logging`` (called once by the CLI) installs a console handler that writes through
``tqdm.write`` so log lines never break a progress bar, plus a run-log handler that buffers records
until :func:`attach_run_log` knows the run root. Without ``-v``, :func:`route_ray_logs` (called by the
executor when it starts Ray) takes the console handlers off Ray's loggers and sends their records to
the run log only, and Ray workers' output stays in Ray's session logs (``log_to_driver=False``).
Library use (tests, notebooks) never calls ``configure_logging`` and keeps Ray's defaults.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve")
RUN_LOG_NAME = "ps3-engine.log"
# Records kept while the run root is not known yet (ray.init happens after the config is loaded, so
# only a few lines ever wait here).
MAX_BUFFERED_RECORDS = 10_000


class JsonLogFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message (+ exception text)."""

    def format(self, record: logging.LogRecord) -> str:
        payload = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
        }
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload)


class TqdmConsoleHandler(logging.Handler):
    """Console lines written above any live progress bar (to stderr, like tqdm's bars)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


class RunLogHandler(logging.Handler):
    """Appends to the run's log file; buffers records until the file is known."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.path: Path | None = None
        self._file: logging.FileHandler | None = None
        self._buffer: list[logging.LogRecord] = []

    def attach(self, path: Path) -> None:
        if self.path == path:
            return
        if self._file is not None:
            self._file.close()
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = logging.FileHandler(path)
        self._file.setFormatter(logging.Formatter(TEXT_FORMAT))
        for record in self._buffer:
            self._file.emit(record)
        self._buffer.clear()

    def emit(self, record: logging.LogRecord) -> None:
        if self._file is not None:
            self._file.emit(record)
        elif len(self._buffer) < MAX_BUFFERED_RECORDS:
            self._buffer.append(record)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        super().close()


class _State:
    configured = False
    verbose = False
    console: logging.Handler | None = None
    run_log: RunLogHandler | None = None


def configure_logging(verbose: bool = False, log_format: str = "text") -> None:
    """Console (INFO, DEBUG with ``verbose``) and run-log handlers on the root logger; idempotent."""
    root = logging.getLogger()
    for handler in (_State.console, _State.run_log):
        if handler is not None:
            root.removeHandler(handler)
    console: logging.Handler
    if log_format == "json":
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(JsonLogFormatter())
    else:
        console = TqdmConsoleHandler()
        console.setFormatter(logging.Formatter(TEXT_FORMAT))
    console.setLevel(logging.DEBUG if verbose else logging.INFO)
    run_log = _State.run_log or RunLogHandler()
    # INFO unless -v: Ray Data logs its scheduler state at DEBUG every few seconds.
    run_log.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.addHandler(console)
    root.addHandler(run_log)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    _State.configured, _State.verbose, _State.console, _State.run_log = True, verbose, console, run_log


def run_log_path(run_root: str) -> Path:
    """``<run>/logs/ps3-engine.log`` for a local run root; a local temp file for an S3 one."""
    if "://" not in run_root:
        return Path(run_root).expanduser().resolve() / "logs" / RUN_LOG_NAME
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", run_root.split("://", 1)[1]).strip("_")
    return Path(tempfile.gettempdir()) / "ps3-engine-logs" / f"{slug}.log"


def attach_run_log(run_root: str) -> Path | None:
    """Send the buffered and all later records to the run's log file; None when logging is not ours."""
    if not _State.configured or _State.run_log is None:
        return None
    path = run_log_path(run_root)
    try:
        _State.run_log.attach(path)
    except OSError as exc:  # a read-only or missing parent: the run itself will say so more clearly
        logging.getLogger(__name__).debug("no run log at %s: %s", path, exc)
        return None
    return path


def current_run_log() -> Path | None:
    return _State.run_log.path if _State.run_log is not None else None


def ray_console_enabled() -> bool:
    """Whether Ray's own lines and its workers' output may reach the console."""
    return not _State.configured or _State.verbose


def route_ray_logs() -> None:
    """Take the console handlers off Ray's loggers and send their records to the run log (not with -v)."""
    if ray_console_enabled():
        return
    for name in RAY_LOGGERS:
        ray_logger = logging.getLogger(name)
        for handler in list(ray_logger.handlers):
            # File handlers (Ray Data's own ray-data.log) stay; anything writing to a terminal goes.
            if not isinstance(handler, logging.FileHandler) and type(handler).__name__ != "SessionFileHandler":
                ray_logger.removeHandler(handler)
        if _State.run_log is not None and _State.run_log not in ray_logger.handlers:
            ray_logger.addHandler(_State.run_log)
        ray_logger.propagate = False
