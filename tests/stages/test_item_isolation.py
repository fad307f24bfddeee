"""Per-item isolation is the rule in every stage's item loop (issue 14, kind 1): an exception raised while
one item is processed becomes that item's error row, the batch's other items keep their rows.

Corpus and render use real inputs that raised before. Segment and caption use a model backend that
raises for one image: backends are not under test here, the stage's handling of their exceptions is
(the crawl's own instances run end to end in test_crawl_inputs.py and the zoo).
"""

from __future__ import annotations

import io

import pyarrow as pa
from PIL import Image

from ps3_engine.schemas import CRAWL_ITEM_SCHEMA, IMAGE_SCHEMA, rows_to_table
from ps3_engine.stages.base import ShardContext
from ps3_engine.stages.caption import CAPTION_PREPARED_SCHEMA, CaptionConfig, CaptionStage
from ps3_engine.stages.captioning.backends import CaptionBackend, CaptionRequest, CaptionResult, SamplingSettings
from ps3_engine.stages.corpus import CORPUS_INPUT_SCHEMA, CorpusConfig, CorpusStage
from ps3_engine.stages.render import RenderConfig, RenderStage
from ps3_engine.stages.segment import SegmentConfig, SegmentStage
from ps3_engine.stages.segmenters.classical import ClassicalSegmenter
from tests.stages.test_segment import image_row, jpeg


def _jpeg(size=(64, 48), colour="teal") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "JPEG")
    return buffer.getvalue()


def test_corpus_keeps_the_batch_when_one_rotated_image_does_not_decode():
    def row(image_id: str, data: bytes, orientation: int) -> dict:
        return {
            "item_id": image_id,
            "image_id": image_id,
            "source_ref": f"http://h/{image_id}.jpg",
            "final_url": None,
            "source_list": "l",
            "image_bytes": data,
            "image_ref": None,
            "exif_orientation": orientation,
            "width": 64,
            "height": 48,
            "license": None,
            "attribution": None,
            "metadata_json": "{}",
            "global_caption": "A teal field.",
            "regions": [{"region_id": f"{image_id}-r", "x0": 0, "y0": 0, "x1": 32, "y1": 24, "caption": "teal"}],
        }

    # An EXIF-rotated row is re-encoded upright; bytes that do not decode used to raise out of the shard.
    batch = pa.Table.from_pylist([row("bad", b"not an image", 6), row("good", _jpeg(), 1)], CORPUS_INPUT_SCHEMA)
    result = CorpusStage(CorpusConfig()).process_batch(batch, ShardContext("build-corpus", "s", 1))
    assert result.output.column("image_id").to_pylist() == ["good"]
    [error] = result.errors.to_pylist()
    assert (error["item_id"], error["reason"]) == ("bad", "unexpected_error")
    assert "UnidentifiedImageError" in error["message"]


class OneBadImageSegmenter(ClassicalSegmenter):
    """The classical backend, raising a plain ValueError for images of width 333 (a backend bug)."""

    def masks_batch(self, images):
        if any(image.shape[1] == 333 for image, _, _ in images):
            raise ValueError("backend cannot handle this image")
        return super().masks_batch(images)


def test_segment_isolates_a_backend_exception_to_its_image():
    stage = SegmentStage(SegmentConfig())
    stage.setup()
    stage._segmenter = OneBadImageSegmenter(stage.config.classical)
    rows = [image_row("bad", jpeg(1, (333, 250)), size=(333, 250)), image_row("good", jpeg(2), size=(512, 384))]
    result = stage.process_batch(rows_to_table(rows, IMAGE_SCHEMA), ShardContext("segment", "s", 1))
    assert set(result.output.column("image_id").to_pylist()) == {"good"}
    [error] = result.errors.to_pylist()
    assert (error["item_id"], error["reason"]) == ("bad", "segmenter_error")
    assert "ValueError" in error["message"]


class OneBadImageCaptioner(CaptionBackend):
    """Captions every request, but raises when a batch holds a request of the image ``bad``."""

    def generate(self, requests: list[CaptionRequest]) -> list[CaptionResult]:
        if any(request.group == "bad" for request in requests):
            raise ValueError("server returned garbage")
        text = "A small teal square on a plain grey background."
        return [CaptionResult(r.request_id, text=text, finish_reason="stop") for r in requests]


def test_caption_isolates_a_backend_exception_to_that_images_requests():
    stage = CaptionStage(CaptionConfig(backend="openai", model="m"))
    stage._backend = OneBadImageCaptioner("m", SamplingSettings())
    crop = _jpeg((32, 24))
    rows = [
        {
            "item_id": i,
            "image_id": i,
            "source_ref": i,
            "global_jpeg": _jpeg(),
            "crops": [{"region_id": f"{i}-r", "crop_jpeg": crop}],
        }
        for i in ("bad", "good")
    ]
    result = stage.process_batch(pa.Table.from_pylist(rows, CAPTION_PREPARED_SCHEMA), ShardContext("caption", "s", 1))
    assert set(result.output.column("image_id").to_pylist()) == {"good"}
    assert result.output.num_rows == 2  # global + local caption of the good image
    errors = result.errors.to_pylist()
    assert sorted(e["item_id"] for e in errors) == ["bad-r", "bad:global"]
    assert {e["reason"] for e in errors} == {"unexpected_error"}


def test_render_refuses_local_paths_and_unusable_rows_of_a_list(tmp_path):
    secret = tmp_path / "secret.pdf"
    secret.write_bytes(b"%PDF-1.4 not really")
    rows = [
        {"item_id": "a", "source_ref": str(secret), "source_kind": "local", "metadata_json": "{}"},
        {
            "item_id": "b",
            "source_ref": "list.txt#line=2",
            "source_kind": "invalid",
            "metadata_json": '{"_invalid_message": "line 2 of list.txt: unsupported URL scheme", '
            '"_invalid_reason": "unsupported_scheme"}',
        },
    ]
    rows = [{**r, "source_list": "list.txt", "license": None, "attribution": None} for r in rows]
    stage = RenderStage(RenderConfig(text_source="text_layer"))
    result = stage.process_batch(rows_to_table(rows, CRAWL_ITEM_SCHEMA), ShardContext("render", "s", 1))
    stage.teardown()
    assert result.output.num_rows == 0
    reasons = {e["item_id"]: (e["reason"], e["transient"]) for e in result.errors.to_pylist()}
    assert reasons == {"a": ("local_file_refused", False), "b": ("unsupported_scheme", False)}
    messages = {e["item_id"]: e["message"] for e in result.errors.to_pylist()}
    assert "set render.allow_local_files=true" in messages["a"]
    assert messages["b"] == "line 2 of list.txt: unsupported URL scheme"
