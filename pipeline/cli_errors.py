"""User-facing error lines for the command line: one or two lines each, never a dump or a traceback.

Config problems (bad YAML, unknown keys, bad values, a missing run root) become ``ConfigError`` with a
compact message; storage failures get advice only when acting on it can help (a rerun after a network
failure continues where the run stopped; a rerun after a permission error fails the same way).
"""

from __future__ import annotations

import argparse
import difflib
import errno
import functools
from typing import Any, NoReturn

import yaml
from pydantic import BaseModel, ValidationError

from ps3_engine.pipeline.config import ConfigError, RunConfig

# Substrings of S3/HTTP failure messages that a later attempt can get past.
TRANSIENT_MARKERS = (
    "NETWORK_CONNECTION",
    "Connection refused",
    "Connection reset",
    "timed out",
    "Timeout",
    "SlowDown",
    "ServiceUnavailable",
    "InternalError",
    "HTTP 500",
    "HTTP 503",
    "Could not connect",
)
MAX_VALUE_CHARS = 60


class ShortErrorParser(argparse.ArgumentParser):
    """argparse, but a usage error is two lines (the problem, where to look) instead of a usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\nsee '{self.prog} --help'\n")


@functools.cache
def config_keys(model: type[BaseModel] = RunConfig, prefix: str = "") -> tuple[str, ...]:
    """Every dotted key of the run config (``crawl.min_short_side``, ...), sections included."""
    keys: list[str] = []
    for name, info in model.model_fields.items():
        dotted = f"{prefix}{name}"
        keys.append(dotted)
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.extend(config_keys(annotation, f"{dotted}."))
    return tuple(keys)


def nearest_key(key: str) -> str | None:
    """The config key closest to a mistyped one (difflib ratio >= 0.6), or None."""
    matches = difflib.get_close_matches(key, config_keys(), n=1)
    return matches[0] if matches else None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= MAX_VALUE_CHARS else text[: MAX_VALUE_CHARS - 3] + "..."


def _describe(error: dict[str, Any]) -> str:
    key = ".".join(str(part) for part in error["loc"])
    kind = error["type"]
    if kind == "extra_forbidden":
        near = nearest_key(key)
        return f"unknown config key {key!r}" + (f" (did you mean {near!r}?)" if near else "")
    if kind == "missing" and key == "run_root":
        return "no run root: pass --run-root (a local folder or s3://bucket/prefix) or set run_root in --config"
    if kind == "missing":
        return f"{key} is required"
    message = error["msg"].removeprefix("Value error, ")
    return f"{key}: {message} (got {_short(error.get('input'))})" if key else message


def describe_config_error(exc: ConfigError) -> str:
    """One line for a config that failed validation (all problems, ';'-separated)."""
    cause = exc.__cause__
    if not isinstance(cause, ValidationError):
        return str(exc)
    problems = [_describe(error) for error in cause.errors()]
    return problems[0] if len(problems) == 1 else f"{len(problems)} config problems: " + "; ".join(problems)


def yaml_problem(exc: yaml.YAMLError) -> str:
    """``mapping values are not allowed here (line 3, column 9)`` from a PyYAML error."""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else problem


def check_overrides(overrides: list[str]) -> None:
    """Refuse a malformed ``--set`` before anything runs: no ``=``, or a value that is not YAML."""
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"--set {override!r} is not of the form KEY=VALUE")
        key, value = override.split("=", 1)
        try:
            yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ConfigError(
                f"--set {key.strip()}: {value!r} is not valid YAML ({yaml_problem(exc)}); quote it to pass a string"
            ) from None


def _chain(exc: BaseException) -> list[BaseException]:
    found = []
    current: BaseException | None = exc
    while current is not None and current not in found:
        found.append(current)
        current = current.__cause__ or current.__context__
    return found


def storage_error_message(exc: OSError) -> str:
    """The line printed for a storage failure: what failed (with its file), and advice only where it helps."""
    chain = _chain(exc)
    text = str(exc) or type(exc).__name__
    if exc.filename and str(exc.filename) not in text:
        text = f"{exc.filename}: {exc.strerror or text}"
    if any(getattr(e, "errno", None) == errno.ENOSPC for e in chain):
        return f"storage error: {text}; free some space, then rerun the same command to continue"
    transient = any(isinstance(e, ConnectionError | TimeoutError) for e in chain) or any(
        marker in str(e) for e in chain for marker in TRANSIENT_MARKERS
    )
    if transient:
        return f"storage error: {text}; rerun the same command to continue (finished shards are kept)"
    return f"storage error: {text}"
