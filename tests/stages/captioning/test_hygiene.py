"""Caption hygiene: the paper's boilerplate prefixes and trailing "no text" sentence, and the reject reasons."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ps3_engine.stages.captioning.hygiene import HygieneSettings, clean_caption, strip_boilerplate


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("The second image is a close-up of a red stop sign.", "A red stop sign."),
        (
            "The second image is a cropped view of the first image, showing a blue car parked by a wall.",
            "A blue car parked by a wall.",
        ),
        ("The image is a close-up of a dog on grass.", "A dog on grass."),
        ("the second image shows a zoomed-in view of a clock face", "A clock face"),
        ("The second image is a close-up of  a   red\n sign.", "A red sign."),
        # No prefix: only whitespace is normalised.
        ("A red   car\tparked next to a tree.", "A red car parked next to a tree."),
        # A prefix with nothing after it is left alone rather than emptied.
        ("The second image is a close-up of", "The second image is a close-up of"),
    ],
)
def test_paper_prefixes_are_stripped(raw, expected):
    assert strip_boilerplate(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("A red sign on a pole. There is no visible text in the image.", "A red sign on a pole."),
        ("A red sign. No text is visible.", "A red sign."),
        # Only the last sentence is ever dropped.
        (
            "There is no visible text. A red sign with a white border.",
            "There is no visible text. A red sign with a white border.",
        ),
        # The last sentence mentions text but not visibility: it carries content, keep it.
        ("A red sign. The text reads STOP.", "A red sign. The text reads STOP."),
        ("A red sign. Nothing is visible behind it.", "A red sign. Nothing is visible behind it."),
        # A caption that is nothing but that sentence is not emptied.
        ("No visible text.", "No visible text."),
    ],
)
def test_trailing_no_text_sentence_only_when_last(raw, expected):
    assert strip_boilerplate(raw) == expected


def test_prefix_and_trailing_sentence_together():
    raw = "The second image is a close-up of a shop window with a poster. There is no visible text on it."
    assert strip_boilerplate(raw) == "A shop window with a poster."


@pytest.mark.parametrize(
    ("raw", "finish_reason", "reason"),
    [
        ("", "stop", "empty_caption"),
        ("   \n\t", None, "empty_caption"),
        ("A red car parked next to", "length", "truncated_caption"),
        # The token limit wins over every content check.
        ("I'm sorry, I cannot", "length", "truncated_caption"),
        ("I'm sorry, I cannot describe this image.", "stop", "refusal"),
        ("I can't help with identifying people in images.", "stop", "refusal"),
        ("There is no second image provided here.", "stop", "refusal"),
        ("As an AI I do not describe images.", "stop", "refusal"),
        ("red red red red red red red red red red", "stop", "degenerate_caption"),
        ("a cat on a mat a cat on a mat a cat on a mat", "stop", "degenerate_caption"),
        ("A dog.", "stop", "too_short"),
        # The prefix is stripped before counting words.
        ("The second image is a close-up of a dog.", "stop", "too_short"),
    ],
)
def test_reject_reasons(raw, finish_reason, reason):
    cleaned = clean_caption(raw, finish_reason)
    assert cleaned.reject_reason == reason
    assert cleaned.detail


def test_good_caption_passes_unchanged():
    raw = "A red car parked next to a green tree, with a white stripe along its side."
    cleaned = clean_caption(raw, "stop")
    assert cleaned.reject_reason is None
    assert cleaned.text == raw


def test_good_caption_is_cleaned_but_kept():
    cleaned = clean_caption("The second image is a close-up of a yellow taxi on a wet street.", "stop")
    assert cleaned.reject_reason is None
    assert cleaned.text == "A yellow taxi on a wet street."


def test_settings_change_the_thresholds():
    assert clean_caption("A red car parked.", "stop").reject_reason is None
    assert clean_caption("A red car parked.", "stop", HygieneSettings(min_words=5)).reject_reason == "too_short"
    repetitive = "the sign says hello the sign says hello the sign says hello again and again"
    assert clean_caption(repetitive, "stop").reject_reason is None
    strict = HygieneSettings(min_distinct_trigram_ratio=0.9)
    assert clean_caption(repetitive, "stop", strict).reject_reason == "degenerate_caption"


PREFIXES = [
    "",
    "The second image is a close-up of ",
    "The second image is a cropped view of the first image, showing ",
    "The image is a close-up of ",
    "The second image shows a zoomed-in view of ",
]
BODY_WORDS = ["red", "car", "sign", "tree", "white", "stripe", "window", "poster", "blue", "door", "lamp"]
sentences = st.lists(st.sampled_from(BODY_WORDS), min_size=2, max_size=8).map(lambda ws: " ".join(ws) + ".")
captions = st.builds(
    lambda prefix, body, tail: prefix + " ".join(body) + tail,
    st.sampled_from(PREFIXES),
    st.lists(sentences, min_size=1, max_size=3),
    st.sampled_from(["", " There is no visible text.", " No text is visible in the image."]),
)


@given(captions)
def test_strip_boilerplate_is_idempotent_on_captions(raw):
    once = strip_boilerplate(raw)
    assert strip_boilerplate(once) == once
    assert "second image" not in once.lower() and "visible" not in once.lower()


@given(st.text(max_size=300))
def test_strip_boilerplate_never_adds_words(raw):
    assert len(strip_boilerplate(raw).split()) <= len(raw.split())


@given(st.text(max_size=300), st.sampled_from([None, "stop", "length"]))
def test_accepted_captions_have_enough_words(raw, finish_reason):
    cleaned = clean_caption(raw, finish_reason)
    if cleaned.reject_reason is None:
        assert finish_reason != "length"
        assert len(re.findall(r"\w+", cleaned.text)) >= HygieneSettings().min_words
        assert cleaned.text == strip_boilerplate(raw)
