"""The ps3-engine command line: help, stage sub-commands, crawl + status, clear config errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from ps3_engine.pipeline.cli import build_parser, main
from tests.support.zoo import ZOO_CRAWL_OVERRIDES


def test_help_lists_every_command():
    text = build_parser().format_help()
    for command in ("crawl", "segment", "caption", "build-corpus", "run", "status", "demo"):
        assert command in text


def test_console_script_help_runs():
    result = subprocess.run(
        [sys.executable, "-m", "ps3_engine.pipeline.cli", "crawl", "--help"], capture_output=True, text=True, check=True
    )
    assert "--retry-failed" in result.stdout and "--input" in result.stdout


@pytest.mark.parametrize(
    ("command", "needs"), [("segment", "crawl"), ("caption", "segment"), ("build-corpus", "caption")]
)
def test_a_stage_without_its_input_is_a_clear_error(command, needs, capsys, tmp_path):
    assert main([command, "--run-root", str(tmp_path), "--executor", "local"]) == 2
    assert f"run 'ps3-engine {needs}' first" in capsys.readouterr().err


def test_invalid_config_is_a_clear_error(capsys, tmp_path):
    code = main(["crawl", "--run-root", str(tmp_path), "--input", "x.txt", "--set", "crawl.min_short_side=-5"])
    assert code == 2
    assert "min_short_side" in capsys.readouterr().err


def test_crawl_then_status_then_rerun(zoo, tmp_path, capsys):
    urls = tmp_path / "urls.txt"
    urls.write_text("\n".join(zoo.url(p) for p in ("/good/0.jpg", "/good/1.jpg", "/small.jpg", "/missing.jpg")))
    run_root = str(tmp_path / "run")
    argv = [
        "crawl",
        "--run-root",
        run_root,
        "--input",
        str(urls),
        "--executor",
        "local",
        *[arg for override in ZOO_CRAWL_OVERRIDES for arg in ("--set", override)],
        "--set",
        "executor.progress=false",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "1 computed" in out and "2 kept" in out and "'too_small': 1" in out and "'http_404': 1" in out
    assert main(["status", run_root, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["crawl"]["done"] == 1 and status["crawl"]["rows"] == 2 and status["crawl"]["error_rows"] == 2
    assert status["crawl"]["state"] == "done"
    assert main(["status", "--run-root", run_root]) == 0  # the README's spelling works too
    assert "crawl         done" in capsys.readouterr().out
    assert (tmp_path / "run" / "logs" / "ps3-engine.log").is_file()
    assert main(argv) == 0
    assert "0 computed, 1 already done" in capsys.readouterr().out
    assert main(["crawl", "--retry-failed", run_root, "--set", "executor.kind=local"]) == 0
    assert "nothing to retry" in capsys.readouterr().out  # 404 and too_small are not transient


def test_status_of_a_non_run_is_an_error(tmp_path, capsys):
    assert main(["status", str(tmp_path)]) == 2
    assert "not a run root" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["local.yaml", "production.yaml"])
def test_example_configs_validate(name):
    from pathlib import Path

    from ps3_engine.pipeline.config import load_run_config

    config = load_run_config(Path(__file__).resolve().parents[2] / "configs" / name)
    assert config.run_root and config.caption.prompts.version == "ps3-v1"
    assert (config.segment.backend, config.caption.backend) in {("classical", "transformers"), ("sam2", "vllm")}


def test_version_and_config_show(capsys):
    from ps3_engine.pipeline.cli_errors import config_keys

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("ps3-engine ")
    assert main(["config", "show", "--defaults"]) == 0
    defaults = yaml.safe_load(capsys.readouterr().out)
    for key in config_keys():  # every key of every section, nested ones included
        node = defaults
        for part in key.split("."):
            node = node[part]
    assert defaults["run_root"] is None and defaults["crawl"]["min_short_side"] > 0
    assert main(["config", "show", "--run-root", "/tmp/r", "--set", "crawl.min_short_side=777"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["run_root"] == "/tmp/r" and resolved["crawl"]["min_short_side"] == 777


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["crawl", "--run-root", "R", "--set", "crawl.min_shrot_side=3"], "did you mean 'crawl.min_short_side'?"),
        (["crawl", "--input", "x.txt"], "no run root: pass --run-root"),
        (["crawl", "--run-root", "R", "--set", "crawl.min_short_side=[1,"], "is not valid YAML"),
        (["crawl", "--run-root", "R", "--set", "crawl.min_short_side=abc"], "crawl.min_short_side: Input should be"),
        (["crawl", "--run-root", "R", "--set", "crawl"], "is not of the form KEY=VALUE"),
        (["status"], "status needs a run root"),
        (["report"], "report needs a run root"),
        (["status", "A", "--run-root", "B"], "two run roots given"),
        (["config", "show", "--config", "BAD_YAML"], "not valid YAML: expected ',' or ']'"),
    ],
)
def test_user_errors_are_one_or_two_lines(argv, expected, capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("crawl: [1,\nsegment: 2\n")
    argv = [str(bad) if a == "BAD_YAML" else str(tmp_path / a) if a in ("R", "A", "B") else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) <= 2, err
    assert "Traceback" not in err and "pydantic" not in err and "For further information" not in err


def test_argparse_errors_are_two_lines(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["crawl", "--no-such-option"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 2 and "unrecognized" in err


def test_a_closed_stdout_pipe_is_not_an_error():
    # The reader closes the pipe before the command writes (what `ps3-engine ... | head -1` does).
    process = subprocess.Popen(
        [sys.executable, "-m", "ps3_engine.pipeline.cli", "config", "show", "--defaults"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    process.stdout.close()
    err = process.stderr.read().decode()
    process.wait(timeout=60)
    assert err == "", err


def test_storage_errors_advise_a_rerun_only_when_it_can_help():
    import errno

    from ps3_engine.pipeline.cli_errors import storage_error_message

    denied = storage_error_message(PermissionError(errno.EACCES, "Permission denied", "/data/run/run.json"))
    assert "/data/run/run.json" in denied and "rerun" not in denied
    full = storage_error_message(OSError(errno.ENOSPC, "No space left on device", "/data/run/crawl/x.parquet"))
    assert "/data/run/crawl/x.parquet" in full and "free some space" in full
    try:
        try:
            raise ConnectionError("Connection refused")
        except ConnectionError as cause:
            raise OSError("could not read Parquet s3://b/run/crawl/part-1.parquet") from cause
    except OSError as exc:
        network = storage_error_message(exc)
    assert "s3://b/run/crawl/part-1.parquet" in network and "rerun the same command" in network


def test_stage_commands_come_from_one_table():
    from ps3_engine.pipeline.cli import STAGE_COMMANDS

    parser = build_parser()
    for command in STAGE_COMMANDS:
        args = parser.parse_args([command.name, "--run-root", "R", "--force"])
        assert args.stage_command is command and args.force is True
        assert hasattr(args, "input") == (command.input_field is not None)


def test_json_log_format_emits_one_object_per_line(capsys, tmp_path):
    import logging

    from ps3_engine.pipeline.cli import JsonLogFormatter

    record = logging.LogRecord("ps3", logging.WARNING, __file__, 1, "shard %s failed", ("s1",), None)
    line = json.loads(JsonLogFormatter().format(record))
    assert line["level"] == "WARNING" and line["message"] == "shard s1 failed" and line["logger"] == "ps3"


def test_a_demo_that_builds_an_empty_dataset_fails_with_one_line(tmp_path, capsys):
    """The demo's inputs are fixed, so an empty dataset means a broken engine: exit 1, not a quiet 0."""
    argv = ["demo", "--out", str(tmp_path / "demo"), "--images", "2", "--executor", "local"]
    # Every generated scene is 2400x1600: a 5000-pixel floor filters them all at the crawl.
    argv += ["--set", "crawl.min_short_side=5000", "--set", "executor.progress=false"]
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "error: the demo built an empty dataset" in out
    assert "'too_small': 4" in out  # the 2 scenes, the small bad input and the scene's copy
