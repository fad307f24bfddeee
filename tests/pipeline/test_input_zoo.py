"""The issue 14 input zoo: every instance of the issue (and cheap siblings) through the whole pipeline.

One run (in-process executor, tiny captioner) over:

* the crawl zoo (``ZOO_EXPECTED``: bad HTTP answers, broken images, duplicates, the issue's image
  instances, a URL with credentials) and ``ZOO_EXTRA_EXPECTED`` (a URL listed three times, blank images,
  a 7999x7999 PNG, 16-bit images holding 8-bit values, a truncated WebP, a redirect to ``file://``, ...);
* list lines that name nothing to fetch (a byte-order mark, ``ftp://``, local paths, a link-local literal)
  and a URL spelled with an upper-case scheme and a fragment;
* a Parquet list with a ``large_string`` url column and a null cell, and one with an integer url;
* PDFs through render: upright, rotated 90 and 180 degrees, text only outside the page box, broken.

Each stage's ledger is rebuilt here from the run root, independently of ``status --check`` (which must
also say OK): every item that entered the stage left it as exactly one output or one error row, with the
expected reason for each bad item. tests/pipeline/test_plan_trace.py covers reruns and lineage instead.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ps3_engine.infra.storage import Storage
from ps3_engine.pipeline.cli import main
from ps3_engine.pipeline.config import load_run_config
from ps3_engine.pipeline.documents import CORPUS_STAGE, RENDER_STAGE, render_input_key
from ps3_engine.pipeline.layout import RunLayout
from ps3_engine.pipeline.runner import run_pipeline
from tests.pipeline.test_plan_trace import overrides_for
from tests.support.pdfs import rotated_pdf, text_pdf
from tests.support.zoo import (
    CREDENTIAL_PATHS,
    CREDENTIAL_SECRET,
    ZOO_CRAWL_OVERRIDES,
    ZOO_EXPECTED,
    ZOO_EXTRA_EXPECTED,
)

pytestmark = pytest.mark.slow

# Kept images that segment must end as filtered no_salient_region (issue kind 5 and a blank 64 MP PNG).
BLANK = {"/blank-white.jpg", "/sparse-7999.png"}
Outcome = tuple[str, str]  # (category, reason); ("kept", "") for an output row


def off_page_pdf() -> bytes:
    """A letter page whose only text is drawn right of and below the visible page box."""
    import io

    from reportlab.pdfgen import canvas

    buffer = io.BytesIO()
    pdf = canvas.Canvas(buffer, pagesize=(612, 792), invariant=1)
    pdf.setFont("Helvetica", 12)
    pdf.drawString(700, 400, "Drawn right of the page where nobody sees it.")
    pdf.drawString(100, -50, "Drawn below the page as well.")
    pdf.showPage()
    pdf.save()
    return buffer.getvalue()


def list_lines(zoo, tmp_path: Path) -> tuple[list[str], dict[str, list[Outcome]]]:
    """The URL list's lines and the crawl outcomes expected per stored reference (one per listed item)."""
    local = tmp_path / "local.jpg"
    local.write_bytes(zoo.assets["/good/4.jpg"])
    urls = zoo.urls()
    lines = ["\ufeff" + urls[0], *urls[1:], *(zoo.url(p) for p in ZOO_EXTRA_EXPECTED if p != "/from-parquet.jpg")]
    lines += [zoo.url("/thrice.jpg")] * 2
    expected: dict[str, list[Outcome]] = defaultdict(list)
    for path, outcome in {**ZOO_EXPECTED, **ZOO_EXTRA_EXPECTED}.items():
        expected[zoo.url(path)].append(outcome)
    expected[zoo.url("/thrice.jpg")] += [("filtered", "duplicate_exact")] * 2
    upper = zoo.url("/good/1.jpg").replace("http://", "HTTP://") + "#fragment"
    lines.append(upper)
    expected[upper] = [("filtered", "duplicate_exact")]  # the same bytes as /good/1.jpg, listed earlier
    source = tmp_path / "zoo.txt"
    refused = {
        "ftp://127.0.0.1/x.jpg": ("failed", "unsupported_scheme"),
        "file:///etc/passwd": ("failed", "local_file_refused"),
        str(local): ("failed", "local_file_refused"),
        "../rel.jpg": ("failed", "local_file_refused"),
        "http://[fe80::1]/x.jpg": ("failed", "blocked_address"),
    }
    for line, outcome in refused.items():
        lines.append(line)
        ref = f"{source}#line={len(lines)}" if outcome[1] == "unsupported_scheme" else line
        expected[ref].append(outcome)
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return [str(source)], dict(expected)


def parquet_lists(zoo, tmp_path: Path) -> tuple[list[str], dict[str, list[Outcome]]]:
    """A list with a large_string url column holding a null cell, and one whose url column is integer."""
    strings, ints = tmp_path / "list.parquet", tmp_path / "ints.parquet"
    urls = pa.array([zoo.url("/from-parquet.jpg"), None], pa.large_string())
    pq.write_table(pa.table({"url": urls, "caption": ["listed in Parquet", "no url"]}), strings)
    pq.write_table(pa.table({"url": [7]}), ints)
    expected = {f"{strings}#row=2": [("failed", "missing_url")], f"{ints}#row=1": [("failed", "invalid_url")]}
    return [str(strings), str(ints)], expected


def documents(folder: Path) -> tuple[dict[str, Outcome], list[str]]:
    """PDFs for render, the render outcome expected per file name, and the upright page's sentences."""
    folder.mkdir()
    generated = text_pdf(1, paragraphs=3, lines_per_paragraph=4, seed=3)
    upright = generated.data
    files = {
        "upright.pdf": (upright, ("kept", "")),
        "rotated-90.pdf": (rotated_pdf(upright, 90), ("kept", "")),
        "rotated-180.pdf": (rotated_pdf(upright, 180), ("kept", "")),
        "off-page.pdf": (off_page_pdf(), ("filtered", "no_text")),
        "broken.pdf": (b"%PDF-1.7 not really a document", ("failed", "broken_pdf")),
    }
    for name, (data, _) in files.items():
        (folder / name).write_bytes(data)
    return {name: outcome for name, (_, outcome) in files.items()}, [p.text for p in generated.pages[0]]


@pytest.fixture(scope="module")
def zoo_run(zoo, tmp_path_factory, tiny_captioner):
    tmp_path = tmp_path_factory.mktemp("input-zoo")
    text_sources, expected = list_lines(zoo, tmp_path)
    parquet_sources, parquet_expected = parquet_lists(zoo, tmp_path)
    expected_documents = documents(tmp_path / "pdfs")
    overrides = [o for o in overrides_for(tiny_captioner) if not o.startswith("crawl.min_")]
    config = load_run_config(
        None,
        [
            *overrides,
            *ZOO_CRAWL_OVERRIDES,
            "segment.mask_max_side=384",
            "segment.top_k=2",
            "render.text_source=text_layer",
            "corpus.validation_fraction=0.0",
        ],
        run_root=str(tmp_path / "run"),
        sources=[*text_sources, *parquet_sources],
        document_sources=[str(tmp_path / "pdfs")],
    )
    zoo.reset()
    results = {r.stage: r for r in run_pipeline(config)}
    layout = RunLayout(Storage(config.run_root))
    return layout, results, {**expected, **parquet_expected}, expected_documents


def _outcome(row: dict) -> Outcome:
    return row["category"], row["reason"]


def crawl_ledger(layout: RunLayout) -> tuple[dict[str, list[Outcome]], dict[str, str]]:
    """Stored reference -> outcomes (one per planned item), and image id -> reference of each kept image."""
    planned = Counter()
    for obj in layout.storage.list("crawl/_input/"):
        planned.update(layout.storage.read_parquet(obj.key, columns=["item_id"]).column("item_id").to_pylist())
    assert set(planned.values()) == {1}
    dropped = layout.dropped_item_ids()
    seen: Counter[str] = Counter()
    by_ref: dict[str, list[Outcome]] = defaultdict(list)
    kept: dict[str, str] = {}
    for shard in layout.manifests("crawl"):
        for row in layout.read_output("crawl", shard, columns=["item_id", "image_id", "source_ref"]).to_pylist():
            if row["item_id"] not in dropped:
                seen[row["item_id"]] += 1
                by_ref[row["source_ref"]].append(("kept", ""))
                assert row["image_id"] not in kept, f"{row['source_ref']}: its image enters segment twice"
                kept[row["image_id"]] = row["source_ref"]
    for row in layout.read_errors("crawl").to_pylist():
        seen[row["item_id"]] += 1
        by_ref[row["input_ref"]].append(_outcome(row))
    assert seen == planned, "crawl: an item is lost, duplicated or unexpected"
    return {ref: sorted(outcomes) for ref, outcomes in by_ref.items()}, kept


def one_row_each(stage: str, expected: set[str], seen: list[str]) -> None:
    counts = Counter(seen)
    assert set(counts) == expected and set(counts.values()) <= {1}, (
        f"{stage}: lost {sorted(expected - set(counts))[:3]}, unexpected {sorted(set(counts) - expected)[:3]}, "
        f"duplicated {[k for k, n in counts.items() if n > 1][:3]}"
    )


def test_every_crawl_item_ends_once_with_its_expected_reason(zoo_run):
    layout, results, expected, _ = zoo_run
    found, _ = crawl_ledger(layout)
    assert found == {ref: sorted(outcomes) for ref, outcomes in expected.items()}
    assert results["crawl"].failed_shards == []


def test_every_kept_image_is_segmented_captioned_and_packed_once(zoo_run, zoo):
    layout, results, _, _ = zoo_run
    _, kept = crawl_ledger(layout)
    regions: dict[str, list[str]] = defaultdict(list)
    segment_errors: dict[str, Outcome] = {}
    for shard in layout.manifests("segment"):
        for row in layout.read_output("segment", shard, columns=["image_id", "region_id"]).to_pylist():
            regions[row["image_id"]].append(row["region_id"])
    for row in layout.read_errors("segment").to_pylist():
        assert row["item_id"] not in segment_errors
        segment_errors[row["item_id"]] = _outcome(row)
    one_row_each("segment", set(kept), [*regions, *segment_errors])
    by_path = {zoo.path_of(ref): image_id for image_id, ref in kept.items()}
    assert {path: segment_errors.get(by_path[path]) for path in BLANK} == dict.fromkeys(
        BLANK, ("filtered", "no_salient_region")
    )
    assert by_path["/good/0.jpg"] in regions and by_path["/float01.tif"] in regions

    requests = {rid for rids in regions.values() for rid in rids} | {f"{image}:global" for image in regions}
    seen = []
    for shard in layout.manifests("caption"):
        for row in layout.read_output("caption", shard, columns=["image_id", "region_id", "kind"]).to_pylist():
            seen.append(row["region_id"] if row["kind"] == "local" else f"{row['image_id']}:global")
    seen += layout.read_errors("caption").column("item_id").to_pylist()
    one_row_each("caption", requests, seen)

    corpus_seen = []
    image_shards = set(layout.manifests("crawl"))
    for shard, entry in layout.manifests("corpus").items():
        if shard in image_shards:
            corpus_seen += layout.storage.read_parquet(entry.output_key, columns=["image_id"]).column(0).to_pylist()
            corpus_seen += layout.storage.read_parquet(entry.errors_key, columns=["item_id"]).column(0).to_pylist()
    one_row_each("build-corpus", set(regions), corpus_seen)
    assert results["build-corpus"].kept_rows > 0


def test_every_document_renders_once_in_reading_order_and_every_page_reaches_the_corpus(zoo_run):
    layout, _, _, (expected_documents, known_sentences) = zoo_run
    pages: dict[str, list[dict]] = defaultdict(list)
    outcomes: dict[str, Outcome] = {}
    for shard, entry in layout.manifests(RENDER_STAGE).items():
        planned = layout.storage.read_parquet(render_input_key(shard), columns=["item_id"]).column(0).to_pylist()
        rows = layout.storage.read_parquet(entry.output_key, columns=["item_id", "page_id", "source_ref", "regions"])
        for row in rows.to_pylist():
            pages[Path(row["source_ref"]).name].append(row)
        errors = layout.storage.read_parquet(entry.errors_key).to_pylist()
        for row in errors:
            name = Path(row["input_ref"].split("#", 1)[0]).name
            assert name not in outcomes
            outcomes[name] = _outcome(row)
        one_row_each(
            "render", set(planned), sorted({r["item_id"] for r in rows.to_pylist()}) + [e["item_id"] for e in errors]
        )
        page_ids = [r["page_id"] for r in rows.to_pylist()]
        corpus = layout.manifests(CORPUS_STAGE)[shard]
        corpus_seen = layout.storage.read_parquet(corpus.output_key, columns=["image_id"]).column(0).to_pylist()
        corpus_seen += layout.storage.read_parquet(corpus.errors_key, columns=["item_id"]).column(0).to_pylist()
        one_row_each("build-corpus (pages)", set(page_ids), corpus_seen)
    outcomes.update({name: ("kept", "") for name, rows in pages.items() if len(rows) == 1})
    assert outcomes == expected_documents

    def sentences(name: str) -> list[str]:
        return [r["text"] for r in pages[name][0]["regions"] if r["scheme"] == "sentence"]

    # Reading order whatever the /Rotate (a 180-degree page once made every line its own sentence).
    for name in ("upright.pdf", "rotated-90.pdf", "rotated-180.pdf"):
        assert sentences(name) == known_sentences, name


def test_nothing_secret_or_local_is_stored_and_the_conservation_check_is_ok(zoo_run, zoo, capsys):
    layout, _, _, _ = zoo_run
    root = Path(layout.storage.root_uri)
    stored = []
    for path in root.rglob("*"):
        if path.suffix == ".parquet":  # decoded: a compressed page need not hold a string verbatim
            table = pq.read_table(path)
            stored.append(repr(table.drop_columns([c for c in table.column_names if "bytes" in c]).to_pylist()))
        elif path.is_file():
            stored.append(path.read_bytes().decode("utf-8", "replace"))
    text = "\n".join(stored)
    assert CREDENTIAL_SECRET not in text and "root:x:0:0" not in text
    assert {zoo.path_of(zoo.url(p)) for p in CREDENTIAL_PATHS} <= set(ZOO_EXPECTED)
    assert zoo.authorization_headers == []
    capsys.readouterr()
    assert main(["status", str(root), "--check"]) == 0
    assert "OK" in capsys.readouterr().out
