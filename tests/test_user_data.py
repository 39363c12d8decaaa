"""--calib-data / --eval-data: the user's files read with clear errors, batched per task, recorded."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lowbit.algorithms._calib import LM_CALIB_WINDOW, USER_ENCODER_SENTENCES, calibration_from_samples, spread
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


class CharTokenizer:
    """One token per character (its code point): enough to check where windows come from."""

    def __call__(self, text, return_tensors=None):
        class Out:
            input_ids = torch.tensor([[ord(c) for c in text]])
        return Out()


class FakeLM:
    task = "causal-lm"
    tokenizer = CharTokenizer()


def _text(window: torch.Tensor) -> str:
    return "".join(chr(int(c)) for c in window.reshape(-1))


def test_samples_are_spread_over_the_file_and_capped(minilm, caplog):
    assert spread(10, 4) == [0, 3, 6, 9] and spread(5, 1) == [0] and spread(3, 8) == [0, 1, 2]
    sentences = [f"sentence number {i}" for i in range(3000)]
    taken = [s for b in calibration_from_samples(minilm, sentences) for s in b]
    assert len(taken) == USER_ENCODER_SENTENCES  # capped without --calib
    assert taken[0] == "sentence number 0" and int(taken[-1].split()[-1]) > 2900  # the file's end is reached
    assert "1024 of the file's 3000 sentences" in caplog.text
    # a causal LM: a text ordered by topic gives windows of every topic, not only the first
    topics = ["alpha " * 300, "beta " * 300, "gamma " * 300, "delta " * 300]  # ~1.5-2k characters each
    windows = calibration_from_samples(FakeLM(), topics, n=4)
    assert [w.shape for w in windows] == [(1, LM_CALIB_WINDOW)] * 4
    assert {_text(w).split()[0] for w in windows} >= {"alpha", "delta"}
    with pytest.raises(CalibrationError, match="at least 1"):
        calibration_from_samples(FakeLM(), topics, n=0)
    calibration_from_samples(FakeLM(), topics, n=1000)
    assert "asked for more than the file's" in caplog.text


def test_a_long_text_is_sampled_by_spans_not_tokenized_whole(caplog):
    import logging

    caplog.set_level(logging.INFO, logger="lowbit.algorithms._calib")  # the CLI tests set "lowbit" to WARNING
    parts = [" ".join(f"p{i}w{j}" for j in range(2500)) for i in range(100)]  # ~2 MB: above 4 * n * 8192 chars
    windows = calibration_from_samples(FakeLM(), parts, n=8)
    assert len(windows) == 8 and all(w.shape == (1, LM_CALIB_WINDOW) for w in windows)
    first = [_text(w).split()[0] for w in windows]
    assert all(f.startswith("p") and "w" in f for f in first)  # each window starts at a word
    where = [int(f[1:].split("w")[0]) for f in first]  # the part each window starts in
    assert where == sorted(where) and where[0] == 0 and where[-1] >= 95  # in order, from the start to the end
    assert "8 windows of 512 tokens spread evenly over" in caplog.text


def test_overlap_with_evaluation_is_measured_and_warned(caplog):
    text = ["the quick brown fox jumps over the lazy dog near the river bank today"]
    assert check_disjoint(text, "completely different words here with nothing shared at all") == 0.0
    assert check_disjoint(text, text[0]) == 1.0
    assert "overlaps the evaluation data" in caplog.text


def test_cli_calib_data_records_the_windows_taken(tmp_path):
    from typer.testing import CliRunner

    from lowbit.cli import app
    from tests._tiny_hf import tiny_folder

    folder = tiny_folder("llama", tmp_path / "llama")
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(f"line {i} of the user's own text about topic {i // 100}" for i in range(600)))
    out = tmp_path / "q"
    res = CliRunner().invoke(app, ["quantize", "--model", str(folder), "--scheme", "gptq", "--group-size", "16",
                                   "--calib-data", str(calib), "--calib", "3", "--no-eval", "--out", str(out)])
    assert res.exit_code == 0, res.output
    record = json.loads((out / "metadata.json").read_text())["calibration"]
    assert record["source"] == str(calib) and record["n_samples"] == 3 and record["n_tokens"] == 3 * LM_CALIB_WINDOW
    assert record["overlap_with_eval"] == 0.0  # measured on the windows taken


def test_cli_low_memory_takes_calib_data_as_in_memory(tmp_path):
    """--low-memory with --calib-data: the same windows (sha256) and codes as the in-memory run."""
    from typer.testing import CliRunner

    from lowbit.cli import app
    from tests._tiny_hf import tiny_folder

    folder = tiny_folder("llama", tmp_path / "llama")
    calib = tmp_path / "calib.jsonl"
    calib.write_text("\n".join(json.dumps({"text": f"record {i}: the user's own text, part {i % 7}"})
                               for i in range(500)))
    records, states = [], []
    for name, extra in (("mem", []), ("disk", ["--low-memory"])):
        out = tmp_path / name
        res = CliRunner().invoke(app, ["quantize", "--model", str(folder), "--scheme", "gptq", "--group-size", "16",
                                       "--calib-data", str(calib), "--calib", "4", "--no-eval", "--out", str(out)]
                                 + extra)
        assert res.exit_code == 0, res.output
        records.append(json.loads((out / "metadata.json").read_text())["calibration"])
        from safetensors.torch import load_file

        states.append(load_file(out / "model.safetensors"))
    assert records[0]["sha256"] == records[1]["sha256"] and records[1]["n_samples"] == 4
    assert records[1]["source"] == str(calib) and records[1]["overlap_with_eval"] == 0.0
    codes = [k for k in states[0] if k.endswith("qweight")]
    assert codes and all(torch.equal(states[0][k], states[1][k]) for k in codes)
