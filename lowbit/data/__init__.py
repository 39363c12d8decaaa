"""Fixed, deterministic evaluation and calibration data, built from text that ships with CPython.

Sentences (encoders) come from the Python documentation topics; evaluation and calibration draw
from disjoint halves of those topics, so calibration never sees evaluation text. The causal-LM
perplexity text is the Python licence, with the evaluation half of the docs as a second, held-out
perplexity text; the LM calibration text is the calibration half of the docs.
Same install → same data on every call; ``overlap`` measures contamination between two sets.
"""

from __future__ import annotations

import functools
import random

from lowbit.data.overlap import overlap
from lowbit.data.sentences import clean_sentences
from lowbit.data.sources import docs_prose, license_text
from lowbit.errors import ConfigError

_EVAL_SEED = 0  # order of the evaluation pool (so any n is a spread over all eval topics)
_CALIB_SEED = 1


@functools.cache
def _pool(half: str) -> tuple[str, ...]:
    """All clean sentences of one half, deduplicated against the other half, in a fixed shuffled order."""
    own = clean_sentences(docs_prose(half))
    other = set(clean_sentences(docs_prose("calib" if half == "eval" else "eval")))
    pool = [s for s in own if s not in other]
    random.Random(_EVAL_SEED if half == "eval" else _CALIB_SEED).shuffle(pool)
    return tuple(pool)


def _take(half: str, n: int) -> list[str]:
    pool = _pool(half)
    if not isinstance(n, int) or n < 1 or n > len(pool):
        raise ConfigError(f"{half} sentences: n must be an integer in 1..{len(pool)}, got {n!r}")
    return list(pool[:n])


def eval_sentences(n: int = 256) -> list[str]:
    """The first n sentences of the fixed evaluation corpus (English, 5–60 words, unique)."""
    return _take("eval", n)


def calib_sentences(n: int = 128) -> list[str]:
    """The first n sentences of the calibration corpus, drawn from docs topics disjoint from evaluation."""
    return _take("calib", n)


def lm_eval_text() -> str:
    """The fixed perplexity text for causal LMs: the CPython licence (~14 kB of English)."""
    return license_text()


@functools.cache
def lm_heldout_text() -> str:
    """A second perplexity text for causal LMs (~109 kB): the evaluation half of the docs prose, less
    the paragraphs that also occur in the calibration half (pages repeat boilerplate paragraphs).

    Same domain as :func:`lm_calib_text` but disjoint text, so it measures how a calibrated method
    generalises within its domain; the licence text measures it across domains."""
    calib = set(docs_prose("calib"))
    return "\n\n".join(p for p in docs_prose("eval") if p not in calib)


@functools.cache
def lm_calib_text() -> str:
    """Calibration text for causal LMs (~110 kB): the calibration half of the docs prose, paragraphs joined."""
    return "\n\n".join(docs_prose("calib"))


def max_sentences(half: str = "eval") -> int:
    """How many sentences the evaluation ('eval') or calibration ('calib') corpus holds."""
    return len(_pool(half))


__all__ = ["eval_sentences", "calib_sentences", "lm_eval_text", "lm_heldout_text", "lm_calib_text", "overlap", "max_sentences"]
