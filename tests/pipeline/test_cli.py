"""The ps3-engine command line: help, stage sub-commands, crawl + status, clear config errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

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
    assert main(argv) == 0
    assert "0 computed, 1 already done" in capsys.readouterr().out
    assert main(["crawl", "--retry-failed", run_root, "--set", "executor.kind=local"]) == 0
    assert "0 computed" in capsys.readouterr().out  # 404 and too_small are not transient


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


def test_json_log_format_emits_one_object_per_line(capsys, tmp_path):
    import logging

    from ps3_engine.pipeline.cli import JsonLogFormatter

    record = logging.LogRecord("ps3", logging.WARNING, __file__, 1, "shard %s failed", ("s1",), None)
    line = json.loads(JsonLogFormatter().format(record))
    assert line["level"] == "WARNING" and line["message"] == "shard s1 failed" and line["logger"] == "ps3"
