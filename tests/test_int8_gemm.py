"""The fused W8A8-dynamic C kernel (lowbit.kernels.int8_gemm) against int8_dynamic_linear_ref, bit for bit,
on every build variant this CPU can run (VNNI / AVX2 / plain C), tails and extremes included."""

import pytest
import torch

from lowbit.kernels import int8_dynamic, int8_gemm

VARIANTS = ("native", "avx2", "portable")


def _packed(qw, variant):
    lib, why = int8_gemm.library(variant)
    if lib is None:
        pytest.skip(f"no C kernel: {why}")
    packed = int8_gemm.pack(qw, variant)
    assert packed.fn is not None
    return packed


def _case(m, k, n, seed, smooth=True, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.linspace(0.1, 20, k)
    if m > 2:
        x[1] = 0.0  # an all-zero token: scale eps, codes 0
    qw = torch.randint(-127, 128, (k, n), generator=g, dtype=torch.int8)
    ws = torch.rand(n, generator=g) * 0.01 + 1e-3
    b = torch.randn(n, generator=g) if bias else None
    si = torch.rand(k, generator=g) + 0.5 if smooth else None
    return x, qw, ws, b, si


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("m,k,n", [(1, 96, 80), (7, 100, 130), (13, 384, 384), (37, 64, 1536), (6, 1536, 64)])
def test_kernel_bit_exact(variant, m, k, n):
    for seed, smooth, bias in ((0, True, True), (1, False, False)):
        x, qw, ws, b, si = _case(m, k, n, seed, smooth, bias)
        y = int8_gemm.w8a8_linear(x, _packed(qw, variant), ws, b, si)
        assert torch.equal(y, int8_dynamic.int8_dynamic_linear_ref(x, qw, ws, b, si)), (variant, m, k, n)


@pytest.mark.parametrize("variant", VARIANTS)
def test_kernel_extremes(variant):
    """Codes +-127 over K = 1536: int16 pair sums at their bound (AVX2), int32 sums past 2^24."""
    k = 1536
    x = torch.full((5, k), 3.0)
    x[1] = -3.0
    x[2, ::2] = -3.0
    qw = torch.full((k, 70), 127, dtype=torch.int8)
    qw[:, 1::2] = -127
    ws, b = torch.ones(70), torch.zeros(70)
    y = int8_gemm.w8a8_linear(x, _packed(qw, variant), ws, b, None)
    assert torch.equal(y, int8_dynamic.int8_dynamic_linear_ref(x, qw, ws, b, None))
    assert y[0, 0] == 127 * 127 * k * (3.0 / 127)


def test_minus_128_weights_stay_exact():
    """-128 breaks the AVX2 sign trick: such weights are declared unpackable there and take the torch path."""
    x, qw, ws, b, si = _case(9, 64, 48, 2)
    qw[3, 5] = -128
    packed = int8_gemm.pack(qw)
    assert packed.has_min
    if int8_gemm.path_name("avx2") == "avx2":
        assert int8_gemm.pack(qw, "avx2").fn is None
    y = int8_dynamic.int8_dynamic_linear(x, qw, ws, b, si)
    assert torch.equal(y, int8_dynamic.int8_dynamic_linear_ref(x, qw, ws, b, si))
    if int8_gemm.path_name() == "vnni512":  # u8 x s8 handles -128 exactly
        assert packed.fn is not None
        assert torch.equal(int8_gemm.w8a8_linear(x, packed, ws, b, si), y)


def test_no_compiler_falls_back(monkeypatch):
    x, qw, ws, b, si = _case(4, 32, 16, 3)
    monkeypatch.setattr(int8_gemm, "library", lambda variant="native": (None, "no compiler"))
    assert int8_gemm.pack(qw).fn is None
    y = int8_dynamic.int8_dynamic_linear(x.reshape(2, 2, 32), qw, ws, b, si)
    assert torch.equal(y, int8_dynamic.int8_dynamic_linear_ref(x.reshape(2, 2, 32), qw, ws, b, si))


def test_packing_is_cached_and_refreshed():
    x, qw, ws, b, si = _case(3, 32, 16, 4)
    p1 = int8_dynamic.packed_weight(qw)
    assert int8_dynamic.packed_weight(qw) is p1
    qw.mul_(-1)  # in place: the version counter moves, the packing is rebuilt
    assert int8_dynamic.packed_weight(qw) is not p1
    assert torch.equal(int8_dynamic.int8_dynamic_linear(x, qw, ws, b, si),
                       int8_dynamic.int8_dynamic_linear_ref(x, qw, ws, b, si))


def test_custom_op_registration():
    """The op torch.compile sees: schema, fake kernel and eager kernel agree (torch.library.opcheck)."""
    x, qw, ws, b, si = _case(5, 64, 32, 5)
    torch.library.opcheck(torch.ops.lowbit.w8a8_dynamic_linear.default, (x, qw, ws, b, si),
                          test_utils=("test_schema", "test_faketensor"))
    compiled = torch.compile(lambda t: torch.ops.lowbit.w8a8_dynamic_linear(t, qw, ws, b, si).relu(), fullgraph=True)
    assert torch.equal(compiled(x), int8_dynamic.int8_dynamic_linear_ref(x, qw, ws, b, si).relu())
    y = torch.ops.lowbit.w8a8_dynamic_linear(x, qw, ws, b, si)
    assert torch.equal(y, int8_dynamic.int8_dynamic_linear_ref(x, qw, ws, b, si))
