"""Integer matrix product ``int8 (M, K) x int8 (K, N) -> int32 (M, N)``, exact.

The fast path is ``torch._int_mm`` (VNNI on this CPU); the reference does the same product in int64
with a plain matmul and narrows to int32 (products of int8 codes summed over K < 2^17 never
overflow int32). Used by the static quantized modules and the integer-only pipelines.
"""

from __future__ import annotations

import torch


def int8_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Fast path: ``torch._int_mm`` on contiguous int8 operands."""
    return torch._int_mm(a.contiguous(), b.contiguous())


def int8_mm_ref(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Reference: int64 matmul, narrowed to int32."""
    return (a.long() @ b.long()).to(torch.int32)


def example_int8_mm(seed: int = 0) -> dict:
    """Random full-range int8 operands with awkward sizes (K = 9 as in a 3x3 conv over one channel)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(-128, 128, (37, 9 + 64 * seed), generator=g, dtype=torch.int8)
    b = torch.randint(-128, 128, (9 + 64 * seed, 19), generator=g, dtype=torch.int8)
    return {"fast": (a, b), "reference": (a, b), "exact": True, "tol": 0.0}
