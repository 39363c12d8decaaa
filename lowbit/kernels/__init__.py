"""Kernels: fast paths for quantized ops, each with a plain ``*_ref`` twin.

``KERNELS[op] = {"reference": fn_ref, "fast": fn, "example": make}`` is the registry the tests loop
over: ``make(seed)`` returns ``{"fast": args, "reference": args, "exact": bool, "tol": float}`` built
from the same quantized data (the twins may take different layouts of it); exact ops must agree
with ``torch.equal``, the others to ``tol`` relative error (bf16 activations). ``resolve`` is the one
visible place where a kernel is chosen for ``kernel="auto"``, and it logs its choice.
"""

from __future__ import annotations

import logging
from typing import Callable

from lowbit.errors import ConfigError
from lowbit.kernels import xnor
from lowbit.kernels import (block_gemm, block_gemv, hadamard, int8_dynamic, int8_mm, prompt_attention, wa_int,
                            weight_only)

log = logging.getLogger(__name__)

KERNELS: dict[str, dict[str, Callable]] = {
    "hadamard_transform": {  # x @ H_n / sqrt(n), the online rotations of lowbit.algorithms.rotation
        "reference": hadamard.hadamard_transform_ref,
        "fast": hadamard.hadamard_transform,
        "example": hadamard.example_hadamard,
    },
    "int8_dynamic_linear": {
        "reference": int8_dynamic.int8_dynamic_linear_ref,
        "fast": int8_dynamic.int8_dynamic_linear,
        "example": int8_dynamic.example_linear,
    },
    "quantize_per_token": {
        "reference": int8_dynamic.quantize_per_token_ref,
        "fast": int8_dynamic.quantize_per_token,
        "example": int8_dynamic.example_per_token,
    },
    "int8_weight_only_linear": {
        "reference": weight_only.int8_weight_only_linear_ref,
        "fast": weight_only.int8_weight_only_linear,
        "example": weight_only.example_int8,
    },
    "int4_weight_only_linear": {
        "reference": weight_only.int4_weight_only_linear_ref,
        "fast": weight_only.int4_weight_only_linear,
        "example": weight_only.example_int4,
    },
    "block_linear": {  # 4-bit codes x fp32 activations (decode GEMV, lowbit.nn.block_linear)
        "reference": block_gemv.block_linear_ref,
        "fast": block_gemv.block_linear,
        "example": block_gemv.example_block_linear,
    },
    "block_linear_m1": {
        "reference": block_gemv.block_linear_ref,
        "fast": block_gemv.block_linear,
        "example": block_gemv.example_block_linear_m1,
    },
    "block_linear_q8": {
        "reference": block_gemv.block_linear_ref,
        "fast": block_gemv.block_linear,
        "example": block_gemv.example_block_linear_q8,
    },
    "block_linear_a8": {  # W4A8: activations int8 per block of 32 (ggml Q8_0-style), integer dot products
        "reference": block_gemv.block_linear_a8_ref,
        "fast": block_gemv.block_linear_a8,
        "example": block_gemv.example_block_linear_a8,
    },
    "block_gemm_a8": {  # W4A8 prompts: weight tiles unpacked once, vpdpbusd register tiles (lowbit.kernels.block_gemm)
        "reference": block_gemv.block_linear_a8_ref,
        "fast": block_gemm.block_gemm_a8,
        "example": block_gemm.example_block_gemm_a8,
    },
    "block_gemm": {  # fp32 activations, prompts: weight tiles dequantized once into a scratch (lowbit.kernels.block_gemm)
        "reference": block_gemv.block_linear_ref,
        "fast": block_gemm.block_gemm,
        "example": block_gemm.example_block_gemm,
    },
    "causal_attention": {  # the decoder's prompt attention over its KV cache (lowbit.kernels.prompt_attention)
        "reference": prompt_attention.causal_attention_ref,
        "fast": prompt_attention.causal_attention,
        "example": prompt_attention.example_causal_attention,
    },
    "quantize_blocks": {
        "reference": block_gemv.quantize_blocks_ref,
        "fast": block_gemv.quantize_blocks,
        "example": block_gemv.example_quantize_blocks,
    },
    "block_rows": {  # quantized embedding lookup
        "reference": block_gemv.block_rows_ref,
        "fast": block_gemv.block_rows,
        "example": block_gemv.example_block_rows,
    },
    "wa_linear": {  # W{b}A{a} group-wise integer product (lowbit.nn.wa_linear)
        "reference": wa_int.wa_linear_ref,
        "fast": wa_int.wa_linear,
        "example": wa_int.example_wa_linear,
    },
    "int8_mm": {
        "reference": int8_mm.int8_mm_ref,
        "fast": int8_mm.int8_mm,
        "example": int8_mm.example_int8_mm,
    },
    "xnor_gemm": {
        "reference": xnor.xnor_gemm_ref,
        "fast": xnor.xnor_gemm,
        "example": xnor.example_xnor_gemm,
    },
    "pack_signs": {
        "reference": xnor.pack_signs_ref,
        "fast": xnor.pack_signs,
        "example": xnor.example_pack_signs,
    },
    "xnor_linear": {
        "reference": xnor.xnor_linear_ref,
        "fast": xnor.xnor_linear,
        "example": xnor.example_xnor_linear,
    },
}

_logged: set[tuple[str, str, str]] = set()


def resolve(op: str, requested: str = "auto", *, supported: bool = True, why_not: str = "") -> str:
    """Pick ``"fast"`` or ``"reference"`` for ``op``.

    ``auto`` takes the fast kernel when ``supported`` (the caller checks shapes/dtypes and says
    ``why_not`` otherwise); ``fast`` insists and fails loudly when unsupported; ``reference`` is
    always available.
    """
    if op not in KERNELS:
        raise ConfigError(f"unknown op {op!r}; known: {', '.join(KERNELS)}")
    requested = getattr(requested, "value", requested)
    if requested == "reference":
        choice = "reference"
    elif requested == "fast":
        if not supported:
            raise ConfigError(f"kernel 'fast' requested for {op} but unsupported here: {why_not}")
        choice = "fast"
    elif requested == "auto":
        choice = "fast" if supported else "reference"
    else:
        raise ConfigError(f"unknown kernel {requested!r}; valid: auto, fast, reference")
    key = (op, requested, choice)
    if key not in _logged:
        _logged.add(key)
        reason = f" ({why_not})" if choice == "reference" and why_not else ""
        log.info("kernel for %s: %s -> %s%s", op, requested, choice, reason)
    return choice
