"""Issue 18 W4: the MSE group-scale search (GPTQ init="mse", RTN on it) agrees with its reference twin bit for
bit and never has a larger group error than min-max; AWQ's scales followed by GPTAQ (awq-gptaq) on the tiny Llama."""

from __future__ import annotations

import copy

import pytest
import torch

import lowbit
from lowbit.algorithms.awq import AWQConfig
from lowbit.algorithms.gptq import GPTQ, GPTQConfig, MSE_NORM, mse_group_init, mse_group_init_ref, rtn_solution
from lowbit.config import build_config
from lowbit.core import choose_qparams, dequantize, per_channel, quantize
from lowbit.errors import ConfigError
from lowbit.nn import WeightOnlyQLinear
from tests._tiny_llama import tiny_batches, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: small ops, one thread


def _groups(seed: int, n: int = 48, g: int = 32) -> torch.Tensor:
    """Rows of one group each: Gaussian, heavy-tailed, one outlier, all zero, constant."""
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(n, g, generator=gen) * torch.rand(n, 1, generator=gen)
    v[1] = torch.distributions.StudentT(2.0).sample((g,))
    v[2, 5] = 25.0
    v[3] = 0
    v[4] = 0.3
    return v


def _err(vals: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, qmin: int, qmax: int, norm: float):
    zz = 0 if z is None else z[:, None]
    q = torch.clamp(torch.round(vals / s[:, None]) + zz, qmin, qmax)
    return ((q - zz) * s[:, None] - vals).abs().pow(norm).sum(dim=1)  # (N,)


@pytest.mark.parametrize("fmt,symmetric", [("int4", True), ("int3", True), ("uint4", False)])
def test_mse_init_matches_its_reference_twin(fmt, symmetric):
    for seed in range(3):
        v = _groups(seed)
        s, z = mse_group_init(fmt, symmetric)(v)
        rs, rz = mse_group_init_ref(fmt, symmetric)(v)
        assert torch.equal(s, rs)
        assert (z is None and rz is None) or torch.equal(z, rz)


@pytest.mark.parametrize("fmt,symmetric", [("int4", True), ("int3", True), ("uint4", False)])
@pytest.mark.parametrize("norm", [2.0, MSE_NORM])
def test_mse_init_never_has_a_larger_group_error_than_minmax(fmt, symmetric, norm):
    for seed in range(4):
        v = _groups(seed)
        mm = choose_qparams(v, fmt, symmetric, per_channel(0))
        s_mm = mm.scale.to(torch.float16).float()  # stored precision, as GPTQ.solve stores it
        s, z = mse_group_init(fmt, symmetric, norm=norm)(v)
        e_mse = _err(v, s, z, mm.qmin, mm.qmax, norm)
        e_mm = _err(v, s_mm, None if mm.zero_point is None else mm.zero_point.float(), mm.qmin, mm.qmax, norm)
        assert torch.all(e_mse <= e_mm)
        assert float(e_mse.sum()) < float(e_mm.sum())  # and the search does find smaller ranges


def test_rtn_on_mse_scales_lowers_the_weight_error_and_stores_them():
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(64, 128, generator=gen)
    init = mse_group_init("int4", True)
    codes, qp = rtn_solution(w, "int4", True, 32, group_init=init)
    mc, mqp = rtn_solution(w, "int4", True, 32)
    assert qp.zero_point is None and qp.scale.shape == (64, 4)
    assert torch.equal(quantize(w, qp), codes)  # plain RTN on the searched scales: no error feedback
    assert float(((dequantize(codes, qp) - w) ** 2).sum()) < float(((dequantize(mc, mqp) - w) ** 2).sum())
    # affine: integer zero-points, stored as min-max's are
    codes, qp = rtn_solution(w, "uint4", False, 32, group_init=mse_group_init("uint4", False))
    assert qp.zero_point.dtype == torch.int32 and torch.equal(quantize(w, qp), codes)


def test_gptq_mse_init_on_a_linear():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1024, 64, generator=gen) * torch.linspace(0.5, 3.0, 64)
    w = torch.randn(32, 64, generator=gen)
    h = GPTQ(64)
    h.add_batch(x)
    out = {}
    for name, init in (("minmax", None), ("mse", mse_group_init("int3", True))):
        codes, qp, loss = h.solve(w, "int3", True, 16, group_init=init)
        out[name] = float(((x @ (dequantize(codes, qp) - w).T) ** 2).sum())
    # measured 0.82x; the group scales are chosen on the weights, not the output, so only "not much worse" is a law
    MSE_VS_MINMAX_OUTPUT_MAX = 1.0
    assert out["mse"] < MSE_VS_MINMAX_OUTPUT_MAX * out["minmax"]


def test_gptq_mse_scheme_and_config_on_tiny_llama():
    fp, batches = tiny_llama(), tiny_batches(n=4, length=64)
    q = lowbit.quantize(copy.deepcopy(fp), build_config("gptq-mse", {"group_size": 16}), batches)
    assert q.lowbit_scheme == "gptq-w4-g16-sym-mseinit-attnh-resw" and len(q.lowbit_report.layers) == 14
    assert all(isinstance(q.get_submodule(n), WeightOnlyQLinear) for n in q.lowbit_report.layers)
    with pytest.raises(ConfigError, match="init must be one of"):
        GPTQConfig(init="percentile")
    with pytest.raises(ConfigError, match="integer grids"):
        GPTQConfig(fmt="nf4", init="mse")
    with pytest.raises(ConfigError, match="integer grids"):
        mse_group_init("nf4", True)


def test_awq_gptaq_on_tiny_llama():
    """AWQ's scales, then GPTAQ: its float stream is exact through the scaled (unclipped) layers, and it lowers
    the output error against the fp32 model below AWQ's own rounding."""
    fp = tiny_llama()
    calib = tiny_batches(4, 64)
    a = lowbit.quantize(copy.deepcopy(fp), AWQConfig(bits=3, group_size=16, n_grid=10, clip=False), calib)
    b = lowbit.quantize(copy.deepcopy(fp), build_config("awq-gptaq", {"bits": 3, "group_size": 16}), calib)
    assert b.lowbit_scheme.startswith("awq-gptaq-w3-g16-sym") and len(b.lowbit_report.layers) == 14
    assert all(isinstance(b.get_submodule(n), WeightOnlyQLinear) for n in b.lowbit_report.layers)
    stats = b.lowbit_report.extra["awq"]["layers"]
    assert "lm.model.layers.1" in stats and "lm.model.layers.1.mlp.down_proj" in stats  # both steps ran

    def err(m):
        with torch.no_grad():
            return sum(float(((m(t) - fp(t)) ** 2).mean()) for t in calib)

    AWQ_GPTAQ_VS_AWQ_MAX = 1.0  # error-compensating rounding of the same scaled layers
    assert err(b) < AWQ_GPTAQ_VS_AWQ_MAX * err(a)
    c = lowbit.quantize(copy.deepcopy(fp), AWQConfig(bits=3, group_size=16, n_grid=10, rounding="gptaq", clip=False,
                                                     init="mse"), calib)
    assert c.lowbit_scheme == "awq-gptaq-w3-g16-sym-mseinit"
    # the clipping search: on by default for rounding rtn / gptq, off for gptaq; names say when it differs
    assert AWQConfig().clips and AWQConfig(rounding="gptq").clips and not AWQConfig(rounding="gptaq").clips
    assert AWQConfig(rounding="gptaq", clip=True).scheme == "awq-gptaq-w4-g128-sym-clip"
    assert AWQConfig(clip=False).scheme == "awq-w4-g128-sym-noclip"
    with pytest.raises(ConfigError, match="needs rounding"):
        AWQConfig(init="mse")
