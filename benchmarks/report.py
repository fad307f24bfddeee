"""Shared helpers for benchmark scripts: machine description and docs/benchmarks.md sections."""

from __future__ import annotations

import os
import platform
import subprocess
from datetime import UTC, datetime
from pathlib import Path

HEADER = (
    "# Benchmarks\n\n"
    "Every result below lists the command that produced it, the machine and the date. Ratios are taken "
    "within one run of one command.\n"
)


def machine_description() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        commit = "unknown"
    return (
        f"Machine: {os.cpu_count()} cores ({cpu}), {memory_gib:.0f} GiB RAM, no GPU, {platform.system()} "
        f"{platform.release()}. Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC. Commit: {commit}."
    )


def replace_doc_section(path: Path, title: str, body: str) -> None:
    """Write ``## title`` with ``body`` into ``path``, replacing that section if present."""
    text = path.read_text() if path.exists() else HEADER
    heading = f"## {title}"
    section = f"{heading}\n\n{body.strip()}\n"
    if heading in text:
        start = text.index(heading)
        end = text.find("\n## ", start + len(heading))
        text = text[:start] + section + ("" if end == -1 else text[end:])
    else:
        text = text.rstrip() + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
