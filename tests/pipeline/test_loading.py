"""README "Loading the corpus": every snippet runs as written against a corpus built by the real pipeline.

The snippets are taken from README.md (the ```python blocks of that section), their run root
``"demo-output/run"`` replaced by the test run's, and executed; the test then checks what each one
loaded against the packed Parquet files. The corpus holds an EXIF orientation-6 photo: the torch
loader's image and boxes must put the box on the planted object.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.support.corpus_run import ProvenanceRun, build_provenance_run

README = Path(__file__).resolve().parents[2] / "README.md"
SECTION = "## Loading the corpus"
PLACEHOLDER = '"demo-output/run"'
SNIPPETS = ("polars", "pyarrow.dataset", "duckdb", "datasets", "ray", "torch")


@pytest.fixture(scope="module")
def provenance_run(tiny_captioner, tmp_path_factory) -> ProvenanceRun:
    return build_provenance_run(tmp_path_factory.getbasetemp() / "provenance-run", tiny_captioner)


def readme_snippets() -> list[str]:
    text = README.read_text()
    section = text[text.index(SECTION) :]
    section = section[: section.find("\n## ", len(SECTION))]
    return re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)


def run_snippet(index: int, run: ProvenanceRun) -> dict:
    code = readme_snippets()[index]
    assert PLACEHOLDER in code, f"snippet {index} does not name the run root as {PLACEHOLDER}"
    namespace: dict = {"__name__": f"readme_snippet_{index}"}
    exec(compile(code.replace(PLACEHOLDER, repr(str(run.root))), f"README.md snippet {index}", "exec"), namespace)
    return namespace


def packed_rows(run: ProvenanceRun) -> list[dict]:
    files = sorted((run.root / "dataset" / "images").rglob("*.parquet"))
    return [row for path in files for row in pq.read_table(path).to_pylist()]


def test_the_section_has_one_snippet_per_loader():
    snippets = readme_snippets()
    assert len(snippets) == len(SNIPPETS)
    for code, library in zip(snippets, SNIPPETS, strict=True):
        assert f"import {library}" in code or f"from {library} import" in code, library


def test_polars_snippet(provenance_run):
    found = run_snippet(0, provenance_run)
    rows = packed_rows(provenance_run)
    assert found["images"].height == len(rows) == 2
    assert found["pairs"].height == sum(len(r["regions"]) for r in rows)
    assert set(found["images"]["url"]) == {r["url"] for r in provenance_run.rows.values()}
    assert set(found["images"]["alt_text"]) == {r["alt_text"] for r in provenance_run.rows.values()}


def test_pyarrow_dataset_snippet(provenance_run):
    train = run_snippet(1, provenance_run)["train"]
    assert sorted(train.column("image_id").to_pylist()) == sorted(r["image_id"] for r in packed_rows(provenance_run))


def test_duckdb_snippet(provenance_run):
    by_licence = run_snippet(2, provenance_run)["by_licence"]
    rows = {r["license"]: r for r in packed_rows(provenance_run)}
    assert by_licence == [(licence, 1, len(rows[licence]["regions"])) for licence in sorted(rows)]


def test_hf_datasets_snippet(provenance_run, tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")  # keep the user's cache clean
    found = run_snippet(3, provenance_run)
    rows = packed_rows(provenance_run)
    assert set(found["corpus"]) == {"train"} and found["corpus"]["train"].num_rows == len(rows)
    assert found["pairs"]["train"].num_rows == sum(len(r["regions"]) for r in rows)
    assert found["first"]["url"] in {r["url"] for r in provenance_run.rows.values()}
    assert found["first"]["regions"] and {"x0", "y0", "x1", "y1", "caption"} <= set(found["first"]["regions"][0])


def test_ray_data_snippet(provenance_run, ray_local):
    found = run_snippet(4, provenance_run)
    rows = packed_rows(provenance_run)
    assert found["images"].count() == len(rows)
    assert found["boxes"].count() == sum(len(r["regions"]) for r in rows)


def test_torch_dataloader_snippet_puts_the_boxes_on_the_planted_object(provenance_run):
    found = run_snippet(5, provenance_run)
    image, boxes, captions = found["image"], found["boxes"], found["captions"]
    assert image.ndim == 3 and image.shape[0] == 3 and boxes.shape == (len(captions), 4)
    samples = list(found["loader"])
    rows = packed_rows(provenance_run)
    assert len(samples) == len(rows)
    expected = {tuple((r["x0"], r["y0"], r["x1"], r["y1"]) for r in row["regions"]) for row in rows}
    assert {tuple(tuple(b) for b in s[1].tolist()) for s in samples} == expected
    upright = np.asarray(provenance_run.upright, np.float32)
    (planted,) = provenance_run.planted
    centre = ((planted[0] + planted[2]) // 2, (planted[1] + planted[3]) // 2)
    rotated = [s for s in samples if tuple(s[0].shape[1:]) == upright.shape[:2]]
    assert len(rotated) == 1  # the orientation-6 photo, upright: [3, 900, 1200]
    pixels, boxes, _ = rotated[0]
    hits = [b for b in boxes.tolist() if b[0] <= centre[0] < b[2] and b[1] <= centre[1] < b[3]]
    assert hits, (planted, boxes.tolist())
    x0, y0, x1, y1 = hits[0]
    crop = pixels.permute(1, 2, 0).numpy()[y0:y1, x0:x1].astype(np.float32)
    assert np.abs(crop - upright[y0:y1, x0:x1]).mean() < 6  # the box lands on the same pixels as upright
