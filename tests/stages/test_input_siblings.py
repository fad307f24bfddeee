"""Issue 14, re-checked with instances the issue does not list (found by trying each kind again by hand).

Each test names the kind it belongs to. The ones that failed before their fix: a truncated WebP called
``corrupt`` (every other format says ``truncated``), an API key echoed base64-encoded reaching storage.
"""

from __future__ import annotations

import base64
import io
import urllib.parse
from datetime import UTC, datetime
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from ps3_engine.infra.storage import Storage
from ps3_engine.pipeline.config import load_run_config
from ps3_engine.pipeline.layout import RunLayout, ShardTask
from ps3_engine.pipeline.runner import run_crawl
from ps3_engine.pipeline.samples import synthetic_scene
from ps3_engine.schemas import CAPTION_SCHEMA, ERROR_SCHEMA, rows_to_table
from ps3_engine.schemas.error import REDACTED, redact_secrets
from ps3_engine.stages.crawl import CrawlConfig
from ps3_engine.stages.imaging import ImageRejected, inspect_image
from tests.support.zoo import ZOO_CRAWL_OVERRIDES


def encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **params)
    return buffer.getvalue()


def rejection(data: bytes) -> ImageRejected:
    config = CrawlConfig()
    with pytest.raises(ImageRejected) as caught:
        inspect_image(data, content_type=None, max_pixels=config.max_pixels, allowed_formats=config.allowed_formats)
    return caught.value


# -- kind 3/10: damaged data, same verdict whatever the format ---------------------------------------


@pytest.mark.parametrize("params", [{"quality": 80}, {"lossless": True}], ids=["lossy", "lossless"])
@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.99])
def test_truncated_webp_is_truncated_like_every_other_format(params, fraction):
    """Before: libwebp refuses the cut file at open and the row said ``corrupt`` (PNG/JPEG/TIFF/BMP: truncated)."""
    data = encode(synthetic_scene(1300, 1100, 2), "WEBP", **params)
    assert rejection(data[: int(len(data) * fraction)]).reason == "truncated"


def test_webp_with_a_broken_chunk_but_its_full_length_is_still_corrupt():
    data = bytearray(encode(synthetic_scene(1300, 1100, 3), "WEBP", quality=80))
    data[23:26] = b"\0\0\0"  # the VP8 frame's start code (after the chunk header and frame tag)
    assert rejection(bytes(data)).reason == "corrupt"


# -- kind 7: secrets, in any encoding a service may echo ----------------------------------------------

KEY = "sk-zoo-0123456789abcdefXYZ-hidden"


@pytest.mark.parametrize(
    "echo",
    [
        base64.b64encode(KEY.encode()).decode(),
        base64.urlsafe_b64encode(b"x" + KEY.encode()).decode(),
        base64.b64encode(b"ab" + KEY.encode() + b"tail").decode(),
        "Basic " + base64.b64encode(f"user:{KEY}".encode()).decode(),
        urllib.parse.quote(KEY + "/=+", safe=""),
    ],
    ids=["base64", "urlsafe-offset-1", "embedded-offset-2", "basic-header", "percent-encoded"],
)
def test_an_api_key_echoed_encoded_is_not_stored(echo, monkeypatch, tmp_path):
    """An OpenAI-compatible endpoint echoing the key base64-encoded: the stored row must not hold the key.

    Checked through the layout's commit (the one place every stage's error table passes) with the key in
    a secret-named environment variable, as the caption backends read it.
    """
    monkeypatch.setenv("PS3_ZOO_CAPTION_API_KEY", KEY + "/=+" if "%" in echo else KEY)
    layout = RunLayout(Storage(str(tmp_path / "run")))
    row = {
        "item_id": "r1",
        "stage": "caption",
        "shard_id": "0",
        "input_ref": "img",
        "category": "failed",
        "reason": "caption_request_rejected",
        "transient": False,
        "message": f'HTTP 401: {{"error": "bad credentials {echo}"}}',
        "attempts": 1,
        "created_at": datetime.now(UTC),
    }
    task = ShardTask("caption", "0", "caption/_input/0.parquet", "x", ())
    errors = rows_to_table([row], ERROR_SCHEMA)
    layout.commit_shard(
        task, fingerprint="f", output=CAPTION_SCHEMA.empty_table(), errors=errors, attempt=1, wall_seconds=0
    )
    [stored] = layout.read_shard_errors("caption", "0").to_pylist()
    assert REDACTED in stored["message"]
    longest_plain_run = max(len(part) for part in stored["message"].split(REDACTED))
    assert echo not in stored["message"] and longest_plain_run < len(echo)


def test_redaction_leaves_unrelated_base64_alone():
    text = "thumbnail " + base64.b64encode(b"an ordinary payload of bytes").decode()
    assert redact_secrets(text, secrets=[KEY]) == text


# -- kind 11: every byte of a path reaches storage --------------------------------------------------

ODD_KEYS = ["scene 1.jpg", "a+b.jpg", "été-東京.jpg", "pct%20.jpg", "semi;colon.jpg", "q?x.jpg"]


def test_s3_keys_with_spaces_plus_percent_and_unicode_are_read_as_written(s3_server, s3_bucket, tmp_path):
    """Every odd key, from an S3 prefix source and from a URL list naming it, becomes a kept image."""
    client = s3_server.client()
    data = {key: encode(synthetic_scene(1100, 1050, i), "JPEG", quality=85) for i, key in enumerate(ODD_KEYS)}
    for key, body in data.items():
        client.put_object(Bucket=s3_bucket, Key=f"in/{key}", Body=body)
    listed = tmp_path / "list.txt"
    listed.write_text("".join(f"s3://{s3_bucket}/in/{key}\n" for key in ODD_KEYS))
    for name, source in (("prefix", f"s3://{s3_bucket}/in/"), ("list", str(listed))):
        config = load_run_config(
            None,
            [*ZOO_CRAWL_OVERRIDES, "crawl.shard_size=64", "executor.kind=local", "executor.progress=false"],
            run_root=str(tmp_path / name),
            sources=[source],
        )
        result = run_crawl(config)
        errors = RunLayout(Storage(config.run_root)).read_errors("crawl").to_pylist()
        assert (result.kept_rows, errors) == (len(ODD_KEYS), []), name
        [part] = Path(config.run_root, "crawl").glob("part-*.parquet")
        rows = pq.read_table(part, columns=["source_ref", "image_bytes"]).to_pylist()
        assert {r["source_ref"].rsplit("/in/", 1)[1]: r["image_bytes"] for r in rows} == data, name


ODD_NAMES = ["exp#1", "exp?v=1", "exp%231", "exp 1", "exp+1", "expé"]


def test_run_roots_whose_names_differ_only_in_odd_characters_stay_apart(s3_server, s3_bucket, tmp_path):
    """Kind 11's sibling for run roots: ``exp#1`` and ``exp`` (or ``exp?v=1``) must never be one place."""
    for root in (f"s3://{s3_bucket}/runs", str(tmp_path)):
        for odd in ODD_NAMES:
            Storage(f"{root}/{odd}").write_bytes_atomic("marker.json", odd.encode())
        assert not Storage(f"{root}/exp").exists("marker.json"), root
        for odd in ODD_NAMES:
            other = Storage(f"{root}/{odd}")
            assert [o.key for o in other.list("")] == ["marker.json"], (root, odd)
            assert other.read_bytes("marker.json") == odd.encode(), (root, odd)
            assert other.uri("marker.json") == f"{root}/{odd}/marker.json"
