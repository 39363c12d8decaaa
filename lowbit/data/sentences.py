"""Cutting prose into clean English sentences: split at sentence ends, keep only well-formed ones."""

from __future__ import annotations

import re

MIN_WORDS = 5
MAX_WORDS = 60

# A sentence ends at . ! or ? (optionally followed by a closing quote/bracket) before whitespace
# and a capital letter or opening quote; "e.g. foo" and "x.y" therefore do not split.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"'”)]?\s+(?=[A-Z\"“(])")
_ABBREVIATIONS = ("e.g.", "i.e.", "etc.", "vs.", "cf.", "Mr.", "Dr.", "No.")


def split_sentences(paragraph: str) -> list[str]:
    """Sentences of one paragraph, in order; re-joins pieces that were split after an abbreviation."""
    pieces = [p.strip() for p in _SENTENCE_END.split(paragraph) if p.strip()]
    out: list[str] = []
    for piece in pieces:
        if out and out[-1].endswith(_ABBREVIATIONS):
            out[-1] = f"{out[-1]} {piece}"
        else:
            out.append(piece)
    return out


def is_clean_sentence(s: str) -> bool:
    """True for a sentence of 5–60 words that starts with a capital, ends with . ! or ?, and is mostly words."""
    words = s.split()
    if not MIN_WORDS <= len(words) <= MAX_WORDS:
        return False
    if not (s[0].isupper() and s[-1] in ".!?"):
        return False
    if any(tok in s for tok in ("::=", ">>>", "...", "http", "  ", "|")):
        return False
    letters = sum(c.isalpha() or c.isspace() for c in s)
    return letters / len(s) >= 0.85


def clean_sentences(paragraphs) -> list[str]:
    """Unique clean sentences from an iterable of paragraphs, in first-seen order."""
    seen: set[str] = set()
    out: list[str] = []
    for paragraph in paragraphs:
        for s in split_sentences(paragraph):
            if is_clean_sentence(s) and s not in seen:
                seen.add(s)
                out.append(s)
    return out
