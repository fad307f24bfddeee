"""Process-tree sampling for benchmarks: peak RSS and CPU seconds of a process and its descendants.

A background thread walks the tree of ``root_pid`` every ``interval_s`` with psutil and records the sum
of resident set sizes (peak over the run) and each process's latest CPU times. Processes listed in
``exclude`` (and their descendants) are left out, e.g. a loopback server that serves both tools.

Caveats, stated in the reports that use it: summed RSS counts pages shared between processes once per
process, and a process that exits between two samples loses at most its last ``interval_s`` of CPU.
"""

from __future__ import annotations

import importlib
import threading
import time
from types import TracebackType

try:
    import psutil
except ImportError:  # not a declared dependency, but ray[default] vendors it and puts it on sys.path on import
    importlib.import_module("ray")
    import psutil


def tree(root_pid: int, exclude: set[int]) -> list[psutil.Process]:
    """``root_pid`` and its live descendants, minus the excluded processes and their descendants."""
    try:
        root = psutil.Process(root_pid)
        members = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    skipped = set(exclude)
    for process in members:
        try:
            if process.pid not in skipped and process.ppid() in skipped:
                skipped.add(process.pid)
        except psutil.NoSuchProcess:
            skipped.add(process.pid)
    return [p for p in members if p.pid not in skipped]


def machine_busy_s() -> float:
    """Busy CPU seconds of the whole machine so far, all cores (idle and iowait excluded)."""
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def _cpu_s(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


class TreeSampler:
    """Context manager: samples the tree of ``root_pid`` until exit.

    After exit: ``seconds`` (wall time inside the block), ``peak_rss``, ``cpu_s`` (the tree's CPU seconds)
    and ``machine_busy_s`` (every process's, so other load on the machine shows as the difference).
    """

    def __init__(self, root_pid: int, exclude: set[int] | None = None, interval_s: float = 0.1) -> None:
        self.root_pid = root_pid
        self.exclude = exclude or set()
        self.interval_s = interval_s
        self.peak_rss = 0
        self.start_rss: int | None = None  # the first sample: what the tree held before the work began
        self.peak_processes = 0
        self.seconds = 0.0
        self.machine_busy_s = 0.0
        self._baseline: dict[int, float] = {}
        self._latest: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tree-sampler", daemon=True)

    def __enter__(self) -> TreeSampler:
        for process in tree(self.root_pid, self.exclude):
            try:
                self._baseline[process.pid] = _cpu_s(process)
            except psutil.NoSuchProcess:
                continue
        self._thread.start()
        self._began, self._busy_before = time.perf_counter(), machine_busy_s()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.seconds = time.perf_counter() - self._began
        self.machine_busy_s = machine_busy_s() - self._busy_before
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def cpu_s(self) -> float:
        """CPU seconds (user + system) the tree used while sampled."""
        return sum(cpu - self._baseline.get(pid, 0.0) for pid, cpu in self._latest.items())

    def _sample(self) -> None:
        rss = 0
        members = tree(self.root_pid, self.exclude)
        for process in members:
            try:
                rss += process.memory_info().rss
                self._latest[process.pid] = _cpu_s(process)
            except psutil.NoSuchProcess:
                continue
        if self.start_rss is None:
            self.start_rss = rss
        if rss > self.peak_rss:
            self.peak_rss, self.peak_processes = rss, len(members)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.interval_s)


def wait_for_quiet(threshold_cores: float = 0.3, window_s: float = 3.0, max_wait_s: float = 600.0) -> float:
    """Wait until the machine's busy cores over ``window_s`` drop below ``threshold_cores``.

    Other work on a shared machine (a test suite, another benchmark) skews timings; this waits it out for
    at most ``max_wait_s``. Returns the last measured load (busy cores); the caller reports it.
    """
    deadline = time.monotonic() + max_wait_s
    while True:
        before = machine_busy_s()
        time.sleep(window_s)
        load = (machine_busy_s() - before) / window_s
        if load < threshold_cores or time.monotonic() >= deadline:
            return load
