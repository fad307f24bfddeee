"""Paper-scale figures (issue 15). Part built so far: cross-shard dedup over synthetic crawl shards.

Run:  .venv/bin/python benchmarks/scale.py dedup --sizes 1000000 3000000 10000000 --write-docs

For each size N the script writes N synthetic crawl rows as committed crawl shards of one source
(``--shard-rows`` rows each, ids ``<8 hex>-<index 05d>`` as planning makes them, so the dedup forms its
waves of ``--wave-shards`` shards; the hash columns only: item_id, shard_id, source_ref, sha256, phash,
width, height, num_bytes; no image bytes), then runs ``pipeline.dedup.run_dedup`` in a fresh child
process and reports its wall time and peak RSS (the child's ``ru_maxrss``): once from scratch, then
once more after 1% more rows arrive in new shards (the last wave grows and a new one may start: the
waves before it are read back from their files, the changed and new ones computed).

``benchmarks/scale.py sweep --size 1000000 --waves 1 16 256 4096`` times the in-memory decision alone
(one near-edge search, then the union-find sweep) for one row set cut into more and more waves.

``benchmarks/scale.py stream --size 10000000 --wave-rows 16384`` times the streaming gate's decision
(``DedupState.add_wave``, in memory) wave by wave as the decided rows grow: the mean per-wave wall and
CPU in windows of waves, so that growth with the rows already decided shows; ``--check`` compares the
result with the one-shot sweep; ``--compare COMMIT --compare-rows N`` runs that commit's
``pipeline/dedup_sweep.py`` (read with ``git show``) on the first N rows in the same process.

Rows: 80% distinct random pHashes, 8% near variants of them (1-6 random bit flips, so some are beyond the
distance), 2% blank images (distinct bytes; pHash 0, or 1-2 bits set for a quarter of them: a dense group
in every table), 10% byte copies of earlier images; then shuffled. (tests/pipeline/test_dedup_scale.py
checks denser groups, e.g. thousands of distinct pHashes of popcount <= 4, for exactness.)
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.report import machine_description, replace_doc_section
from ps3_engine.infra.storage import Storage
from ps3_engine.pipeline.dedup import HASH_COLUMNS, run_dedup
from ps3_engine.pipeline.dedup_sweep import DedupState, solve_waves
from ps3_engine.pipeline.layout import RunLayout, ShardTask
from ps3_engine.schemas import ERROR_SCHEMA
from ps3_engine.schemas.image import IMAGE_SCHEMA

logger = logging.getLogger("benchmarks.scale")
HASH_SCHEMA = pa.schema([IMAGE_SCHEMA.field(name) for name in HASH_COLUMNS])
DOC_TITLE = "Paper-scale dedup (benchmarks/scale.py dedup)"


def synthetic_hashes(num_rows: int, seed: int) -> dict[str, np.ndarray]:
    """Per-row image id, pHash, size and bytes (see the module docstring for the mix)."""
    rng = np.random.default_rng(seed)
    num_near, num_blank = num_rows * 8 // 100, num_rows * 2 // 100
    num_base = num_rows * 80 // 100
    num_images = num_base + num_near + num_blank
    base = rng.integers(0, 2**64, num_base, dtype=np.uint64)
    flips = np.zeros(num_near, np.uint64)
    for count in range(6):
        bit = np.uint64(1) << rng.integers(0, 64, num_near).astype(np.uint64)
        flips |= np.where(rng.integers(0, 6, num_near) >= count, bit, np.uint64(0))
    near = base[rng.integers(0, num_base, num_near)] ^ flips
    # Blank images: three in four hash to 0, the rest to one of the 2,080 values with 1-2 bits set.
    blank = np.zeros(num_blank, np.uint64)
    for _ in range(2):
        bit = np.uint64(1) << rng.integers(0, 64, num_blank).astype(np.uint64)
        blank |= np.where(rng.random(num_blank) < 0.25, bit, np.uint64(0))
    phash = np.concatenate([base, near, blank])
    image = np.concatenate([np.arange(num_images), rng.integers(0, num_images, num_rows - num_images)])
    image = image[rng.permutation(num_rows)]
    width = rng.choice([1024, 2048, 3840], num_images).astype(np.int32)
    height = rng.choice([768, 1536, 2160], num_images).astype(np.int32)
    num_bytes = rng.integers(200_000, 3_000_000, num_images)
    return {
        "image": image,
        "phash": phash[image],
        "width": width[image],
        "height": height[image],
        "num_bytes": num_bytes[image],
    }


def shard_table(shard_id: str, rows: dict[str, np.ndarray]) -> pa.Table:
    images = rows["image"].tolist()
    return pa.table(
        {
            "item_id": [f"{shard_id}-{i:05d}" for i in range(len(images))],
            "shard_id": [shard_id] * len(images),
            "source_ref": [f"https://img{i % 997}.example.com/photos/{i:010d}.jpg" for i in images],
            "sha256": [f"{i * 0x9E3779B97F4A7C15 % 2**64:016x}" * 4 for i in images],
            "phash": rows["phash"],
            "width": rows["width"],
            "height": rows["height"],
            "num_bytes": rows["num_bytes"],
        },
        schema=HASH_SCHEMA,
    )


SOURCE_PREFIX = "5f3a9c21"


def write_shards(layout: RunLayout, rows: dict[str, np.ndarray], start: int, stop: int, shard_rows: int) -> int:
    """Commit rows [start, stop) as crawl shards of one source, numbered in row order."""
    count = 0
    for first in range(start, stop, shard_rows):
        shard_id = f"{SOURCE_PREFIX}-{first // shard_rows:05d}"
        part = {name: column[first : min(first + shard_rows, stop)] for name, column in rows.items()}
        task = ShardTask(stage="crawl", shard_id=shard_id, input_key="", input_checksum="", input_shards=())
        layout.commit_shard(
            task,
            fingerprint="synthetic",
            output=shard_table(shard_id, part),
            errors=ERROR_SCHEMA.empty_table(),
            attempt=1,
            wall_seconds=0.0,
        )
        count += 1
    return count


def child(root: str, max_distance: int, wave_shards: int) -> None:
    """Run the dedup once in this (fresh) process and print its figures as JSON."""
    started = time.perf_counter()
    outcome = run_dedup(RunLayout(Storage(root)), max_distance, wave_shards)
    seconds = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    # CPU seconds too: other sessions share the cores, so wall time alone says little about the code.
    cpu = usage.ru_utime + usage.ru_stime
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "peak_rss": usage.ru_maxrss * 1024, **outcome.__dict__}))


def run_child(root: Path, max_distance: int, wave_shards: int) -> dict:
    command = [sys.executable, __file__, "child", "--root", str(root), "--max-distance", str(max_distance)]
    command += ["--wave-shards", str(wave_shards)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(size: int, args: argparse.Namespace, work: Path) -> dict:
    extra = size // 100
    rows = synthetic_hashes(size + extra, seed=size)
    root = work / f"run-{size}"
    layout = RunLayout(Storage(str(root)))
    started = time.perf_counter()
    shards = write_shards(layout, rows, 0, size, args.shard_rows)
    logger.info("size %d: %d shards written in %.0f s", size, shards, time.perf_counter() - started)
    if size % args.shard_rows:
        raise ValueError(f"--sizes must be multiples of --shard-rows ({args.shard_rows}); {size} is not")
    scratch = run_child(root, args.max_distance, args.wave_shards)
    write_shards(layout, rows, size, size + extra, args.shard_rows)
    incremental = run_child(root, args.max_distance, args.wave_shards)
    assert incremental["incremental"] and incremental["waves_reused"] > 0, incremental
    shutil.rmtree(root)
    result = {"size": size, "shards": shards, "extra": extra, "scratch": scratch, "incremental": incremental}
    logger.info("size %d: %s", size, json.dumps(result))
    return result


def table(results: list[dict]) -> str:
    lines = [
        "| rows | shards | waves | from scratch (s) | its CPU (s) | peak RSS (GB) | time growth | RSS growth "
        "| rows kept | exact drops | near drops | +1% rows (s), CPU (s) | its peak RSS (GB) "
        "| its waves computed / reused, rows read |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for i, r in enumerate(results):
        s, inc = r["scratch"], r["incremental"]
        prev = results[i - 1] if i else None
        growth = rss_growth = "-"
        if prev:
            growth = f"x{s['seconds'] / prev['scratch']['seconds']:.2f} for x{r['size'] / prev['size']:.1f} rows"
            rss_growth = f"x{s['peak_rss'] / prev['scratch']['peak_rss']:.2f}"
        lines.append(
            f"| {r['size']:,} | {r['shards']:,} | {s['waves_computed']:,} | {s['seconds']:.1f} "
            f"| {s['cpu_seconds']:.1f} | {s['peak_rss'] / 1e9:.2f} | {growth} | {rss_growth} "
            f"| {s['kept']:,} | {s['dropped_exact']:,} | {s['dropped_near']:,} "
            f"| {inc['seconds']:.1f}, {inc['cpu_seconds']:.1f} "
            f"| {inc['peak_rss'] / 1e9:.2f} | {inc['waves_computed']} / {inc['waves_reused']}"
            f"{' (rebuilt from links)' if inc.get('resumed') else ''}, {inc['rows_read']:,} |"
        )
    return "\n".join(lines)


def sweep(size: int, wave_counts: list[int], max_distance: int) -> None:
    """In memory: the wave decision over ``size`` synthetic rows cut into each number of waves (no I/O)."""
    rows = synthetic_hashes(size, seed=size)
    words = np.zeros((size, 4), np.uint64)
    words[:, 0] = rows["image"].astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)  # odd: a bijection
    pixels = rows["width"].astype(np.int64) * rows["height"]
    num_bytes = rows["num_bytes"].astype(np.int64)
    for num_waves in wave_counts:
        wave = np.arange(size, dtype=np.int64) * num_waves // size
        wall, cpu = time.perf_counter(), time.process_time()
        representative, _ = solve_waves(words, rows["phash"], pixels, num_bytes, wave, max_distance)
        dropped = int(np.count_nonzero(representative != np.arange(size)))
        sys.stdout.write(
            f"| {size:,} | {num_waves:,} | {time.perf_counter() - wall:.1f} | {time.process_time() - cpu:.1f} "
            f"| {dropped:,} |\n"
        )


def _sweep_module_at(commit: str) -> Any:
    """``pipeline/dedup_sweep.py`` as it was at ``commit``, loaded as a module (for a before/after run)."""
    root = Path(__file__).resolve().parent.parent
    source = subprocess.run(
        ["git", "show", f"{commit}:pipeline/dedup_sweep.py"], cwd=root, check=True, capture_output=True, text=True
    ).stdout
    module = types.ModuleType(f"dedup_sweep_{commit}")
    exec(compile(source, f"{commit}:pipeline/dedup_sweep.py", "exec"), module.__dict__)
    return module


def _stream_waves(state: Any, columns: tuple, wave_rows: int, windows: int) -> list[tuple[int, int, float, float]]:
    """Decide waves one by one; per window ``(first wave, waves, mean wall s, mean CPU s)``."""
    words, phash, pixels, num_bytes = columns
    size = phash.size
    num_waves = -(-size // wave_rows)
    bounds = np.linspace(0, num_waves, windows + 1).astype(int)
    out = []
    for lo, hi in itertools.pairwise(bounds):
        if hi <= lo:
            continue
        wall, cpu = time.perf_counter(), time.process_time()
        for k in range(lo, hi):
            a, b = k * wave_rows, min((k + 1) * wave_rows, size)
            state.add_wave(words[a:b], phash[a:b], pixels[a:b], num_bytes[a:b])
        out.append((lo, hi - lo, (time.perf_counter() - wall) / (hi - lo), (time.process_time() - cpu) / (hi - lo)))
    return out


def stream(args: argparse.Namespace) -> None:
    """In memory: the streaming gate's per-wave decision cost as the decided rows grow."""
    rows = synthetic_hashes(args.size, seed=args.size)
    words = np.zeros((args.size, 4), np.uint64)
    words[:, 0] = rows["image"].astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)  # odd: a bijection
    pixels = rows["width"].astype(np.int64) * rows["height"]
    columns = (words, rows["phash"], pixels, rows["num_bytes"].astype(np.int64))
    header = "| code | rows decided before the window | waves in window | mean wall per wave (ms) | mean CPU (ms) |"
    sys.stdout.write(header + "\n|---|---:|---:|---:|---:|\n")
    variants = [("this commit", DedupState, args.size)]
    if args.compare:
        variants.append((args.compare, _sweep_module_at(args.compare).DedupState, args.compare_rows or args.size))
    for name, state_type, size in variants:
        state = state_type(args.max_distance)
        part = tuple(column[:size] for column in columns)
        total = time.perf_counter()
        for first, count, wall, cpu in _stream_waves(state, part, args.wave_rows, args.windows):
            decided = first * args.wave_rows
            sys.stdout.write(f"| {name} | {decided:,} | {count} | {wall * 1e3:.1f} | {cpu * 1e3:.1f} |\n")
        sys.stdout.write(
            f"\n{name}: {size:,} rows in waves of {args.wave_rows:,}: {time.perf_counter() - total:.1f} s wall, "
            f"peak RSS so far {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB\n\n"
        )
        if args.check and name == "this commit":
            wave = np.arange(size, dtype=np.int64) // args.wave_rows
            expected, _ = solve_waves(*part, wave, args.max_distance)
            same = np.array_equal(np.asarray(state.representative), expected)
            sys.stdout.write(f"check against the one-shot sweep: {'identical' if same else 'DIFFERENT'}\n\n")
            if not same:
                raise SystemExit(1)
        del state


def main() -> None:
    if sys.argv[1:2] == ["state"]:  # status and plan on a finished run on S3: benchmarks/scale_state.py
        from benchmarks.scale_state import main as state_main

        state_main(["bench", *sys.argv[2:]])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("dedup", help="time run_dedup over synthetic crawl shards")
    bench.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 3_000_000, 10_000_000])
    bench.add_argument("--shard-rows", type=int, default=10_000)
    bench.add_argument("--max-distance", type=int, default=4)
    bench.add_argument("--wave-shards", type=int, default=64, help="crawl.dedup_wave_shards")
    bench.add_argument("--work-dir", default=None, help="where the synthetic runs go (default: a temp dir)")
    bench.add_argument("--write-docs", action="store_true")
    waves = sub.add_parser("sweep", help="in-memory wave decision: cost against the number of waves")
    waves.add_argument("--size", type=int, default=1_000_000)
    waves.add_argument("--waves", type=int, nargs="+", default=[1, 16, 256, 4096])
    waves.add_argument("--max-distance", type=int, default=4)
    streamed = sub.add_parser("stream", help="streaming gate: per-wave decision cost as decided rows grow")
    streamed.add_argument("--size", type=int, default=3_000_000)
    streamed.add_argument("--wave-rows", type=int, default=16_384, help="rows per wave (64 shards of 256)")
    streamed.add_argument("--windows", type=int, default=5, help="windows of waves to report")
    streamed.add_argument("--max-distance", type=int, default=4)
    streamed.add_argument("--check", action="store_true", help="compare with the one-shot sweep")
    streamed.add_argument("--compare", default=None, help="also run pipeline/dedup_sweep.py of this commit")
    streamed.add_argument("--compare-rows", type=int, default=None, help="rows for the --compare run")
    one = sub.add_parser("child", help=argparse.SUPPRESS)
    one.add_argument("--root", required=True)
    one.add_argument("--max-distance", type=int, required=True)
    one.add_argument("--wave-shards", type=int, required=True)
    args = parser.parse_args()
    if args.command == "child":
        child(args.root, args.max_distance, args.wave_shards)
        return
    if args.command == "stream":
        stream(args)
        return
    if args.command == "sweep":
        sys.stdout.write("| rows | waves | wall (s) | CPU (s) | rows dropped |\n|---:|---:|---:|---:|---:|\n")
        sweep(args.size, args.waves, args.max_distance)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        results = [measure(size, args, Path(tmp)) for size in args.sizes]
    report = table(results)
    sys.stdout.write(report + "\n")
    if args.write_docs:
        command = "`.venv/bin/python benchmarks/scale.py dedup " + " ".join(sys.argv[2:]).replace(" --write-docs", "")
        body = f"Command: {command} --write-docs`\n\n{machine_description()}\n\n{report}\n"
        replace_doc_section(Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md", DOC_TITLE, body)


if __name__ == "__main__":
    main()
