"""The document branch: render stage on generated PDFs (text layer and OCR), errors, caps, planning, corpus rows.

PDFs are generated here with known sentences at known positions (``tests/support/pdfs.py``); the
assertions compare the stage's boxes with that layout (IoU) and its captions with the known text.
"""

from __future__ import annotations

import difflib
import io
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pypdfium2 as pdfium
import pytest
from PIL import Image
from reportlab.lib.pdfencrypt import StandardEncryption
from reportlab.pdfgen import canvas

from ps3_engine.infra.static_server import serve_directory
from ps3_engine.infra.storage import Storage
from ps3_engine.pipeline.corpus import build_corpus
from ps3_engine.pipeline.documents import check_documents, plan_document_corpus, plan_documents
from ps3_engine.pipeline.executor import ExecutorConfig, make_executor
from ps3_engine.pipeline.layout import RunLayout
from ps3_engine.pipeline.shard_runner import StageSpec
from ps3_engine.schemas import (
    CRAWL_ITEM_SCHEMA,
    check_model_matches_schema,
    records_to_table,
    rows_to_table,
)
from ps3_engine.schemas.corpus import CORPUS_PART_SCHEMA
from ps3_engine.schemas.document import DOCUMENT_PAGE_SCHEMA, DocumentPage, DocumentRegion
from ps3_engine.stages.base import ShardContext
from ps3_engine.stages.corpus import CorpusConfig
from ps3_engine.stages.documents.corpus import DocumentCorpusConfig, DocumentCorpusStage, document_corpus_rows
from ps3_engine.stages.documents.ocr import OcrUnavailable
from ps3_engine.stages.geometry import BoxXYXY, iou
from ps3_engine.stages.render import RenderConfig, RenderStage
from tests.support.pdfs import blank_pdf, rotate_box, rotated_pdf, scanned_pdf, text_pdf, to_pixels

needs_tesseract = pytest.mark.skipif(
    shutil.which("tesseract") is None, reason="tesseract binary not installed (apt-get install tesseract-ocr)"
)
CONTEXT = ShardContext("render", "doc-test-00000", 1)
LETTER_PX_150 = (1275, 1650)


def items(refs: list[str], source_list: str = "test") -> pa.Table:
    rows = [
        {
            "item_id": f"item-{i}",
            "source_ref": ref,
            "source_kind": "http" if ref.startswith("http") else "file",
            "source_list": source_list,
            "license": "CC-BY-4.0",
            "attribution": None,
            "metadata_json": "{}",
        }
        for i, ref in enumerate(refs)
    ]
    return rows_to_table(rows, CRAWL_ITEM_SCHEMA)


def render(tmp_path: Path, documents: dict[str, bytes], **config) -> tuple[list[dict], list[dict]]:
    """Write the documents, run the stage over them in one batch; (page rows, error rows)."""
    refs = []
    for name, data in documents.items():
        (tmp_path / name).write_bytes(data)
        refs.append(str(tmp_path / name))
    stage = RenderStage(RenderConfig(**config))
    result = stage.process_batch(items(refs), CONTEXT)
    stage.teardown()
    assert result.output.schema.equals(DOCUMENT_PAGE_SCHEMA, check_metadata=True)
    return result.output.to_pylist(), result.errors.to_pylist()


def regions_of(page: dict, scheme: str) -> list[dict]:
    return [r for r in page["regions"] if r["scheme"] == scheme]


def box(region: dict) -> BoxXYXY:
    return BoxXYXY(region["x0"], region["y0"], region["x1"], region["y1"])


@pytest.fixture(scope="module")
def two_pages():
    return text_pdf(2, seed=7)


@pytest.fixture(scope="module")
def text_layer_pages(two_pages, tmp_path_factory):
    return render(tmp_path_factory.mktemp("text"), {"doc.pdf": two_pages.data}, text_source="text_layer")


def test_pages_render_at_the_configured_dpi(two_pages, tmp_path):
    pages, errors = render(tmp_path, {"doc.pdf": two_pages.data}, dpi=100, text_source="text_layer")
    assert errors == []
    assert [(p["page_index"], p["num_pages"]) for p in pages] == [(0, 2), (1, 2)]
    for page in pages:
        assert (page["width"], page["height"]) == (850, 1100)  # 8.5 x 11 in at 100 dpi
        assert Image.open(io.BytesIO(page["image_bytes"])).size == (850, 1100)
        assert (page["page_width_pt"], page["page_height_pt"]) == (612, 792)


def test_text_layer_sentences_match_the_known_layout(two_pages, text_layer_pages):
    pages, errors = text_layer_pages
    assert errors == []
    for page, known in zip(pages, two_pages.pages, strict=True):
        assert (page["width"], page["height"]) == LETTER_PX_150
        assert page["text_source"] == "text_layer" and page["text_engine"].startswith("pdfium")
        assert page["image_format"] == "PNG" and page["dpi"] == 150
        sentences = regions_of(page, "sentence")
        assert [s["text"] for s in sentences] == [k.text for k in known]
        for sentence, placed in zip(sentences, known, strict=True):
            assert iou(box(sentence), to_pixels(placed.box_pt, 792, 150)) >= 0.5, sentence["text"]
        assert page["num_words"] == sum(len(k.words) for k in known)


def expected_runs(words, run_length=15, min_words=5):
    """The word runs the paper's scheme gives for the known words: chunks of 15 within each paragraph."""
    runs, block = [], []
    for word in [*words, None]:
        if block and (word is None or word.block != block[0].block):
            runs += [block[i : i + run_length] for i in range(0, len(block), run_length)]
            block = []
        if word is not None:
            block.append(word)
    return [run for run in runs if len(run) >= min_words]


def test_text_layer_word_runs_are_15_consecutive_words(two_pages, text_layer_pages):
    pages, _ = text_layer_pages
    for page_index, page in enumerate(pages):
        runs = regions_of(page, "word_run")
        expected = expected_runs(two_pages.words(page_index))
        assert max(r["num_words"] for r in runs) == 15
        assert [r["text"] for r in runs] == [" ".join(w.text for w in run) for run in expected]
        for run, words in zip(runs, expected, strict=True):
            known = [to_pixels(w.box_pt, 792, 150) for w in words]
            union = BoxXYXY(
                min(b.x0 for b in known), min(b.y0 for b in known), max(b.x1 for b in known), max(b.y1 for b in known)
            )
            assert iou(box(run), union) >= 0.5


def test_rotated_pages_keep_boxes_on_the_displayed_page(tmp_path):
    generated = text_pdf(1, paragraphs=1, lines_per_paragraph=3, seed=3)
    for rotation in (90, 180):
        pages, errors = render(tmp_path, {"rot.pdf": rotated_pdf(generated.data, rotation)}, text_source="text_layer")
        assert errors == []
        (page,) = pages
        width, height = (1650, 1275) if rotation == 90 else LETTER_PX_150
        assert (page["width"], page["height"], page["rotation"]) == (width, height, rotation)
        # pdfium may order the lines of a rotated page differently; match sentences by their text.
        sentences = {s["text"]: box(s) for s in regions_of(page, "sentence")}
        assert set(sentences) == {placed.text for placed in generated.pages[0]}
        for placed in generated.pages[0]:
            expected = rotate_box(to_pixels(placed.box_pt, 792, 150), rotation, *LETTER_PX_150)
            assert iou(sentences[placed.text], expected) >= 0.5


@needs_tesseract
def test_scanned_page_goes_through_ocr(two_pages, tmp_path):
    scanned = scanned_pdf(text_pdf(1, seed=7))
    pages, errors = render(tmp_path, {"scan.pdf": scanned})
    assert errors == []
    (page,) = pages
    assert page["text_source"] == "ocr" and page["text_engine"].startswith("tesseract")
    known = two_pages.pages[0]
    sentences = regions_of(page, "sentence")
    exact = sum(s["text"] == k.text for s, k in zip(sentences, known, strict=False))
    assert exact >= 0.8 * len(known), [s["text"] for s in sentences]
    # Word level: every known word should be found, at its place, with its text.
    ocr_words = [w for s in sentences for w in s["text"].split(" ")]
    known_words = [w.text for w in two_pages.words(0)]
    matcher = difflib.SequenceMatcher(None, ocr_words, known_words, autojunk=False)
    assert sum(m.size for m in matcher.get_matching_blocks()) >= 0.9 * len(known_words)
    by_text = {s["text"]: box(s) for s in sentences}
    overlapping = [iou(by_text[k.text], to_pixels(k.box_pt, 792, 150)) for k in known if k.text in by_text]
    assert overlapping and min(overlapping) >= 0.3


@needs_tesseract
def test_ocr_word_boxes_match_the_known_words(tmp_path):
    generated = text_pdf(1, paragraphs=2, lines_per_paragraph=3, seed=11)
    pages, _ = render(
        tmp_path, {"scan.pdf": scanned_pdf(generated)}, word_run_length=1, word_run_stride=1, min_word_run_words=1
    )
    known = generated.words(0)
    words = regions_of(pages[0], "word_run")  # runs of one word are the OCR words themselves
    # Align the OCR words with the known ones by text (tesseract may split, merge or miss a word).
    matcher = difflib.SequenceMatcher(None, [w["text"] for w in words], [k.text for k in known], autojunk=False)
    pairs = [(words[m.a + i], known[m.b + i]) for m in matcher.get_matching_blocks() for i in range(m.size)]
    assert len(pairs) >= 0.9 * len(known)
    assert min(iou(box(w), to_pixels(k.box_pt, 792, 150)) for w, k in pairs) >= 0.3


@needs_tesseract
def test_forced_ocr_on_a_text_pdf_agrees_with_the_text_layer(tmp_path):
    generated = text_pdf(1, paragraphs=1, lines_per_paragraph=4, seed=5)
    pages, _ = render(tmp_path, {"doc.pdf": generated.data}, text_source="ocr", schemes=("sentence",))
    sentences = regions_of(pages[0], "sentence")
    assert pages[0]["text_source"] == "ocr"
    assert sum(s["text"] == k.text for s, k in zip(sentences, generated.pages[0], strict=False)) >= 3


def test_encrypted_broken_and_owner_only_encryption(tmp_path):
    owner_only = text_pdf(1, paragraphs=1, lines_per_paragraph=1, encrypt=StandardEncryption("", "owner-secret"))
    documents = {
        "locked.pdf": text_pdf(1, encrypt="user-secret").data,
        "garbage.pdf": b"this is not a PDF at all",
        "html.pdf": b"<html><body>404</body></html>",
        "truncated.pdf": text_pdf(1).data[:300],
        "empty.pdf": b"",
        "owner-only.pdf": owner_only.data,
    }
    pages, errors = render(tmp_path, documents, text_source="text_layer")
    reasons = {Path(e["input_ref"]).name: (e["reason"], e["category"]) for e in errors}
    assert reasons == {
        "locked.pdf": ("encrypted", "failed"),
        "garbage.pdf": ("broken_pdf", "failed"),
        "html.pdf": ("broken_pdf", "failed"),
        "truncated.pdf": ("broken_pdf", "failed"),
        "empty.pdf": ("broken_pdf", "failed"),
    }
    assert [Path(p["source_ref"]).name for p in pages] == ["owner-only.pdf"]
    assert regions_of(pages[0], "sentence")[0]["text"] == owner_only.pages[0][0].text


def test_page_count_cap_rejects_or_truncates(tmp_path):
    three = text_pdf(3, paragraphs=1, lines_per_paragraph=2).data
    pages, errors = render(tmp_path, {"long.pdf": three}, max_pages=2, text_source="text_layer")
    assert pages == []
    assert [(e["reason"], e["category"], e["item_id"]) for e in errors] == [("too_many_pages", "filtered", "item-0")]
    pages, errors = render(tmp_path, {"long.pdf": three}, max_pages=2, over_page_limit="truncate")
    assert errors == [] and [(p["page_index"], p["num_pages"]) for p in pages] == [(0, 3), (1, 3)]


def test_page_size_cap_and_pages_without_text(tmp_path):
    poster = text_pdf(1, page_size=(2000.0, 3000.0), paragraphs=1, lines_per_paragraph=1).data
    documents = {"poster.pdf": poster, "blank.pdf": blank_pdf(2), "ok.pdf": text_pdf(1).data}
    pages, errors = render(tmp_path, documents, max_page_pixels=4_000_000, text_source="text_layer")
    found = sorted((Path(e["input_ref"]).name, e["reason"], e["category"]) for e in errors)
    assert found == [
        ("blank.pdf#page=1", "no_text", "filtered"),
        ("blank.pdf#page=2", "no_text", "filtered"),
        ("poster.pdf#page=1", "page_too_large", "filtered"),
    ]
    assert [Path(p["source_ref"]).name for p in pages] == ["ok.pdf"]
    _, errors = render(tmp_path, {"poster.pdf": poster}, max_page_side=4000, text_source="text_layer")
    assert [e["reason"] for e in errors] == ["page_too_large"]


def test_jpeg_output_and_scheme_selection(two_pages, tmp_path):
    pages, _ = render(tmp_path, {"doc.pdf": two_pages.data}, image_format="JPEG", schemes=("word_run",))
    assert Image.open(io.BytesIO(pages[0]["image_bytes"])).format == "JPEG"
    assert {r["scheme"] for p in pages for r in p["regions"]} == {"word_run"}


def test_missing_tesseract_fails_fast_with_instructions():
    stage = RenderStage(RenderConfig(tesseract_cmd="no-such-tesseract-binary"))
    with pytest.raises(OcrUnavailable, match="apt-get install tesseract-ocr"):
        stage.preflight()
    RenderStage(RenderConfig(text_source="text_layer", tesseract_cmd="no-such-tesseract-binary")).preflight()
    with pytest.raises(ValueError, match="schemes"):
        RenderConfig(schemes=())


def test_missing_files_and_http_sources(two_pages, tmp_path):
    (tmp_path / "doc.pdf").write_bytes(two_pages.data)
    stage = RenderStage(RenderConfig(text_source="text_layer", http={"allow_private_addresses": True}))
    with serve_directory(tmp_path) as base:
        batch = items([f"{base}/doc.pdf", f"{base}/missing.pdf", str(tmp_path / "absent.pdf")])
        result = stage.process_batch(batch, CONTEXT)
    stage.teardown()
    pages = result.output.to_pylist()
    assert [p["page_index"] for p in pages] == [0, 1]
    assert pages[0]["final_url"] == f"{base}/doc.pdf" and pages[0]["source_kind"] == "http"
    assert sorted(e["reason"] for e in result.errors.to_pylist()) == ["http_404", "not_found"]


def test_planned_folder_runs_on_the_local_executor_into_corpus_rows(two_pages, tmp_path):
    folder = tmp_path / "pdfs"
    folder.mkdir()
    (folder / "a.pdf").write_bytes(two_pages.data)
    (folder / "b.pdf").write_bytes(text_pdf(1, seed=2).data)
    (folder / "broken.pdf").write_bytes(b"%PDF-1.4 nothing else")
    (folder / "notes.txt").write_text("not a pdf")
    layout = RunLayout(Storage(str(tmp_path / "run")))
    tasks = plan_documents(layout, [str(folder)], shard_size=2, s3=RenderConfig().s3)
    assert [t.shard_id.startswith("doc-") for t in tasks] == [True, True]
    assert plan_documents(layout, [str(folder)], 2, RenderConfig().s3) == tasks  # stable plan
    spec = StageSpec(RenderStage, RenderConfig(text_source="text_layer"))
    fingerprint = spec.build().fingerprint()
    executor = make_executor(ExecutorConfig(kind="local", progress=False))
    reports = list(executor.run(spec, layout.storage, fingerprint, tasks))
    assert [r.status for r in reports] == ["computed", "computed"]
    pages = pa.concat_tables([layout.read_output("render", t.shard_id) for t in tasks])
    errors = layout.read_errors("render").to_pylist()
    assert pages.num_rows == 3 and [e["reason"] for e in errors] == ["broken_pdf"]

    rows = document_corpus_rows(pages, DocumentCorpusConfig())
    assert rows.schema.equals(CORPUS_PART_SCHEMA, check_metadata=True)
    assert set(rows.column("source_type").to_pylist()) == {"document"}
    assert rows.column("global_caption").null_count == rows.num_rows
    first = rows.to_pylist()[0]
    page = pages.to_pylist()[0]
    assert first["image_id"] == page["page_id"] and first["image_bytes"] == page["image_bytes"]
    assert len(first["regions"]) == len(page["regions"])
    assert first["regions"][0]["caption"] == page["regions"][0]["text"]
    pages_of_a = [
        r for r, p in zip(rows.to_pylist(), pages.to_pylist(), strict=True) if p["source_ref"].endswith("a.pdf")
    ]
    assert len({r["split"] for r in pages_of_a}) == 1  # a document's pages share a split

    corpus_tasks = plan_document_corpus(layout)
    corpus_spec = StageSpec(DocumentCorpusStage, DocumentCorpusConfig())
    corpus_fingerprint = corpus_spec.build().fingerprint()
    assert {r.status for r in executor.run(corpus_spec, layout.storage, corpus_fingerprint, corpus_tasks)} == {
        "computed"
    }
    dataset = build_corpus(layout, CorpusConfig(), {"render": fingerprint, "document-corpus": corpus_fingerprint})
    assert sum(split["images"] for split in dataset.counts.values()) == 3
    assert sum(split["regions"] for split in dataset.counts.values()) == sum(len(r) for r in rows.column("regions"))
    assert check_documents(layout) == []
    layout.storage.delete(RunLayout.manifest_key("corpus", corpus_tasks[0].shard_id))
    assert [(g.stage, g.problem) for g in check_documents(layout)] == [("corpus", "missing_shard")]

    sentences_only = document_corpus_rows(pages, DocumentCorpusConfig(schemes=("sentence",), max_regions_per_page=2))
    assert all(len(r) == 2 for r in sentences_only.column("regions").to_pylist())
    sentence_ids = {r["region_id"] for p in pages.to_pylist() for r in p["regions"] if r["scheme"] == "sentence"}
    assert {r["region_id"] for rs in sentences_only.column("regions").to_pylist() for r in rs} <= sentence_ids


def test_document_corpus_stage_reports_pages_without_chosen_regions():
    page = sample_page(regions=[])
    stage = DocumentCorpusStage(DocumentCorpusConfig())
    result = stage.process_batch(records_to_table([page], DOCUMENT_PAGE_SCHEMA), ShardContext("corpus", "doc-x", 1))
    assert result.output.num_rows == 0
    assert [(e["reason"], e["input_ref"]) for e in result.errors.to_pylist()] == [("no_regions", "a.pdf#page=4")]


def sample_page(regions: list[DocumentRegion]) -> DocumentPage:
    return DocumentPage(
        page_id="p" * 32,
        item_id="i1",
        shard_id="doc-x",
        doc_sha256="d" * 64,
        source_ref="a.pdf",
        source_kind="file",
        source_list="pdfs/",
        final_url=None,
        page_index=3,
        num_pages=9,
        image_bytes=b"\x89PNG",
        image_format="PNG",
        width=1275,
        height=1650,
        dpi=150.0,
        page_width_pt=612.0,
        page_height_pt=792.0,
        rotation=0,
        text_source="text_layer",
        text_engine="pdfium 1",
        num_words=12,
        regions=regions,
        license=None,
        attribution=None,
        metadata_json="{}",
        rendered_at=datetime(2026, 11, 24, tzinfo=UTC),
    )


def test_document_page_schema_matches_its_model():
    check_model_matches_schema(DocumentPage, DOCUMENT_PAGE_SCHEMA)
    region = DocumentRegion(region_id="r", scheme="sentence", x0=1, y0=2, x1=30, y1=40, text="Hi.", num_words=1)
    table = records_to_table([sample_page([region])], DOCUMENT_PAGE_SCHEMA)
    assert DocumentPage.model_validate(table.to_pylist()[0]) == sample_page([region])
    with pytest.raises(ValueError, match="not a valid xyxy box"):
        DocumentRegion(region_id="r", scheme="sentence", x0=5, y0=2, x1=5, y1=40, text="", num_words=0)


def test_s3_prefix_source_plans_and_renders(two_pages, s3_bucket, s3_server, tmp_path):
    client = s3_server.client()
    client.put_object(Bucket=s3_bucket, Key="pdfs/a.pdf", Body=two_pages.data)
    client.put_object(Bucket=s3_bucket, Key="pdfs/sub/b.PDF", Body=text_pdf(1, seed=4).data)
    client.put_object(Bucket=s3_bucket, Key="pdfs/cover.jpg", Body=b"not a pdf")
    layout = RunLayout(Storage(str(tmp_path / "run")))
    (task,) = plan_documents(layout, [f"s3://{s3_bucket}/pdfs"], shard_size=8, s3=RenderConfig().s3)
    planned = layout.storage.read_parquet(task.input_key)
    assert planned.column("source_ref").to_pylist() == [
        f"s3://{s3_bucket}/pdfs/a.pdf",
        f"s3://{s3_bucket}/pdfs/sub/b.PDF",
    ]
    assert set(planned.column("source_kind").to_pylist()) == {"s3"}
    stage = RenderStage(RenderConfig(text_source="text_layer"))
    result = stage.process_batch(planned, CONTEXT)
    stage.teardown()
    assert result.errors.num_rows == 0
    assert result.output.column("page_index").to_pylist() == [0, 1, 0]


def test_local_and_ray_executors_write_the_same_pages(ray_local, tmp_path):
    folder = tmp_path / "pdfs"
    folder.mkdir()
    for seed in range(3):
        (folder / f"{seed}.pdf").write_bytes(text_pdf(2, paragraphs=2, seed=seed).data)
    spec = StageSpec(RenderStage, RenderConfig(text_source="text_layer"))
    outputs = {}
    for kind in ("local", "ray"):
        layout = RunLayout(Storage(str(tmp_path / f"run-{kind}")))
        tasks = plan_documents(layout, [str(folder)], shard_size=2, s3=RenderConfig().s3)
        executor = make_executor(ExecutorConfig(kind=kind, progress=False))
        reports = list(executor.run(spec, layout.storage, spec.build().fingerprint(), tasks))
        assert {r.status for r in reports} == {"computed"}
        pages = pa.concat_tables([layout.read_output("render", t.shard_id) for t in tasks]).drop_columns(
            ["rendered_at"]
        )
        outputs[kind] = pages.sort_by([("page_id", "ascending")])
    assert outputs["local"].num_rows == 6
    assert outputs["local"].equals(outputs["ray"])


def test_the_same_pdf_under_two_names_gives_distinct_pages_in_one_split(two_pages, tmp_path):
    pages, _ = render(tmp_path, {"a.pdf": two_pages.data, "copy.pdf": two_pages.data}, text_source="text_layer")
    assert len({p["page_id"] for p in pages}) == 4
    rows = document_corpus_rows(pa.Table.from_pylist(pages, DOCUMENT_PAGE_SCHEMA), DocumentCorpusConfig())
    assert len(set(rows.column("split").to_pylist())) == 1
    again, _ = render(tmp_path, {"a.pdf": two_pages.data, "copy.pdf": two_pages.data}, text_source="text_layer")
    assert [p["page_id"] for p in again] == [p["page_id"] for p in pages]  # stable across reruns


def test_run_with_documents_only_builds_a_document_corpus(tmp_path, capsys):
    """`ps3-engine run --documents FOLDER`: render -> corpus rows -> packed dataset, every item accounted for."""
    import json as json_module

    import polars as pl

    from ps3_engine.pipeline.cli import main
    from tests.support.pdfs import text_pdf

    folder = tmp_path / "pdfs"
    folder.mkdir()
    for seed in range(2):
        (folder / f"doc-{seed}.pdf").write_bytes(text_pdf(seed=seed).data)
    (folder / "broken.pdf").write_bytes(b"%PDF-1.7 not really")
    run_root = tmp_path / "run"
    argv = ["run", "--documents", str(folder), "--run-root", str(run_root), "--executor", "local"]
    assert main([*argv, "--set", "executor.progress=false", "--set", "corpus.validation_fraction=0.0"]) == 0
    out = capsys.readouterr().out
    assert "[render]" in out and "'broken_pdf': 1" in out and "[dataset] train:" in out
    frame = pl.read_parquet(str(run_root / "dataset" / "images" / "train" / "*.parquet"))
    assert set(frame["source_type"]) == {"document"} and frame["global_caption"].null_count() == frame.height
    assert all(len(regions) > 0 for regions in frame["regions"])
    assert main(["status", str(run_root), "--check"]) == 0
    assert "OK" in capsys.readouterr().out
    summary = json_module.loads((run_root / "summary.json").read_text())
    assert {"render", "build-corpus"} <= set(summary["stages"])


# -- reading order under page rotation, and text the page does not show ------------------------------


def test_rotated_pages_give_the_same_regions_in_reading_order(tmp_path):
    """A page displayed upside down once made every line its own sentence (25 instead of 14) and
    changed the word runs; whatever the /Rotate, the regions are the unrotated page's, in its order."""
    generated = text_pdf(1, paragraphs=3, lines_per_paragraph=4, seed=3)
    known = [placed.text for placed in generated.pages[0]]
    upright_runs = None
    for rotation in (0, 90, 180, 270):
        pages, errors = render(tmp_path, {"rot.pdf": rotated_pdf(generated.data, rotation)}, text_source="text_layer")
        assert errors == []
        (page,) = pages
        sentences = regions_of(page, "sentence")
        assert [s["text"] for s in sentences] == known, rotation
        for sentence, placed in zip(sentences, generated.pages[0], strict=True):
            expected = rotate_box(to_pixels(placed.box_pt, 792, 150), rotation, *LETTER_PX_150)
            assert iou(box(sentence), expected) >= 0.5, (rotation, sentence["text"])
        runs = [r["text"] for r in regions_of(page, "word_run")]
        assert runs == (upright_runs := upright_runs or runs), rotation


def off_page_pdf(crop: tuple[float, float, float, float] | None = None) -> bytes:
    """One letter page: a sentence drawn right of the page, one below it, and (when ``crop`` is given)
    visible text that the crop box may hide."""
    buffer = io.BytesIO()
    pdf = canvas.Canvas(buffer, pagesize=(612, 792), invariant=1)
    pdf.setFont("Helvetica", 12)
    pdf.drawString(700, 400, "Drawn right of the page where nobody sees it.")
    pdf.drawString(100, -50, "Drawn below the page as well.")
    if crop is not None:
        pdf.drawString(72, 700, "Top sentence stays in view.")
        pdf.drawString(72, 100, "Bottom sentence is cropped away.")
    pdf.showPage()
    pdf.save()
    if crop is None:
        return buffer.getvalue()
    document = pdfium.PdfDocument(buffer.getvalue())
    document[0].set_cropbox(*crop)
    out = io.BytesIO()
    document.save(out)
    document.close()
    return out.getvalue()


def test_text_outside_the_visible_page_is_no_text(tmp_path):
    """The issue's instance: words only outside the page box were kept as a page with 0 regions."""
    pages, errors = render(tmp_path, {"off.pdf": off_page_pdf()}, text_source="text_layer")
    assert pages == []
    assert [(e["category"], e["reason"]) for e in errors] == [("filtered", "no_text")]


def test_text_cropped_away_by_the_crop_box_is_not_a_region(tmp_path):
    """A sibling: the visible page box is the crop box, and half the page's text lies outside it."""
    pages, errors = render(tmp_path, {"crop.pdf": off_page_pdf(crop=(0, 400, 612, 792))}, text_source="text_layer")
    assert errors == []
    (page,) = pages
    assert (page["width"], page["height"]) == (1275, 817)  # 612 x 392 pt at 150 dpi
    assert [s["text"] for s in regions_of(page, "sentence")] == ["Top sentence stays in view."]
    assert all(0 <= r["y0"] < r["y1"] <= page["height"] for r in page["regions"])
    _, hidden = render(tmp_path, {"none.pdf": off_page_pdf(crop=(0, 300, 612, 500))}, text_source="text_layer")
    assert [(e["category"], e["reason"]) for e in hidden] == [("filtered", "no_text")]


def test_words_that_form_no_region_are_no_text(tmp_path):
    """A sibling: a page with 3 words and only 5-word runs chosen was kept with 0 regions."""
    buffer = io.BytesIO()
    pdf = canvas.Canvas(buffer, pagesize=(612, 792), invariant=1)
    pdf.setFont("Helvetica", 12)
    pdf.drawString(72, 700, "Only three words.")
    pdf.showPage()
    pdf.save()
    pages, errors = render(tmp_path, {"short.pdf": buffer.getvalue()}, text_source="text_layer", schemes=("word_run",))
    assert pages == [] and [(e["category"], e["reason"]) for e in errors] == [("filtered", "no_text")]
    assert "form no word_run region" in errors[0]["message"]
