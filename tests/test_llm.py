"""LLM plumbing on tiny random Llamas: SmoothQuant folds, W/A presets and WAQLinear, LLM.int8,
layer-by-layer quantization from safetensors, calibration hygiene, schemes."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

import lowbit
from lowbit.algorithms._llm import effective_group_size, warn_if_overlaps_eval
from lowbit.algorithms.gptq import GPTQConfig, make_gptq_process
from lowbit.algorithms.presets import preset_config
from lowbit.algorithms.smoothquant import WAConfig, fold_llama_smoothing
from lowbit.api import QuantizeReport
from lowbit.config import build_config
from lowbit.errors import ConfigError
from lowbit.kernels.wa_int import wa_linear, wa_linear_ref
from lowbit.nn import DynamicQLinear, WAQLinear
from lowbit.nn.mixed_linear import MixedInt8Linear
from tests._tiny_llama import tiny_batches, tiny_llama


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: small ops, one thread


def _rel_err(model, fp, ids) -> float:
    with torch.no_grad():
        y, r = model(ids), fp(ids)
    return float((y - r).norm() / r.norm())


def test_group_size_policy():
    assert effective_group_size(576, 128) == 64
    assert effective_group_size(1536, 128) == 128
    assert effective_group_size(576, 0) == 0
    with pytest.raises(ConfigError, match="group-size 0"):
        effective_group_size(7, 4)


@pytest.mark.parametrize("bits,symmetric,act_bits,group", [(4, True, 8, 32), (2, False, 8, 16), (4, True, 4, 0),
                                                           (8, True, 8, 0), (3, False, 4, 32)])
def test_waqlinear_integer_path_matches_reference_and_fake_quant(bits, symmetric, act_bits, group):
    g = torch.Generator().manual_seed(bits + act_bits)
    lin = nn.Linear(64, 24)
    x = torch.randn(3, 7, 64, generator=g)
    smooth = torch.rand(64, generator=g) + 0.5
    m = WAQLinear.from_float(lin, bits, group, symmetric, act_bits, smooth)
    fast = m(x)
    m.kernel, m._prepared = "reference", None
    assert torch.equal(m(x), fast)  # int32 products via torch._int_mm == int64 reference, same epilogue
    torch.testing.assert_close(fast, m.fake_forward(x), rtol=1e-4, atol=1e-4)  # = fake-quant float simulation
    re = WAQLinear.from_spec({k: v for k, v in m.spec().items() if k != "class"})
    re.load_state_dict(m.state_dict())
    assert torch.equal(re(x), fast)


def test_wa_kernel_accumulators_exact_at_extremes():
    q = torch.full((5, 64), 127, dtype=torch.int8)
    w = torch.full((64, 8), -127, dtype=torch.int8)
    s = torch.ones(8, 2)
    x = torch.full((5, 64), 3.0)
    assert torch.equal(wa_linear(x, w, s, 32, 8, None), wa_linear_ref(x, w, s, 32, 8, None))
    assert torch.equal(torch._int_mm(q, w), (q.long() @ w.long()).int())


def test_smoothquant_fold_is_exact_in_float():
    fp = tiny_llama()
    m = copy.deepcopy(fp)
    keep = fold_llama_smoothing(m, tiny_batches(2, 32), alpha=0.5)
    assert set(keep) == {f"lm.model.layers.{i}.self_attn.o_proj" for i in range(2)}
    assert not torch.allclose(m.lm.model.layers[0].input_layernorm.weight, fp.lm.model.layers[0].input_layernorm.weight)
    ids = tiny_batches(1, 24, seed=3)[0]
    with torch.no_grad():
        torch.testing.assert_close(m(ids), fp(ids), rtol=1e-4, atol=1e-4)


def test_presets_order_by_aggressiveness_on_tiny_llama():
    fp = tiny_llama()
    calib = tiny_batches(4, 64)
    ids = tiny_batches(1, 64, seed=7)[0]
    err = {}
    for name in ("w8a8", "w4a8", "w4a4", "w2a8"):
        q = lowbit.quantize(copy.deepcopy(fp), preset_config(name), calib)
        assert q.lowbit_scheme == name
        assert len(q.lowbit_report.layers) == 14  # every decoder linear; LM head stays float
        kind = DynamicQLinear if name == "w8a8" else WAQLinear
        assert all(isinstance(q.get_submodule(n), kind) for n in q.lowbit_report.layers)
        err[name] = _rel_err(q, fp, ids)
    W8A8_REL_ERR_MAX = 0.05  # int8 x int8 on a smoothed random model: ~1% measured
    assert err["w8a8"] < W8A8_REL_ERR_MAX
    assert err["w8a8"] < err["w4a8"] < err["w4a4"]
    assert err["w4a8"] < err["w2a8"]


def test_smoothquant_helps_per_token_int8_with_outlier_channels():
    fp = tiny_llama()
    with torch.no_grad():  # outlier channels in the attention input, as real LLMs have
        for layer in fp.lm.model.layers:
            layer.input_layernorm.weight[[3, 17]] = 40.0
    calib = tiny_batches(4, 64)
    ids = tiny_batches(1, 64, seed=7)[0]
    plain = lowbit.quantize(copy.deepcopy(fp), WAConfig(alpha=None), calib)
    smooth = lowbit.quantize(copy.deepcopy(fp), WAConfig(alpha=0.5), calib)
    assert _rel_err(smooth, fp, ids) < 0.7 * _rel_err(plain, fp, ids)
    assert build_config("smoothquant", {"alpha": "0.6"}).alpha == 0.6


def test_llm_int8_keeps_outlier_columns_in_float():
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(64, 32)
    x = torch.randn(20, 64, generator=g)
    x[:, 5] *= 60  # an outlier feature dimension
    ref = lin(x)
    mixed = MixedInt8Linear.from_float(lin)
    plain = DynamicQLinear.from_float(lin)
    with torch.no_grad():
        e_mixed = float((mixed(x) - ref).norm() / ref.norm())
        e_plain = float((plain(x) - ref).norm() / ref.norm())
    assert mixed.last_outliers == 1
    assert e_mixed < 0.3 * e_plain
    fp = tiny_llama(layers=1)
    q = lowbit.quantize(copy.deepcopy(fp), build_config("llm-int8", {}))
    assert "lm.lm_head" in q.lowbit_report.skipped and len(q.lowbit_report.layers) == 7


def test_sequential_from_safetensors_equals_in_memory(tmp_path):
    from lowbit.algorithms.sequential import process_layerwise, quantize_from_safetensors

    fp = tiny_llama()
    fp.lm.save_pretrained(str(tmp_path))
    calib = tiny_batches(4, 64)
    cfg = GPTQConfig(bits=4, group_size=16)
    a = copy.deepcopy(fp)
    process_layerwise(a, calib, make_gptq_process(cfg, "lm.model.layers", QuantizeReport(), {}))
    rep = QuantizeReport()
    b = quantize_from_safetensors(tmp_path, make_gptq_process(cfg, "lm.model.layers", rep, {}), calib)
    assert len(rep.layers) == 14
    for name in rep.layers:
        assert torch.equal(a.get_submodule(name).qweight, b.get_submodule(name).qweight), name
    ids = tiny_batches(1, 32, seed=8)[0]
    with torch.no_grad():
        torch.testing.assert_close(b(ids), a(ids))


def test_quantize_from_disk_matches_lowbit_quantize_and_saves(tmp_path):
    from lowbit.algorithms.awq import AWQConfig
    from lowbit.algorithms.from_disk import quantize_from_disk

    fp = tiny_llama()
    fp.lm.save_pretrained(str(tmp_path / "fp"))
    calib = tiny_batches(4, 64)
    cfg = GPTQConfig(bits=4, group_size=16)
    a = lowbit.quantize(copy.deepcopy(fp), cfg, calib)
    b = quantize_from_disk(tmp_path / "fp", cfg, calib)
    assert b.lowbit_scheme == a.lowbit_scheme and b.lowbit_report.layers == a.lowbit_report.layers
    assert b.lowbit_calibration["sha256"] == a.lowbit_calibration["sha256"]
    for name in a.lowbit_report.layers:
        assert torch.equal(a.get_submodule(name).qweight, b.get_submodule(name).qweight), name
    lowbit.save(b, tmp_path / "q")  # the same files as an in-memory run
    assert (tmp_path / "q" / "metadata.json").is_file()
    c = quantize_from_disk(tmp_path / "fp", AWQConfig(bits=4, group_size=16), calib)
    assert len(c.lowbit_report.layers) == 14
    hqq = AWQConfig(bits=4, group_size=16, symmetric=False, n_grid=4, init="hqq")  # awq-hqq: HQQ's rounding
    d, e = quantize_from_disk(tmp_path / "fp", hqq, calib), lowbit.quantize(copy.deepcopy(fp), hqq, calib)
    assert d.lowbit_scheme == "awq-hqq-w4-g16-asym" and len(d.lowbit_report.layers) == 14
    for name in e.lowbit_report.layers:
        assert torch.equal(d.get_submodule(name).dequantized_weight(), e.get_submodule(name).dequantized_weight()), name
    with pytest.raises(ConfigError, match="supports gptq and awq"):
        quantize_from_disk(tmp_path / "fp", build_config("w8a8", {}), calib)
    with pytest.raises(ConfigError, match="no model.safetensors"):
        quantize_from_disk(tmp_path, cfg, calib)


def test_calibration_overlap_warns(caplog):
    from lowbit.data import lm_eval_text

    class Echo:  # a "tokenizer" whose decode returns the evaluation text: full contamination
        def decode(self, ids):
            return lm_eval_text()[:2000]

    class M(nn.Module):
        tokenizer = Echo()

    with caplog.at_level(logging.WARNING):
        frac = warn_if_overlaps_eval(M(), [torch.zeros(1, 4, dtype=torch.long)])
    assert frac > 0.9 and "overlaps the evaluation text" in caplog.text


def test_schemes_and_bad_options():
    assert build_config("gptq", {"bits": 3, "group_size": 64, "symmetric": False}).scheme == "gptq-w3-g64-asym-attnh-resw"
    assert build_config("gptq", {"bits": 3, "attention_hessian": False}).scheme == "gptq-w3-g128-sym-resw"
    assert build_config("gptq", {"bits": 3, "attention_hessian": False, "residual_weights": False}).scheme == \
        "gptq-w3-g128-sym"
    assert build_config("awq", {"bits": 4}).scheme == "awq-w4-g128-asym"  # affine by default, as AutoAWQ
    assert build_config("awq", {"symmetric": True}).scheme == "awq-w4-g128-sym"
    assert build_config("awq-gptq", {}).symmetric and build_config("awq-gptaq", {}).symmetric
    assert build_config("awq-gptq", {"attention_scales": False}).scheme.endswith("-noattnscales")
    with pytest.raises(ConfigError, match="does not take attention_scales"):
        build_config("awq", {"attention_scales": False})
    assert build_config("w4a4", {}).act_bits == 4
    with pytest.raises(ConfigError, match="does not take"):
        build_config("w4a8", {"bits": 4})
    with pytest.raises(ConfigError, match="W5A8"):
        WAConfig(weight_bits=5)
