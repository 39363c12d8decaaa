"""Save -> load -> same outputs, and every kind of damaged folder gives a clear LoadError."""

import copy
import json

import pytest
import torch
from typer.testing import CliRunner

import lowbit
from lowbit.algorithms.dynamic import Int8DynamicConfig
from lowbit.algorithms.rtn import WeightOnlyConfig
from lowbit.cli import app
from lowbit.errors import LoadError
from lowbit.io.metadata import read_metadata


@pytest.fixture(scope="module")
def saved_digits(tmp_path_factory, digits_cnn):
    model = lowbit.quantize(copy.deepcopy(digits_cnn), Int8DynamicConfig())
    folder = tmp_path_factory.mktemp("store") / "digits-w8"
    lowbit.save(model, folder, fidelity={"accuracy": 1.0})
    return model, folder


def test_save_load_same_outputs_digits(saved_digits, digits_data):
    model, folder = saved_digits
    loaded = lowbit.load(folder)
    x = digits_data[2][:64]
    assert torch.equal(model(x), loaded(x))
    meta = read_metadata(folder)
    assert meta.is_quantized and meta.scheme == "w8a8-dynamic" and meta.model == "digits"
    assert meta.calibration is not None and len(meta.calibration.sha256) == 64
    assert any("Conv2d" in why for why in meta.skipped.values())


def test_save_load_weight_only_minilm(tmp_path, minilm):
    model = lowbit.quantize(copy.deepcopy(minilm), WeightOnlyConfig(bits=4, group_size=128))
    lowbit.save(model, tmp_path / "m")
    loaded = lowbit.load(tmp_path / "m")
    s = ["Quantized models must load back.", "Second sentence here."]
    assert torch.equal(model.encode(s), loaded.encode(s))


def test_fp32_model_is_not_quantized(tmp_path, digits_cnn):
    lowbit.save(digits_cnn, tmp_path / "fp")
    meta = read_metadata(tmp_path / "fp")
    assert meta.is_quantized is False and meta.scheme is None


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_truncated_weights(saved_digits, tmp_path):
    folder = _copy(saved_digits[1], tmp_path / "t")
    w = folder / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    with pytest.raises(LoadError, match="model.safetensors.*checksum"):
        lowbit.load(folder)
    with pytest.raises(LoadError, match="model.safetensors"):
        lowbit.load(folder, verify=False)


def test_edited_metadata(saved_digits, tmp_path):
    folder = _copy(saved_digits[1], tmp_path / "e")
    (folder / "metadata.json").write_text("{not json")
    with pytest.raises(LoadError, match="metadata.json.*JSON"):
        lowbit.load(folder)
    meta = json.loads((saved_digits[1] / "metadata.json").read_text())
    meta["is_quantized"] = "perhaps"
    (folder / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(LoadError, match="is_quantized"):
        lowbit.load(folder)
    meta["is_quantized"] = True
    meta["layers"]["fc.nope"] = meta["layers"].popitem()[1]
    (folder / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(LoadError, match="fc.nope"):
        lowbit.load(folder)


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(LoadError, match="not a folder"):
        lowbit.load(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoadError, match="metadata.json"):
        lowbit.load(tmp_path / "empty")


def test_cli_refuses_existing_out_and_unknown_names(tmp_path):
    runner = CliRunner()
    (tmp_path / "exists").mkdir()
    r = runner.invoke(app, ["quantize", "--model", "digits", "--scheme", "w8a8-dynamic", "--out", str(tmp_path / "exists")])
    assert r.exit_code == 2 and "--force" in r.output
    r = runner.invoke(app, ["quantize", "--model", "resnet", "--scheme", "rtn"])
    assert r.exit_code == 2 and "minilm" in r.output
    r = runner.invoke(app, ["quantize", "--model", "digits", "--scheme", "magic"])
    assert r.exit_code == 2 and "w8a8-dynamic" in r.output
    r = runner.invoke(app, ["quantize", "--model", "digits", "--scheme", "rtn", "--low-memory"])
    assert r.exit_code == 2 and "--low-memory applies to causal LMs" in r.output


def test_cli_quantize_digits_end_to_end(tmp_path):
    runner = CliRunner()
    out = tmp_path / "d"
    r = runner.invoke(app, ["quantize", "--model", "digits", "--scheme", "rtn", "--bits", "8", "--out", str(out),
                            "--quick", "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output[r.output.index("["): r.output.rindex("]") + 1])
    assert rows[0]["scheme"] == "fp32" and rows[1]["scheme"] == "w8-pc-sym"
    assert rows[1]["accuracy"] >= rows[0]["accuracy"] - 1.0
    assert read_metadata(out).fidelity["accuracy"] == rows[1]["accuracy"]
