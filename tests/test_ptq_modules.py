"""Quantized modules and the front door on small random layers (unit tests; real models elsewhere)."""

import copy

import pytest
import torch
from torch import nn

import lowbit
from lowbit.algorithms.dynamic import Int8DynamicConfig
from lowbit.algorithms.rtn import WeightOnlyConfig
from lowbit.config import build_config, config_from_json, config_to_json, list_schemes
from lowbit.core import choose_qparams, per_channel, per_group, quantize, size_of, sqnr_db
from lowbit.errors import ConfigError
from lowbit.nn import DynamicQLinear, QEmbedding, WeightOnlyQLinear

# bf16 activations in the fast weight-only kernels cost ~40-50 dB SQNR against the fp32 reference;
# 35 dB leaves room for unlucky seeds while catching any layout or scale bug (those give < 10 dB).
FAST_VS_REF_SQNR_DB = 35.0


def _linear(k=256, n=96, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(k, n)


def _reference(m: nn.Module) -> nn.Module:
    r = copy.deepcopy(m)
    r.kernel = "reference"
    r._fn = r._choice = None
    return r


def test_dynamic_qlinear_fast_equals_reference():
    lin = _linear()
    x = torch.randn(3, 11, 256) * torch.linspace(0.1, 10, 256)
    for smooth in (None, torch.rand(256) + 0.5):
        m = DynamicQLinear.from_float(lin, smooth=smooth)
        assert torch.equal(m(x), _reference(m)(x))
        assert sqnr_db(lin(x), m(x)) > 30


def test_dynamic_qlinear_smoothing_preserves_the_function():
    lin = _linear()
    x = torch.randn(64, 256)
    x[:, 5] *= 50  # an outlier channel
    s = x.abs().amax(0) ** 0.5 / lin.weight.abs().amax(0) ** 0.5
    plain = DynamicQLinear.from_float(lin)
    smooth = DynamicQLinear.from_float(lin, smooth=s)
    torch.testing.assert_close(smooth.dequantized_weight(), lin.weight.detach(), atol=0.02, rtol=0.05)
    assert sqnr_db(lin(x), smooth(x)) > sqnr_db(lin(x), plain(x))


@pytest.mark.parametrize("bits,group,sym", [(8, 0, True), (4, 128, True), (4, 64, False), (4, 0, True),
                                            (3, 32, True), (3, 32, False), (2, 64, False)])
def test_weight_only_codes_storage_and_fast_path(bits, group, sym):
    lin = _linear()
    m = WeightOnlyQLinear.from_float(lin, bits, group, sym)
    gran = per_group(group) if group else per_channel(0)
    qp = choose_qparams(lin.weight.detach(), m.qparams().fmt, sym, gran)
    qp.scale = qp.scale.half().float()
    assert torch.equal(m.codes(), quantize(lin.weight.detach(), qp))  # packed codes round-trip exactly
    assert m.qweight.numel() == size_of(lin.weight.shape, m.fmt, gran, sym).code_bytes
    x = torch.randn(7, 256)
    fast, ref = m(x), _reference(m)(x)
    assert m._op != "reference"  # every case above has a fast kernel
    assert sqnr_db(ref, fast) > FAST_VS_REF_SQNR_DB


def test_nf4_uses_reference_and_beats_int4_on_gaussian_weights():
    lin = _linear()
    nn.init.normal_(lin.weight, std=0.05)  # NF4's design assumption: normally distributed weights
    nf = WeightOnlyQLinear.from_float(lin, group_size=64, fmt="nf4")
    i4 = WeightOnlyQLinear.from_float(lin, 4, 64, True)
    x = torch.randn(9, 256)
    assert sqnr_db(lin(x), nf(x)) > sqnr_db(lin(x), i4(x))
    assert nf._op == "reference"


def test_qembedding_forward_matches_reference():
    emb = nn.Embedding(50, 32, padding_idx=0)
    q = QEmbedding.from_float(emb)
    ids = torch.randint(0, 50, (4, 7))
    assert torch.equal(q(ids), q.forward_ref(ids))
    assert sqnr_db(emb(ids), q(ids)) > 40


def test_quantize_front_door_include_exclude_and_report():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.Conv2d(1, 1, 1))
    lowbit.quantize(model, WeightOnlyConfig(bits=8, group_size=0, exclude=("2",)))
    assert isinstance(model[0], WeightOnlyQLinear) and isinstance(model[2], nn.Linear)
    assert list(model.lowbit_report.layers) == ["0"]
    assert "3" in model.lowbit_report.skipped  # the conv stays float, with its reason


@pytest.mark.parametrize("sym", [True, False])
def test_ragged_last_group_equals_zero_padding(sym):
    """K = 576 at g128 (SmolLM2): the last group has 64 columns; same codes as padding W with zeros."""
    torch.manual_seed(0)
    lin = nn.Linear(576, 32)
    m = WeightOnlyQLinear.from_float(lin, 4, 128, sym)
    assert m.scale.shape == (32, 5)
    wp = torch.nn.functional.pad(lin.weight.detach(), (0, 64))
    qp = choose_qparams(wp, m.qparams().fmt, sym, per_group(128))
    qp.scale = qp.scale.half().float()
    assert torch.equal(m.codes(), quantize(wp, qp)[:, :576])
    x = torch.randn(5, 576)
    assert m._fast_support()[0] == "int4_weight_only_linear"
    assert sqnr_db(_reference(m)(x), m(x)) > FAST_VS_REF_SQNR_DB
    assert sqnr_db(lin(x), m(x)) > 15


def test_no_matching_layer_is_an_error():
    with pytest.raises(ConfigError, match="no layer matched"):
        lowbit.quantize(nn.Sequential(nn.ReLU()), Int8DynamicConfig(smooth_alpha=None))


def test_nan_weights_refused():
    m = nn.Linear(4, 4)
    m.weight.data[0, 0] = float("nan")
    with pytest.raises(ConfigError, match="NaN"):
        lowbit.quantize(m, WeightOnlyConfig(bits=8, group_size=0))


def test_configs_round_trip_through_json():
    """Every registered scheme's default config survives JSON (CLI flags, HTTP payloads, metadata.json)."""
    schemes = list_schemes()
    assert len(schemes) >= 30
    for s in schemes:
        cfg = build_config(s.name, {"budget_mb": 10.0} if s.name == "mixed" else {})  # mixed needs a bound
        assert config_from_json(config_to_json(cfg)) == cfg, s.name


def test_bad_scheme_and_options_are_clear_errors():
    with pytest.raises(ConfigError, match="valid schemes"):
        build_config("int5-magic")
    with pytest.raises(ConfigError, match="does not take"):
        build_config("w8a8-dynamic", {"bits": 4})
    with pytest.raises(ConfigError, match="bits must be one of"):
        build_config("rtn", {"bits": 5})
    with pytest.raises(ConfigError, match="unknown config kind"):
        config_from_json({"version": 1, "kind": "nope"})
    with pytest.raises(ConfigError, match="version"):
        config_from_json({"version": 99, "kind": "weight-only"})


def test_int4_layer_with_10_outputs_falls_back_to_reference():
    """The int4 kernel packs rows in blocks of 16: a 10-class head must still work (reference path)."""
    lin = nn.Linear(64, 10)
    m = WeightOnlyQLinear.from_float(lin, 4, 0, True)
    x = torch.randn(3, 64)
    assert m(x).shape == (3, 10) and m._op == "reference"
    assert "divisible by 16" in m._fast_support()[1]


def test_int8_kernel_needs_k_multiple_of_16():
    """_weight_int8pack_mm silently returns garbage for K = 24: such layers must take the reference path."""
    lin = nn.Linear(24, 16)
    m = WeightOnlyQLinear.from_float(lin, 8, 0, True)
    x = torch.randn(3, 24)
    assert sqnr_db(lin(x), m(x)) > 30 and m._op == "reference"
