"""The README's first command, as a newcomer runs it: a fresh clone, a fresh ``.venv``, no terminal.

Clones the committed HEAD of this checkout (uncommitted edits are not what a newcomer gets), runs the
first command of the README's "Set-up" block there with ``CI=true`` and stdin closed, and checks the
dataset it reports. pip takes packages from whatever index this machine's pip configuration names (a
local mirror is fine); nothing is shared with the development ``.venv``. The second README command
(``bash scripts/test.sh``) is the suite this test belongs to.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]
# The environment as the suite was started (taken at collection, before any session fixture ran): the
# suite later exports its test S3 server's settings and others, which a newcomer's shell does not have.
LAUNCH_ENV = dict(os.environ)
# What scripts/setup.sh's `models` install takes on disk (7.1 GB measured) plus room for the demo's run.
FRESH_VENV_BYTES = 8 * 10**9


def readme_setup_commands() -> list[str]:
    """The commands of the first fenced block under the README's "Set-up" heading, comments stripped."""
    readme = (ROOT / "README.md").read_text()
    section = re.search(r"^## Set-up.*?^```\w*\n(.*?)^```", readme, flags=re.MULTILINE | re.DOTALL)
    assert section, "README.md has no '## Set-up' section with a code block"
    lines = (line.split("#", 1)[0].strip() for line in section.group(1).splitlines())
    return [line for line in lines if line]


def test_readme_names_the_demo_and_the_test_command_in_that_order():
    assert readme_setup_commands() == ["bash scripts/demo.sh", "bash scripts/test.sh"]
    assert (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1] == "exec bash scripts/test.sh"


def _dataset_root(output: str, clone: Path) -> Path:
    """Where the run says its dataset is (a path relative to the clone when it is not absolute)."""
    found = re.findall(r"\[dataset\] at (\S+)", output) or [
        f"{root}/dataset" for root in re.findall(r"run root: (\S+)", output)
    ]
    assert found, f"the demo did not report its dataset:\n{output[-4000:]}"
    path = Path(found[-1])
    return path if path.is_absolute() else clone / path


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_readme_first_command_works_in_a_fresh_clone(tmp_path):
    # A newcomer's machine has room for one fresh .venv (torch with its CUDA libraries, measured 7.1 GB); a
    # machine without it would fail minutes later deep in pip's output, so say so up front instead.
    free = shutil.disk_usage(tmp_path).free
    if free < FRESH_VENV_BYTES:
        pytest.skip(f"a fresh .venv needs about {FRESH_VENV_BYTES / 1e9:.0f} GB free; {free / 1e9:.1f} GB free here")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True, timeout=300)
    env = {k: v for k, v in LAUNCH_ENV.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "RAY_ADDRESS")}
    # RAY_ADDRESS=local: a new machine has no Ray running, but inside the suite a cluster started by an
    # earlier test (`ray start`) would otherwise be joined, with that cluster's environment and code.
    env.update(CI="true", PATH=_path_without_venvs(env.get("PATH", "")), RAY_ADDRESS="local")
    command = readme_setup_commands()[0]
    began = time.monotonic()
    try:
        result = subprocess.run(
            shlex.split(command),
            cwd=clone,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=2200,
            check=False,
        )
        output = result.stdout + result.stderr
        assert result.returncode == 0, (
            f"{command} failed ({result.returncode}):\n{output[-4000:]}\n{_summary(output)}\n"
            f"{_error_messages(clone / 'demo-output' / 'run')}"
        )
        dataset = _dataset_root(output, clone)
        manifest = dataset / "manifest.json"
        assert manifest.is_file(), f"no manifest at {manifest}"
        parquet = sorted(dataset.rglob("*.parquet"))
        rows = sum(pq.read_metadata(path).num_rows for path in parquet)
        assert rows > 0, f"no rows under {dataset}:\n{_summary(output)}\n{_error_messages(dataset.parent)}"
        noisy = [line for line in output.splitlines() if _is_ray_or_error_line(line)]
        assert not noisy, "the demo's console shows Ray log lines or error-level lines:\n" + "\n".join(noisy[:10])
        # Without a terminal (CI, a cluster job's log) progress is plain lines: no redraws, no cursor moves.
        redraws = [line for line in output.split("\n") if "\r" in line or "\x1b[" in line]
        assert not redraws, "the demo's console redraws in a log:\n" + "\n".join(map(repr, redraws[:5]))
        print(f"{command} in a fresh clone: {time.monotonic() - began:.0f} s, {rows} rows in {len(parquet)} files")
    finally:
        # A fresh .venv holds several GB (torch); pytest keeps the last tmp dirs, so drop it now.
        shutil.rmtree(clone / ".venv", ignore_errors=True)


# Ray's own console lines: worker/raylet prefixes such as "(raylet)" or "(MapBatches pid=123)", and its
# logger format "<date> <time> INFO worker.py:1234 -- ...". Ours are "<date> <time> INFO ps3_engine...: ...".
_RAY_LINE = re.compile(r"\((raylet|[\w()]*\s?pid=\d+)[^)]*\)|\s(INFO|WARNING|ERROR)\s+\w+\.py:\d+ -- ")
_ERROR_LINE = re.compile(r"\s(ERROR|CRITICAL)\s|Traceback \(most recent call last\)")


def _is_ray_or_error_line(line: str) -> bool:
    return bool(_RAY_LINE.search(line) or _ERROR_LINE.search(line))


def test_console_line_filter_recognises_ray_lines_and_errors():
    assert _is_ray_or_error_line("\x1b[33m(raylet)\x1b[0m It looks like you're creating a detached actor")
    assert _is_ray_or_error_line("(MapBatches(_run_tasks_once) pid=17893) hello")
    assert _is_ray_or_error_line("2026-12-01 00:13:25,761\tINFO worker.py:2012 -- Started a local Ray instance.")
    assert _is_ray_or_error_line("2026-12-01 00:13:25,761 ERROR ps3_engine.pipeline.runner: shard failed")
    assert not _is_ray_or_error_line("2026-12-01 00:13:25,761 INFO ps3_engine.pipeline.runner: corpus: 4 shards")
    assert not _is_ray_or_error_line("[crawl] rows: 24 kept; 4 failed {'truncated': 1}, errors=0")


def _summary(output: str) -> str:
    """The run's own summary lines ("[crawl] rows: ..."), wherever the tail cut them off."""
    return "\n".join(line for line in output.splitlines() if line.startswith("["))


def _error_messages(run_root: Path, limit: int = 8) -> str:
    """The first distinct (stage, reason, message) of the run's error rows: what a failed demo hit."""
    seen: dict[tuple, None] = {}
    for path in sorted(run_root.glob("*/errors/*.parquet")):
        for row in pq.read_table(path, columns=["stage", "reason", "message"]).to_pylist():
            seen.setdefault((row["stage"], row["reason"], row["message"][:300]))
    return "\n".join(" | ".join(key) for key in list(seen)[:limit])


def _path_without_venvs(path: str) -> str:
    """PATH minus virtualenv bin folders, so the clone's scripts cannot pick up the caller's tools."""
    return os.pathsep.join(p for p in path.split(os.pathsep) if not (Path(p).parent / "pyvenv.cfg").exists())
