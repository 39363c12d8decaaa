"""The fixed evaluation and calibration data: sizes, cleanliness, determinism, disjointness."""

from __future__ import annotations

import pytest

from lowbit.data import (calib_sentences, eval_sentences, lm_calib_text, lm_eval_text, lm_heldout_text, max_sentences,
                         overlap)
from lowbit.errors import ConfigError

# Stock phrases ("the numeric arguments are first converted to a") recur across the docs'
# topics, so some 8-grams are shared even between disjoint pages; measured 0.3-0.9%.
MAX_CALIB_EVAL_NGRAM_OVERLAP = 0.02


def test_eval_sentences_size_and_shape():
    sentences = eval_sentences()
    assert len(sentences) == 256 and len(set(sentences)) == 256
    assert max_sentences("eval") >= 256
    for s in sentences:
        assert 5 <= len(s.split()) <= 60
        assert s[0].isupper() and s[-1] in ".!?"
        assert "\n" not in s and "  " not in s


def test_data_is_deterministic_and_prefix_stable():
    assert eval_sentences(256) == eval_sentences(256)
    assert eval_sentences(64) == eval_sentences(256)[:64]
    assert calib_sentences(100) == calib_sentences(200)[:100]
    assert lm_eval_text() == lm_eval_text() and lm_calib_text() == lm_calib_text()


def test_calibration_is_disjoint_from_evaluation():
    evaluation = eval_sentences(max_sentences("eval"))
    calibration = calib_sentences(max_sentences("calib"))
    assert not set(evaluation) & set(calibration)
    assert overlap(calibration, evaluation) < MAX_CALIB_EVAL_NGRAM_OVERLAP
    assert overlap(lm_calib_text(), lm_eval_text()) < MAX_CALIB_EVAL_NGRAM_OVERLAP
    assert not any(s in lm_calib_text() for s in evaluation)


def test_lm_texts():
    text = lm_eval_text()
    assert "PYTHON SOFTWARE FOUNDATION LICENSE" in text and len(text) > 10_000
    assert len(lm_calib_text()) > 50_000


def test_lm_heldout_text_is_disjoint_from_lm_calibration():
    held = lm_heldout_text()
    assert len(held) > 50_000
    assert overlap([held], lm_calib_text()) < MAX_CALIB_EVAL_NGRAM_OVERLAP  # stock phrases only


def test_overlap_semantics():
    a = ["the cat sat on the mat today", "a completely different sentence about dogs and parks"]
    assert overlap(a, a) == 1.0
    assert overlap(a, ["nothing in common whatsoever here"]) == 0.0
    assert overlap([], a) == 0.0
    assert overlap(a[:1], a) == 1.0
    assert 0.0 < overlap(a, a[:1]) < 1.0
    assert overlap("The Cat sat on the MAT today", a[0]) == 1.0  # case-insensitive words


def test_bad_n_is_a_config_error():
    with pytest.raises(ConfigError, match="1.."):
        eval_sentences(max_sentences("eval") + 1)
    with pytest.raises(ConfigError):
        calib_sentences(0)
