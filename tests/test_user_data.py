"""--calib-data / --eval-data: the user's files read with clear errors, batched per task, recorded."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lowbit.algorithms._calib import calibration_from_samples
from lowbit.data.user import check_disjoint, read_samples
from lowbit.errors import CalibrationError, ConfigError


def test_txt_jsonl_npy(tmp_path):
    (tmp_path / "a.txt").write_text("first sample\n\n  second sample  \n", encoding="utf-8")
    samples, rec = read_samples(tmp_path / "a.txt")
    assert samples == ["first sample", "second sample"] and rec["n_samples"] == 2 and len(rec["sha256"]) == 64
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate("xyz")))
    assert read_samples(tmp_path / "b.jsonl")[0] == ["x", "y", "z"]
    np.save(tmp_path / "c.npy", np.zeros((5, 8, 8), dtype=np.float32))
    x, _ = read_samples(tmp_path / "c.npy")
    assert isinstance(x, torch.Tensor) and x.shape == (5, 1, 8, 8)


@pytest.mark.parametrize("name,content,match", [
    ("bad.jsonl", '{"text": "ok"}\n{"txt": "no text field"}\n', r"bad.jsonl:2: each line must be an object"),
    ("bad2.jsonl", '{"text": "ok"}\nnot json\n', r"bad2.jsonl:2: not JSON"),
    ("empty.txt", "\n  \n", "no non-empty samples"),
    ("data.csv", "a,b\n", "unsupported data file .csv"),
])
def test_bad_files_say_what_and_where(tmp_path, name, content, match):
    (tmp_path / name).write_text(content)
    with pytest.raises(ConfigError, match=match):
        read_samples(tmp_path / name)


def test_pickled_npy_is_refused(tmp_path):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ConfigError, match="not a plain numeric"):
        read_samples(tmp_path / "obj.npy")
    with pytest.raises(ConfigError, match="no such file"):
        read_samples(tmp_path / "missing.txt")


def test_batches_per_task(minilm):
    sentences = [f"sentence number {i}" for i in range(70)]
    batches = calibration_from_samples(minilm, sentences)
    assert [len(b) for b in batches] == [32, 32, 6]
    assert sum(len(b) for b in calibration_from_samples(minilm, sentences, n=40)) == 40
    with pytest.raises(CalibrationError, match="image calibration data"):
        calibration_from_samples(minilm, torch.zeros(4, 1, 8, 8))


def test_overlap_with_evaluation_is_measured_and_warned(caplog):
    text = ["the quick brown fox jumps over the lazy dog near the river bank today"]
    assert check_disjoint(text, "completely different words here with nothing shared at all") == 0.0
    assert check_disjoint(text, text[0]) == 1.0
    assert "overlaps the evaluation data" in caplog.text
