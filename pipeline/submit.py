"""``ps3-engine submit``: send a ``ps3-engine`` command to a running Ray cluster through the job API.

The same as ``ray job submit --working-dir . --runtime-env-json ... -- ps3-engine ...``, with the
runtime environment built for this project: the working directory without virtualenvs, run outputs and
caches, and the S3 endpoint/region variables of the caller. Credentials are NOT forwarded unless asked
for (``--forward-credentials``): on a real cluster they come from the nodes' instance role or service
account, and the job API would otherwise store them in the job's metadata.
"""

from __future__ import annotations

import logging
import os
import shlex
import time
from typing import Any

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


def runtime_env(working_dir: str = ".", forward_credentials: bool = False) -> dict[str, Any]:
    names = FORWARDED_ENV + (CREDENTIAL_ENV if forward_credentials else ())
    env_vars = {name: os.environ[name] for name in names if os.environ.get(name)}
    return {"working_dir": working_dir, "excludes": WORKING_DIR_EXCLUDES, "env_vars": env_vars}


def entrypoint(command: list[str]) -> str:
    if not command:
        raise ValueError("nothing to submit: give the ps3-engine command after '--', e.g. -- run --config X")
    if command[0] == "ps3-engine":
        command = command[1:]
    return shlex.join(["ps3-engine", *command])


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


def submit(
    address: str | None,
    command: list[str],
    *,
    working_dir: str = ".",
    forward_credentials: bool = False,
    wait: bool = True,
    timeout_s: float | None = None,
) -> tuple[str, str]:
    """Submit and (optionally) follow the job; returns (job id, final status)."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    job_id = submit_when_ready(
        client, entrypoint=entrypoint(command), runtime_env=runtime_env(working_dir, forward_credentials)
    )
    logger.info("submitted %s to %s: %s", job_id, address, entrypoint(command))
    if not wait:
        return job_id, str(client.get_job_status(job_id))
    return job_id, wait_for_job(client, job_id, timeout_s)


def wait_for_job(client: Any, job_id: str, timeout_s: float | None = None) -> str:
    """Poll until the job ends; returns SUCCEEDED, FAILED or STOPPED (stops it on timeout)."""
    from ray.job_submission import JobStatus

    began = time.monotonic()
    terminal = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
    status = client.get_job_status(job_id)
    while status not in terminal:
        if timeout_s is not None and time.monotonic() - began > timeout_s:
            client.stop_job(job_id)
            raise TimeoutError(f"job {job_id} still {status} after {timeout_s:.0f}s; stopped it")
        time.sleep(1.0)
        status = client.get_job_status(job_id)
    logger.info("job %s finished: %s", job_id, status)
    return str(status.value if hasattr(status, "value") else status)
