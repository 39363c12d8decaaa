"""Weight-only linears as ONNX Runtime's ``com.microsoft.MatMulNBits`` (contrib op, ORT's own 4-bit format).

``MatMulNBits(A, B, scales[, zero_points])`` computes ``A @ W^T`` with ``W[n, k] = (u[n, k] - z[n, j]) *
scales[n, j]``, ``j = k // block_size`` (ORT's operator schema, ``onnxruntime`` contrib op docs):

- ``B``: uint8 ``(N, k_blocks, block_size * bits / 8)``, ``k_blocks = ceil(K / block_size)``; inside each
  block the ``bits``-bit codes ``u`` are packed low bits first (at 4 bits: code 2i in the low nibble of
  byte i, code 2i+1 in the high nibble); a ragged last block is padded with zeros.
- ``scales``: float ``(N, k_blocks)``.
- ``zero_points``: absent = ``2^(bits-1)`` (8 at 4 bits); uint8 packed like ``B`` into
  ``(N, ceil(k_blocks * bits / 8))``; or float ``(N, k_blocks)`` (unpacked, any value).
- ``block_size``: a power of two >= 16 — lowbit's ``group_size``.

lowbit's :class:`WeightOnlyQLinear` maps onto it without requantizing: signed codes ``q`` (symmetric
int4) become ``u = q + 8`` with the default zero-point, so ``(u - 8) s = q s``; unsigned affine codes
(uint4) go as they are with their integer zero-points packed; HQQ's fp16 zero-points go unpacked as
float. Per-channel layers (``group_size = 0``) repeat the row's scale in every block of
``PER_CHANNEL_BLOCK``. Codebook formats (NF4) and group sizes that are not a power of two >= 16 are
refused. ORT's CPU kernel (accuracy_level 0) computes in fp32; lowbit's fast int4 kernel runs in bf16,
its reference in fp32.
"""

from __future__ import annotations

import copy
import io
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.api import set_submodule
from lowbit.core import Kind, get_format
from lowbit.errors import ConfigError
from lowbit.io.onnx_common import write_onnx
from lowbit.nn import WeightOnlyQLinear
from lowbit.nn.base import QMODULES
from lowbit.nn.qembedding import QEmbedding

log = logging.getLogger(__name__)

OPSET = 17
NBITS = (2, 4, 8)  # the schema's bit widths
MIN_BLOCK = 16
PER_CHANNEL_BLOCK = 128  # any power of two works for a per-channel layer (its scale repeats per block)


def _pack_low_first(u: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., L) codes < 2^bits, L a multiple of 8 // bits -> (..., L * bits / 8) uint8, low bits first."""
    per_byte = 8 // bits
    v = u.to(torch.int32).reshape(*u.shape[:-1], -1, per_byte)  # (..., L / per_byte, per_byte)
    shifts = torch.arange(per_byte, dtype=torch.int32) * bits
    return (v << shifts).sum(dim=-1).to(torch.uint8)


def _unpack_low_first(b: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`_pack_low_first`: (..., L * bits / 8) uint8 -> (..., L) int32 codes."""
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, dtype=torch.int32) * bits
    v = (b.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # (..., L / per_byte, per_byte)
    return v.reshape(*b.shape[:-1], -1)


def matmulnbits_tensors(m: WeightOnlyQLinear) -> dict:
    """``B``, ``scales``, ``zero_points`` (or None) and the attributes of the MatMulNBits node for ``m``."""
    f = get_format(m.fmt)
    if f.kind is not Kind.UNIFORM:
        raise ConfigError(f"MatMulNBits holds uniform integer codes; {m.fmt} is a {f.kind.value} format")
    if f.bits not in NBITS:
        raise ConfigError(f"MatMulNBits takes {NBITS} bits; this layer is {m.fmt} ({f.bits} bits)")
    bits, n, k = f.bits, m.out_features, m.in_features
    g = m.group_size
    if g and (g < MIN_BLOCK or g & (g - 1)):
        raise ConfigError(f"MatMulNBits blocks are a power of two >= {MIN_BLOCK}; group_size {g} is not "
                          "(requantize with e.g. --group-size 32/64/128)")
    block = g or PER_CHANNEL_BLOCK
    k_blocks = -(-k // block)
    offset = 1 << (bits - 1) if f.signed else 0  # signed codes move into [0, 2^bits)
    u = m.codes().to(torch.int32) + offset  # (N, K)
    u = F.pad(u, (0, k_blocks * block - k))  # (N, k_blocks * block), ragged tail zero-padded
    b = _pack_low_first(u.reshape(n, k_blocks, block), bits)  # (N, k_blocks, block * bits / 8)
    scale = m.scale.float()
    zp = m.zero_point
    if not g:  # per channel: (N,) -> (N, k_blocks)
        scale = scale[:, None].expand(n, k_blocks)
        zp = None if zp is None else zp[:, None].expand(n, k_blocks)
    zero_points = None
    if zp is not None:
        if zp.is_floating_point():  # HQQ: unpacked float zero-points
            zero_points = zp.float() + offset
        else:
            zpu = zp.to(torch.int32) + offset  # (N, k_blocks)
            per_byte = 8 // bits
            zpu = F.pad(zpu, (0, (-k_blocks) % per_byte))
            zero_points = _pack_low_first(zpu, bits)  # (N, ceil(k_blocks * bits / 8))
    elif not f.signed:
        raise ConfigError(f"{m.fmt} codes without a zero-point have no MatMulNBits encoding")
    return {"B": b.contiguous(), "scales": scale.contiguous().clone(),
            "zero_points": None if zero_points is None else zero_points.contiguous().clone(),
            "K": k, "N": n, "bits": bits, "block_size": block}


def matmulnbits_weight_ref(b: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None, k: int,
                           bits: int, block_size: int) -> torch.Tensor:
    """The (N, K) float weight a MatMulNBits node holds, decoded from its tensors per the schema."""
    n, k_blocks, _ = b.shape
    u = _unpack_low_first(b, bits).float()  # (N, k_blocks, block)
    if zero_points is None:
        z = torch.full((n, k_blocks), float(1 << (bits - 1)))
    elif zero_points.is_floating_point():
        z = zero_points.float()
    else:
        z = _unpack_low_first(zero_points, bits)[:, :k_blocks].float()  # (N, k_blocks)
    w = (u - z[..., None]) * scales.float()[..., None]  # (N, k_blocks, block)
    return w.reshape(n, k_blocks * block_size)[:, :k]


class _MatMulNBits(torch.autograd.Function):
    """The contrib op; the torch forward (used while tracing) decodes the packed tensors in fp32."""

    @staticmethod
    def forward(ctx, x, b, scales, zero_points, k, n, bits, block_size):
        return F.linear(x, matmulnbits_weight_ref(b, scales, zero_points, k, bits, block_size).to(x.dtype))

    @staticmethod
    def symbolic(g, x, b, scales, zero_points, k, n, bits, block_size):
        inputs = [x, b, scales] + ([zero_points] if zero_points is not None else [])
        return g.op("com.microsoft::MatMulNBits", *inputs, K_i=k, N_i=n, bits_i=bits, block_size_i=block_size)


class MatMulNBitsLinear(nn.Module):
    """Export-time stand-in for a :class:`WeightOnlyQLinear`: one MatMulNBits node (+ Add for a bias; a Mul
    before it for SINQ's per-input-channel ``input_scale``)."""

    def __init__(self, m: WeightOnlyQLinear):
        super().__init__()
        t = matmulnbits_tensors(m)
        self.k, self.n, self.bits, self.block_size = t["K"], t["N"], t["bits"], t["block_size"]
        self.register_buffer("B", t["B"])
        self.register_buffer("scales", t["scales"])
        self.register_buffer("zero_points", t["zero_points"])
        self.register_buffer("bias", None if m.bias is None else m.bias.detach().float().clone())
        scale = getattr(m, "input_scale", None)
        self.register_buffer("input_scale", None if scale is None else scale.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale is not None:
            x = x * self.input_scale  # (..., K) * (K,)
        y = _MatMulNBits.apply(x, self.B, self.scales, self.zero_points, self.k, self.n, self.bits, self.block_size)
        return y if self.bias is None else y + self.bias


def export_weight_only_onnx(model: nn.Module, path: str | Path, example_inputs: tuple, input_names: list[str],
                            output_names: list[str], dynamic_axes: dict | None = None, overwrite: bool = False,
                            opset: int = OPSET) -> dict:
    """Write ``model`` with its :class:`WeightOnlyQLinear` layers as MatMulNBits nodes (atomically)."""
    import onnx

    path = Path(path)
    if path.exists() and not overwrite:
        raise ConfigError(f"{path} exists (use --force / overwrite=True to replace it)")
    out = copy.deepcopy(model).eval()
    n, unsupported = 0, []
    for name, m in list(out.named_modules()):
        if isinstance(m, WeightOnlyQLinear):
            set_submodule(out, name, MatMulNBitsLinear(m))
            n += 1
        elif type(m).__name__ in QMODULES and not isinstance(m, QEmbedding):
            unsupported.append(f"{name} ({type(m).__name__})")
    if unsupported:
        raise ConfigError(f"MatMulNBits export handles WeightOnlyQLinear (and QEmbedding); cannot export "
                          f"{', '.join(unsupported[:4])}")
    if not n:
        raise ConfigError(f"{type(model).__name__} has no weight-only quantized linears (WeightOnlyQLinear); "
                          "quantize it first, e.g. lowbit quantize --scheme rtn --bits 4 --group-size 128")
    buf = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(out, example_inputs, buf, opset_version=opset, dynamo=False, input_names=input_names,
                          output_names=output_names, dynamic_axes=dynamic_axes, do_constant_folding=True,
                          custom_opsets={"com.microsoft": 1})
    size, ops = write_onnx(onnx.load_from_string(buf.getvalue()), path)
    log.info("exported %s: %d MatMulNBits layers, %.2f MB", path, n, size / 1e6)
    return {"path": str(path), "matmulnbits_layers": n, "bytes": size, "ops": ops}


class _LogitsGraph(nn.Module):
    """``(input_ids, attention_mask) -> logits`` of a Hugging Face causal LM, without a KV cache. The
    mask is an input because transformers' mask builder, given none, uses ``aten::diff`` (no ONNX op)."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def export_causal_lm_onnx(model: nn.Module, path: str | Path, overwrite: bool = False, opset: int = OPSET) -> dict:
    """A weight-only causal LM (lowbit's ``CausalLM``) as ``input_ids, attention_mask -> logits`` with
    MatMulNBits linears; batch and sequence axes dynamic."""
    if getattr(model, "task", None) != "causal-lm":
        raise ConfigError(f"export_causal_lm_onnx needs a causal LM (task 'causal-lm'); got {type(model).__name__}")
    if not any(isinstance(m, WeightOnlyQLinear) for m in model.modules()):
        raise ConfigError(f"{type(model).__name__} has no weight-only quantized linears (WeightOnlyQLinear); "
                          "quantize it first, e.g. lowbit quantize --scheme rtn --bits 4 --group-size 128")
    ids = torch.randint(0, int(model.lm.config.vocab_size), (1, 8), generator=torch.Generator().manual_seed(0))
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
            "logits": {0: "batch", 1: "sequence"}}
    return export_weight_only_onnx(_LogitsGraph(model.lm), path, (ids, torch.ones_like(ids)),
                                   ["input_ids", "attention_mask"], ["logits"], axes, overwrite, opset)
