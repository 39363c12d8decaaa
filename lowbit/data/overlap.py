"""How much of one text collection reappears in another: the calibration-hygiene measure.

Calibrating on the data you evaluate on flatters the result (PEERS.md complaint 10). ``overlap``
reports the fraction of word n-grams of `a` that also occur in `b`; callers warn above a threshold.
"""

from __future__ import annotations

import re
from typing import Iterable

_WORD = re.compile(r"\w+")


def _items(x: str | Iterable[str]) -> list[str]:
    return [x] if isinstance(x, str) else [str(s) for s in x]


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    """Lower-cased word n-grams of one text; a text shorter than n words is one gram of all its words."""
    words = _WORD.findall(text.lower())
    if not words:
        return set()
    if len(words) <= n:
        return {tuple(words)}
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def overlap(a: str | Iterable[str], b: str | Iterable[str], n: int = 8) -> float:
    """Fraction in [0, 1] of the distinct word n-grams of `a` that also occur in `b`.

    `a` and `b` are each a text or a collection of texts (sentences); n-grams never span two items.
    1.0 means every n-gram of `a` is in `b` (e.g. a == b); 0.0 means no shared n-gram; an empty `a`
    gives 0.0.
    """
    grams_a: set[tuple[str, ...]] = set()
    for item in _items(a):
        grams_a |= ngrams(item, n)
    if not grams_a:
        return 0.0
    grams_b: set[tuple[str, ...]] = set()
    for item in _items(b):
        grams_b |= ngrams(item, n)
    return len(grams_a & grams_b) / len(grams_a)
