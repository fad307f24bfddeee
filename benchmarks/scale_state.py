"""Run-state figures at paper scale (issue 15 item 6): ``status`` and ``plan`` on a finished run on S3.

Run:  .venv/bin/python benchmarks/scale_state.py bench --sizes 1000000 3000000 10000000 --write-docs
(or ``benchmarks/scale.py state --sizes ...``, the same)

Starts SeaweedFS on loopback (``tests/support/seaweed.py``), writes for each size N a finished synthetic
run of N items to its own bucket (``benchmarks/synthetic_run.py``: four stages, 128-256 items per shard,
manifests, dedup drops, each stage compacted into its index as the runner does), then runs
``pipeline.status.run_status`` and ``pipeline.plan.plan_run`` (against the run's committed inputs), each
in a fresh child process: wall time, peak RSS (the child's ``ru_maxrss``), and the storage requests it
made (``Storage`` methods counted by wrapping them; a listing is one request per 1,000 keys on S3). With
``--unindexed-size`` it also times ``status`` at that size with the index ignored (every manifest JSON
read, 16 at a time): the per-shard cost the index removes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.report import machine_description, replace_doc_section
from benchmarks.synthetic_run import STAGES, SyntheticRun
from ps3_engine.infra.storage import Storage

logger = logging.getLogger("benchmarks.scale_state")
DOC_TITLE = "Paper-scale run state: status and plan on S3 (benchmarks/scale_state.py)"
COUNTED = ("read_bytes", "read_parquet", "info", "list", "list_versions")


def count_requests() -> Counter[str]:
    """Wrap the Storage methods that talk to the store; the counter fills as they are called."""
    calls: Counter[str] = Counter()

    def counted(name, method):
        def call(self, *args, **kwargs):
            calls[name] += 1
            result = method(self, *args, **kwargs)
            if name.startswith("list"):
                calls["listed_keys"] += len(result)
            return result

        return call

    for name in COUNTED:
        setattr(Storage, name, counted(name, getattr(Storage, name)))
    return calls


def child(root: str, what: str) -> None:
    """Run ``status`` or ``plan`` once in this fresh process and print its figures as JSON (imports untimed)."""
    from ps3_engine.pipeline import shard_index
    from ps3_engine.pipeline.config import RunConfig
    from ps3_engine.pipeline.plan import plan_run
    from ps3_engine.pipeline.status import run_status

    calls = count_requests()
    if what == "status-unindexed":
        shard_index.read_index = lambda storage, stage: ({}, [])
    started = time.perf_counter()
    if what.startswith("status"):
        stages = run_status(root)["stages"]
        outcome = {name: f"{s.state} {s.done}/{s.planned}" for name, s in stages.items()}
    else:
        outcome = {p.stage: f"{len(p.recompute)} of {p.shards} to compute" for p in plan_run(RunConfig(run_root=root))}
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": seconds, "peak_rss": peak, "calls": dict(calls), "outcome": outcome}))


def run_child(root: str, what: str) -> dict:
    command = [sys.executable, __file__, "child", "--root", root, "--what", what]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{what} child failed: {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(server, size: int, args: argparse.Namespace) -> dict:
    bucket = f"state-{size}"
    server.client().create_bucket(Bucket=bucket)
    root = f"s3://{bucket}/run"
    started = time.perf_counter()
    run = SyntheticRun(Storage(root), size)
    run.write()
    build_s = time.perf_counter() - started
    logger.info("size %d: %d shards per stage written in %.0f s: %s", size, len(run.shard_items), build_s, run.written)
    result = {"size": size, "shards": len(run.shard_items), "build_s": build_s, "written": run.written}
    for what in ("status", "plan"):
        result[what] = run_child(root, what)
        logger.info("size %d %s: %s", size, what, json.dumps(result[what]))
    if size == args.unindexed_size:
        result["status-unindexed"] = run_child(root, "status-unindexed")
        logger.info("size %d status without the index: %s", size, json.dumps(result["status-unindexed"]))
    return result


def _reads(figures: dict) -> str:
    calls = figures["calls"]
    reads = calls.get("read_bytes", 0) + calls.get("read_parquet", 0) + calls.get("info", 0)
    listings = calls.get("list", 0) + calls.get("list_versions", 0)
    return f"{reads:,} / {listings:,} ({calls.get('listed_keys', 0):,} keys)"


def table(results: list[dict]) -> str:
    lines = [
        "| items | shards per stage | command | wall (s) | growth | peak RSS (GB) | objects read / listings (keys) "
        "| outcome |",
        "|---:|---:|---|---:|---:|---:|---|---|",
    ]
    for i, r in enumerate(results):
        for what in ("status", "plan", "status-unindexed"):
            if what not in r:
                continue
            f = r[what]
            prev = results[i - 1] if i else None
            growth = "-"
            if prev and what in prev:
                growth = f"x{f['seconds'] / prev[what]['seconds']:.2f} for x{r['size'] / prev['size']:.1f}"
            outcome = ", ".join(f"{k} {v}" for k, v in f["outcome"].items())
            name = "status, index ignored" if what == "status-unindexed" else what
            lines.append(
                f"| {r['size']:,} | {r['shards']:,} | {name} | {f['seconds']:.1f} | {growth} "
                f"| {f['peak_rss'] / 1e9:.2f} | {_reads(f)} | {outcome} |"
            )
    lines += ["", "| items | objects written per stage (" + ", ".join(STAGES) + ") | build (s) |", "|---:|---|---:|"]
    for r in results:
        written = ", ".join(f"{r['written'][s]:,}" for s in STAGES)
        lines.append(f"| {r['size']:,} | {written} | {r['build_s']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="status and plan on synthetic finished runs on loopback SeaweedFS")
    bench.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 3_000_000, 10_000_000])
    bench.add_argument("--unindexed-size", type=int, default=1_000_000)
    bench.add_argument("--work-dir", default=None, help="where SeaweedFS keeps its data (default: a temp dir)")
    bench.add_argument("--write-docs", action="store_true")
    one = sub.add_parser("child", help=argparse.SUPPRESS)
    one.add_argument("--root", required=True)
    one.add_argument("--what", required=True)
    args = parser.parse_args(argv)
    if args.command == "child":
        child(args.root, args.what)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from tests.support.seaweed import start_seaweed

    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        server = start_seaweed(Path(tmp) / "seaweed")
        os.environ.update(server.env())  # the children inherit the endpoint and credentials
        try:
            results = [measure(server, size, args) for size in args.sizes]
        finally:
            server.stop()
    report = table(results)
    sys.stdout.write(report + "\n")
    if args.write_docs:
        command = "`.venv/bin/python benchmarks/scale_state.py " + " ".join(argv).replace(" --write-docs", "")
        body = f"Command: {command} --write-docs`\n\n{machine_description()}\n\n{report}\n"
        replace_doc_section(Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md", DOC_TITLE, body)


if __name__ == "__main__":
    main()
