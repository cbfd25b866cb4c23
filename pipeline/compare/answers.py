"""Answer normalization for exact-match quality: the one definition that the comparison
report, the demo model's training evaluation and the tests all use, so that two answers
judged equal in one place are judged equal everywhere."""
from __future__ import annotations

import re

_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}  # as the VQA evaluation maps them
_ARTICLES = {"a", "an", "the"}


def normalize_answer(text: str | None) -> str | None:
    """VQA-style: lower-case, drop punctuation (apostrophes join, others separate; a decimal
    point or a thousands comma between digits stays meaningful), drop articles, number words
    to digits, single spaces."""
    if text is None:
        return None
    t = text.lower()
    t = re.sub(r"(?<=\d),(?=\d{3})", "", t)  # 1,000 -> 1000
    t = re.sub(r"['\u2019]", "", t)  # don't -> dont
    t = re.sub(r"(?!(?<=\d)\.(?=\d))[^\w\s]", " ", t)  # every other punctuation mark, but 2.5 stays
    words = [_NUMBERS.get(w, w) for w in t.replace("_", " ").split() if w not in _ARTICLES]
    return " ".join(words)


def answers_match(a: str | None, b: str | None) -> bool:
    """Normalized exact match; a missing answer matches nothing."""
    return a is not None and b is not None and normalize_answer(a) == normalize_answer(b)
