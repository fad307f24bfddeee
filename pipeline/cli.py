"""``ps3-engine``: the stage-level command line of the PS3 data engine.

Run ``ps3-engine --help`` for the commands; ``ps3-engine config show --defaults`` for every config key.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from ps3_engine.pipeline.cli_errors import (
    ShortErrorParser,
    check_overrides,
    describe_config_error,
    storage_error_message,
    yaml_problem,
)
from ps3_engine.pipeline.config import ConfigError, RunConfig, load_run_config
from ps3_engine.pipeline.logs import JsonLogFormatter, attach_run_log, configure_logging, current_run_log
from ps3_engine.pipeline.runner import (
    STAGE_ORDER,
    StageRunResult,
    run_build_corpus,
    run_caption,
    run_crawl,
    run_pipeline,
    run_render,
    run_segment,
)
from ps3_engine.pipeline.status import describe_stage, run_status

logger = logging.getLogger("ps3-engine")
__all__ = ["JsonLogFormatter", "build_parser", "main"]


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="run config YAML (see configs/)")
    parser.add_argument("--run-root", help="local folder or s3://bucket/prefix (overrides the config)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set crawl.min_short_side=2048 (repeatable)",
    )
    parser.add_argument(
        "--executor",
        choices=["ray", "local"],
        help="ray: Ray Data on a local or remote cluster; local: in-process, for debugging",
    )
    parser.add_argument("--ray-address", help="address of a running Ray cluster (default: RAY_ADDRESS or local)")


def _add_pipeline_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", action="append", help="a crawl source (repeatable)")
    parser.add_argument(
        "--force",
        action="append",
        default=[],
        choices=(*STAGE_ORDER, "render"),
        metavar="STAGE",
        help="recompute every shard of STAGE and of the stages after it that its items go through "
        "(build-corpus: images' and pages' rows; render: the PDF pages and their rows) (repeatable)",
    )


def _add_run_root(parser: argparse.ArgumentParser, positional: bool = True) -> None:
    """``RUN`` and/or ``--run-root RUN``: the README gives every command --run-root."""
    if positional:
        parser.add_argument("run", nargs="?", help="run root (local folder or s3://bucket/prefix)")
    parser.add_argument("--run-root", dest="run_root_option", help="run root (same as RUN)")


def _run_root(args: argparse.Namespace) -> str:
    positional, option = getattr(args, "run", None), args.run_root_option
    if positional and option and positional != option:
        raise ConfigError(f"two run roots given ({positional} and --run-root {option}); give one")
    if not (positional or option):
        raise ConfigError(f"{args.command} needs a run root: ps3-engine {args.command} RUN (or --run-root RUN)")
    return positional or option


def _version() -> str:
    try:
        return importlib.metadata.version("ps3-engine")
    except importlib.metadata.PackageNotFoundError:  # running from a checkout that was never installed
        return "unknown (not installed)"


def _load(args: argparse.Namespace, *, run_log: bool = True, **extra: object) -> RunConfig:
    """The resolved run config of a command (file, run snapshot, --set, options); attaches the run log.

    ``run_log=False`` for read-only commands: attaching creates ``<run>/logs/``, so a mistyped run root
    given to ``config show`` or ``plan`` would otherwise leave a folder behind.
    """
    check_overrides(args.overrides)
    overrides = list(args.overrides)
    if args.executor:
        overrides.append(f"executor.kind={args.executor}")
    if args.ray_address:
        overrides.append(f"executor.ray_address={args.ray_address}")
    base = None
    if args.config is None and args.run_root:
        # Continuing a run without --config: start from its snapshot so stage settings stay as they were.
        base = _existing_snapshot(args.run_root)
        if base is not None:
            logger.info("using the config snapshot of %s (run.json); --set overrides apply on top", args.run_root)
    try:
        config = load_run_config(args.config, overrides, base=base, run_root=args.run_root, **extra)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{args.config}: not valid YAML: {yaml_problem(exc)}") from None
    except IsADirectoryError:
        raise ConfigError(f"--config {args.config} is a folder; give a YAML file (see configs/)") from None
    if run_log:
        attach_run_log(config.run_root)
    return config


def _existing_snapshot(run_root: str) -> dict | None:
    from ps3_engine.infra.storage import Storage

    storage = Storage(run_root)
    return storage.read_json("run.json")["config"] if storage.exists("run.json") else None


def _print_results(config: RunConfig, results: list[StageRunResult]) -> int:
    for result in results:
        print(
            f"[{result.stage}] shards: {result.computed_shards} computed, {result.skipped_shards} already done, "
            f"{len(result.failed_shards)} failed (of {result.planned_shards})"
        )
        print(
            f"[{result.stage}] rows: {result.kept_rows} kept, {result.output_rows} written; "
            f"{sum(result.filtered_by_reason.values())} filtered {result.filtered_by_reason}; "
            f"{sum(result.errors_by_reason.values())} failed {result.errors_by_reason}"
        )
        print(
            f"[{result.stage}] wall {result.wall_s:.1f}s, {result.throughput_rows_per_s:.1f} items/s, "
            f"{result.workers} workers {result.busy_fraction:.0%} busy"
        )
        if result.dataset:
            if not result.dataset["counts"]:  # else the summary ends with no dataset line at all
                print("[dataset] no images: every item was filtered or failed (see the reasons above)")
            for split, counts in sorted(result.dataset["counts"].items()):
                print(
                    f"[dataset] {split}: {counts['images']} images, {counts['regions']} (box, caption) pairs, "
                    f"{counts['global_captions']} global captions in {counts['shards']} shards"
                )
            # The two table roots a reader is pointed at (README "Loading the corpus"), not the folder above.
            print(f"[dataset] at {result.dataset['root']} (tables images/ and pairs/, manifest.json)")
    print(f"run root: {config.run_root} (summary.json, run.json)")
    log = current_run_log()
    if log is not None:
        print(f"log: {log}")
    return 1 if any(r.failed_shards for r in results) else 0


@dataclass(frozen=True)
class StageCommand:
    """One stage sub-command: ``ps3-engine NAME [run options] [--input SRC ...] [--force]``."""

    name: str
    runner: Callable[..., StageRunResult]
    help: str
    description: str
    input_field: str | None = None  # the RunConfig list that --input fills
    input_help: str = ""


STAGE_COMMANDS = (
    StageCommand(
        "crawl",
        run_crawl,
        "download and validate images into image shards",
        "Crawl URL lists (.txt/.csv/.parquet with a url column and optional metadata), local folders and S3 "
        "prefixes into validated, deduplicated image shards. Rerunning skips shards that are complete and fresh.",
        "sources",
        "a source: URL list, folder or s3:// prefix (repeatable)",
    ),
    StageCommand(
        "segment",
        run_segment,
        "propose the PS3 salient boxes of each crawled image (SAM2 or classical)",
        "Segment every crawled image (segment.backend: 'sam2' with a checkpoint, or the weight-free "
        "'classical' default), score the candidate box grid with the PS3 rule and keep the top-k "
        "non-overlapping boxes per image.",
    ),
    StageCommand(
        "caption",
        run_caption,
        "caption every region crop (and each image) with a multimodal LLM",
        "Crop every selected box from its full-resolution image and caption it with the paper's "
        "two-image prompt (global image, crop), plus one global caption per image. caption.backend: "
        "'vllm' (GPU, production), 'openai' (any OpenAI-compatible endpoint) or 'transformers' (CPU/GPU). "
        "Outputs are cleaned; empty, truncated, refused and degenerate captions go to the errors table.",
    ),
    StageCommand(
        "render",
        run_render,
        "document branch: rasterise PDF pages and take text-region captions from the text layer or OCR",
        "Render the PDFs of URL lists, folders or S3 prefixes at render.dpi (paper: 150) with page "
        "count/size caps, and turn their text into (box, caption) pairs: sentences and runs of 15 consecutive "
        "words, boxes in rendered-page pixels; tesseract OCR for pages without a text layer. build-corpus "
        "then adds the pages to the corpus with source_type 'document' (no global caption).",
        "document_sources",
        "a PDF source: list, folder or s3:// prefix (repeatable)",
    ),
    StageCommand(
        "build-corpus",
        run_build_corpus,
        "write training-ready corpus shards (image + boxes + captions)",
        "Join images, boxes and cleaned captions into one row per image, split train/validation "
        "by image hash, pack into Parquet shards of about corpus.target_shard_bytes under <run>/dataset/, "
        "with a flat (box, caption) pairs view and dataset/manifest.json (counts, sources, fingerprints).",
    ),
)


def cmd_stage(args: argparse.Namespace) -> int:
    """Run one stage over a run root (the command's row of STAGE_COMMANDS says which)."""
    command: StageCommand = args.stage_command
    if getattr(args, "retry_failed", None):
        check_overrides(args.overrides)
        config = load_run_config(None, list(args.overrides), **_snapshot_config(args.retry_failed))
        attach_run_log(config.run_root)
        result = run_crawl(config, retry_failed=True)
        if not (result.computed_shards or result.failed_shards):  # a retried shard is one or the other
            print(f"[crawl] nothing to retry: {config.run_root} records no transient failure (5xx, 429, timeouts)")
            return 0
        return _print_results(config, [result])
    fields = {command.input_field: args.input or None} if command.input_field else {}
    config = _load(args, **fields)
    return _print_results(config, [command.runner(config, force=args.force)])


def _add_stage_commands(sub: argparse._SubParsersAction) -> None:
    for command in STAGE_COMMANDS:
        parser = sub.add_parser(command.name, help=command.help, description=command.description)
        _add_run_options(parser)
        if command.input_field:
            parser.add_argument("--input", action="append", help=command.input_help)
        if command.name == "crawl":
            parser.add_argument(
                "--retry-failed", metavar="RUN", help="retry only the items of RUN whose recorded failure is transient"
            )
        parser.add_argument("--force", action="store_true", help="recompute every shard of this stage")
        parser.set_defaults(func=cmd_stage, stage_command=command)


def _snapshot_config(run_root: str) -> dict:
    from ps3_engine.infra.storage import Storage

    storage = Storage(run_root)
    if not storage.exists("run.json"):
        raise ConfigError(f"{run_root} has no run.json: is it a run root?")
    return {**storage.read_json("run.json")["config"], "run_root": run_root}


def cmd_run(args: argparse.Namespace) -> int:
    config = _load(args, sources=args.input or None, document_sources=args.documents or None)
    return _print_results(config, run_pipeline(config, force=frozenset(args.force)))


def cmd_plan(args: argparse.Namespace) -> int:
    from ps3_engine.pipeline.plan import plan_run

    config = _load(args, run_log=False, sources=args.input or None)
    plans = plan_run(config, force=frozenset(args.force))
    if args.json:
        found = {
            p.stage: {"shards": p.shards, "recompute": p.recompute, **({"note": p.note} if p.note else {})}
            for p in plans
        }
        print(json.dumps(found, indent=2))
        return 0
    print(f"run root: {config.run_root}")
    for plan in plans:
        note = f" ({plan.note})" if plan.note else ""
        print(f"  {plan.stage:13s} {len(plan.recompute)} of {plan.shards} shards to compute {plan.reasons}{note}")
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    from ps3_engine.infra.storage import Storage
    from ps3_engine.pipeline.layout import RunLayout
    from ps3_engine.pipeline.lineage import trace_region

    try:
        trace = trace_region(RunLayout(Storage(_run_root(args))), args.region_id)
    except KeyError as exc:
        print(f"ps3-engine: error: {exc.args[0]}", file=sys.stderr)
        return 2
    print(json.dumps(trace, indent=2, default=str))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    run_root = _run_root(args)
    if args.check:
        return _check(run_root)
    status = run_status(run_root)
    if args.json:
        print(
            json.dumps(
                {k: (v.__dict__ if hasattr(v, "__dict__") else v) for k, v in status["stages"].items()}, indent=2
            )
        )
        return 0
    print(f"run root: {run_root}")
    for stage in STAGE_ORDER:
        if stage == "build-corpus" and "render" in status["stages"]:  # the document branch, where it ran
            print(f"  {'render':13s} " + describe_stage(status["stages"]["render"]))
        entry = status["stages"].get(stage)
        print(f"  {stage:13s} " + (describe_stage(entry) if entry is not None else "not run"))
    return 0


def _check(run_root: str) -> int:
    from ps3_engine.infra.storage import Storage, StorageError
    from ps3_engine.pipeline.conservation import check_run
    from ps3_engine.pipeline.layout import RunLayout
    from ps3_engine.pipeline.verify import verify_run

    storage = Storage(run_root)
    if not storage.exists("run.json"):
        raise FileNotFoundError(f"{run_root} is not a run root (no run.json)")
    global_captions = storage.read_json("run.json")["config"].get("caption", {}).get("global_captions", True)
    damaged = verify_run(RunLayout(storage))
    for gap in damaged:
        print(f"DAMAGED {gap.examples[0]}")
    try:
        gaps = check_run(RunLayout(storage), global_captions=global_captions)
    except StorageError as exc:  # an unreadable file: listed above; a rerun of the stages recomputes it
        print(f"conservation not checked: {exc}")
        gaps = []
    # Stale shards (their input changed since they were computed) and pending ones (not computed yet, their
    # upstream is new) wait for a rerun: nothing is lost, so they are listed apart and do not fail the
    # check; before, a stale shard's items were reported as lost, a pending shard as a missing shard.
    waiting = [gap for gap in gaps if gap.problem in ("stale", "pending")]
    gaps = [gap for gap in gaps if gap.problem not in ("stale", "pending")]
    for gap in waiting:
        print(f"{gap.problem.upper()} {gap.describe()}")
    for gap in gaps:
        print(f"GAP {gap.describe()}")
    if damaged:
        print(f"{len(damaged)} damaged files: rerun the stages that wrote them to recompute those shards")
    problems = f"{len(gaps)} gaps" + (f", {len(damaged)} damaged files" if damaged else "")
    verdict = "OK" if not (gaps or damaged) else problems
    if waiting:
        stale = sum(gap.problem == "stale" for gap in waiting)
        counts = [f"{stale} stale {_shards(stale)} not checked"] if stale else []
        if len(waiting) > stale:
            counts.append(f"{len(waiting) - stale} {_shards(len(waiting) - stale)} not computed yet")
        reruns = ", ".join(dict.fromkeys(gap.examples[0].removeprefix("rerun ") for gap in waiting))
        verdict += f"; {', '.join(counts)} (rerun {reruns})"
    print(f"conservation check of {run_root}: {verdict}")
    return 1 if gaps or damaged else 0


def _shards(count: int) -> str:
    return "shard" if count == 1 else "shards"


def cmd_submit(args: argparse.Namespace) -> int:
    from ps3_engine.pipeline.submit import run_submit

    command = args.command_args[1:] if args.command_args[:1] == ["--"] else args.command_args
    return run_submit(
        args.address,
        command,
        working_dir=args.working_dir,
        image=getattr(args, "image", None),
        forward_credentials=args.forward_credentials,
        follow=not getattr(args, "no_follow", False),
        wait=not args.no_wait,
        timeout_s=args.timeout,
    )


def _recipe_overrides(args: argparse.Namespace) -> dict:
    import yaml

    overrides = {}
    for override in args.overrides:
        if "=" not in override:
            raise ConfigError(f"override {override!r} is not of the form key=value")
        key, value = override.split("=", 1)
        overrides[key.strip()] = yaml.safe_load(value)
    if args.tokenizer:
        overrides["tokenizer"] = args.tokenizer
    return overrides


def cmd_train(args: argparse.Namespace) -> int:
    if args.job == "vila-hd":
        return _train_vila_hd(args)
    from ps3_engine.infra.storage import S3Settings
    from ps3_engine.training.ps3.recipes import load_recipe
    from ps3_engine.training.ps3.train import CorpusRejected, launch

    recipe = load_recipe(args.recipe, _recipe_overrides(args))
    if recipe.tokenizer is None and recipe.model.pretrained is None:
        from ps3_engine.training.ps3.tokenizer import build_tiny_text_tokenizer

        cache = Path(os.environ.get("PS3_CACHE", "~/.cache/ps3-engine")).expanduser() / "tiny-text-tokenizer"
        recipe = recipe.model_copy(update={"tokenizer": str(build_tiny_text_tokenizer(cache))})
    try:
        result = launch(args.corpus, recipe, args.storage_path, args.name or recipe.name, S3Settings())
    except CorpusRejected as exc:
        print(f"ps3-engine: error: {exc}", file=sys.stderr)
        return 2
    print(
        f"[train ps3] {result.run_name}: {result.steps} steps, loss {result.metrics.get('total', float('nan')):.4f}; "
        f"checkpoint {result.checkpoint_path}"
    )
    return 0


def _train_vila_hd(args: argparse.Namespace) -> int:
    from ps3_engine.infra.storage import S3Settings
    from ps3_engine.training.vila_hd.recipes import load_recipe
    from ps3_engine.training.vila_hd.train import DataRejected, launch

    recipe = load_recipe(args.recipe, _recipe_overrides(args))
    try:
        result = launch(args.corpus, recipe, args.storage_path, args.name or f"vila-hd-{recipe.name}", S3Settings())
    except DataRejected as exc:
        print(f"ps3-engine: error: {exc}", file=sys.stderr)
        return 2
    print(
        f"[train vila-hd] {result.run_name}: {result.steps} steps, "
        f"loss {result.metrics.get('loss', float('nan')):.4f}; checkpoint {result.checkpoint_path}"
    )
    return 0


def cmd_infer(args: argparse.Namespace) -> int:
    from ps3_engine.infra.storage import S3Settings
    from ps3_engine.training.vila_hd.infer import answer

    result = answer(
        args.image,
        args.question,
        args.checkpoint,
        num_select=args.num_select,
        num_look_close=args.num_look_close,
        look_close_mode=args.look_close_mode,
        max_new_tokens=args.max_new_tokens,
        s3=S3Settings(),
        device=args.device,
    )
    print(
        f"[infer vila-hd] {result.num_selected_patches} high-res patches, {result.num_vision_tokens} vision "
        f"tokens: {result.answer}"
    )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from ps3_engine.pipeline.report import build_report, write_report

    run_root = _run_root(args)
    options = {"samples": args.samples, "errors_per_reason": args.errors_per_reason}
    if args.out:
        Path(args.out).write_text(build_report(run_root, **options))
        print(f"report: {args.out}")
    else:
        print(f"report: {write_report(run_root, **options)}")
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    """Print the resolved config (or the defaults) as YAML, every key included."""
    if args.defaults:
        # run_root has no default; a placeholder lets the rest validate, and the output says so.
        data = RunConfig.model_validate({"run_root": "RUN_ROOT"}).model_dump(mode="json")
        data["run_root"] = None
        print("# ps3-engine defaults; run_root is required (--run-root or run_root in the config file)")
    else:
        data = _load(args, run_log=False).model_dump(mode="json")
    print(yaml.safe_dump(data, sort_keys=False, default_flow_style=False), end="")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ps3_engine.pipeline.demo import run_demo

    check_overrides(args.overrides)
    attach_run_log(str(Path(args.out).resolve() / "run"))  # where run_demo puts its run root
    config, results = run_demo(Path(args.out), args.images, args.executor or "ray", args.overrides)
    status = _print_results(config, results)
    images = sum(counts["images"] for r in results if r.dataset for counts in r.dataset["counts"].values())
    if images == 0:
        # The demo's inputs are fixed: an empty dataset means the engine is broken here, not the data.
        print("error: the demo built an empty dataset: every image was filtered or failed (counts above)")
        return 1
    return status


def cmd_export(args: argparse.Namespace) -> int:
    from ps3_engine.pipeline.export import export_webdataset

    # S3 endpoint and region come from the environment (AWS_ENDPOINT_URL_S3, AWS_REGION).
    result = export_webdataset(args.run, args.out, split=args.split, samples_per_shard=args.samples_per_shard)
    manifest = result.manifest
    print(f"export: {result.samples} images in {len(result.shards)} shard pairs, {len(result.skipped)} skipped")
    print(f"  --train-data-image {manifest['train_data_image']}")
    print(f"  --train-data-text-box {manifest['train_data_text_box']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = ShortErrorParser(
        prog="ps3-engine",
        description="PS3 data engine: crawl high-res images, segment salient regions, caption them, "
        "and build the region-caption corpus, as Ray Data stages over a local or S3 run root.",
    )
    parser.add_argument("--version", action="version", version=f"ps3-engine {_version()}")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="debug logging, and Ray's own log lines on the console"
    )
    parser.add_argument(
        "--log-format",
        choices=["text", "json"],
        default=os.environ.get("PS3_LOG_FORMAT", "text"),
        help="json: one JSON object per log line (for log collectors on a cluster); env PS3_LOG_FORMAT",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_stage_commands(sub)

    run = sub.add_parser(
        "run",
        help="run all stages in order (crawl -> segment -> caption -> build-corpus)",
        description="Run every stage in order over one run root; complete and fresh shards "
        "are skipped, so rerunning after a crash only computes what is missing or stale.",
    )
    _add_run_options(run)
    _add_pipeline_options(run)
    run.add_argument("--documents", action="append", help="a PDF source for the document branch (repeatable)")
    run.set_defaults(func=cmd_run)

    plan = sub.add_parser(
        "plan",
        help="show what a rerun would recompute and why, without running anything",
        description="For the given config (default: the run's snapshot), list per stage how many shards a "
        "rerun would compute and why: missing, config changed, input changed, upstream shard recomputes, forced.",
    )
    _add_run_options(plan)
    _add_pipeline_options(plan)
    plan.add_argument("--json", action="store_true", help="machine-readable output, per shard")
    plan.set_defaults(func=cmd_plan)

    trace = sub.add_parser(
        "trace",
        help="lineage of a region: caption, segment and crawl rows back to the source URL",
        description="Print (JSON) a region's box, its image's source URL and licence, its captions with model, "
        "prompt version and sampling, its corpus split and dataset shard, and each step's config fingerprint.",
    )
    trace.add_argument("region_id")
    _add_run_root(trace, positional=False)
    trace.set_defaults(func=cmd_trace)

    status = sub.add_parser(
        "status",
        help="per-stage shards done/stale/missing/failed, rows and errors",
        description="Show what a run root holds, read from its manifests and in-progress records: per stage "
        "done, running, partial, interrupted, stale, failed or not run.",
    )
    _add_run_root(status)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument(
        "--check",
        action="store_true",
        help="verify that every item entering each stage is in its output or errors table exactly once; "
        "exit 1 on any gap (shards whose input changed since they were computed are listed as STALE, "
        "shards whose upstream is new as PENDING: both wait for a rerun and are not checked)",
    )
    status.set_defaults(func=cmd_status)

    report = sub.add_parser(
        "report",
        help="an HTML report of a run: sample images with boxes, crops with captions, distributions",
        description="Render a self-contained HTML page (embedded thumbnails and SVG plots) to "
        "<run>/report/index.html, or to --out.",
    )
    _add_run_root(report)
    report.add_argument("--out", help="write the page to this local file instead of the run root")
    report.add_argument("--samples", type=int, default=6, help="number of sample images")
    report.add_argument("--errors-per-reason", type=int, default=5, help="failed/filtered items listed per reason")
    report.set_defaults(func=cmd_report)

    config = sub.add_parser(
        "config",
        help="show the resolved run config with every key, or the defaults",
        description="'config show' prints the config a command with the same options would run with "
        "(--config file, the run's snapshot, --set overrides), every key included; --defaults prints the "
        "built-in defaults.",
    )
    actions = config.add_subparsers(dest="config_action", required=True, metavar="ACTION")
    show = actions.add_parser("show", help="print the resolved config as YAML")
    _add_run_options(show)
    show.add_argument("--defaults", action="store_true", help="the built-in defaults (ignores the other options)")
    show.set_defaults(func=cmd_config_show)

    submit = sub.add_parser(
        "submit",
        help="run a ps3-engine command on a Ray cluster through the job API",
        description="Submit 'ps3-engine ARGS...' as a Ray job with this directory as working_dir (virtualenvs, "
        "run outputs and caches excluded) and the S3 endpoint/region environment; credentials are only "
        "forwarded with --forward-credentials. Example: ps3-engine submit --address http://HEAD:8265 -- "
        "run --config configs/production.yaml",
    )
    submit.add_argument("--address", default=None, help="Ray dashboard address (default: RAY_ADDRESS)")
    submit.add_argument("--working-dir", default=".")
    submit.add_argument("--forward-credentials", action="store_true", help="also send AWS_* credentials")
    submit.add_argument("--no-wait", action="store_true", help="return after submitting")
    submit.add_argument("--no-follow", action="store_true", help="wait for the job without streaming its log")
    submit.add_argument(
        "--image", help="run the job in this container image (Ray's image_uri; default: the nodes' own image)"
    )
    submit.add_argument("--timeout", type=float, default=None, help="stop the job after this many seconds")
    submit.add_argument("command_args", nargs=argparse.REMAINDER, help="-- then the ps3-engine arguments")
    submit.set_defaults(func=cmd_submit)

    train = sub.add_parser(
        "train",
        help="launch a training job on corpus shards with Ray Train (ps3)",
        description="Pre-train PS3 on the corpus of a run root (its dataset/ written by build-corpus, local or S3). "
        "The corpus manifest is checked before any worker starts; checkpoints go to --storage-path and a "
        "relaunch with the same --name resumes from the latest one.",
    )
    train.add_argument("job", choices=["ps3", "vila-hd"], help="which model to train")
    train.add_argument(
        "--corpus",
        "--data",
        dest="corpus",
        required=True,
        help="ps3: run root holding dataset/; vila-hd: an SFT dataset or such a corpus root (local or s3://)",
    )
    train.add_argument("--recipe", default="debug", help="ps3: debug | paper-1.5k; vila-hd: debug | align | full")
    train.add_argument("--storage-path", default="runs/training", help="checkpoints and results (local or s3://)")
    train.add_argument("--name", help="run name (default: the recipe name); the same name resumes")
    train.add_argument("--tokenizer", help="tokenizer folder (default: the model's pretrained path)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    train.set_defaults(func=cmd_train)

    infer = sub.add_parser(
        "infer",
        help="answer a question about an image with a trained VILA-HD checkpoint",
        description="Top-down selection driven by the question, with a chosen high-res token budget.",
    )
    infer.add_argument("job", choices=["vila-hd"])
    infer.add_argument("--image", required=True)
    infer.add_argument("--question", required=True)
    infer.add_argument("--checkpoint", help="training checkpoint folder (local or s3://); default: tiny random model")
    budget = infer.add_mutually_exclusive_group()
    budget.add_argument("--num-select", type=int, help="high-res patches to select")
    budget.add_argument("--num-look-close", type=int, help="selection rounds of the model's budget each")
    infer.add_argument("--look-close-mode", choices=["after_prompt", "after_image"])
    infer.add_argument("--max-new-tokens", type=int, default=64)
    infer.add_argument("--device", default="cpu")
    infer.set_defaults(func=cmd_infer)

    export = sub.add_parser(
        "export",
        help="write the corpus in another trainer's format",
        description="webdataset: the two parallel WebDatasets NVlabs/PS3's training code reads "
        "(OUT/images/image_XXXXX.tar of NNNNNNNN.jpg, OUT/text_boxes/text_box_XXXXX.tar of NNNNNNNN.json).",
    )
    export.add_argument("format", choices=["webdataset"])
    export.add_argument("run", metavar="RUN", help="run root holding dataset/ (local or s3://)")
    export.add_argument("out", metavar="OUT", help="output folder (local or s3://)")
    export.add_argument("--split", default="train", choices=["train", "validation"], help="(default: %(default)s)")
    export.add_argument("--samples-per-shard", type=int, default=10_000, help="(default: %(default)s)")
    export.set_defaults(func=cmd_export)

    demo = sub.add_parser(
        "demo",
        help="the embedded default job: generated images, loopback HTTP, local Ray",
        description="Generate sample high-res images plus bad inputs, serve them on loopback "
        "and run the pipeline on them with a local Ray.",
    )
    demo.add_argument("--out", default="demo-output", help="folder for the site, URL list and run root")
    demo.add_argument("--images", type=int, default=24, help="number of generated images")
    demo.add_argument("--executor", choices=["ray", "local"])
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    demo.set_defaults(func=cmd_demo)
    return parser


def _first_lines(text: str, limit: int = 2) -> str:
    """At most ``limit`` lines of a message (the run log has the rest)."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return "\n".join(lines[:limit]) + (" ..." if len(lines) > limit else "")


def _run(args: argparse.Namespace) -> int:
    try:
        code = args.func(args)
        sys.stdout.flush()  # inside the try: a closed pipe shows up here, not at interpreter exit
        return code
    except BrokenPipeError:
        # The reader went away (ps3-engine status R | head -1): not an error. Python's docs: point stdout
        # at devnull so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except ConfigError as exc:
        print(f"ps3-engine: error: {_first_lines(describe_config_error(exc))}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as exc:
        print(f"ps3-engine: error: {_first_lines(str(exc))}", file=sys.stderr)
        return 2
    except OSError as exc:
        logger.debug("storage failure", exc_info=True)
        log = current_run_log()
        print(f"ps3-engine: {_first_lines(storage_error_message(exc))}", file=sys.stderr)
        if log is not None:
            print(f"ps3-engine: details in {log}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ps3-engine: interrupted; rerun the same command to continue (finished shards are kept)", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ps3-engine`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose, args.log_format)
    return _run(args)


if __name__ == "__main__":
    sys.exit(main())
