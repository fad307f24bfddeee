"""No secret reaches a stored error row, whatever stage made it and whatever a service echoed back."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from ps3_engine.infra.storage import Storage
from ps3_engine.pipeline.config import load_run_config
from ps3_engine.pipeline.layout import RunLayout, ShardTask
from ps3_engine.pipeline.runner import run_caption, run_crawl, run_segment
from ps3_engine.schemas import CAPTION_SCHEMA, ERROR_SCHEMA, rows_to_table
from ps3_engine.schemas.error import REDACTED, redact_secrets
from tests.stages.captioning.test_openai_backend import (  # noqa: F401 - fixtures used by name
    KEY_ENV,
    MODEL,
    SECRET,
    Call,
    Reply,
    answer,
    fake_openai,
    small_scenes,
)


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ('HTTP 401: {"error": "invalid key Bearer sk-live-ABCDEFGHIJKLMNOPQRST"}', "sk-live-ABCDEFGHIJKLMNOPQRST"),
        ("GET http://alice:hunter22@127.0.0.1:8080/x.jpg failed", "alice:hunter22"),
        ("clone https://ghp_tokenvalue123@github.com/a/b", "ghp_tokenvalue123"),
        ("403 on https://b.s3.amazonaws.com/k.jpg?X-Amz-Signature=abcdef0123&X-Amz-Expires=60", "abcdef0123"),
        ('{"api_key": "k-1234567890", "detail": "bad"}', "k-1234567890"),
        ("Authorization: Basic YWxpY2U6aHVudGVyMjI=", "YWxpY2U6aHVudGVyMjI="),
        ("AWS key AKIAABCDEFGHIJKLMNOP was refused", "AKIAABCDEFGHIJKLMNOP"),
    ],
)
def test_known_secret_shapes_are_redacted(text, secret):
    cleaned = redact_secrets(text, secrets=[])
    assert secret not in cleaned and REDACTED in cleaned


def test_secret_env_values_are_redacted_and_plain_text_is_kept(monkeypatch):
    monkeypatch.setenv("MY_LLM_CREDENTIAL", "plain-words-no-shape")
    monkeypatch.setenv("SHORT_TOKEN", "1234")  # too short to redact safely
    text = "server said: plain-words-no-shape is not valid (code 1234) at http://127.0.0.1:8000/v1"
    assert redact_secrets(text) == f"server said: {REDACTED} is not valid (code 1234) at http://127.0.0.1:8000/v1"


def test_every_committed_error_table_is_redacted(tmp_path, monkeypatch):
    """Whatever stage made the row (here a crawl row quoting a presigned URL, a segment row quoting an
    env secret), the layout's commit is the one place it passes on the way to storage."""
    monkeypatch.setenv("HF_TOKEN", "hf_secretvalue_0123456789")
    layout = RunLayout(Storage(str(tmp_path / "run")))
    now = datetime.now(UTC)
    base = {"shard_id": "0", "category": "failed", "transient": False, "attempts": 1, "created_at": now}
    errors = rows_to_table(
        [
            {
                **base,
                "item_id": "a",
                "stage": "crawl",
                "input_ref": "http://bob:pw123456@host/a.jpg",
                "reason": "http_status",
                "message": "403 from https://b.example/a.jpg?token=abcdef123456",
            },
            {
                **base,
                "item_id": "b",
                "stage": "crawl",
                "input_ref": "http://host/b.jpg",
                "reason": "unexpected_error",
                "message": "hub said: token hf_secretvalue_0123456789 has no access",
            },
        ],
        ERROR_SCHEMA,
    )
    task = ShardTask("crawl", "0", "crawl/_input/0.parquet", "x", ())
    layout.commit_shard(
        task, fingerprint="f", output=CAPTION_SCHEMA.empty_table(), errors=errors, attempt=1, wall_seconds=0.0
    )
    stored = layout.read_shard_errors("crawl", "0").to_pylist()
    text = repr(stored)
    for secret in ("pw123456", "abcdef123456", "hf_secretvalue_0123456789"):
        assert secret not in text
    assert [r["input_ref"] for r in stored] == [f"http://{REDACTED}@host/a.jpg", "http://host/b.jpg"]


def test_openai_endpoint_echoing_the_key_never_gets_it_stored(small_scenes, tmp_path, fake_openai, monkeypatch):  # noqa: F811
    """The issue's instance: a server that repeats the Authorization header in its 401 body."""
    monkeypatch.setenv(KEY_ENV, SECRET)

    def echo_key(call: Call) -> Reply:
        return 401, {}, f'{{"error": "invalid api key: {call.authorization}"}}'.encode()

    fake_openai.scenario = echo_key
    config = load_run_config(
        None,
        [
            "executor.kind=local",
            "executor.progress=false",
            "crawl.min_short_side=64",
            "crawl.min_long_side=64",
            "segment.top_k=2",
            "caption.backend=openai",
            f"caption.model={MODEL}",
            f"caption.openai.base_url={fake_openai.url}",
            f"caption.openai.api_key_env={KEY_ENV}",
            "caption.openai.backoff_s=0",
        ],
        run_root=str(tmp_path / "run"),
        sources=[str(small_scenes)],
    )
    run_crawl(config)
    run_segment(config)
    result = run_caption(config)
    assert result.failed_shards == [] and result.errors_by_reason == {"caption_request_rejected": result.error_rows}
    assert {c.authorization for c in fake_openai.calls} == {f"Bearer {SECRET}"}  # the key was really sent
    errors = RunLayout(Storage(config.run_root)).read_errors("caption").to_pylist()
    assert errors and all(f"invalid api key: Bearer {REDACTED}" in e["message"] for e in errors)
    stored = b"".join(p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file())
    assert SECRET.encode() not in stored
