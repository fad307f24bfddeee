"""Planning at scale (issue 15 item 1): time and driver peak RSS of planning N synthetic URLs.

Two measurements per size, each in a fresh child process so its peak RSS is the planner's own:
``plan-cli`` runs ``ps3-engine plan --run-root R --input urls.txt`` (one text list, nothing written) and
``plan-write`` plans the same URLs split over many Parquet lists and writes the crawl input shards
(``plan_crawl`` with ``persist``), then plans them again (nothing is rewritten).

Run::

    .venv/bin/python benchmarks/scale_plan.py --sizes 1000000 10000000 --files-per-million 10
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

# 1 in 50 URLs is listed twice (another file), so the occurrence index sees repeats.
REPEAT_EVERY = 50


def _url(i: int) -> str:
    return f"https://img{i % 9973}.example.com/photos/{i:010d}/full.jpg"


def write_inputs(folder: Path, num_urls: int, num_files: int) -> tuple[Path, list[Path]]:
    """One text list and ``num_files`` Parquet lists (url, caption) holding the same URLs."""
    text = folder / "urls.txt"
    with text.open("w") as handle:
        for start in range(0, num_urls, 1_000_000):
            handle.write("".join(_url(i) + "\n" for i in range(start, min(start + 1_000_000, num_urls))))
    per_file = -(-num_urls // num_files)
    lists = []
    for index, start in enumerate(range(0, num_urls, per_file)):
        ids = [
            i - REPEAT_EVERY if i % REPEAT_EVERY == 0 and i >= per_file else i
            for i in range(start, min(start + per_file, num_urls))
        ]
        path = folder / f"part-{index:05d}.parquet"
        pq.write_table(pa.table({"url": [_url(i) for i in ids], "caption": [f"photo {i}" for i in ids]}), path)
        lists.append(path)
    return text, lists


PEAK = (
    "\nimport json, resource\n"
    "RESULT['peak_mb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024\n"
    "print(json.dumps(RESULT))\n"
)


def _child(code: str) -> dict:
    """Run ``code`` (which sets ``RESULT``) in a fresh interpreter; its JSON result, peak RSS (MB) and wall."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code + PEAK], check=True, capture_output=True, text=True)
    return {**json.loads(result.stdout.strip().splitlines()[-1]), "wall_s": round(time.perf_counter() - started, 1)}


def measure(folder: Path, num_urls: int, num_files: int) -> dict:
    text, lists = write_inputs(folder, num_urls, num_files)
    argv = ["plan", "--run-root", str(folder / "plan-run"), "--input", str(text)]
    cli = _child(
        "import contextlib, io\n"
        "from ps3_engine.pipeline.cli import main\n"
        f"with contextlib.redirect_stdout(io.StringIO()):\n    assert main({argv!r}) == 0\n"
        "RESULT = {}\n"
    )
    write = _child(
        "import time\n"
        "from ps3_engine.infra.storage import S3Settings, Storage\n"
        "from ps3_engine.pipeline.layout import RunLayout\n"
        "from ps3_engine.pipeline.sources import plan_crawl\n"
        f"layout = RunLayout(Storage({str(folder / 'run')!r}))\n"
        f"sources = {[str(p) for p in lists]!r}\n"
        "t = time.perf_counter(); tasks = plan_crawl(layout, sources, 128, S3Settings())\n"
        "first = time.perf_counter() - t\n"
        "t = time.perf_counter(); again = plan_crawl(layout, sources, 128, S3Settings())\n"
        "second = time.perf_counter() - t\n"
        "assert [x.input_checksum for x in tasks] == [x.input_checksum for x in again]\n"
        "RESULT = {'shards': len(tasks), 'write_s': round(first, 1), 'again_s': round(second, 1)}\n"
    )
    return {
        "urls": num_urls,
        "files": len(lists),
        "plan_cli_s": cli["wall_s"],
        "plan_cli_peak_mb": cli["peak_mb"],
        **{k: write[k] for k in ("shards", "write_s", "again_s")},
        "plan_write_peak_mb": write["peak_mb"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--files-per-million", type=int, default=10)
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one, removed)")
    args = parser.parse_args()
    rows = []
    for size in sorted(args.sizes):
        folder = Path(tempfile.mkdtemp(dir=args.workdir, prefix=f"plan-{size}-"))
        try:
            rows.append(measure(folder, size, max(1, size * args.files_per_million // 1_000_000)))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        print(json.dumps(rows[-1]), flush=True)
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        growth = {
            k: round(last[k] / max(first[k], 1e-9), 1)
            for k in ("plan_cli_s", "write_s", "plan_cli_peak_mb", "plan_write_peak_mb")
        }
        print(
            json.dumps({"items_growth": last["urls"] / first["urls"], **{f"growth_{k}": v for k, v in growth.items()}})
        )


if __name__ == "__main__":
    main()
