"""Fault injection for tests: a loopback TCP proxy that fails on demand, worker-process lookup, a tiny disk.

* :class:`FaultProxy` sits in front of a real server (SeaweedFS) and, while failing, resets every
  connection or answers every request with S3's ``503 SlowDown``; connections open when a failure starts
  are dropped mid-flight, like an endpoint that goes away.
* :func:`child_processes` / :class:`ProcessKiller` find processes by their title among a parent's children
  (Ray workers are children of their raylet and show what they run as ``ray::<Actor>.<method>``) and
  SIGKILL the first that matches.
* :func:`tmpfs` mounts a size-limited tmpfs (root only) so writes hit ENOSPC; it can be grown afterwards.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

FailureMode = Literal["reset", "slowdown"]

SLOWDOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message><RequestId>fault-proxy</RequestId></Error>"
)
SLOWDOWN_RESPONSE = (
    b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nRetry-After: 1\r\n"
    b"Content-Length: " + str(len(SLOWDOWN_BODY)).encode() + b"\r\nConnection: close\r\n\r\n" + SLOWDOWN_BODY
)


def _abort(sock: socket.socket) -> None:
    """Drop the connection: shutdown wakes threads blocked on it, a zero linger makes close send an RST."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


class FaultProxy:
    """A threaded TCP proxy on 127.0.0.1 in front of ``upstream``; healthy until :meth:`fail` is called."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._mode: FailureMode | None = None
        self._lock = threading.Lock()
        self._live: set[socket.socket] = set()
        self._closed = threading.Event()
        self.proxied = 0  # connections passed through
        self.failed = 0  # connections reset or answered 503 (including those dropped when a failure began)
        self._thread = threading.Thread(target=self._accept_loop, name="fault-proxy", daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def fail(self, mode: FailureMode) -> None:
        """Start failing: drop every open connection, then reset (or 503) every new one."""
        with self._lock:
            self._mode = mode
            live, self._live = self._live, set()
            self.failed += len(live) // 2
        for sock in live:
            _abort(sock)

    def heal(self) -> None:
        with self._lock:
            self._mode = None

    def fail_for(self, mode: FailureMode, seconds: float) -> None:
        self.fail(mode)
        time.sleep(seconds)
        self.heal()

    def close(self) -> None:
        self._closed.set()
        _abort(self._listener)
        self.fail("reset")

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                mode = self._mode
                if mode is not None:
                    self.failed += 1
            if mode == "reset":
                _abort(client)
            elif mode == "slowdown":
                threading.Thread(target=self._answer_slowdown, args=(client,), daemon=True).start()
            else:
                threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    @staticmethod
    def _answer_slowdown(client: socket.socket) -> None:
        """Read the request head, answer 503 SlowDown and close (the body, if any, is not waited for)."""
        client.settimeout(2.0)
        head = b""
        with contextlib.suppress(OSError):
            while b"\r\n\r\n" not in head and len(head) < 65536:
                chunk = client.recv(4096)
                if not chunk:
                    break
                head += chunk
            client.sendall(SLOWDOWN_RESPONSE)
        _abort(client)

    def _connect(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.upstream, timeout=5.0)
        except OSError:
            _abort(client)
            return
        upstream.settimeout(None)
        with self._lock:
            if self._mode is not None:  # a failure began while connecting
                _abort(client)
                _abort(upstream)
                return
            self._live.update((client, upstream))
            self.proxied += 1
        for src, dst in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while chunk := src.recv(65536):
                dst.sendall(chunk)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            _abort(src)
            _abort(dst)
        finally:
            with self._lock:
                self._live.discard(src)


# -- processes ---------------------------------------------------------------------------------


def child_processes(parent_pid: int) -> dict[int, str]:
    """Direct children of ``parent_pid`` with their titles (Linux ``/proc``); vanished ones are skipped."""
    children: set[int] = set()
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{parent_pid}/task").iterdir():
            with contextlib.suppress(OSError):
                children.update(int(pid) for pid in (task / "children").read_text().split())
    titles = {}
    for pid in children:
        with contextlib.suppress(OSError):
            titles[pid] = (
                Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            )
    return titles


@dataclass
class ProcessKiller:
    """Polls ``parent_pid``'s children and SIGKILLs the first whose title starts with ``title_prefix``.

    ``armed`` (checked about every 50 ms until it holds) delays the hunt, e.g. until a stage has begun.
    """

    parent_pid: int
    title_prefix: str
    armed: Callable[[], bool] | None = None
    poll_s: float = 0.01
    killed: list[tuple[int, str]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> ProcessKiller:
        self._thread = threading.Thread(target=self._run, name="process-killer", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while self.armed is not None and not self.armed():
            if self._stop.wait(0.05):
                return
        while not self._stop.is_set():
            for pid, title in child_processes(self.parent_pid).items():
                if title.startswith(self.title_prefix):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                        self.killed.append((pid, title))
                    return
            time.sleep(self.poll_s)


# -- a disk that fills up ----------------------------------------------------------------------


class MountUnavailable(RuntimeError):
    """This machine (or user) cannot mount a file system (tmpfs, loop device)."""


@dataclass(frozen=True)
class Tmpfs:
    path: Path

    def resize(self, size: str) -> None:
        """Grow (or shrink) the mounted filesystem in place, e.g. after "freeing space"."""
        subprocess.run(["mount", "-o", f"remount,size={size}", str(self.path)], check=True, capture_output=True)


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Tmpfs]:
    """Mount a tmpfs of ``size`` (e.g. ``"340k"``) at ``path`` for the block; raises MountUnavailable."""
    with _mounted(["-t", "tmpfs", "-o", f"size={size}", "tmpfs"], path):
        yield Tmpfs(path)


@contextlib.contextmanager
def nearly_full_disk(path: Path, size: str, free_bytes: int) -> Iterator[Path]:
    """Mount an ext4 file system of ``size`` at ``path`` with about ``free_bytes`` left free.

    Unlike a tmpfs, filling it costs neither memory nor disk: the image is a sparse file and the filler is
    an fallocate'd file (ext4 reserves its blocks without writing them). Raises MountUnavailable.
    """
    image = path.with_name(path.name + ".img")
    try:
        subprocess.run(["truncate", "-s", size, str(image)], check=True)
        try:
            made = subprocess.run(["mkfs.ext4", "-q", "-m", "0", str(image)], capture_output=True, text=True)
        except FileNotFoundError as exc:  # no e2fsprogs: like no mount command, the machine cannot do it
            raise MountUnavailable("no mkfs.ext4 command") from exc
        if made.returncode != 0:
            raise MountUnavailable(made.stderr.strip() or "mkfs.ext4 failed")
        with _mounted(["-o", "loop", str(image)], path):
            fill = shutil.disk_usage(path).free - free_bytes
            subprocess.run(["fallocate", "-l", str(fill), str(path / "fill")], check=True)
            yield path
    finally:
        image.unlink(missing_ok=True)


@contextlib.contextmanager
def _mounted(mount_args: list[str], path: Path) -> Iterator[None]:
    path.mkdir(parents=True, exist_ok=True)
    try:
        result = subprocess.run(["mount", *mount_args, str(path)], capture_output=True, text=True)
    except FileNotFoundError as exc:
        raise MountUnavailable("no mount command") from exc
    if result.returncode != 0:
        raise MountUnavailable(result.stderr.strip() or f"mount exited {result.returncode}")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)
