"""Error row: an item that entered a stage and did not leave it as output, with the reason.

``category`` separates policy decisions ("filtered": too small, opted out, duplicate) from failures
("failed": HTTP errors, undecodable bytes). ``transient`` marks failures worth retrying.
"""

from __future__ import annotations

import base64
import os
import re
import urllib.parse
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict

SCHEMA_VERSION = 1

ErrorCategory = Literal["failed", "filtered"]


class ErrorRecord(BaseModel):
    model_config = ConfigDict(frozen=True)

    item_id: str
    stage: str
    shard_id: str
    input_ref: str
    category: ErrorCategory
    reason: str
    transient: bool
    message: str
    attempts: int
    created_at: datetime


ERROR_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("shard_id", pa.string(), nullable=False),
        pa.field("input_ref", pa.string(), nullable=False),
        pa.field("category", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("transient", pa.bool_(), nullable=False),
        pa.field("message", pa.string(), nullable=False),
        pa.field("attempts", pa.int16(), nullable=False),
        pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ],
    metadata={"record_kind": "error", "schema_version": str(SCHEMA_VERSION)},
)


# -- secrets never reach a stored error row ----------------------------------------------------------
# Error messages quote what a service said, and services echo credentials back (an OpenAI-compatible
# server repeating the Authorization header in a 401 body, an HTTP library printing a URL with its
# userinfo, a presigned URL's signature). Every error table a stage commits passes through
# :func:`redact_error_table`, so no stage has to remember to do it.

REDACTED = "[REDACTED]"
# Environment variables whose values are secrets: the name says so (OPENAI_API_KEY, HF_TOKEN,
# AWS_SECRET_ACCESS_KEY, DB_PASSWORD, LLM_CREDENTIALS, ...). The caption backends read their keys from
# such variables (caption.openai.api_key_env), so the worker that might leak a key also knows it.
_SECRET_ENV_NAME = re.compile(r"KEY|TOKEN|SECRET|PASS|CRED|AUTH", re.IGNORECASE)
# Shorter values are too likely to be ordinary words or numbers elsewhere in a message.
MIN_SECRET_CHARS = 8
_SECRET_PATTERNS = (
    # Authorization header values: "Bearer sk-...", "Basic dXNlcjpwYXNz".
    (re.compile(r"\b(Bearer|Basic|Token)\s+[A-Za-z0-9._~+/=-]{6,}", re.IGNORECASE), rf"\1 {REDACTED}"),
    # URL userinfo: scheme://user:password@host or scheme://token@host.
    (re.compile(r"\b([a-z][a-z0-9+.-]*://)[^/\s@]+@", re.IGNORECASE), rf"\1{REDACTED}@"),
    # Credentials in query strings (API keys, tokens, S3 presigned signatures).
    (
        re.compile(
            r"([?&](?:api[_-]?key|key|access[_-]?token|token|secret|password|sig|signature|"
            r"x-amz-signature|x-amz-credential|x-amz-security-token)=)[^&\s\"'<>]+",
            re.IGNORECASE,
        ),
        rf"\1{REDACTED}",
    ),
    # Key-value fields in echoed JSON or headers: "api_key": "...", authorization: ..., password=...
    (
        re.compile(
            r"([\"']?\b(?:api[_-]?key|x-api-key|authorization|password|secret|access[_-]?token)[\"']?\s*[:=]\s*[\"']?)"
            r"(?!Bearer\b|Basic\b|Token\b|\[REDACTED\])[^\s\"',}]+",
            re.IGNORECASE,
        ),
        rf"\1{REDACTED}",
    ),
    # Well-known key shapes even when no variable holds them here: OpenAI/Anthropic-style "sk-...",
    # Hugging Face "hf_...", AWS access key ids.
    (re.compile(r"\b(?:sk-[A-Za-z0-9_-]{16,}|hf_[A-Za-z0-9]{16,}|AKIA[0-9A-Z]{16})\b"), REDACTED),
)


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of the environment's secret-named variables, longest first (so no prefix wins)."""
    environ = os.environ if environ is None else environ
    values = {v for k, v in environ.items() if _SECRET_ENV_NAME.search(k) and len(v) >= MIN_SECRET_CHARS}
    return sorted(values, key=len, reverse=True)


def redact_secrets(text: str, secrets: Sequence[str] | None = None) -> str:
    """``text`` with secret env values, auth header values, URL userinfo and credential fields replaced.

    Args:
        text: an error message or reference about to be stored or logged.
        secrets: exact values to remove; default :func:`secret_values` of this process's environment.
    """
    for value in secret_values() if secrets is None else secrets:
        for form in encoded_forms(value):
            text = text.replace(form, REDACTED)
    for pattern, replacement in _SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


@lru_cache(maxsize=256)
def encoded_forms(value: str) -> tuple[str, ...]:
    """``value`` as a service may echo it: verbatim, percent-encoded, or base64 (standard or URL-safe).

    A base64 echo may start at any byte of a longer encoded string ("Basic " + b64("user:" + key)), so
    each of the 3 byte alignments contributes the characters that encode only the value's own bits.
    Forms shorter than :data:`MIN_SECRET_CHARS` are left out (they would match ordinary text).
    """
    raw = value.encode()
    forms = {value, urllib.parse.quote(value, safe="")}
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + raw).decode().rstrip("=")
        first = -(-offset * 8 // 6)  # first character holding no bit of the padding bytes
        last = (offset + len(raw)) * 8 // 6  # characters past this hold bits of what follows
        core = encoded[first:last]
        forms.update({core, core.replace("+", "-").replace("/", "_")})
    return tuple(sorted((f for f in forms if len(f) >= MIN_SECRET_CHARS), key=len, reverse=True))


REDACTED_COLUMNS = ("message", "input_ref")


def redact_error_table(errors: pa.Table) -> pa.Table:
    """``errors`` (``ERROR_SCHEMA``) with :func:`redact_secrets` applied to its free-text columns."""
    if errors.num_rows == 0:
        return errors
    secrets = secret_values()
    for name in REDACTED_COLUMNS:
        index = errors.schema.get_field_index(name)
        field = errors.schema.field(index)
        cleaned = [None if v is None else redact_secrets(v, secrets) for v in errors.column(index).to_pylist()]
        errors = errors.set_column(index, field, pa.array(cleaned, field.type))
    return errors
