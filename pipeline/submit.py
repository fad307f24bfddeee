"""``ps3-engine submit``: send a ``ps3-engine`` command to a running Ray cluster through the job API.

The same as ``ray job submit --working-dir . --runtime-env-json ... -- ps3-engine ...``, with the
runtime environment built for this project: the working directory without virtualenvs, run outputs and
caches, and the S3 endpoint/region variables of the caller. Credentials are NOT forwarded unless asked
for (``--forward-credentials``): on a real cluster they come from the nodes' instance role or service
account, and the job API would otherwise store them in the job's metadata.

Before anything is sent, the job's command line is parsed with the CLI's own parser and its run config
resolved here, in the client: a job that would fail in its first second (no input, a bad ``--set``)
fails here with one line instead of after a cluster round trip. Then the job's log is followed like
``ray job submit`` does; a failed job ends with its last log lines and Ray's status message on stderr.

The cluster image (docker/Dockerfile, docker/Dockerfile.gpu, the manifests in infra/cluster/) has one
name, :func:`image_name`: ``ps3-engine:<version>-cpu`` / ``-gpu`` unless ``PS3_ENGINE_IMAGE`` names
another repository and tag (its ``-cpu``/``-gpu`` suffix is added per variant).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, TextIO

logger = logging.getLogger(__name__)

WORKING_DIR_EXCLUDES = [
    ".venv",
    ".git",
    "demo-output",
    "runs",
    "**/__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    ".hypothesis",
    "*.egg-info",
]
FORWARDED_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION", "RAY_AUTH_MODE")
CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
IMAGE_ENV = "PS3_ENGINE_IMAGE"
IMAGE_REPOSITORY = "ps3-engine"
# Commands that plan crawl or render inputs, and the config fields that hold those inputs.
INPUT_FIELDS = {"run": ("sources", "document_sources"), "crawl": ("sources",), "render": ("document_sources",)}


def image_name(variant: str = "cpu") -> str:
    """The cluster image for ``variant`` (``cpu`` or ``gpu``): ``$PS3_ENGINE_IMAGE-<variant>`` if set.

    Default ``ps3-engine:<installed version>-<variant>``, the tag docker/Dockerfile(.gpu) say to build and
    the manifests in infra/cluster/ name (tests/infra/test_cluster.py keeps them equal).
    """
    if variant not in ("cpu", "gpu"):
        raise ValueError(f"image variant must be 'cpu' or 'gpu', not {variant!r}")
    from importlib.metadata import version

    base = os.environ.get(IMAGE_ENV) or f"{IMAGE_REPOSITORY}:{version('ps3-engine')}"
    return f"{base}-{variant}"


def runtime_env(working_dir: str = ".", forward_credentials: bool = False, image: str | None = None) -> dict[str, Any]:
    """The job's runtime env; ``image`` runs the job in that container image (Ray's ``image_uri``)."""
    names = FORWARDED_ENV + (CREDENTIAL_ENV if forward_credentials else ())
    env_vars = {name: os.environ[name] for name in names if os.environ.get(name)}
    env: dict[str, Any] = {"working_dir": working_dir, "excludes": WORKING_DIR_EXCLUDES, "env_vars": env_vars}
    if image:
        env["image_uri"] = image
    return env


def entrypoint(command: list[str]) -> str:
    if not command:
        raise ValueError("nothing to submit: give the ps3-engine command after '--', e.g. -- run --config X")
    if command[0] == "ps3-engine":
        command = command[1:]
    return shlex.join(["ps3-engine", *command])


def validate_command(command: list[str], working_dir: str | Path = ".") -> None:
    """Check the job's command line and resolved run config here, before submission.

    Paths in the command (``--config``) are read relative to ``working_dir``, the folder the job runs in.

    Raises:
        ValueError: one line saying what is wrong (unknown option, invalid config, no input).
    """
    import yaml

    from ps3_engine.pipeline.cli import build_parser
    from ps3_engine.pipeline.cli_errors import check_overrides, describe_config_error, yaml_problem
    from ps3_engine.pipeline.config import ConfigError, load_run_config

    if command[:1] == ["ps3-engine"]:
        command = command[1:]
    args = _parse_job_args(build_parser(), command)
    fields = INPUT_FIELDS.get(command[0])
    config_path = getattr(args, "config", None)
    if fields is None:
        return
    if config_path is None and getattr(args, "run_root", None) and _continues_a_run(args):
        # The job continues from the run's own config snapshot (run.json), which holds its inputs.
        return
    inputs = {"sources": getattr(args, "input", None), "document_sources": getattr(args, "documents", None)}
    if command[0] == "render":
        inputs = {"document_sources": getattr(args, "input", None)}
    path = Path(working_dir) / config_path if config_path is not None else None
    if path is not None and not path.is_file():
        raise ValueError(f"the job's --config {config_path} is not a file under the working dir {working_dir}")
    try:
        check_overrides(args.overrides)
        config = load_run_config(path, list(args.overrides), run_root=args.run_root, **inputs)
    except ConfigError as exc:
        raise ValueError(f"the job's run config is invalid: {describe_config_error(exc)}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"the job's --config {config_path} is not valid YAML: {yaml_problem(exc)}") from None
    if not any(getattr(config, field) for field in fields):
        flags = "--input SRC" + (" or --documents SRC" if command[0] == "run" else "")
        raise ValueError(
            f"the job has no input: add {flags} after '{command[0]}' or set {' / '.join(fields)} in the config"
        )


def _continues_a_run(args: argparse.Namespace) -> bool:
    """Whether the job's run root already holds a run snapshot, or this client cannot tell.

    A run root that this client can read and that has no ``run.json`` is a new run, so it needs an input;
    one it cannot reach (no credentials here, say) is given the benefit of the doubt.
    """
    from ps3_engine.infra.storage import Storage

    if getattr(args, "input", None) or getattr(args, "documents", None):
        return False  # inputs given: validate them below like any new run
    try:
        return Storage(args.run_root).exists("run.json")
    except Exception:  # an unreachable or unauthorised store: the cluster may see what this client cannot
        logger.debug("cannot read %s from this client; leaving the input check to the job", args.run_root)
        return True


def _parse_job_args(parser: argparse.ArgumentParser, command: list[str]) -> argparse.Namespace:
    """Parse with the CLI's parser; argparse's own error (it exits) becomes a one-line ValueError."""
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            return parser.parse_args(command)
    except SystemExit as exc:
        # argparse ends with "<prog>: error: <reason>" (a usage or help hint may come before or after it).
        lines = [line for line in errors.getvalue().splitlines() if "error:" in line]
        reason = lines[-1].split("error:", 1)[1].strip() if lines else "invalid arguments"
        raise ValueError(f"the job's command line is invalid: {reason}") from exc


def submit_when_ready(client: Any, ready_timeout_s: float = 90.0, **job: Any) -> str:
    """Submit, retrying while a freshly started head has no job agent yet ("No available agent")."""
    deadline = time.monotonic() + ready_timeout_s
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise
            logger.info("the cluster's job agent is not up yet; retrying")
            time.sleep(2.0)


def run_submit(
    address: str | None,
    command: list[str],
    *,
    working_dir: str = ".",
    image: str | None = None,
    forward_credentials: bool = False,
    follow: bool = True,
    wait: bool = True,
    timeout_s: float | None = None,
    tail_lines: int = 30,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Validate, submit, then follow (or poll) the job to its end. Returns the exit code for the CLI.

    Args:
        address: the Ray dashboard, e.g. ``http://HEAD:8265`` (None: ``RAY_ADDRESS``).
        command: ``ps3-engine`` arguments, e.g. ``["run", "--config", "configs/production.yaml", ...]``.
        image: run the job in this container image (Ray's ``image_uri``); None runs it in the nodes' image.
        follow: stream the job's log to ``out`` as it is written (like ``ray job submit``).
        wait: False returns right after submission.
        timeout_s: stop the job after this many seconds (exit 1).
        tail_lines: how many of a failed job's last log lines go to ``err``.

    Returns:
        0 when the job succeeded (or was only submitted), 1 when it failed, was stopped or timed out.

    Raises:
        ValueError: the command or its config is invalid (nothing was submitted).
    """
    from ray.job_submission import JobSubmissionClient

    out, err = out or sys.stdout, err or sys.stderr
    validate_command(command, working_dir)
    client = JobSubmissionClient(address)
    job = entrypoint(command)
    job_id = submit_when_ready(client, entrypoint=job, runtime_env=runtime_env(working_dir, forward_credentials, image))
    print(f"submitted job {job_id}: {job}", file=err)
    if not wait:
        return 0
    try:
        status = follow_job(client, job_id, timeout_s, out) if follow else wait_for_job(client, job_id, timeout_s)
    except TimeoutError as exc:
        print(f"ps3-engine: {exc}", file=err)
        return 1
    if status == "SUCCEEDED":
        print(f"job {job_id}: SUCCEEDED", file=err)
        return 0
    print(failure_report(client, job_id, tail_lines), file=err)
    return 1


def follow_job(client: Any, job_id: str, timeout_s: float | None = None, out: TextIO | None = None) -> str:
    """Stream the job's log to ``out`` until it ends; returns its final status (stops it on timeout)."""
    out = out or sys.stdout

    async def stream() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(asyncio.wait_for(stream(), timeout_s))
    except TimeoutError:
        client.stop_job(job_id)
        raise TimeoutError(f"job {job_id} still running after {timeout_s:.0f}s; stopped it") from None
    # The log stream closes when the job ends; its status may lag the stream by a moment.
    return wait_for_job(client, job_id, timeout_s=60.0)


def failure_report(client: Any, job_id: str, tail_lines: int = 30) -> str:
    """Ray's status and message for a job that did not succeed, after its last ``tail_lines`` log lines."""
    info = client.get_job_info(job_id)
    lines = client.get_job_logs(job_id).splitlines()[-tail_lines:]
    status = _status_text(info.status)
    head = f"--- last {len(lines)} log lines of job {job_id} ---"
    return "\n".join([head, *lines, f"job {job_id}: {status}: {info.message or 'no message'}"])


def wait_for_job(client: Any, job_id: str, timeout_s: float | None = None, poll_s: float = 1.0) -> str:
    """Poll until the job ends; returns SUCCEEDED, FAILED or STOPPED (stops it on timeout)."""
    from ray.job_submission import JobStatus

    began = time.monotonic()
    terminal = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
    status = client.get_job_status(job_id)
    while status not in terminal:
        if timeout_s is not None and time.monotonic() - began > timeout_s:
            client.stop_job(job_id)
            raise TimeoutError(f"job {job_id} still {_status_text(status)} after {timeout_s:.0f}s; stopped it")
        time.sleep(poll_s)
        status = client.get_job_status(job_id)
    logger.info("job %s finished: %s", job_id, _status_text(status))
    return _status_text(status)


def _status_text(status: Any) -> str:
    return str(status.value if hasattr(status, "value") else status)
