"""Every fast kernel against its reference twin, looping over the registry."""

import pytest
import torch

from lowbit.errors import ConfigError
from lowbit.kernels import KERNELS, resolve

WITH_EXAMPLES = sorted(op for op, entry in KERNELS.items() if "example" in entry)


def test_every_kernel_has_a_reference_twin():
    for op, entry in KERNELS.items():
        assert callable(entry["reference"]) and callable(entry["fast"]), op


def _flat(out):
    return list(out) if isinstance(out, tuple) else [out]


@pytest.mark.parametrize("op", WITH_EXAMPLES)
@pytest.mark.parametrize("seed", [0, 1])
def test_fast_matches_reference(op, seed):
    ex = KERNELS[op]["example"](seed)
    fast = _flat(KERNELS[op]["fast"](*ex["fast"]))
    ref = _flat(KERNELS[op]["reference"](*ex["reference"]))
    assert len(fast) == len(ref)
    for a, b in zip(fast, ref):
        assert a.shape == b.shape
        if ex["exact"]:
            assert torch.equal(a, b), op
        else:
            rel = (a.float() - b.float()).norm() / b.float().norm()
            assert rel <= ex["tol"], f"{op}: relative error {rel:.2e} > {ex['tol']}"


def test_int8_dynamic_accumulators_bit_exact():
    from lowbit.kernels.int8_dynamic import quantize_per_token

    g = torch.Generator().manual_seed(3)
    x = torch.randn(50, 128, generator=g)
    w = torch.randint(-127, 128, (128, 40), generator=g, dtype=torch.int8)
    q, _ = quantize_per_token(x)
    assert torch.equal(torch._int_mm(q, w), (q.long() @ w.long()).int())


def test_resolve_rules():
    assert resolve("int8_dynamic_linear", "auto") == "fast"
    assert resolve("int8_dynamic_linear", "auto", supported=False, why_not="x") == "reference"
    assert resolve("int8_dynamic_linear", "reference") == "reference"
    with pytest.raises(ConfigError, match="unsupported"):
        resolve("int4_weight_only_linear", "fast", supported=False, why_not="codebook")
    with pytest.raises(ConfigError, match="valid"):
        resolve("int8_dynamic_linear", "turbo")


def test_int_product_is_exact_at_the_extremes():
    """The AVX2 path (fp32 GEMM chunks) must equal the int64 product even where a full-K fp32 sum
    (127^2 * 1536 > 2^24) would round."""
    from lowbit.kernels import int8_dynamic

    q = torch.full((4, 1536), 127, dtype=torch.int8)
    w = torch.full((1536, 8), 127, dtype=torch.int8)
    w[:, 1] = -127
    ref = (q.long() @ w.long()).to(torch.int32)
    assert torch.equal(int8_dynamic.int_product(q, w), ref)
    old = int8_dynamic.INT_MM_FAST
    try:
        int8_dynamic.INT_MM_FAST = False  # force the chunked path on any CPU
        assert torch.equal(int8_dynamic.int_product(q, w), ref)
    finally:
        int8_dynamic.INT_MM_FAST = old
