"""Core quantization math: the seed's worked example, affine vs symmetric, and torch as reference."""

import pytest
import torch

from lowbit.core import (
    FORMATS,
    choose_qparams,
    cosine,
    dequantize,
    fake_quantize,
    fit_codebook,
    get_format,
    mse,
    per_channel,
    per_group,
    per_tensor,
    quantize,
    sqnr_db,
)
from lowbit.errors import ConfigError

SEED_X = [1.6, -0.7, -3.4, 1.7, -2.9, 0.5, 2.3, 6.2]
SEED_Q = [33, -14, -70, 35, -59, 10, 47, 127]


def test_seed_worked_example_absmax_int8():
    x = torch.tensor(SEED_X)
    qp = choose_qparams(x, "int8", symmetric=True)
    assert torch.equal(quantize(x, qp), torch.tensor(SEED_Q, dtype=torch.int8))
    assert float(1 / qp.scale) == pytest.approx(127 / 6.2)


def test_affine_zero_is_exact():
    x = torch.tensor([-1.3, 0.0, 0.7, 4.9, 2.2])
    qp = choose_qparams(x, "uint8", symmetric=False)
    q = quantize(x, qp)
    assert int(q[1]) == int(qp.zero_point)
    assert float(dequantize(q, qp)[1]) == 0.0


def test_affine_beats_symmetric_on_skewed_data():
    x = torch.linspace(-3, 2, 1001)
    sym = choose_qparams(x, "int4", symmetric=True)
    aff = choose_qparams(x, "int4", symmetric=False)
    assert mse(x, dequantize(quantize(x, aff), aff)) < mse(x, dequantize(quantize(x, sym), sym))


def test_symmetric_zero_maps_to_zero_code():
    x = torch.tensor([0.0, -2.0, 5.0])
    qp = choose_qparams(x, "int4", symmetric=True)
    assert int(quantize(x, qp)[0]) == 0


@pytest.mark.parametrize("dtype,fmt", [(torch.qint8, "int8"), (torch.quint8, "uint8")])
def test_per_tensor_affine_bit_exact_vs_torch(dtype, fmt):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, generator=g) * 3 + 0.5
    qp = choose_qparams(x, fmt, symmetric=False)
    ref = torch.quantize_per_tensor(x, float(qp.scale), int(qp.zero_point), dtype).int_repr()
    assert torch.equal(quantize(x, qp).to(ref.dtype), ref)


@pytest.mark.parametrize("axis", [0, 1])
def test_per_channel_affine_bit_exact_vs_torch(axis):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(16, 48, generator=g) * torch.linspace(0.1, 4, 48)
    qp = choose_qparams(x, "int8", symmetric=False, granularity=per_channel(axis))
    ref = torch.quantize_per_channel(x, qp.scale.double(), qp.zero_point.long(), axis, torch.qint8).int_repr()
    assert torch.equal(quantize(x, qp), ref)


def test_per_group_error_shrinks_with_group_size():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 512, generator=g)
    w[:, 7] *= 30  # an outlier column: smaller groups contain it
    errs = []
    for gs in (512, 128, 32):
        qp = choose_qparams(w, "int4", True, per_group(gs))
        assert qp.scale.shape == (64, 512 // gs)
        errs.append(mse(w, dequantize(quantize(w, qp), qp)))
    assert errs[0] > errs[1] > errs[2]


def test_group_size_must_divide():
    with pytest.raises(ConfigError, match="divisible"):
        choose_qparams(torch.randn(4, 100), "int4", True, per_group(64))


def test_unknown_format_lists_valid_names():
    with pytest.raises(ConfigError, match="nf4"):
        get_format("int5")


def test_unsigned_symmetric_refused():
    with pytest.raises(ConfigError, match="affine"):
        choose_qparams(torch.randn(8), "uint8", symmetric=True)


def test_nf4_matches_qlora_definition():
    levels = FORMATS["nf4"].codebook
    assert len(levels) == 16 and levels[0] == -1.0 and levels[-1] == 1.0 and 0.0 in levels
    # Published NF4 table (QLoRA appendix E), 4 decimals.
    assert levels[1] == pytest.approx(-0.6962, abs=1e-4)
    assert levels[-2] == pytest.approx(0.7230, abs=1e-4)


# NF4 is optimal for normally distributed weights: it must beat uniform int4 absmax on N(0, 1) data.
def test_nf4_beats_int4_on_gaussian():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(128, 256, generator=g)
    nf = choose_qparams(w, "nf4", True, per_group(64))
    i4 = choose_qparams(w, "int4", True, per_group(64))
    assert sqnr_db(w, dequantize(quantize(w, nf), nf)) > sqnr_db(w, dequantize(quantize(w, i4), i4))


def test_binary_uses_mean_abs_scale():
    x = torch.tensor([[1.0, -3.0, 2.0, -2.0]])
    qp = choose_qparams(x, "binary", granularity=per_channel(0))
    y = dequantize(quantize(x, qp), qp)
    assert torch.allclose(y, torch.tensor([[2.0, -2.0, 2.0, -2.0]]))


def test_fp8_matches_torch_cast():
    x = torch.randn(1000) * 10
    qp = choose_qparams(x, "fp8_e4m3")
    y = dequantize(quantize(x, qp), qp)
    ref = (x / qp.scale).to(torch.float8_e4m3fn).float() * qp.scale
    assert torch.equal(y, ref)


# Heavy-tailed weights: 16 learned levels beat 16 uniform affine levels by > 2 dB (3.4 dB measured).
def test_kmeans_codebook_beats_uniform_at_same_levels():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(32, 256, generator=g) ** 3  # heavy-tailed: non-uniform levels pay off
    km = fit_codebook(w, 16, per_channel(0))
    uni = choose_qparams(w, "uint4", False, per_channel(0))
    assert km.codebook.shape == (32, 16)
    assert sqnr_db(w, dequantize(quantize(w, km), km)) > sqnr_db(w, dequantize(quantize(w, uni), uni)) + 2


def test_fake_quantize_equals_quantize_dequantize():
    w = torch.randn(8, 64)
    qp = choose_qparams(w, "int4", False, per_group(16))
    assert torch.equal(fake_quantize(w, qp), dequantize(quantize(w, qp), qp))


def test_cosine_metric():
    a = torch.randn(5, 7)
    assert torch.allclose(cosine(a, a, dim=-1), torch.ones(5))
    assert float(cosine(a, -a)) == pytest.approx(-1.0)


def test_bf16_cast_format():
    x = torch.randn(10)
    qp = choose_qparams(x, "bf16")
    assert quantize(x, qp).dtype == torch.bfloat16
    assert torch.equal(dequantize(quantize(x, qp), qp), x.to(torch.bfloat16).float())
