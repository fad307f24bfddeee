"""VILA-HD supervised-tuning data: the sample format, grounded samples from the corpus, and tensors.

A sample (``VilaHDSample``, one row of ``SFT_SCHEMA``) is one image (bytes or a reference), a
conversation whose first user turn is about the image, and optional evidence boxes (xyxy pixels in the
EXIF-oriented frame, like the corpus). Kinds:

* ``qa``: plain visual QA, next-token loss only.
* ``grounded_qa``: QA whose evidence box also supervises the top-down selection (BCE + Dice).
* ``selection``: a question without an answer; the labels are all ignored and only the selection loss
  trains (the paper's patch-selection data, spec 5.4).

``GroundedSampleMaker`` turns each (box, local caption) of a corpus row into a ``selection`` sample and
a ``grounded_qa`` sample. The paper has LLaMA-3.1 rewrite each local caption into a question; no LLM is
available here, so the questions come from fixed templates filled with the caption's first sentence,
the template chosen by a hash of the region id (deterministic across workers and reruns).

Ray Data path (``sft_dataset`` reads and checks the data)::

    kind, check = check_training_data(uri)            # before asking for GPUs
    ds = training_rows(uri, kind, "train")            # SFT shards, or corpus rows made into samples
    ds = ds.flat_map(SFTSampleTransform(image_size=1512, tokenizer_path=...).samples)
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, model_validator

from ps3_engine.infra.storage import S3Settings, Storage, read_uri_bytes
from ps3_engine.schemas.corpus import MANIFEST_KEY as CORPUS_MANIFEST_KEY
from ps3_engine.stages.captioning.hygiene import strip_boilerplate
from ps3_engine.training.common.skips import record_drop, record_skip
from ps3_engine.training.ps3.data import (
    SampleError,
    decode_oriented,
    rasterise_box_xyxy,
    split_sentences,
)
from ps3_engine.training.vila_hd.tokenizer import IGNORE_INDEX, encode_conversation, load_chat_tokenizer

logger = logging.getLogger(__name__)

SFT_SCHEMA_VERSION = 1
SampleKind = Literal["qa", "grounded_qa", "selection"]

QUESTION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "natural": (
        "What is in the region showing {subject}?",
        "Look at {subject}. What can you see there?",
        "Find {subject} in the image. What does it look like?",
        "Where is {subject}, and what is around it?",
    ),
    "document": (
        "What does the part of the page with {subject} say?",
        "Read the region that contains {subject}.",
        "Find {subject} on the page. What is written there?",
    ),
}
DESCRIBE_TEMPLATES = ("Describe {subject} in detail.", "Tell me more about {subject}.")
MAX_SUBJECT_WORDS = 16


# -- the sample format -----------------------------------------------------------------------------
class Turn(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    role: Literal["system", "user", "assistant"]
    text: str


class EvidenceBox(BaseModel):
    """xyxy pixels, half-open, in the EXIF-oriented frame of the image."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    x0: int
    y0: int
    x1: int
    y1: int


class VilaHDSample(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    sample_id: str
    kind: SampleKind
    source: str
    image_bytes: bytes | None
    image_ref: str | None
    width: int
    height: int
    turns: list[Turn]
    evidence: list[EvidenceBox]

    @model_validator(mode="after")
    def _check(self) -> VilaHDSample:
        if (self.image_bytes is None) == (self.image_ref is None):
            raise ValueError("a sample has either image_bytes or image_ref")
        if not any(t.role == "user" for t in self.turns):
            raise ValueError("a sample needs a user turn")
        has_answer = any(t.role == "assistant" for t in self.turns)
        if has_answer == (self.kind == "selection"):
            raise ValueError(f"a {self.kind} sample {'has no' if not has_answer else 'has an'} assistant turn")
        if self.kind != "qa" and not self.evidence:
            raise ValueError(f"a {self.kind} sample needs an evidence box")
        for box in self.evidence:
            if not (0 <= box.x0 < box.x1 <= self.width and 0 <= box.y0 < box.y1 <= self.height):
                raise ValueError(f"evidence box {box} is empty or outside the {self.width}x{self.height} image")
        return self

    def to_row(self) -> dict[str, Any]:
        return self.model_dump(mode="python")


_BOX_TYPE = pa.struct([pa.field(n, pa.int32(), nullable=False) for n in ("x0", "y0", "x1", "y1")])
_TURN_TYPE = pa.struct([pa.field("role", pa.string(), nullable=False), pa.field("text", pa.string(), nullable=False)])
SFT_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("image_bytes", pa.large_binary()),
        pa.field("image_ref", pa.string()),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("turns", pa.list_(_TURN_TYPE), nullable=False),
        pa.field("evidence", pa.list_(_BOX_TYPE), nullable=False),
    ],
    metadata={"record_kind": "vila_hd_sample", "schema_version": str(SFT_SCHEMA_VERSION)},
)


# -- grounded samples from the corpus --------------------------------------------------------------
def caption_subject(caption: str) -> str:
    """The caption's first sentence as a noun phrase for a template: no final stop, lower-case start, <= 16 words."""
    sentences = split_sentences(caption)
    first = sentences[0].rstrip(" .!?") if sentences else ""
    words = first.split()[:MAX_SUBJECT_WORDS]
    if words and not (len(words[0]) > 1 and words[0][1].isupper()):
        words[0] = words[0][0].lower() + words[0][1:]
    return " ".join(words)


def _pick(options: tuple[str, ...], key: str) -> str:
    return options[int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little") % len(options)]


@dataclass(frozen=True)
class GroundedSampleMaker:
    """Corpus row -> ``selection`` and/or ``grounded_qa`` samples, one per kind and (box, local caption).

    ``max_regions_per_image`` keeps a deterministic subset (by region-id hash). Picklable for Ray's
    ``flat_map`` (use :meth:`rows`).
    """

    kinds: tuple[SampleKind, ...] = ("selection", "grounded_qa")
    max_regions_per_image: int | None = None
    skip_counter: str | None = None  # the launch's counter actor (training.common.skips); None = this process

    def __post_init__(self) -> None:
        if not self.kinds or "qa" in self.kinds:
            raise ValueError(f"kinds must be a non-empty subset of ('selection', 'grounded_qa'), got {self.kinds}")

    def __call__(self, row: dict[str, Any]) -> list[VilaHDSample]:
        regions = sorted(row.get("regions") or [], key=lambda r: hashlib.sha256(r["region_id"].encode()).digest())
        if self.max_regions_per_image is not None:
            regions = regions[: self.max_regions_per_image]
        image = {"image_bytes": row.get("image_bytes") or None}
        image["image_ref"] = None if image["image_bytes"] else row.get("image_ref") or None
        if image["image_ref"] is None and image["image_bytes"] is None:
            message = "the row has neither image bytes nor an image reference"
            record_skip(self.skip_counter, "no_image", str(row.get("image_id")), message)
            return []
        style = "document" if row.get("source_type") == "document" else "natural"
        samples = []
        for region in regions:
            caption = strip_boilerplate(region["caption"] or "")
            subject = caption_subject(caption)
            if not subject:
                record_drop(self.skip_counter, "empty_caption")
                continue
            box = _clipped_box(region, row["width"], row["height"])
            if box is None:
                record_drop(self.skip_counter, "degenerate_box")
                continue
            for kind in self.kinds:
                turns = _grounded_turns(kind, style, subject, caption, region["region_id"])
                samples.append(
                    VilaHDSample(
                        sample_id=f"{region['region_id']}-{kind}",
                        kind=kind,
                        source=row["source_list"],
                        width=row["width"],
                        height=row["height"],
                        turns=turns,
                        evidence=[box],
                        **image,
                    )
                )
        return samples

    def rows(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        return [sample.to_row() for sample in self(row)]


def _clipped_box(region: dict[str, Any], width: int, height: int) -> EvidenceBox | None:
    x0, y0 = max(region["x0"], 0), max(region["y0"], 0)
    x1, y1 = min(region["x1"], width), min(region["y1"], height)
    return EvidenceBox(x0=x0, y0=y0, x1=x1, y1=y1) if x1 > x0 and y1 > y0 else None


def _grounded_turns(kind: str, style: str, subject: str, caption: str, key: str) -> list[Turn]:
    if kind == "selection":
        return [Turn(role="user", text=_pick(QUESTION_TEMPLATES[style], key).format(subject=subject))]
    sentences = split_sentences(caption)
    answer = " ".join(sentences[1:]) if len(sentences) > 1 else caption.strip()
    question = _pick(DESCRIBE_TEMPLATES, key).format(subject=subject)
    return [Turn(role="user", text=question), Turn(role="assistant", text=answer)]


def grounded_samples_from_corpus(
    corpus_uri: str,
    split: str,
    maker: GroundedSampleMaker | None = None,
    *,
    limit: int | None = None,
    s3: S3Settings | None = None,
) -> Iterator[VilaHDSample]:
    """Grounded samples of ``split``, in shard order, in this process (small corpora, tests, notebooks)."""
    maker = maker or GroundedSampleMaker()
    storage = Storage(corpus_uri, s3)
    manifest = storage.read_json(CORPUS_MANIFEST_KEY)
    produced = 0
    for shard in manifest.get("shards", []):
        if shard.get("split") != split:
            continue
        with storage.filesystem.open_input_file(storage.path(shard["key"])) as handle:
            for batch in pq.ParquetFile(handle).iter_batches(batch_size=32):
                for row in batch.to_pylist():
                    for sample in maker(row):
                        if limit is not None and produced >= limit:
                            return
                        produced += 1
                        yield sample


# -- samples to tensors ----------------------------------------------------------------------------
@dataclass(frozen=True)
class SFTSampleTransform:
    """``SFT_SCHEMA`` row -> numpy arrays for the model. Picklable; the tokenizer loads once per process.

    The image is squashed to ``image_size`` square (PS3's default preprocessing) and normalised; the
    evidence boxes become one pixel map (their union). Output: ``pixel_values`` [3, S, S] float32,
    ``evidence_map`` [S, S] uint8 (all zero without evidence), ``input_ids`` / ``attention_mask`` /
    ``labels`` [context_length] int64, right-padded.
    """

    image_size: int
    tokenizer_path: str
    context_length: int = 512
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    s3: S3Settings | None = field(default=None, compare=False)
    skip_counter: str | None = None  # the launch's counter actor (training.common.skips); None = this process

    def __post_init__(self) -> None:
        if self.image_size < 1 or self.context_length < 8:
            raise ValueError(f"image_size {self.image_size} must be >= 1 and context_length >= 8")

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        """One training example.

        Raises:
            SampleError: an undecodable image, a wrong size, or a first user turn longer than the context.
        """
        size = self.image_size
        image = self._image(row)
        evidence = np.zeros((size, size), dtype=np.uint8)
        scale_x, scale_y = size / row["width"], size / row["height"]
        for box in row.get("evidence") or []:
            scaled = (box["x0"] * scale_x, box["y0"] * scale_y, box["x1"] * scale_x, box["y1"] * scale_y)
            evidence |= rasterise_box_xyxy(scaled, size)
        input_ids, attention_mask, labels = self.tokens(row)
        return {
            "pixel_values": image_pixels(image, size, self.mean, self.std),
            "evidence_map": evidence,
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
        }

    def tokens(self, row: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        tokenizer = load_chat_tokenizer(self.tokenizer_path, self.s3)
        turns = [(t["role"], t["text"]) for t in row["turns"]]
        ids, labels = encode_conversation(tokenizer, turns, supervise=row["kind"] != "selection")
        first_user_end = _first_user_turn_length(tokenizer, turns)
        if first_user_end > self.context_length:
            message = f"the first user turn takes {first_user_end} tokens > context {self.context_length}"
            raise SampleError(message, "prompt_too_long")
        ids, labels = ids[: self.context_length], labels[: self.context_length]
        pad = self.context_length - len(ids)
        return (
            np.asarray(ids + [tokenizer.pad_token_id] * pad, dtype=np.int64),
            np.asarray([1] * len(ids) + [0] * pad, dtype=np.int64),
            np.asarray(labels + [IGNORE_INDEX] * pad, dtype=np.int64),
        )

    def samples(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        """``[example]``, or ``[]`` for a row that cannot be used (counted and logged once): for ``flat_map``."""
        try:
            return [self(row)]
        except SampleError as error:
            record_skip(self.skip_counter, error.reason, str(row.get("sample_id")), str(error))
            return []

    def _image(self, row: dict[str, Any]) -> Image.Image:
        data = row.get("image_bytes")
        if not data:
            if not row.get("image_ref"):
                raise SampleError("the sample has neither image bytes nor an image reference", "no_image")
            data = read_uri_bytes(row["image_ref"], self.s3)
        try:
            image = decode_oriented(bytes(data))
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
            raise SampleError(
                f"cannot decode the image: {type(error).__name__}: {error}", "undecodable_image"
            ) from error
        if image.size != (row["width"], row["height"]):
            message = f"decoded size {image.size} is not the sample size {(row['width'], row['height'])}"
            raise SampleError(message, "size_mismatch")
        return image


def image_pixels(
    image: Image.Image, size: int, mean: tuple[float, ...] = (0.5, 0.5, 0.5), std: tuple[float, ...] = (0.5, 0.5, 0.5)
) -> np.ndarray:
    """``[3, size, size]`` float32: the image squashed to a square (bicubic) and normalised."""
    resized = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    pixels_hwc = (np.asarray(resized, dtype=np.float32) / 255.0 - np.asarray(mean, np.float32)) / np.asarray(
        std, np.float32
    )
    return np.ascontiguousarray(pixels_hwc.transpose(2, 0, 1))


def _first_user_turn_length(tokenizer: Any, turns: list[tuple[str, str]]) -> int:
    """Tokens up to and including the end of the first user turn (pass 1 needs it whole)."""
    first_user = next(i for i, (role, _) in enumerate(turns) if role == "user")
    return len(encode_conversation(tokenizer, turns[: first_user + 1])[0])
