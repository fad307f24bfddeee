"""The tiny tokenizers train without writing to stdout (the demo's summary is the only thing there).

tokenizers' trainer bar writes blank lines to a stdout that is not a terminal; capfd captures file
descriptor 1, where that Rust code writes.
"""

from __future__ import annotations

from ps3_engine.training.ps3.tokenizer import build_tiny_text_tokenizer
from ps3_engine.training.tiny_captioner import _train_tokenizer


def test_tiny_tokenizers_write_nothing_to_stdout(tmp_path, capfd):
    captioner_tokenizer = _train_tokenizer(["A red square on a plain surface."] * 50)
    text_tokenizer = build_tiny_text_tokenizer(tmp_path / "text")
    captured = capfd.readouterr()
    assert captured.out == ""
    assert captioner_tokenizer("a red square")["input_ids"]
    assert (text_tokenizer / "tokenizer.json").is_file()
