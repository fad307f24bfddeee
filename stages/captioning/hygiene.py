"""Caption hygiene: strip the captioner's boilerplate and reject outputs that are not captions.

The paper's training loader (spec 1.6) deletes "The second image is a close-up of" style prefixes and
drops a final sentence that says there is no visible text. We do the same once, at corpus build time,
and keep the raw text next to the cleaned one. Outputs that are empty, cut off by the token limit,
refusals or degenerate repetition are rejected with a reason instead of entering the corpus.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

# "The second image is a close-up of ...", "The second image is a cropped view of the first image, showing ...",
# "The image is a close-up crop from the first image. ..." and close variants.
_PREFIX = re.compile(
    r"^\s*(?:the\s+)?(?:second\s+)?image\s+(?:is|shows)\s+(?:a\s+|an\s+)?"
    r"(?:zoomed[- ]in\s+|cropped\s+|close[- ]up\s+)?(?:view|close[- ]up|crop|section|portion|part|detail)"
    r"(?:\s+crop)?(?:\s+(?:of|from)(?:\s+the\s+first\s+image)?)?"
    r"(?:\s*[,.:;]\s*|\s+)(?:(?:which|that)\s+)?(?:showing|shows|depicting|depicts|featuring|features|of)?\s*",
    re.IGNORECASE,
)
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+")
_REFUSAL = re.compile(
    r"^\s*(?:i\s*(?:'m|am)\s+(?:sorry|unable)|i\s+(?:cannot|can't|can not|won't)|sorry,|as an ai\b|"
    r"i\s+do\s+not\s+(?:see|have)|there\s+is\s+no\s+(?:second\s+)?image)",
    re.IGNORECASE,
)
_WORD = re.compile(r"\w+", re.UNICODE)


@dataclass(frozen=True)
class HygieneSettings:
    min_words: int = 3
    # A caption whose distinct word 3-grams are fewer than this share of all its 3-grams is degenerate.
    min_distinct_trigram_ratio: float = 0.5
    # ... or whose single most common word makes up more than this share of its words (with >= 8 words).
    max_top_word_share: float = 0.4


@dataclass(frozen=True)
class CleanedCaption:
    text: str
    reject_reason: str | None  # None when the caption is usable
    detail: str = ""


def strip_boilerplate(text: str) -> str:
    """Remove the crop/close-up prefix and a trailing "no visible text" sentence; normalise whitespace."""
    cleaned = " ".join(text.split())
    match = _PREFIX.match(cleaned)
    if match and match.end() < len(cleaned):
        rest = cleaned[match.end() :]
        cleaned = rest[:1].upper() + rest[1:]
    sentences = _SENTENCE_SPLIT.split(cleaned)
    if len(sentences) > 1:
        last = sentences[-1].lower()
        if "text" in last and "visible" in last:
            sentences = sentences[:-1]
    return " ".join(sentences).strip()


def degenerate_reason(text: str, settings: HygieneSettings) -> str | None:
    words = [w.lower() for w in _WORD.findall(text)]
    if len(words) >= 8:
        top_share = Counter(words).most_common(1)[0][1] / len(words)
        if top_share > settings.max_top_word_share:
            return f"one word is {top_share:.0%} of the caption"
    trigrams = list(zip(words, words[1:], words[2:], strict=False))
    if len(trigrams) >= 6:
        distinct = len(set(trigrams)) / len(trigrams)
        if distinct < settings.min_distinct_trigram_ratio:
            return f"only {distinct:.0%} of its word 3-grams are distinct"
    return None


def clean_caption(raw: str, finish_reason: str | None, settings: HygieneSettings | None = None) -> CleanedCaption:
    """Clean ``raw`` and decide whether it is a usable caption.

    Reasons: ``empty_caption``, ``truncated_caption`` (stopped by the token limit), ``refusal``,
    ``degenerate_caption``, ``too_short``.
    """
    settings = settings or HygieneSettings()
    if not raw or not raw.strip():
        return CleanedCaption("", "empty_caption", "the model returned no text")
    text = strip_boilerplate(raw)
    if finish_reason == "length":
        return CleanedCaption(text, "truncated_caption", "generation stopped at the token limit")
    if _REFUSAL.match(raw) or _REFUSAL.match(text):
        return CleanedCaption(text, "refusal", raw[:200])
    degenerate = degenerate_reason(text, settings)
    if degenerate:
        return CleanedCaption(text, "degenerate_caption", degenerate)
    if len(_WORD.findall(text)) < settings.min_words:
        return CleanedCaption(text, "too_short", f"fewer than {settings.min_words} words")
    return CleanedCaption(text, None)
