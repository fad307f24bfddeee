"""Lineage (``ps3-engine trace REGION_ID``): a region back through caption, segment and crawl to its source.

Ids are content-derived (image id = sha256 of the bytes, region id = hash of image id and box), so the
trace is a lookup across the stages' shards: the region row, its image row, its caption (and the
image's global caption), its corpus row and dataset shard, each with the shard's config fingerprint and
the stage settings of the run snapshot. A region of a rendered PDF page (the document branch) is traced
through its render shard to the document instead: its caption is the page's own text.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow.compute as pc

from ps3_engine.pipeline.corpus import MANIFEST_KEY as DATASET_MANIFEST_KEY
from ps3_engine.pipeline.layout import RunLayout


def _find(layout: RunLayout, stage: str, column: str, value: str) -> tuple[str, dict[str, Any]] | None:
    for shard_id, entry in sorted(layout.manifests(stage).items()):
        table = layout.storage.read_parquet(entry.output_key)
        matches = table.filter(pc.equal(table.column(column), value))
        if matches.num_rows:
            return shard_id, matches.slice(0, 1).to_pylist()[0]
    return None


def trace_region(layout: RunLayout, region_id: str) -> dict[str, Any]:
    """Everything known about ``region_id``, upstream to the source URL; raises KeyError when unknown."""
    found = _find(layout, "segment", "region_id", region_id)
    snapshot = layout.storage.read_json(layout.RUN_CONFIG_KEY) if layout.storage.exists(layout.RUN_CONFIG_KEY) else {}
    config = snapshot.get("config", {})
    if found is None:
        # Regions of rendered PDF pages (the document branch) come from render, not segment.
        document = _trace_document_region(layout, region_id, config)
        if document is None:
            raise KeyError(f"region {region_id} is in no segment or render shard of this run")
        return document
    shard_id, region = found

    def fingerprint(stage: str) -> str | None:
        entry = layout.manifests(stage).get(shard_id)
        return entry.config_fingerprint if entry else None

    image = _find(layout, "crawl", "image_id", region["image_id"])
    image_row = image[1] if image else {}
    captions = []
    caption_entry = layout.manifests("caption").get(shard_id)
    if caption_entry is not None:
        table = layout.storage.read_parquet(caption_entry.output_key)
        for row in table.filter(pc.equal(table.column("image_id"), region["image_id"])).to_pylist():
            if row["region_id"] in (region_id, None):
                captions.append(row)
    corpus = _find(layout, "corpus", "image_id", region["image_id"])
    dataset_shard = _dataset_shard(layout, region["image_id"])
    return {
        "region": {k: region[k] for k in ("region_id", "image_id", "x0", "y0", "x1", "y1", "score", "rank")},
        "segment": {
            "shard_id": shard_id,
            "backend": region["backend"],
            "settings": json.loads(region["backend_settings_json"]),
            "config_fingerprint": fingerprint("segment"),
        },
        "crawl": {
            "source_ref": image_row.get("source_ref"),
            "final_url": image_row.get("final_url"),
            "source_list": image_row.get("source_list"),
            "license": image_row.get("license"),
            "attribution": image_row.get("attribution"),
            "width": image_row.get("width"),
            "height": image_row.get("height"),
            "sha256": image_row.get("sha256"),
            "fetched_at": str(image_row.get("fetched_at")),
            "config_fingerprint": fingerprint("crawl"),
        },
        "captions": [
            {
                "kind": c["kind"],
                "text": c["clean_text"],
                "raw_text": c["raw_text"],
                "model": c["model"],
                "prompt_version": c["prompt_version"],
                "sampling": json.loads(c["sampling_json"]),
                "config_fingerprint": fingerprint("caption"),
            }
            for c in sorted(captions, key=lambda c: c["kind"])
        ],
        "corpus": {
            "in_corpus": corpus is not None and any(r["region_id"] == region_id for r in corpus[1]["regions"]),
            "split": corpus[1]["split"] if corpus else None,
            "dataset_shard": dataset_shard,
            "config_fingerprint": fingerprint("corpus"),
        },
        "run_config": {stage: config.get(stage) for stage in ("crawl", "segment", "caption", "corpus")},
    }


def _dataset_shard(layout: RunLayout, image_id: str) -> str | None:
    """The packed dataset shard holding ``image_id`` (None: not packed, or no dataset yet)."""
    if not layout.storage.exists(DATASET_MANIFEST_KEY):
        return None
    for shard in layout.storage.read_json(DATASET_MANIFEST_KEY)["shards"]:
        ids = layout.storage.read_parquet(shard["key"], columns=["image_id"]).column("image_id")
        if pc.any(pc.equal(ids, image_id)).as_py():
            return shard["key"]
    return None


PAGE_COLUMNS = (
    "page_id", "regions", "source_ref", "final_url", "source_list", "license", "attribution", "doc_sha256",
    "page_index", "num_pages", "width", "height", "dpi", "text_source", "text_engine", "rendered_at",
)  # fmt: skip


def _trace_document_region(layout: RunLayout, region_id: str, config: dict[str, Any]) -> dict[str, Any] | None:
    """A region of a rendered PDF page back to its document: render shard, page, text, corpus row."""
    for shard_id, entry in sorted(layout.manifests("render").items()):
        table = layout.storage.read_parquet(entry.output_key, columns=list(PAGE_COLUMNS))  # no page pixels
        ids = pc.struct_field(pc.list_flatten(table.column("regions")), "region_id")
        if not pc.any(pc.equal(ids, region_id)).as_py():
            continue
        page = next(p for p in table.to_pylist() if any(r["region_id"] == region_id for r in p["regions"]))
        region = next(r for r in page["regions"] if r["region_id"] == region_id)
        corpus_entry = layout.manifests("corpus").get(shard_id)
        corpus = None
        if corpus_entry is not None:
            rows = layout.storage.read_parquet(corpus_entry.output_key, columns=["image_id", "split", "regions"])
            corpus = next((r for r in rows.to_pylist() if r["image_id"] == page["page_id"]), None)
        return {
            "region": {"region_id": region_id, "image_id": page["page_id"]}
            | {k: region[k] for k in ("x0", "y0", "x1", "y1", "scheme", "num_words")},
            "render": {
                "shard_id": shard_id,
                **{k: page[k] for k in ("page_index", "num_pages", "width", "height", "dpi")},
                **{k: page[k] for k in ("text_source", "text_engine")},
                "rendered_at": str(page["rendered_at"]),
                "config_fingerprint": entry.config_fingerprint,
            },
            "document": {k: page[k] for k in ("source_ref", "final_url", "source_list", "license", "attribution")}
            | {"sha256": page["doc_sha256"]},
            "captions": [{"kind": "local", "text": region["text"], "source": page["text_source"]}],
            "corpus": {
                "in_corpus": corpus is not None and any(r["region_id"] == region_id for r in corpus["regions"]),
                "split": corpus["split"] if corpus else None,
                "dataset_shard": _dataset_shard(layout, page["page_id"]),
                "config_fingerprint": corpus_entry.config_fingerprint if corpus_entry else None,
            },
            "run_config": {stage: config.get(stage) for stage in ("render", "document_corpus", "corpus")},
        }
    return None
