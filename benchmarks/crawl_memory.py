"""Crawl validation memory: peak RSS of one crawl worker validating 64 MP PNGs with 16 download threads.

Run:  .venv/bin/python benchmarks/crawl_memory.py --images 32 --threads 16 --write-docs
      (add ``--old-commit 8e34f1f`` to measure the code before the pixel budget, from a git archive)

The worst case of issue 14: a 7999x7999 PNG of a flat colour is ~190 KB on the wire but ~192 MB once
decoded, so many of them in flight multiply a worker's memory by the download thread count. Each
measurement runs in a fresh child process: it builds the crawl stage (``download_threads`` threads, the
given ``validation_pixel_budget``), validates one small image to load the codecs, records its peak RSS
(the baseline), then crawls ``--images`` URLs of the worst-case PNG from a loopback server in one batch
and records the peak RSS again (``ru_maxrss``, which is exact, unlike sampling). The server runs in the
parent, so its memory is not counted.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs" / "benchmarks.md"
SECTION = "## Crawl validation memory (benchmarks/crawl_memory.py)"
SIDE = 7999
UNBOUNDED = 10**12


def write_images(folder: Path, mode: str) -> int:
    """The worst case (``SIDE`` x ``SIDE``, flat colour) and a small warm-up image; returns the PNG's size."""
    Image.new(mode, (SIDE, SIDE), "teal").save(folder / "worst.png", optimize=True)
    Image.new("RGB", (1200, 1024), "teal").save(folder / "warmup.png")
    return (folder / "worst.png").stat().st_size


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def child(base_url: str, images: int, threads: int, budget: int) -> dict:
    """Runs in the measured process: crawl ``images`` copies of the worst case in one batch."""
    import pyarrow as pa

    from ps3_engine.stages.base import ShardContext
    from ps3_engine.stages.crawl import CrawlConfig, CrawlStage

    options = {"download_threads": threads, "http": {"allow_private_addresses": True}, "batch_size": images}
    if budget:
        options["validation_pixel_budget"] = budget
    stage = CrawlStage(CrawlConfig(**options))
    stage.setup()

    def batch(paths: list[str]) -> pa.Table:
        rows = [
            {
                "item_id": f"i{n}",
                "source_ref": f"{base_url}/{path}?copy={n}",
                "source_kind": "http",
                "source_list": "bench",
                "license": None,
                "attribution": None,
                "metadata_json": "{}",
            }
            for n, path in enumerate(paths)
        ]
        return pa.Table.from_pylist(rows)

    context = ShardContext(stage="crawl", shard_id="bench", attempt=1)
    stage.process_batch(batch(["warmup.png"]), context)
    baseline = peak_rss_mb()
    started = time.perf_counter()
    result = stage.process_batch(batch(["worst.png"] * images), context)
    seconds = time.perf_counter() - started
    stage.teardown()
    return {
        "baseline_mb": baseline,
        "peak_mb": peak_rss_mb(),
        "seconds": seconds,
        "kept": result.output.num_rows,
        "errors": result.errors.column("reason").to_pylist() if result.errors.num_rows else [],
    }


def old_tree(commit: str, scratch: Path) -> Path:
    """``ps3_engine`` as of ``commit``, importable from the returned folder (ahead of the editable install)."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit], check=True, capture_output=True).stdout
    source = scratch / "src"
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(source, filter="data")
    package = scratch / "path" / "ps3_engine"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    for name in ("pipeline", "stages", "schemas", "infra"):
        (package / name).symlink_to(source / name)
    return scratch / "path"


def measure(base_url: str, images: int, threads: int, budget: int, pythonpath: Path | None = None) -> dict:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = f"{pythonpath}{os.pathsep}{env.get('PYTHONPATH', '')}"
    command = [sys.executable, __file__, "--child", base_url, "--images", str(images), "--threads", str(threads)]
    command += ["--budget", str(budget)]
    done = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(rows: list[tuple[str, dict]], args: argparse.Namespace, png_bytes: int) -> str:
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    lines = [
        SECTION,
        "",
        f"Command: `.venv/bin/python benchmarks/crawl_memory.py --images {args.images} --threads {args.threads}"
        + (f" --old-commit {args.old_commit}" if args.old_commit else "")
        + " --write-docs`",
        "",
        f"Machine: {os.cpu_count()} cores, no GPU. Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC. "
        f"Commit: {commit.stdout.strip()}.",
        "",
        "| code / setting | download threads | images | peak RSS before the batch (MB) | peak RSS (MB) |"
        " growth (MB) | seconds | kept |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, row in rows:
        growth = row["peak_mb"] - row["baseline_mb"]
        lines.append(
            f"| {label} | {args.threads} | {args.images} | {row['baseline_mb']:.0f} | {row['peak_mb']:.0f} |"
            f" {growth:.0f} | {row['seconds']:.1f} | {row['kept']} |"
        )
    lines += [
        "",
        f"Images: one {SIDE}x{SIDE} RGB PNG of a flat colour ({png_bytes / 1000:.0f} KB; 64.0 MP, under the 64 MP "
        f"cap), fetched {args.images} times from a loopback server in the parent process, as one batch of one "
        "crawl worker (`CrawlStage.process_batch`, the stage's thread pool). Peak RSS is the child's "
        "`ru_maxrss`: before = after building the stage and validating one small image, so growth is what the "
        "batch added. The budget counts stored pixels decoded at once by all threads of a worker; one image "
        "larger than the budget still runs, alone. Pillow's decode blocks are raised to 64 MB in crawl "
        "workers (`stages.imaging.use_large_decode_blocks`): with 16 MB blocks glibc kept each thread's freed "
        "decode in its arena, and the budget alone left ~900 MB at 4 threads.",
        "",
        "Result: " + "; ".join(f"{label}: +{row['peak_mb'] - row['baseline_mb']:.0f} MB" for label, row in rows) + ".",
        "",
    ]
    return "\n".join(lines)


def write_docs(text: str) -> None:
    current = DOCS.read_text()
    if SECTION in current:
        start = current.index(SECTION)
        rest = current[start + len(SECTION) :]
        end = rest.find("\n## ")
        current = current[:start] + text + ("" if end < 0 else rest[end + 1 :])
    else:
        current = current.rstrip("\n") + "\n\n" + text
    DOCS.write_text(current)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--budget", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--child", metavar="BASE_URL", help=argparse.SUPPRESS)
    parser.add_argument("--old-commit", help="also measure this commit's code (before the pixel budget)")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.images, args.threads, args.budget)))
        return

    from ps3_engine.infra.static_server import serve_directory
    from ps3_engine.stages.crawl import CrawlConfig

    default_budget = CrawlConfig().validation_pixel_budget
    with tempfile.TemporaryDirectory() as scratch, serve_directory(Path(scratch)) as base_url:
        png_bytes = write_images(Path(scratch), "RGB")
        rows = []
        if args.old_commit:
            old = old_tree(args.old_commit, Path(scratch) / "old")
            rows.append((f"before (commit {args.old_commit})", measure(base_url, args.images, args.threads, 0, old)))
        settings = [(f"now, budget unbounded ({UNBOUNDED:.0e} px)", UNBOUNDED)]
        settings.append((f"now, default budget ({default_budget / 1e6:.0f} MP)", default_budget))
        for label, budget in settings:
            rows.append((label, measure(base_url, args.images, args.threads, budget)))
        for label, row in rows:
            print(f"{label}: {json.dumps(row)}")
    text = report(rows, args, png_bytes)
    print(text)
    if args.write_docs:
        write_docs(text)


if __name__ == "__main__":
    main()
