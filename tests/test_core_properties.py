"""Property tests that loop over the whole format table (hypothesis)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.core import (
    FORMATS,
    Kind,
    choose_qparams,
    dequantize,
    fake_quantize,
    pack,
    per_channel,
    per_group,
    per_tensor,
    quantize,
    representable_range,
    unpack,
)

SCALED = [f for f in FORMATS.values() if f.kind is not Kind.CAST]
UNIFORM = [f for f in FORMATS.values() if f.kind is Kind.UNIFORM]
GRANULARITIES = [per_tensor(), per_channel(0), per_group(8)]


def _modes(fmt):
    if fmt.kind is not Kind.UNIFORM:
        return [True]
    return [False] if not fmt.signed else [True, False]


def _tensor(seed: int, spread: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(6, 32, generator=g) * spread + spread * 0.3


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(1, 8), n=st.integers(0, 100), data=st.data())
def test_unpack_pack_roundtrip_unsigned(bits, n, data):
    codes = data.draw(st.lists(st.integers(0, 2**bits - 1), min_size=n, max_size=n))
    q = torch.tensor(codes, dtype=torch.uint8)
    packed = pack(q, bits)
    assert packed.numel() == math.ceil(n / 8) * bits
    assert torch.equal(unpack(packed, bits, (n,)), q)


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_and_unpack_in_chunks_equal_one_pass(bits, monkeypatch):
    """pack() / unpack() work in chunks of runs to bound their temporaries; chunk edges must not show."""
    import importlib

    pack_mod = importlib.import_module("lowbit.core.pack")  # the module (lowbit.core.pack is the function)

    g = torch.Generator().manual_seed(bits)
    q = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (7, 13), generator=g, dtype=torch.int8)
    packed = pack(q, bits, signed=True)
    whole = unpack(packed, bits, q.shape, signed=True)
    monkeypatch.setattr(pack_mod, "UNPACK_CHUNK", 3)  # 91 codes = 12 runs -> 4 chunks
    assert torch.equal(pack(q, bits, signed=True), packed)
    assert torch.equal(unpack(packed, bits, q.shape, signed=True), whole)
    assert torch.equal(whole, q)


@pytest.mark.parametrize("fmt", [f for f in FORMATS.values() if f.kind is not Kind.CAST], ids=lambda f: f.name)
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_format_codes_pack_roundtrip(fmt, seed):
    x = _tensor(seed, 2.0)
    for symmetric in _modes(fmt):
        qp = choose_qparams(x, fmt, symmetric, per_channel(0))
        q = quantize(x, qp)
        signed = q.dtype == torch.int8
        packed = pack(q, fmt.storage_bits, signed=signed)
        assert torch.equal(unpack(packed, fmt.storage_bits, q.shape, signed=signed), q)


@pytest.mark.parametrize("fmt", SCALED, ids=lambda f: f.name)
@pytest.mark.parametrize("gran", GRANULARITIES, ids=["tensor", "channel", "group8"])
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), spread=st.floats(0.01, 100.0))
def test_on_grid_values_roundtrip_and_idempotence(fmt, gran, seed, spread):
    x = _tensor(seed, spread)
    for symmetric in _modes(fmt):
        qp = choose_qparams(x, fmt, symmetric, gran)
        y = dequantize(quantize(x, qp), qp)
        # y lies on the grid: quantizing it again with the same parameters changes nothing.
        assert torch.equal(quantize(y, qp), quantize(x, qp))
        assert torch.equal(dequantize(quantize(y, qp), qp), y)


@pytest.mark.parametrize("fmt", UNIFORM, ids=lambda f: f.name)
@pytest.mark.parametrize("gran", GRANULARITIES, ids=["tensor", "channel", "group8"])
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), spread=st.floats(0.01, 100.0))
def test_rounding_error_at_most_half_scale_inside_range(fmt, gran, seed, spread):
    x = _tensor(seed, spread)
    for symmetric in _modes(fmt):
        qp = choose_qparams(x, fmt, symmetric, gran)
        y = dequantize(quantize(x, qp), qp)
        lo, hi = representable_range(qp)
        from lowbit.core.granularity import from_blocks, to_blocks

        xb = to_blocks(x, gran)
        shape = (*xb.shape[:-1], 1)
        inside = (xb >= lo.reshape(shape)) & (xb <= hi.reshape(shape))
        bound = (qp.scale.reshape(shape) / 2) * (1 + 1e-5) + 1e-6 * spread
        err = (to_blocks(y, gran) - xb).abs()
        assert bool((err <= bound)[inside].all())


@pytest.mark.parametrize("fmt", SCALED, ids=lambda f: f.name)
def test_ste_gradient_passes_inside_and_is_zero_outside(fmt):
    x = torch.linspace(-4, 4, 64)
    qp = choose_qparams(torch.linspace(-2, 2, 64), fmt, _modes(fmt)[0], per_tensor())
    xg = x.clone().requires_grad_(True)
    fake_quantize(xg, qp).sum().backward()
    lo, hi = representable_range(qp)
    inside = (x >= lo) & (x <= hi)
    assert inside.any() and (~inside).any()
    assert torch.equal(xg.grad[inside], torch.ones(int(inside.sum())))
    assert torch.equal(xg.grad[~inside], torch.zeros(int((~inside).sum())))
