"""The SigLIP tokenizer (a sentencepiece model) loads through the path the paper recipes use."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from transformers import SiglipTokenizer

from ps3_engine.training.ps3.data import CorpusSampleTransform
from ps3_engine.training.ps3.recipes import load_recipe
from ps3_engine.training.ps3.tokenizer import _corpus_lines, load_text_tokenizer

CONTEXT = 24


@pytest.fixture(scope="module")
def siglip_tokenizer_dir(tmp_path_factory) -> Path:
    """A SigLIP-style checkpoint folder's tokenizer: a sentencepiece unigram model trained here, saved by
    ``SiglipTokenizer.save_pretrained`` (``spiece.model`` + ``tokenizer_config.json``, like the hub folders)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus_lines()),
        model_writer=model,
        vocab_size=48,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    work = tmp_path_factory.mktemp("spm")
    (work / "spiece.model").write_bytes(model.getvalue())
    folder = work / "siglip"
    SiglipTokenizer(vocab_file=str(work / "spiece.model"), model_max_length=64).save_pretrained(folder)
    assert (folder / "spiece.model").is_file()
    return folder


def _transform(tokenizer_path: str, **changes) -> CorpusSampleTransform:
    return CorpusSampleTransform(image_size=56, tokenizer_path=tokenizer_path, context_length=CONTEXT, **changes)


def test_the_paper_recipe_loads_the_siglip_tokenizer_from_its_pretrained_folder(siglip_tokenizer_dir):
    recipe = load_recipe("paper-1.5k", {"model.pretrained": str(siglip_tokenizer_dir)})
    assert recipe.tokenizer_path == str(siglip_tokenizer_dir)
    tokenizer = load_text_tokenizer(recipe.tokenizer_path)
    assert isinstance(tokenizer, SiglipTokenizer)
    # SigLIP pads with </s> to the full context and ends every caption with </s>
    ids = tokenizer("A red square on a plain surface.", padding="max_length", max_length=CONTEXT)["input_ids"]
    assert len(ids) == CONTEXT and ids[-1] == tokenizer.pad_token_id == tokenizer.eos_token_id
    assert tokenizer.unk_token_id not in ids


def test_the_training_transform_tokenizes_with_it(siglip_tokenizer_dir):
    from tests.training.test_ps3_data import _rows  # the same synthetic rows as the data tests

    sample = _transform(str(siglip_tokenizer_dir))(_rows()["red"])
    expected = load_text_tokenizer(str(siglip_tokenizer_dir))
    assert sample["input_ids"].shape == (CONTEXT,) and sample["input_ids"].dtype == np.int64
    assert int(sample["input_ids"].max()) < len(expected)


def test_a_tokenizer_under_an_s3_prefix_is_copied_once_and_loaded(siglip_tokenizer_dir, s3_server, s3_bucket, tmp_path):
    client = s3_server.client()
    for path in siglip_tokenizer_dir.iterdir():
        client.put_object(Bucket=s3_bucket, Key=f"models/siglip-tok/{path.name}", Body=path.read_bytes())
    tokenizer = load_text_tokenizer(f"s3://{s3_bucket}/models/siglip-tok", None, str(tmp_path))
    local = load_text_tokenizer(str(siglip_tokenizer_dir))
    assert tokenizer("a blue circle")["input_ids"] == local("a blue circle")["input_ids"]


def test_a_folder_without_a_tokenizer_is_a_clear_error(tmp_path):
    (tmp_path / "spiece.model").write_bytes(b"not a sentencepiece model")
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "SiglipTokenizer"}')
    with pytest.raises(ValueError, match=r"cannot load a tokenizer .*sentencepiece"):
        load_text_tokenizer(str(tmp_path))
    with pytest.raises(ValueError, match="cannot load a tokenizer"):
        load_text_tokenizer(str(tmp_path / "absent"))
