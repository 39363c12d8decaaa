"""The fixed evaluation and calibration data: sizes, cleanliness, determinism, disjointness."""

from __future__ import annotations

import pytest

from lowbit.data import (calib_sentences, eval_sentences, lm_calib_composition, lm_calib_text, lm_eval_text,
                         lm_heldout_text, lm_science_text, max_sentences, overlap)
from lowbit.errors import ConfigError

# Stock phrases ("the numeric arguments are first converted to a") recur across the docs'
# topics, so some 8-grams are shared even between disjoint pages; measured 0.3-0.9%.
MAX_CALIB_EVAL_NGRAM_OVERLAP = 0.02
# The calibration mix drops every paragraph sharing an 8-gram with an evaluation text; what is
# left are 8-grams across two joined paragraphs (measured 4e-5 of the mix's 8-grams, i.e. two).
MAX_MIX_SPANNING_OVERLAP = 1e-3


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
    for source in ("mix", "docs"):
        assert overlap(lm_calib_text(source), lm_eval_text()) < MAX_CALIB_EVAL_NGRAM_OVERLAP
        assert not any(s in lm_calib_text(source) for s in evaluation)


def test_lm_texts():
    text = lm_eval_text()
    assert "PYTHON SOFTWARE FOUNDATION LICENSE" in text and len(text) > 10_000
    assert len(lm_calib_text()) > 150_000 and len(lm_calib_text("docs")) > 50_000
    science = lm_science_text()
    assert len(science) > 30_000 and "Iris" in science and "Number of Instances" in science
    assert ".. _iris_dataset:" not in science  # rst anchors removed


def test_lm_heldout_text_is_disjoint_from_lm_calibration():
    held = lm_heldout_text()
    assert len(held) > 50_000
    assert overlap([held], lm_calib_text("docs")) < MAX_CALIB_EVAL_NGRAM_OVERLAP  # stock phrases only


def test_calibration_mix_shares_no_8gram_with_any_evaluation_text():
    from lowbit.data.mix import evaluation_texts

    mix = lm_calib_text()
    texts = evaluation_texts()
    assert {"licence", "heldout", "science"} <= texts.keys()
    for name, text in texts.items():
        # by construction no paragraph of the mix shares an 8-gram with an evaluation text; only
        # 8-grams spanning two joined paragraphs can (a heading + its first words: 2 of 53k here)
        assert overlap(mix, text) < MAX_MIX_SPANNING_OVERLAP, name
        assert overlap(text, mix) < MAX_MIX_SPANNING_OVERLAP, name
    assert overlap(eval_sentences(max_sentences("eval")), mix) < MAX_MIX_SPANNING_OVERLAP
    assert "PYTHON SOFTWARE FOUNDATION LICENSE" not in mix.upper()


def test_science_text_is_its_own_domain():
    science = lm_science_text()
    assert overlap(science, lm_calib_text()) < MAX_MIX_SPANNING_OVERLAP
    assert overlap(science, lm_calib_text("docs")) < MAX_MIX_SPANNING_OVERLAP
    assert overlap(science, lm_eval_text()) < MAX_CALIB_EVAL_NGRAM_OVERLAP
    assert overlap(science, lm_heldout_text()) < MAX_CALIB_EVAL_NGRAM_OVERLAP
    assert lm_science_text() is lm_science_text()  # cached: one string per install


def test_calibration_mix_is_deterministic_and_holds_every_domain():
    from lowbit.data import mix

    comp = lm_calib_composition()
    assert lm_calib_text() == lm_calib_text() and comp == lm_calib_composition()
    assert set(comp["domains"]) == {"docs", "code", "legal", "readme"}
    for domain, info in comp["domains"].items():
        # each domain fills at least 3/4 of its budget and never more than one paragraph over it
        assert 0.75 * mix.BUDGETS[domain] <= info["chars"] <= mix.BUDGETS[domain] + mix.CHUNK_CHARS, domain
        assert info["sources"], domain
    assert comp["bytes"] == sum(v["bytes"] for v in comp["domains"].values())
    assert not any(s.startswith(("scikit_learn/", "lowbit/")) for v in comp["domains"].values() for s in v["sources"])
    text = lm_calib_text()
    assert "def " in text and "Licensed under the Apache License" in text  # code, legal
    layout = mix.mix_layout()
    assert all(text[a:b] and (b == len(text) or text[b:b + 2] == "\n\n") for _, a, b in layout)
    # interleaved: every prefix holds the domains in proportion to their budgets (within a chunk or
    # two each), e.g. the first 16 kB that 8 windows of 512 tokens read
    for limit in (16_000, 40_000, 100_000):
        seen = {d: sum(b - a for dd, a, b in layout if dd == d and b <= limit) for d in mix.DOMAINS}
        total_budget = sum(mix.BUDGETS.values())
        for d in mix.DOMAINS:
            share = limit * mix.BUDGETS[d] / total_budget
            assert abs(seen[d] - share) < 2.5 * mix.CHUNK_CHARS + 0.1 * share, (limit, d, seen)
    # a rebuild from scratch gives the same text
    mix._build.cache_clear()
    assert lm_calib_text() == text and mix.mix_layout() == layout


def test_mix_reads_only_the_locked_distributions(tmp_path, monkeypatch):
    from pathlib import Path

    from lowbit.data import mix

    lock = Path(__file__).resolve().parents[1] / "requirements.lock"
    locked = {mix.normalised_dist_name(line.split("==")[0]) for line in lock.read_text().splitlines()
              if line.strip() and not line.startswith("#")}
    assert set(mix.MIX_DISTRIBUTIONS) == locked - {mix.normalised_dist_name(d) for d in mix.EXCLUDED_DISTS}
    for name in ("requests-2.0.dist-info", "diskcache-5.6.3.dist-info", "scikit_learn-1.0.dist-info"):
        (tmp_path / name / "licenses").mkdir(parents=True)
        (tmp_path / name / "licenses" / "LICENSE").write_text(f"The {name} licence.\n")
    monkeypatch.setattr(mix, "_site_packages", lambda: tmp_path)
    mix.legal_sources.cache_clear()
    try:
        # a package installed beside lowbit (llama-cpp-python's diskcache) is not calibration text
        assert [name for name, _ in mix.legal_sources()] == ["requests/licenses/LICENSE"]
    finally:
        mix.legal_sources.cache_clear()


def test_unknown_calibration_source_is_a_config_error():
    with pytest.raises(ConfigError, match="mix, docs, mix-large"):
        lm_calib_text("wiki")


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


def test_calibration_metadata_records_the_mix_composition():
    import torch

    from lowbit.algorithms._calib import calibration_info

    ids = [torch.arange(8)[None]]
    info = calibration_info(ids, "lowbit.data.lm_calib_text('mix') (smollm2)")
    assert info["calib_text"]["name"] == "mix" and info["calib_text"]["sha256"] == lm_calib_composition()["sha256"]
    assert set(info["calib_text"]["domain_bytes"]) == {"docs", "code", "legal", "readme"}
    docs = calibration_info(ids, "lowbit.data.lm_calib_text('docs') (smollm2)")["calib_text"]
    assert docs["name"] == "docs" and docs["domain_bytes"] == {"docs": len(lm_calib_text("docs").encode())}
    assert "calib_text" not in calibration_info(ids, "user")


def test_lm_calib_source_switches_the_default_calibration_text():
    import torch

    from lowbit.algorithms._calib import default_calibration
    from lowbit.data import lm_calib_default, lm_calib_source

    class _CharTokenizer:  # one token per character: windows are the text's first characters
        def __call__(self, text, return_tensors=None):
            return type("Enc", (), {"input_ids": torch.tensor([[ord(c) % 50_000 for c in text[:2048]]])})()

    model = type("LM", (), {"task": "causal-lm", "tokenizer": _CharTokenizer()})()
    first = lambda text: torch.tensor([ord(c) % 50_000 for c in text[:512]])  # noqa: E731
    assert torch.equal(default_calibration(model, 1)[0][0], first(lm_calib_text()))
    with lm_calib_source("docs"):
        assert lm_calib_default() == "docs"
        assert torch.equal(default_calibration(model, 1)[0][0], first(lm_calib_text("docs")))
    assert lm_calib_default() == "mix"
    with pytest.raises(ConfigError):
        with lm_calib_source("wiki"):
            pass


# The extended mix repeats the mix's own text up to where the mix's budgets cut it (measured: the
# first 212,025 of 215,845 characters here); 90 % leaves room for other installs' budget-cut ends.
MIN_LARGE_MIX_SHARED_PREFIX = 0.9


def test_large_mix_extends_the_mix_and_stays_clean():
    from lowbit.data import mix

    small, large = lm_calib_text("mix"), lm_calib_text("mix-large")
    cut = int(MIN_LARGE_MIX_SHARED_PREFIX * len(small))
    assert large[:cut] == small[:cut]
    assert len(large) > 2.5 * len(small)  # the docs domain runs out at ~69 kB; the others fill 5x
    comp = lm_calib_composition("mix-large")
    assert comp["budget_factor"] == mix.EXTENDED_FACTOR and lm_calib_composition()["budget_factor"] == 1
    for domain, info in comp["domains"].items():
        assert info["budget_chars"] == mix.EXTENDED_FACTOR * mix.BUDGETS[domain]
        assert info["chars"] <= info["budget_chars"] + mix.CHUNK_CHARS
    for name, text in mix.evaluation_texts().items():  # the same hygiene as the mix
        assert overlap(large, text) < MAX_MIX_SPANNING_OVERLAP, name
    with pytest.raises(ValueError, match="integer >= 1"):
        mix.mix_text(0)
