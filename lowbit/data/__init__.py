"""Fixed, deterministic evaluation and calibration data, built from text that ships with CPython.

Sentences (encoders) come from the Python documentation topics; evaluation and calibration draw
from disjoint halves of those topics, so calibration never sees evaluation text. Causal LMs are
evaluated on three texts of three domains: the Python licence (legal, :func:`lm_eval_text`), the
evaluation half of the docs (:func:`lm_heldout_text`) and scikit-learn's dataset descriptions
(scientific prose, :func:`lm_science_text`, used for no choice of defaults). The LM calibration
text is a mix of docs prose, stdlib code, package licences and package READMEs
(:mod:`lowbit.data.mix`), none of it evaluation text; ``lm_calib_text("docs")`` is the older
docs-only text.
Same install → same data on every call; ``overlap`` measures contamination between two sets.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import random
from typing import Iterator

from lowbit.data.overlap import overlap
from lowbit.data.sentences import clean_sentences
from lowbit.data.sources import dataset_descriptions, docs_prose, license_text
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
def lm_science_text() -> str:
    """The third perplexity text for causal LMs (~42 kB): scikit-learn's dataset descriptions
    (scientific prose about measured data sets, with statistics tables and references), files in
    sorted order joined by blank lines.

    Another domain than the licence and the docs; no calibration source reads scikit-learn, and
    no default of lowbit was chosen on it (it only reports)."""
    return "\n\n".join(text for _, text in dataset_descriptions())


LM_CALIB_SOURCES = ("mix", "docs", "mix-large")
_lm_calib_default = "mix"


def lm_calib_default() -> str:
    """The name of the LM calibration text that calibrated methods read by default (``"mix"``)."""
    return _lm_calib_default


@contextlib.contextmanager
def lm_calib_source(source: str) -> Iterator[None]:
    """Within the block, the built-in LM calibration (``default_calibration``) reads
    ``lm_calib_text(source)``; e.g. ``"docs"`` to reproduce results from before the mix."""
    global _lm_calib_default
    if source not in LM_CALIB_SOURCES:
        raise ConfigError(f"unknown LM calibration source {source!r}; valid: {', '.join(LM_CALIB_SOURCES)}")
    before, _lm_calib_default = _lm_calib_default, source
    try:
        yield
    finally:
        _lm_calib_default = before


def lm_calib_text(source: str = "mix") -> str:
    """Calibration text for causal LMs.

    - ``"mix"`` (default, ~216 kB): docs prose, stdlib code, package licences and package READMEs
      interleaved with fixed per-domain budgets, every evaluation text excluded
      (:mod:`lowbit.data.mix`; its composition: :func:`lm_calib_composition`);
    - ``"docs"`` (~110 kB): the calibration half of the docs prose, paragraphs joined (the
      default before issue 18; older results were calibrated on it);
    - ``"mix-large"`` (~630 kB): the same mix with every budget times
      :data:`lowbit.data.mix.EXTENDED_FACTOR` (5), the text end-to-end scale tuning reads past its first
      96 windows (``lowbit.algorithms.scale_tuning.builtin_tuning_windows``).
    """
    if source in ("mix", "mix-large"):
        from lowbit.data.mix import EXTENDED_FACTOR, mix_text

        return mix_text(EXTENDED_FACTOR if source == "mix-large" else 1)
    if source == "docs":
        return _docs_calib_text()
    raise ConfigError(f"unknown LM calibration source {source!r}; valid: {', '.join(LM_CALIB_SOURCES)}")


@functools.cache
def _docs_calib_text() -> str:
    return "\n\n".join(docs_prose("calib"))


def lm_calib_composition(source: str = "mix") -> dict:
    """What :func:`lm_calib_text` holds, for metadata: domain → bytes (and sources, for the mix)."""
    if source == "docs":
        raw = _docs_calib_text().encode("utf-8")
        return {"domains": {"docs": {"bytes": len(raw)}}, "bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    lm_calib_text(source)  # validates the name
    from lowbit.data.mix import EXTENDED_FACTOR, mix_composition

    return mix_composition(EXTENDED_FACTOR if source == "mix-large" else 1)


def max_sentences(half: str = "eval") -> int:
    """How many sentences the evaluation ('eval') or calibration ('calib') corpus holds."""
    return len(_pool(half))


__all__ = ["eval_sentences", "calib_sentences", "lm_eval_text", "lm_heldout_text", "lm_science_text", "lm_calib_text",
           "lm_calib_composition", "lm_calib_default", "lm_calib_source", "LM_CALIB_SOURCES", "overlap", "max_sentences"]
