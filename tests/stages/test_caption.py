"""The caption stage: pixel budgets, the CPU phase, the tiny captioner on local Ray, backends and weights."""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import math
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

import ps3_engine.stages.caption as caption_module
from ps3_engine.infra.storage import S3Settings, Storage
from ps3_engine.pipeline.config import load_run_config
from ps3_engine.pipeline.layout import RunLayout
from ps3_engine.pipeline.runner import run_caption, run_crawl, run_segment
from ps3_engine.pipeline.samples import planted_scene
from ps3_engine.schemas import IMAGE_SCHEMA, REGION_SCHEMA
from ps3_engine.stages.base import ShardContext
from ps3_engine.stages.caption import (
    CAPTION_INPUT_SCHEMA,
    CaptionConfig,
    CaptionStage,
    caption_id_for,
    join_regions_with_images,
)
from ps3_engine.stages.captioning.backends import (
    CaptionBackendUnavailable,
    CaptionRequest,
    CaptionResult,
    SamplingSettings,
    generate_isolating_failures,
    torch_out_of_memory,
)
from ps3_engine.stages.captioning.prompts import PS3_GLOBAL_PROMPT, PS3_LOCAL_PROMPT
from ps3_engine.stages.captioning.transformers_backend import TransformersCaptioner, TransformersSettings
from ps3_engine.stages.captioning.vllm_backend import VllmCaptioner, VllmSettings
from ps3_engine.stages.captioning.weights import resolve_model_dir
from ps3_engine.stages.geometry import fit_to_pixel_budget

# -- fit_to_pixel_budget ------------------------------------------------------------------------


@st.composite
def budgets(draw):
    factor = draw(st.sampled_from([1, 2, 14, 28]))
    max_pixels = draw(st.integers(factor * factor, 4_000_000))
    min_pixels = draw(st.integers(1, max_pixels))
    return max_pixels, min_pixels, factor


def _scale(width: int, height: int, max_pixels: int, min_pixels: int) -> float:
    if width * height > max_pixels:
        return math.sqrt(max_pixels / (width * height))
    if width * height < min_pixels:
        return math.sqrt(min_pixels / (width * height))
    return 1.0


@given(st.integers(1, 8000), st.integers(1, 8000), budgets())
def test_fit_stays_within_budget_on_the_factor_grid(width, height, budget):
    max_pixels, min_pixels, factor = budget
    new_w, new_h = fit_to_pixel_budget(width, height, max_pixels, min_pixels, factor)
    assert new_w * new_h <= max_pixels
    assert new_w % factor == 0 and new_h % factor == 0
    assert new_w >= factor and new_h >= factor


@given(st.integers(1, 8000), st.integers(1, 8000), budgets())
def test_fit_roughly_keeps_the_aspect_ratio(width, height, budget):
    max_pixels, min_pixels, factor = budget
    scale = _scale(width, height, max_pixels, min_pixels)
    new_w, new_h = fit_to_pixel_budget(width, height, max_pixels, min_pixels, factor)
    if min(width, height) * scale >= 8 * factor:
        # Rounding each side to the grid and stepping one side down can each move it by an 8th at most.
        assert abs(math.log((new_w / new_h) / (width / height))) <= 0.3
    if factor == 1 and min(width, height) * scale >= 100:
        assert abs(new_w / new_h - width / height) <= 0.05 * width / height


@given(st.integers(1, 200), st.integers(1, 200), st.sampled_from([1, 2, 14, 28]), st.data())
def test_fit_keeps_sizes_already_inside_the_budget(a, b, factor, data):
    width, height = a * factor, b * factor
    max_pixels = data.draw(st.integers(width * height, 4 * width * height))
    min_pixels = data.draw(st.integers(1, width * height))
    assert fit_to_pixel_budget(width, height, max_pixels, min_pixels, factor) == (width, height)


def test_fit_examples_and_bad_budgets():
    assert fit_to_pixel_budget(2048, 1536, 256 * 28 * 28, 4 * 28 * 28, 28) == (504, 392)
    assert fit_to_pixel_budget(448, 448, 256 * 28 * 28, 4 * 28 * 28, 28) == (448, 448)
    with pytest.raises(ValueError, match="not positive"):
        fit_to_pixel_budget(0, 10, 1000)
    with pytest.raises(ValueError, match="cannot hold"):
        fit_to_pixel_budget(10, 10, 27 * 27, 1, 28)
    with pytest.raises(ValueError, match="cannot hold"):
        fit_to_pixel_budget(10, 10, 1000, 2000)


def test_fit_reaches_min_pixels_for_small_crops():
    new_w, new_h = fit_to_pixel_budget(30, 60, 256 * 28 * 28, 4 * 28 * 28, 28)
    assert new_w * new_h >= 4 * 28 * 28


# -- joining regions with images ------------------------------------------------------------------


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=92)
    return buffer.getvalue()


def image_row(image_id: str, data: bytes | None, size: tuple[int, int], ref: str | None = None) -> dict:
    return {
        "image_id": image_id,
        "item_id": image_id,
        "shard_id": "s",
        "source_ref": f"src-{image_id}",
        "source_kind": "file",
        "source_list": "l",
        "final_url": None,
        "image_bytes": data,
        "image_ref": ref,
        "num_bytes": len(data or b""),
        "width": size[0],
        "height": size[1],
        "format": "JPEG",
        "mode": "RGB",
        "exif_orientation": 1,
        "sha256": image_id,
        "phash": 0,
        "content_type": None,
        "http_status": None,
        "license": None,
        "attribution": None,
        "metadata_json": "{}",
        "fetch_attempts": 1,
        "fetched_at": datetime.now(UTC),
    }


def region_row(image_id: str, region_id: str, box: tuple[int, int, int, int], rank: int) -> dict:
    x0, y0, x1, y1 = box
    return {
        "region_id": region_id,
        "image_id": image_id,
        "shard_id": "s",
        "x0": x0,
        "y0": y0,
        "x1": x1,
        "y1": y1,
        "score": 1.0 / (rank + 1),
        "rank": rank,
        "backend": "classical",
        "backend_settings_json": "{}",
    }


def test_join_groups_boxes_by_image_in_rank_order():
    images = pa.Table.from_pylist(
        [image_row("a", b"A", (64, 48)), image_row("b", b"B", (64, 48)), image_row("c", None, (64, 48), "s3://x/c")],
        schema=IMAGE_SCHEMA,
    )
    regions = pa.Table.from_pylist(
        [
            region_row("a", "a-second", (10, 10, 20, 20), 1),
            region_row("c", "c-first", (0, 0, 8, 8), 0),
            region_row("a", "a-first", (0, 0, 10, 10), 0),
        ],
        schema=REGION_SCHEMA,
    )
    joined = join_regions_with_images(regions, images)
    assert joined.schema == CAPTION_INPUT_SCHEMA
    rows = {r["image_id"]: r for r in joined.to_pylist()}
    assert set(rows) == {"a", "c"}  # "b" has no regions and is not captioned
    assert [r["region_id"] for r in rows["a"]["regions"]] == ["a-first", "a-second"]
    assert rows["a"]["regions"][1] == {"region_id": "a-second", "x0": 10, "y0": 10, "x1": 20, "y1": 20}
    assert rows["a"]["image_bytes"] == b"A" and rows["c"]["image_ref"] == "s3://x/c"
    assert rows["c"]["source_ref"] == "src-c" and (rows["c"]["width"], rows["c"]["height"]) == (64, 48)

    orphan = pa.Table.from_pylist([region_row("zzz", "z", (0, 0, 4, 4), 0)], schema=REGION_SCHEMA)
    with pytest.raises(ValueError, match="missing from the crawl shard"):
        join_regions_with_images(orphan, images)


# -- the CPU phase ----------------------------------------------------------------------------------

RED, BLUE = (210, 30, 30), (30, 30, 210)


def two_colour_image(size=(640, 480)) -> Image.Image:
    """Left half red, right half blue: a crop's colour tells where it was cut from."""
    image = Image.new("RGB", size, RED)
    image.paste(BLUE, (size[0] // 2, 0, size[0], size[1]))
    return image


def caption_row(image_id: str, data: bytes | None, size, boxes, ref: str | None = None) -> dict:
    return {
        "item_id": image_id,
        "image_id": image_id,
        "source_ref": f"src-{image_id}",
        "image_bytes": data,
        "image_ref": ref,
        "width": size[0],
        "height": size[1],
        "regions": [
            {"region_id": f"{image_id}-{i}", "x0": b[0], "y0": b[1], "x1": b[2], "y1": b[3]}
            for i, b in enumerate(boxes)
        ],
    }


def mean_colour(data: bytes) -> tuple[float, ...]:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    pixels = list(image.getdata())
    return tuple(sum(p[c] for p in pixels) / len(pixels) for c in range(3))


def test_prepare_cuts_resized_crops_from_one_decode(monkeypatch):
    config = CaptionConfig(max_pixels=64 * 28 * 28)
    stage = CaptionStage(config)
    decodes = []
    real_load_rgb = caption_module.load_rgb

    def counting_load_rgb(data):
        decodes.append(len(data))
        return real_load_rgb(data)

    monkeypatch.setattr(caption_module, "load_rgb", counting_load_rgb)
    boxes = [(0, 0, 300, 100), (400, 60, 480, 420), (100, 200, 228, 328)]  # wide, tall, square
    data = jpeg(two_colour_image())
    rows = [caption_row("one", data, (640, 480), boxes), caption_row("two", data, (640, 480), boxes[:1])]
    result = stage.prepare_batch(
        pa.Table.from_pylist(rows, schema=CAPTION_INPUT_SCHEMA), ShardContext("caption", "s", 1)
    )
    assert result.errors.num_rows == 0
    assert len(decodes) == 2  # one decode per image, however many boxes it has

    prepared = {r["image_id"]: r for r in result.output.to_pylist()}
    global_size = Image.open(io.BytesIO(prepared["one"]["global_jpeg"])).size
    assert global_size == fit_to_pixel_budget(640, 480, config.max_pixels, config.min_pixels, 28)
    assert global_size[0] * global_size[1] <= config.max_pixels
    crops = prepared["one"]["crops"]
    assert [c["region_id"] for c in crops] == ["one-0", "one-1", "one-2"]
    for crop, (x0, y0, x1, y1) in zip(crops, boxes, strict=True):
        width, height = Image.open(io.BytesIO(crop["crop_jpeg"])).size
        assert (width, height) == fit_to_pixel_budget(x1 - x0, y1 - y0, config.max_pixels, config.min_pixels, 28)
        assert (width > height) == (x1 - x0 > y1 - y0) and (width < height) == (x1 - x0 < y1 - y0)
        assert abs(math.log((width / height) / ((x1 - x0) / (y1 - y0)))) < 0.2
    # The crops come from where the boxes are: the left boxes are red, the right one blue.
    colours = [mean_colour(c["crop_jpeg"]) for c in crops]
    assert colours[0][0] > 150 > colours[0][2] and colours[2][0] > 150 > colours[2][2]
    assert colours[1][2] > 150 > colours[1][0]
    assert len(prepared["two"]["crops"]) == 1


def test_prepare_turns_unusable_images_into_error_rows(tmp_path):
    stage = CaptionStage(CaptionConfig())
    data = jpeg(two_colour_image((320, 240)))
    on_disk = tmp_path / "on-disk.jpg"
    on_disk.write_bytes(data)
    box = [(10, 10, 100, 100)]
    rows = [
        caption_row("good", data, (320, 240), box),
        caption_row("garbage", b"\xff\xd8 not really a jpeg", (320, 240), box),
        caption_row("http-ref", None, (320, 240), box, ref="http://example.com/a.jpg"),
        caption_row("outside", data, (320, 240), [(300, 200, 400, 300)]),
        caption_row("wrong-size", data, (640, 480), box),
        caption_row("by-reference", None, (320, 240), box, ref=str(on_disk)),
    ]
    result = stage.prepare_batch(
        pa.Table.from_pylist(rows, schema=CAPTION_INPUT_SCHEMA), ShardContext("caption", "s", 1)
    )
    assert set(result.output.column("image_id").to_pylist()) == {"good", "by-reference"}
    errors = {e["item_id"]: e for e in result.errors.to_pylist()}
    assert set(errors) == {"garbage", "http-ref", "outside", "wrong-size"}
    assert {e["reason"] for e in errors.values()} == {"undecodable"}
    assert {e["input_ref"] for e in errors.values()} == {f"src-{i}" for i in errors}
    assert "image_storage=bytes" in errors["http-ref"]["message"]
    assert "outside" in errors["outside"]["message"]
    assert "differs" in errors["wrong-size"]["message"]


# -- the whole stage on local Ray with the tiny captioner ---------------------------------------------


@pytest.fixture(scope="module")
def small_scenes(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("caption-scenes")
    for seed in range(3):
        image, _ = planted_scene(320, 240, seed, num_patches=2)
        (folder / f"scene-{seed}.jpg").write_bytes(jpeg(image))
    return folder


def tiny_run_config(folder: Path, run_root: Path, captioner: Path, *overrides: str):
    return load_run_config(
        None,
        [
            "executor.kind=local",
            "executor.progress=false",
            "crawl.shard_size=2",
            "crawl.min_short_side=64",
            "crawl.min_long_side=64",
            "segment.top_k=2",
            "caption.backend=transformers",
            f"caption.model={captioner}",
            "caption.transformers.device=cpu",
            "caption.max_pixels=12544",
            "caption.sampling.max_new_tokens=48",
            *overrides,
        ],
        run_root=str(run_root),
        sources=[str(folder)],
    )


def read_all(layout: RunLayout, stage: str) -> list[dict]:
    return [row for shard in sorted(layout.manifests(stage)) for row in layout.read_output(stage, shard).to_pylist()]


def test_caption_stage_on_local_ray_with_the_tiny_captioner(small_scenes, tmp_path, tiny_captioner, ray_local):
    config = tiny_run_config(small_scenes, tmp_path / "run", tiny_captioner)
    assert run_crawl(config).kept_rows == 3
    assert run_segment(config).failed_shards == []
    on_ray = config.model_copy(update={"executor": config.executor.model_copy(update={"kind": "ray"})})
    result = run_caption(on_ray)
    assert result.failed_shards == [] and result.computed_shards == 2 and result.input_rows == 3

    layout = RunLayout(Storage(config.run_root))
    images = {r["image_id"] for r in read_all(layout, "crawl")}
    regions = {r["region_id"]: r["image_id"] for r in read_all(layout, "segment")}
    captions = read_all(layout, "caption")
    errors = layout.read_errors("caption").to_pylist()
    assert len(images) == 3 and regions

    # Every region has exactly one caption or error row; every image one global caption or error row.
    subjects = [r["region_id"] or f"{r['image_id']}:global" for r in captions] + [e["item_id"] for e in errors]
    assert sorted(subjects) == sorted([*regions, *(f"{i}:global" for i in images)])
    assert result.output_rows == len(captions) and result.error_rows == len(errors)
    assert {r["kind"] for r in captions} == {"local", "global"}

    sampling_json = json.dumps(SamplingSettings(max_new_tokens=48).model_dump(mode="json"), sort_keys=True)
    prompt_tokens = {"local": set(), "global": set()}
    for row in captions:
        if row["region_id"] is not None:
            assert regions[row["region_id"]] == row["image_id"]
        assert row["caption_id"] == caption_id_for(row["image_id"], row["region_id"], "ps3-v1")
        assert row["model"] == str(tiny_captioner) and row["prompt_version"] == "ps3-v1"
        assert row["sampling_json"] == sampling_json
        assert row["clean_text"] and row["raw_text"]
        assert 1 <= row["completion_tokens"] <= 48 and row["latency_ms"] > 0
        prompt_tokens[row["kind"]].add(row["prompt_tokens"])
    # A local request carries two images, a global one a single image: its prompt is longer.
    assert min(prompt_tokens["local"]) > max(prompt_tokens["global"]) > 0

    again = run_caption(on_ray)
    assert again.computed_shards == 0 and again.skipped_shards == 2

    # A new prompt version makes every caption shard stale (in-process executor: same stage code).
    bumped = tiny_run_config(small_scenes, tmp_path / "run", tiny_captioner, "caption.prompts.version=ps3-v2")
    recomputed = run_caption(bumped)
    assert recomputed.computed_shards == 2 and recomputed.failed_shards == []
    new_captions = read_all(layout, "caption")
    assert {r["prompt_version"] for r in new_captions} == {"ps3-v2"}
    assert not {r["caption_id"] for r in new_captions} & {r["caption_id"] for r in captions}
    assert len(new_captions) + layout.read_errors("caption").num_rows == len(subjects)

    # vLLM needs a GPU per engine: on this GPU-less Ray cluster the run fails before any worker starts.
    vllm_on_ray = on_ray.model_copy(update={"caption": on_ray.caption.model_copy(update={"backend": "vllm"})})
    with pytest.raises(ValueError, match="GPU"):
        run_caption(vllm_on_ray)


# -- backends ---------------------------------------------------------------------------------------


def scene_requests() -> list[CaptionRequest]:
    scene = two_colour_image((112, 84))
    crop = scene.crop((0, 0, 56, 56))
    return [
        CaptionRequest("global", "img", [scene], PS3_GLOBAL_PROMPT),
        CaptionRequest("local", "img", [scene, crop], PS3_LOCAL_PROMPT),
    ]


@pytest.fixture(scope="module")
def cpu_captioner(tiny_captioner):
    backend = TransformersCaptioner(
        str(tiny_captioner), SamplingSettings(max_new_tokens=24), TransformersSettings(device="cpu")
    )
    backend.setup()
    yield backend
    backend.close()


def test_transformers_backend_isolates_a_failing_request(cpu_captioner, caplog):
    caplog.set_level(logging.WARNING)
    good = scene_requests()
    # Qwen2-VL's processor refuses images with an aspect ratio over 200.
    sliver = CaptionRequest("sliver", "img", [Image.new("RGB", (2000, 4), RED)], PS3_GLOBAL_PROMPT)
    requests = [good[0], sliver, good[1], CaptionRequest("again", "img", good[0].images, PS3_GLOBAL_PROMPT)]
    results = cpu_captioner.generate(requests)
    assert [r.request_id for r in results] == ["global", "sliver", "local", "again"]
    failed = results[1]
    assert failed.error_reason == "caption_request_failed" and "aspect ratio" in failed.error_message
    for result in (results[0], results[2], results[3]):
        assert result.ok and result.text and result.completion_tokens > 0
        assert result.finish_reason in {"stop", "length"}
    assert "splitting" in caplog.text


def test_isolation_bisects_to_the_failing_requests():
    requests = [CaptionRequest(f"r{i}", "g", [], "p") for i in range(6)]
    calls = []

    def run_batch(batch):
        calls.append(len(batch))
        if any(r.request_id == "r4" for r in batch):
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [CaptionResult(r.request_id, text="A caption here.") for r in batch]

    results = generate_isolating_failures(requests, run_batch, torch_out_of_memory)
    assert [r.request_id for r in results] == [f"r{i}" for i in range(6)]
    assert [r.error_reason for r in results] == [None, None, None, None, "out_of_memory", None]
    assert calls[0] == 6 and len(calls) < 12
    assert generate_isolating_failures([], run_batch, torch_out_of_memory) == []


def test_missing_model_folder_is_unavailable(tmp_path):
    missing = TransformersCaptioner(str(tmp_path / "absent"), SamplingSettings(), TransformersSettings(device="cpu"))
    with pytest.raises(CaptionBackendUnavailable, match=r"no config\.json"):
        missing.setup()
    stage = CaptionStage(CaptionConfig(model=str(tmp_path / "absent"), transformers=TransformersSettings(device="cpu")))
    with pytest.raises(CaptionBackendUnavailable, match="absent"):
        stage.setup()


def test_vllm_without_the_gpu_extra_is_unavailable(tmp_path):
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    backend = VllmCaptioner(str(tmp_path), SamplingSettings(), VllmSettings(), 12544, 3136)
    with pytest.raises(CaptionBackendUnavailable, match=r"\[gpu\]"):
        backend.setup()
    stage = CaptionStage(CaptionConfig(backend="vllm", vllm=VllmSettings(tensor_parallel_size=2)))
    assert stage.resources.num_gpus == 2.0 and not stage.resources.gpu_optional
    with pytest.raises(CaptionBackendUnavailable, match=r"pip install 'ps3-engine\[gpu\]'"):
        stage.setup()


@pytest.mark.gpu
def test_vllm_captioner_on_gpu(tiny_captioner):
    pytest.importorskip("vllm")
    settings = VllmSettings(max_model_len=2048, gpu_memory_utilization=0.3, enforce_eager=True)
    backend = VllmCaptioner(str(tiny_captioner), SamplingSettings(max_new_tokens=32), settings, 12544, 3136)
    backend.setup()
    try:
        results = backend.generate(scene_requests())
    finally:
        backend.close()
    assert [r.request_id for r in results] == ["global", "local"]
    for result in results:
        assert result.ok and result.text and 0 < result.completion_tokens <= 32
        assert result.prompt_tokens > 0 and result.finish_reason in {"stop", "length"}
    assert results[1].prompt_tokens > results[0].prompt_tokens


# -- weights from S3 ----------------------------------------------------------------------------------


def upload_folder(client, bucket: str, prefix: str, folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            client.put_object(Bucket=bucket, Key=f"{prefix}/{path.relative_to(folder)}", Body=path.read_bytes())


def test_captioner_weights_from_an_s3_prefix(tiny_captioner, s3_bucket, s3_server, tmp_path):
    upload_folder(s3_server.client(), s3_bucket, "captioners/tiny", tiny_captioner)
    uri = f"s3://{s3_bucket}/captioners/tiny"
    cache = tmp_path / "cache"
    local = Path(resolve_model_dir(uri, str(cache), S3Settings()))
    assert local.parent == cache
    originals = {p.relative_to(tiny_captioner): p.read_bytes() for p in tiny_captioner.rglob("*") if p.is_file()}
    assert {p.relative_to(local): p.read_bytes() for p in local.rglob("*") if p.is_file()} == originals
    # A second resolve reuses the cache.
    mtime = (local / "config.json").stat().st_mtime_ns
    assert resolve_model_dir(uri, str(cache), S3Settings()) == str(local)
    assert (local / "config.json").stat().st_mtime_ns == mtime

    backend = TransformersCaptioner(
        uri, SamplingSettings(max_new_tokens=16), TransformersSettings(device="cpu", weights_cache_dir=str(cache))
    )
    backend.setup()
    (result,) = backend.generate(scene_requests()[:1])
    assert result.ok and result.text


def test_empty_s3_prefix_is_unavailable(s3_bucket, s3_server, tmp_path):
    s3_server.client().put_object(Bucket=s3_bucket, Key="elsewhere/file.txt", Body=b"x")
    with pytest.raises(CaptionBackendUnavailable, match="no model files"):
        resolve_model_dir(f"s3://{s3_bucket}/captioners/none", str(tmp_path), S3Settings())


def test_s3_weights_that_changed_size_are_fetched_again(s3_bucket, s3_server, tmp_path):
    client = s3_server.client()
    client.put_object(Bucket=s3_bucket, Key="m/config.json", Body=b"{}")
    uri = f"s3://{s3_bucket}/m"
    local = Path(resolve_model_dir(uri, str(tmp_path), S3Settings()))
    assert (local / "config.json").read_bytes() == b"{}"
    client.put_object(Bucket=s3_bucket, Key="m/config.json", Body=b'{"model_type": "qwen2_vl"}')
    resolve_model_dir(uri, str(tmp_path), S3Settings())
    assert (local / "config.json").read_bytes() == b'{"model_type": "qwen2_vl"}'
