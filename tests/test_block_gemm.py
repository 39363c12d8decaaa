"""The prompt GEMMs of lowbit.kernels.block_gemm against their reference twins on odd shapes, and the
three builds (AVX-512 VNNI / AVX2 / plain C) against each other, bit for bit."""

import pytest
import torch

from lowbit.kernels import block_gemm, block_gemv

VARIANTS = ("native", "avx2", "portable")
# Both sides compute from the same codes and the same int8 activations; the GEMM sums integer block
# products scaled per block and group, the reference runs F.linear over dequantized fp32 weights:
# only the fp32 summation order differs (observed ~3e-7 relative).
REL_TOL = 2e-6


def _lib(variant):
    lib, why = block_gemm.library(variant)
    if lib is None:
        pytest.skip(f"no C kernel: {why}")
    return lib


def _case(m, n, k, g, offsets, bias=True, seed=0):
    x, packed, s, b, bb = block_gemv._example(seed, 4, g, m, k=k, n=n)
    x[0, :32] = 0.0  # an all-zero activation block: d = 0, codes 0
    return x, packed, s, b if offsets else None, 4, g, bb if bias else None


def _rel(a, b):
    return float((a - b).norm() / b.norm())


# M not a multiple of the 4-row tile, N not a multiple of the 32-output tile (and under 16), SmolLM2's
# K = 576 / 1536, groups of 32 / 64 / 128 (ragged last group at K = 320), symmetric and affine, bias or not.
SHAPES = [
    (37, 80, 320, 128, True, True),
    (9, 40, 96, 32, False, False),
    (13, 7, 576, 64, True, True),
    (8, 96, 1536, 128, False, True),
    (130, 64, 576, 128, True, False),
]


@pytest.mark.parametrize("m,n,k,g,offsets,bias", SHAPES)
def test_a8_gemm_matches_reference_and_builds_agree(m, n, k, g, offsets, bias):
    args = _case(m, n, k, g, offsets, bias)
    ref = block_gemv.block_linear_a8_ref(*args)
    outs = {}
    for v in VARIANTS:
        _lib(v)
        outs[v] = block_gemm.block_gemm_a8(*args, variant=v)
        assert outs[v].shape == ref.shape
        assert _rel(outs[v], ref) < REL_TOL, v
    for v in VARIANTS[1:]:
        assert torch.equal(outs[v], outs["native"]), v  # same integers, same fused steps in the same order
    gemv = block_gemv.block_linear_a8(*args)  # the decoding kernel: same math, other summation order
    assert _rel(outs["native"], gemv) < REL_TOL


@pytest.mark.parametrize("variant", VARIANTS)
def test_activation_codes_are_bit_exact(variant):
    _lib(variant)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(11, 192, generator=g) * torch.linspace(0.01, 30, 192)
    x[2, 64:96] = 0.0
    q, d, sums = block_gemm.quantize_blocks(x, 64, variant)
    q_ref, d_ref = block_gemv.quantize_blocks_ref(x)
    assert torch.equal(q, q_ref) and torch.equal(d, d_ref)
    blocks = q_ref.float().reshape(11, -1, 32).sum(-1) * d_ref  # (M, K/32)
    assert torch.allclose(sums, blocks.reshape(11, 3, 2).sum(-1), rtol=1e-6, atol=1e-6)


def test_a8_gemm_extremes_stay_exact():
    """Codes 15 against activations +-127 over K = 1536: the largest integer block sums (15 * 127 * 32)."""
    k, n = 1536, 48
    x = torch.full((6, k), 2.0)
    x[1] = -2.0
    u = torch.full((n, k), 15, dtype=torch.uint8)
    s = torch.ones(n, k // 128, dtype=torch.float16)
    args = (x, block_gemv.pack_codes(u, 4), s, None, 4, 128, None)
    want = torch.full((6, n), 2.0 * 7 * k)  # W = s u + b = 15 - 8 = 7 everywhere
    want[1] = -want[1]
    for v in VARIANTS:
        _lib(v)
        assert torch.equal(block_gemm.block_gemm_a8(*args, variant=v), want), v


def test_no_compiler_falls_back(monkeypatch):
    args = _case(9, 40, 96, 32, True)
    want = block_gemv.block_linear_a8(*args)
    monkeypatch.setattr(block_gemm, "library", lambda variant="native": (None, "no compiler"))
    assert torch.equal(block_gemm.block_gemm_a8(*args), want)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("m,n,k,g,offsets,bias", SHAPES)
def test_f32_gemm_matches_reference_and_builds_agree(bits, m, n, k, g, offsets, bias):
    x, packed, s, b, bb = block_gemv._example(1, bits, g, m, k=k, n=n)
    args = (x, packed, s, b if offsets else None, bits, g, bb if bias else None)
    ref = block_gemv.block_linear_ref(*args)
    outs = {}
    for v in VARIANTS:
        _lib(v)
        outs[v] = block_gemm.block_gemm(*args, variant=v)
        assert _rel(outs[v], ref) < REL_TOL, v
    for v in VARIANTS[1:]:
        assert torch.equal(outs[v], outs["native"]), v  # one FMA per k in the same order, then the bias


# The decoder's prompt path (GEMMs) against the same decoder on the reference kernels: the same
# weights and activation codes, fp32 summation order only, compounded over 2 layers and the head.
PROMPT_LOGIT_TOL = 1e-4


@pytest.mark.parametrize("activations", ["fp32", "int8"])
@pytest.mark.parametrize("scheme", ["int4-g64-affine", "int4-tied-embedding", "int8-per-channel"])
def test_decoder_prompt_logits_match_the_reference_kernels(activations, scheme, monkeypatch):
    from lowbit.models.decode import Decoder
    from tests.test_decode import _model
    from tests._tiny_llama import tiny_batches

    m = _model(scheme)
    ids = tiny_batches(1, length=21)[0]
    got = Decoder(m, max_len=32, activations=activations).logits(ids)
    monkeypatch.setattr(block_gemm, "block_gemm_a8", block_gemv.block_linear_a8_ref)
    monkeypatch.setattr(block_gemm, "block_gemm", block_gemv.block_linear_ref)
    want = Decoder(m, max_len=32, activations=activations).logits(ids)
    assert float((got - want).abs().max() / want.abs().max()) < PROMPT_LOGIT_TOL
