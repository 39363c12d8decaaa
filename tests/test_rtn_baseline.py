"""RTN on a quantized model's own grid (lowbit.analysis.rtn_baseline) and `lowbit quantize --vs-rtn`.

Tiny random-weight models: pipeline checks only, never a quality result."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import lowbit
from lowbit.algorithms.gptq import GPTQConfig
from lowbit.algorithms.hqq import HQQConfig
from lowbit.analysis.rtn_baseline import compare_to_rtn, describe, rtn_twin
from lowbit.config import build_config
from lowbit.nn import WeightOnlyQLinear
from tests._tiny_llama import tiny_batches, tiny_llama


def _float_linears(model) -> dict:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


@pytest.mark.parametrize("config", [GPTQConfig(bits=4, group_size=64, symmetric=True),
                                    HQQConfig(bits=3, group_size=64, symmetric=False)], ids=["gptq-sym", "hqq-affine"])
def test_twin_rounds_each_quantized_linear_on_its_own_grid(config):
    # hidden 96 is no multiple of 64: q/k/v/gate/up fall back to groups of 32, down_proj (128 inputs) keeps 64
    fp32 = tiny_llama(hidden=96, inter=128)
    q = copy.deepcopy(fp32)
    lowbit.quantize(q, config, tiny_batches(4, 32) if isinstance(config, GPTQConfig) else None)
    twin = rtn_twin(fp32, q)
    quantized = {n: m for n, m in q.named_modules() if isinstance(m, WeightOnlyQLinear)}
    assert len(quantized) == 14  # 2 layers x 7 decoder linears
    floats = _float_linears(fp32)
    groups = set()
    for name, m in quantized.items():
        t = twin.get_submodule(name)
        assert isinstance(t, WeightOnlyQLinear)
        assert (t.fmt, t.group_size, t.symmetric) == (m.fmt, m.group_size, m.symmetric)
        groups.add(t.group_size)
        rtn = WeightOnlyQLinear.from_float(floats[name], int(m.fmt[3:]), m.group_size, m.symmetric)
        assert torch.equal(t.codes(), rtn.codes()) and torch.equal(t.scale, rtn.scale)
    assert groups == {32, 64}
    # everything the method did not quantize is the fp32 model's own tensor (norms, embeddings, head): shared, not
    # copied, so the twin costs only its packed weights
    for name, p in twin.named_parameters():
        assert p is fp32.get_parameter(name), name
    assert all(isinstance(m, nn.Linear) for n, m in fp32.named_modules() if n in quantized)  # fp32 left as it was
    assert twin.lowbit_scheme == "rtn (same grid)"


def test_no_twin_where_rtn_cannot_mirror_the_model():
    fp32 = tiny_llama()
    wa = copy.deepcopy(fp32)
    # activations quantized too: RTN is not its twin
    lowbit.quantize(wa, build_config("w8a8-dynamic"), tiny_batches(2, 32))
    assert rtn_twin(fp32, wa) is None
    assert rtn_twin(fp32, copy.deepcopy(fp32)) is None  # nothing quantized
    renamed = copy.deepcopy(fp32)
    lowbit.quantize(renamed, HQQConfig(bits=4, group_size=32))
    other = tiny_llama(layers=1)  # the quantized model's layer 1 has no float linear of that name here
    assert rtn_twin(other, renamed) is None


def test_compare_to_rtn_shares_and_the_texts_where_the_method_loses():
    fp32 = {"ppl": 10.0, "kl": 0.0, "ppl_heldout": 20.0, "kl_heldout": 0.0, "ppl_science": 30.0, "kl_science": 0.0}
    rtn = {"scheme": "rtn (same grid)", "ppl": 14.0, "kl": 0.5, "ppl_heldout": 30.0, "kl_heldout": 0.4,
           "ppl_science": 29.0, "kl_science": 0.1}
    row = {"ppl": 11.0, "kl": 0.2, "ppl_heldout": 32.0, "kl_heldout": 0.3, "ppl_science": 31.0, "kl_science": 0.2}
    c = compare_to_rtn(fp32, rtn, row)
    assert c["texts"]["licence"]["removed"] == pytest.approx(0.75)  # (14 - 11) / (14 - 10)
    assert c["texts"]["held-out docs"]["removed"] == pytest.approx(-0.2)  # (30 - 32) / (30 - 20)
    assert c["texts"]["science"]["removed"] is None  # RTN below fp32: no increase to remove
    assert c["worse_on"] == [{"text": "held-out docs", "closer_in_kl": True},
                             {"text": "science", "closer_in_kl": False}]
    lines, warnings = describe("m", c, calibrated=True)
    assert len(lines) == 3 and "removes 75 %" in lines[0] and "loses nothing" in lines[2]
    assert len(warnings) == 2
    assert "closer to fp32" in warnings[0] and "flattening" in warnings[0] and "--calib-data" in warnings[0]
    assert "further from fp32" in warnings[1] and "--calib-data" in warnings[1]
    assert "--guard" in describe("m", c, calibrated=False)[1][1]
    user = compare_to_rtn({"ppl": 5.0}, {"ppl": 6.0}, {"ppl": 7.0, "eval_data": "user"})
    assert list(user["texts"]) == ["your text"] and user["worse_on"] == [{"text": "your text", "closer_in_kl": None}]
    # higher-is-better measures: an encoder's cosine to fp32 (fp32 itself: 1)
    enc = compare_to_rtn({"cos_mean": 1.0}, {"cos_mean": 0.96}, {"cos_mean": 0.99})
    assert enc["texts"]["evaluation sentences"]["removed"] == pytest.approx(0.75) and enc["worse_on"] == []
    enc = compare_to_rtn({"cos_mean": 1.0}, {"cos_mean": 0.96}, {"cos_mean": 0.95})
    assert enc["worse_on"] == [{"text": "evaluation sentences", "closer_in_kl": None}]
    assert "--calib-data" in describe("m", enc, calibrated=True)[1][0]


def test_cli_measures_rtn_beside_the_scheme_and_records_it(tmp_path, caplog):
    from typer.testing import CliRunner

    from lowbit.cli import app
    from tests._tiny_hf import tiny_folder

    folder = tiny_folder("llama", tmp_path / "llama")
    out = tmp_path / "q"
    args = ["quantize", "--model", str(folder), "--scheme", "hqq", "--group-size", "16", "--quick", "--json"]
    res = CliRunner().invoke(app, args + ["--out", str(out)])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout[res.stdout.index("["):])
    assert [r["scheme"] for r in rows] == ["fp32", "rtn (same grid)", "hqq-w4-g16-asym"]
    vs = json.loads((out / "metadata.json").read_text())["fidelity"]["vs_rtn"]
    assert set(vs["texts"]) == {"licence", "held-out docs", "science"}
    assert vs["texts"]["licence"]["rtn"] == pytest.approx(rows[1]["ppl"])
    assert vs["texts"]["licence"]["value"] == pytest.approx(rows[2]["ppl"])
    res = CliRunner().invoke(app, args + ["--no-vs-rtn"])
    assert res.exit_code == 0, res.output
    assert [r["scheme"] for r in json.loads(res.stdout[res.stdout.index("["):])] == ["fp32", "hqq-w4-g16-asym"]


def test_service_quantize_job_records_the_comparison(tmp_path):
    from lowbit.io.open import open_model
    from lowbit.service.quantize_job import compare_with_rtn, measure_fidelity
    from tests._tiny_hf import tiny_folder

    source = open_model(str(tiny_folder("bert", tmp_path / "bert")))
    q = copy.deepcopy(source)
    config = build_config("hqq", {"group_size": 16})
    lowbit.quantize(q, config)
    fidelity = measure_fidelity(q, source)
    vs = compare_with_rtn(q, source, config, fidelity)
    t = vs["texts"]["evaluation sentences"]  # the job's encoder measure: cosine to the source on 64 sentences
    assert t["value"] == fidelity["cos_mean"] and t["rtn"] < 1.0
    worse = [{"text": "evaluation sentences", "closer_in_kl": None}]
    assert vs["worse_on"] == ([] if t["value"] >= t["rtn"] else worse)
    rtn = copy.deepcopy(source)
    lowbit.quantize(rtn, build_config("rtn", {"bits": 4, "group_size": 16}))
    assert compare_with_rtn(rtn, source, build_config("rtn", {"bits": 4, "group_size": 16}), {}) is None


def test_eval_vs_rtn_on_a_saved_folder(tmp_path):
    from typer.testing import CliRunner

    from lowbit.cli import app
    from tests._tiny_hf import tiny_folder

    folder = tiny_folder("llama", tmp_path / "llama")
    run = CliRunner().invoke
    for scheme in ("hqq", "rtn"):
        res = run(app, ["quantize", "--model", str(folder), "--scheme", scheme, "--group-size", "16", "--no-eval",
                        "--out", str(tmp_path / scheme)])
        assert res.exit_code == 0, res.output
    res = run(app, ["eval", str(tmp_path / "hqq"), "--quick", "--vs-rtn", "--json"])  # reference: the source folder
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout[res.stdout.index("{"):])
    assert set(result["vs_rtn"]["texts"]) == {"licence", "held-out docs", "science"}
    assert result["vs_rtn"]["texts"]["licence"]["value"] == result["ppl"]
    res = run(app, ["eval", str(tmp_path / "rtn"), "--quick", "--vs-rtn"])
    assert res.exit_code == 2 and "it is RTN itself" in res.output


def test_losses_are_explained_token_by_token(tmp_path):
    """explain_losses: where a scheme's perplexity is above RTN's, its tokens bucketed by fp32's confidence say
    whether RTN's flattening or the scheme's own error made the difference (docs/llm.md)."""
    from lowbit.analysis.evaluate import confidence_buckets, lm_eval_windows
    from lowbit.analysis.rtn_baseline import BUCKETS, explain_losses
    from lowbit.io.open import open_model
    from tests._tiny_hf import tiny_folder

    fp32 = open_model(str(tiny_folder("llama", tmp_path / "llama")))
    q = copy.deepcopy(fp32)
    lowbit.quantize(q, build_config("hqq", {"group_size": 16}))
    twin = rtn_twin(fp32, q)
    texts = [f"sentence {i} of a text the tiny model has never seen, with numbers {i * 7}" for i in range(80)]
    windows = lm_eval_windows(fp32, "", eval_data=texts)
    same, rtn = confidence_buckets([fp32, twin], fp32, windows)
    assert [b["kl"] for b in same] == [0.0, 0.0, 0.0]  # fp32 against itself
    assert sum(b["tokens"] for b in rtn) == windows.shape[0] * (windows.shape[1] - 1)
    c = compare_to_rtn({"ppl": 5.0, "kl": 0.0}, {"ppl": 6.0, "kl": 0.5}, {"ppl": 7.0, "kl": 0.4, "eval_data": "user"})
    explain_losses(c, fp32, twin, q, eval_data=texts)
    w = c["worse_on"][0]
    assert list(w["buckets"]) == list(BUCKETS) and [b["tokens"] for b in w["buckets"].values()] == [
        b["tokens"] for b in rtn]
    assert [b["nll_rtn"] for b in w["buckets"].values()] == pytest.approx([b["nll"] for b in rtn])
    confident = list(w["buckets"].values())[1:]
    assert w["flattening"] == (all(b["kl"] < b["kl_rtn"] for b in w["buckets"].values() if b["tokens"])
                               and sum(b["nll"] for b in confident) < sum(b["nll_rtn"] for b in confident))
    assert "token by token" in describe("hqq", c, calibrated=False)[1][0]
    # the two verdicts in words, on SmolLM2-like buckets (bench/results/licence_windows_part_sym.md)
    flat = {"text": "licence", "closer_in_kl": True, "flattening": True, "buckets": dict(zip(BUCKETS, [
        {"tokens": 1397, "nll_rtn": 7755.0, "nll": 8310.0, "kl_rtn": 0.87, "kl": 0.57},
        {"tokens": 1545, "nll_rtn": 2550.0, "nll": 2157.0, "kl_rtn": 0.69, "kl": 0.49},
        {"tokens": 635, "nll_rtn": 174.0, "nll": 82.0, "kl_rtn": 0.226, "kl": 0.095}]))}
    mixed = dict(flat, flattening=False, buckets=dict(flat["buckets"], **{BUCKETS[2]: {
        "tokens": 635, "nll_rtn": 174.0, "nll": 199.0, "kl_rtn": 0.226, "kl": 0.268}}))
    c = {"texts": {"licence": {"measure": "perplexity", "key": "ppl", "rtn": 18.72, "value": 19.2, "removed": -0.08,
                               "kl_rtn": 0.68, "kl": 0.66}}, "worse_on": [flat]}
    said = describe("s", c, calibrated=False)[1][0]
    assert "RTN's flattening, not the scheme's error" in said and "-485 nats" in said and "--guard" not in said
    c["worse_on"] = [mixed]
    said = describe("s", c, calibrated=False)[1][0]
    assert "a loss of its own" in said and "p >= 0.9 (KL 0.268 vs RTN's 0.226)" in said and "--guard" in said
