"""ggml's block formats (the tensor types of GGUF files) as lowbit modules.

Three formats, each over blocks of ``QK = 32`` consecutive weights along the input dimension
(ggml-common.h: ``block_q4_0``, ``block_q4_1``, ``block_q8_0``; reference quantizers in
ggml-quants.c ``quantize_row_q{4_0,4_1,8_0}_ref``, mirrored by the ``gguf`` package's
``gguf.quants``):

- **Q4_0**: one fp16 ``d`` and 32 unsigned nibbles ``u``; ``x = d * (u - 8)``. Rounding: ``mx`` is the
  block's value of largest magnitude *with its sign*, ``d = mx / -8``, ``u = min(15, trunc(x / d + 8.5))``.
  So the extreme value gets code ``-8`` exactly and ``d`` is negative when ``mx > 0``. In lowbit this is a
  :class:`~lowbit.nn.WeightOnlyQLinear` (``int4``, symmetric, group 32) whose signed codes ``q = u - 8``
  use the full ``[-8, 7]`` range and whose fp16 scale may be negative.
- **Q4_1**: fp16 ``d``, fp16 ``m`` and 32 nibbles; ``x = d * u + m`` with ``d = (max - min) / 15``,
  ``m = min``, ``u = min(15, trunc((x - min) / d + 0.5))``. ``m`` is a float, not an integer
  zero-point, so it does not fit ``WeightOnlyQLinear``: :class:`BlockMinQLinear` stores it as is.
- **Q8_0**: fp16 ``d`` and 32 int8; ``x = d * q``, ``d = absmax / 127``, ``q = roundf(x / d)`` (half away
  from zero). In lowbit: ``WeightOnlyQLinear`` (``int8``, symmetric, group 32).

In all three the codes are computed with the fp32 ``d`` and ``d`` is then stored as fp16 (as ggml does).
:func:`ggml_quantize` is lowbit's own torch implementation of those reference roundings; the export
test checks it byte for byte against ``gguf.quants.quantize``.

:class:`QTableEmbedding` looks rows up in a quantized (vocab, hidden) table, so a GGUF
``token_embd`` stays at its stored width and can double as the tied output head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit import kernels
from lowbit.core import QParams, dequantize, pack, packed_nbytes, per_group, unpack
from lowbit.errors import ConfigError
from lowbit.kernels import weight_only
from lowbit.nn.base import module_from_spec, register_qmodule
from lowbit.nn.qlinear import WeightOnlyQLinear

GGML_BLOCK = 32  # QK4_0 = QK4_1 = QK8_0 = 32
GGML_TYPES = ("q4_0", "q4_1", "q8_0")


def _ggml_roundf(x: torch.Tensor) -> torch.Tensor:
    """Round half away from zero, computed as ``floor(a) + floor(2 (a - floor(a)))`` on ``a = |x|``
    (the formula of gguf's ``np_roundf``, which matches C ``roundf`` also just below .5)."""
    a = x.abs()
    fl = torch.floor(a)
    return torch.sign(x) * (fl + torch.floor(2 * (a - fl)))


def ggml_quantize(w: torch.Tensor, qtype: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """ggml's reference rounding of ``w`` (N, K) to ``qtype`` in blocks of 32 along K.

    Returns ``(codes, d, m)``: codes (N, K) — int8 in [-8, 7] for q4_0 (``u - 8``), uint8 in [0, 15]
    for q4_1, int8 for q8_0; ``d`` fp16 (N, K / 32); ``m`` fp16 (N, K / 32) for q4_1, else None.
    The formulas are in the module docstring; the arithmetic is fp32 like ggml's.
    """
    if qtype not in GGML_TYPES:
        raise ConfigError(f"unknown ggml type {qtype!r}; valid: {', '.join(GGML_TYPES)}")
    n, k = w.shape
    if k % GGML_BLOCK:
        raise ConfigError(f"{qtype} needs in_features divisible by {GGML_BLOCK}, got {k}")
    wb = w.detach().float().reshape(n, k // GGML_BLOCK, GGML_BLOCK)  # (N, K/32, 32)
    m = None
    if qtype == "q4_0":
        idx = wb.abs().argmax(dim=-1, keepdim=True)  # first index of the largest |x|, as numpy's argmax
        d = torch.gather(wb, -1, idx) / -8  # (N, K/32, 1), signed
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        codes = (torch.trunc(wb * inv + 8.5).clamp(0, 15) - 8).to(torch.int8)
    elif qtype == "q4_1":
        lo = wb.amin(dim=-1, keepdim=True)
        d = (wb.amax(dim=-1, keepdim=True) - lo) / 15
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        codes = torch.trunc((wb - lo) * inv + 0.5).clamp(0, 15).to(torch.uint8)
        m = lo.reshape(n, -1).to(torch.float16)
    else:
        d = wb.abs().amax(dim=-1, keepdim=True) / 127
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        codes = _ggml_roundf(wb * inv).to(torch.int8)
    return codes.reshape(n, k), d.reshape(n, -1).to(torch.float16), m


def linear_from_ggml(weight_shape: tuple[int, int], qtype: str, codes: torch.Tensor, d: torch.Tensor,
                     m: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                     kernel: str = "auto") -> nn.Module:
    """The lowbit module holding ggml codes unchanged: ``WeightOnlyQLinear`` (q4_0, q8_0) or
    :class:`BlockMinQLinear` (q4_1). ``codes`` (N, K) as returned by :func:`ggml_quantize`."""
    n, k = weight_shape
    if qtype == "q4_1":
        mod = BlockMinQLinear(k, n, bias is not None, 4, GGML_BLOCK, kernel)
        mod.qweight.copy_(pack(codes, 4, signed=False))
        mod.offset.copy_(m.reshape(mod.offset.shape))
    elif qtype in ("q4_0", "q8_0"):
        fmt = "int4" if qtype == "q4_0" else "int8"
        mod = WeightOnlyQLinear(k, n, bias is not None, fmt, GGML_BLOCK, True, kernel)
        mod.qweight.copy_(pack(codes, 4 if qtype == "q4_0" else 8, signed=True))
    else:
        raise ConfigError(f"unknown ggml type {qtype!r}; valid: {', '.join(GGML_TYPES)}")
    mod.scale.copy_(d.reshape(mod.scale.shape))
    if bias is not None:
        mod.bias.copy_(bias.float())
    return mod


def linear_from_packed(weight_shape: tuple[int, int], qtype: str, qweight: torch.Tensor, d: torch.Tensor,
                       m: torch.Tensor | None = None, kernel: str = "auto") -> nn.Module:
    """Like :func:`linear_from_ggml` from codes already in lowbit's packed layout (bias-free)."""
    n, k = weight_shape
    if qtype == "q4_1":
        mod = BlockMinQLinear(k, n, False, 4, GGML_BLOCK, kernel)
        mod.offset.copy_(m.reshape(mod.offset.shape))
    elif qtype in ("q4_0", "q8_0"):
        mod = WeightOnlyQLinear(k, n, False, "int4" if qtype == "q4_0" else "int8", GGML_BLOCK, True, kernel)
    else:
        raise ConfigError(f"unknown ggml type {qtype!r}; valid: {', '.join(GGML_TYPES)}")
    if qweight.numel() != mod.qweight.numel():
        raise ConfigError(f"{qtype} {weight_shape}: {qweight.numel()} packed bytes, expected {mod.qweight.numel()}")
    mod.qweight = qweight  # adopt the buffer: no second copy
    mod.scale.copy_(d.reshape(mod.scale.shape))
    return mod


def linear_on_ggml_grid(linear: nn.Linear, qtype: str, kernel: str = "auto") -> nn.Module:
    """Quantize ``linear`` with ggml's reference rounding (:func:`ggml_quantize`), so that a GGUF export
    writes its codes and scales unchanged."""
    codes, d, m = ggml_quantize(linear.weight, qtype)
    bias = None if linear.bias is None else linear.bias.detach()
    return linear_from_ggml(tuple(linear.weight.shape), qtype, codes, d, m, bias, kernel)


@register_qmodule
class BlockMinQLinear(nn.Module):
    """``y = x @ W^T + b`` with ``W[n, k] = scale[n, g] * u[n, k] + offset[n, g]``, ``g = k // group_size``.

    ``u`` are unsigned ``bits``-bit codes (packed), ``scale`` and ``offset`` fp16 per group: this is
    ggml's Q4_1 (``d``, ``m``; blocks of 32) and keeps its float minimum exactly, which an integer
    zero-point could not. ``K`` must be a multiple of ``group_size``.

    The fast path is the int4 kernel: its layout computes ``(u - 8) * s + z``, so ``z = offset + 8 s``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bits: int = 4,
                 group_size: int = GGML_BLOCK, kernel: str = "auto"):
        super().__init__()
        if group_size <= 0 or in_features % group_size:
            raise ConfigError(f"BlockMinQLinear needs group_size > 0 dividing in_features={in_features}, "
                              f"got {group_size}")
        if bits not in (4, 8):
            raise ConfigError(f"BlockMinQLinear supports 4 or 8 bits, got {bits}")
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.group_size, self.kernel = group_size, kernel
        groups = in_features // group_size
        self.register_buffer("qweight", torch.zeros(packed_nbytes(in_features * out_features, bits), dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(out_features, groups, dtype=torch.float16))  # (N, K/g)
        self.register_buffer("offset", torch.zeros(out_features, groups, dtype=torch.float16))  # (N, K/g)
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._fast = None
        self._choice = None

    @classmethod
    def from_float(cls, linear: nn.Linear, kernel: str = "auto") -> "BlockMinQLinear":
        """Q4_1 with ggml's reference rounding (:func:`ggml_quantize`)."""
        return linear_on_ggml_grid(linear, "q4_1", kernel)

    def spec(self) -> dict:
        return {"class": type(self).__name__, "in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, "bits": self.bits, "group_size": self.group_size,
                "kernel": self.kernel}

    @classmethod
    def from_spec(cls, spec: dict) -> "BlockMinQLinear":
        return cls(**spec)

    def codes(self) -> torch.Tensor:
        return unpack(self.qweight, self.bits, (self.out_features, self.in_features))

    def dequantize_rows(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """``scale * u + offset`` in fp32 for the given output rows (all when None): (R, K)."""
        if rows is None:
            codes, scale, offset = self.codes(), self.scale, self.offset
        else:
            row_bytes = self.in_features * self.bits // 8  # K % 32 == 0: rows start on whole bytes
            packed = self.qweight.view(self.out_features, row_bytes)[rows]  # (R, K * bits / 8)
            codes = unpack(packed.reshape(-1), self.bits, (rows.numel(), self.in_features))
            scale, offset = self.scale[rows], self.offset[rows]
        r = codes.shape[0]
        cb = codes.reshape(r, -1, self.group_size).float()  # (R, K/g, g)
        w = cb * scale.float()[..., None] + offset.float()[..., None]
        return w.reshape(r, self.in_features)

    def dequantized_weight(self) -> torch.Tensor:
        return self.dequantize_rows(None)

    def _fast_support(self) -> tuple[bool, str]:
        if self.bits != 4:
            return False, "8-bit codes have no int4 kernel"
        if self.out_features % weight_only.INT4_N_MULTIPLE:
            return False, f"int4 kernel needs out_features divisible by {weight_only.INT4_N_MULTIPLE}"
        if self.group_size not in weight_only.INT4_GROUP_SIZES:
            return False, f"int4 kernel needs a group size in {weight_only.INT4_GROUP_SIZES}"
        return True, ""

    def _prepare(self) -> None:
        ok, why = self._fast_support()
        self._choice = kernels.resolve("int4_weight_only_linear", self.kernel, supported=ok, why_not=why)
        if self._choice == "fast":
            s = self.scale.float()
            packed, sz = weight_only.int4_kernel_params(self.codes(), s, torch.full_like(s, 8.0), self.group_size)
            # int4_kernel_params wrote z = (8 - 8) * s = 0; the Q4_1 layout needs z = offset + 8 s.
            sz[..., 1] = (self.offset.float() + 8 * s).T.to(torch.bfloat16)  # (K/g, N)
            self._fast = (packed, sz)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.release_kernel_layout()

    def release_kernel_layout(self) -> None:
        self._choice = self._fast = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._choice is None:
            self._prepare()
        if self._choice == "fast":
            packed, sz = self._fast
            return weight_only.int4_weight_only_linear(x, packed, sz, self.group_size, self.bias)
        return self.forward_ref(x)

    def forward_ref(self, x: torch.Tensor) -> torch.Tensor:
        """Reference twin: fp32 dequantized weight and ``F.linear``."""
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.dequantized_weight(), bias).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, u{self.bits} g{self.group_size} "
                f"scale+min, kernel={self.kernel}")


def dequantize_rows(table: nn.Module, rows: torch.Tensor) -> torch.Tensor:
    """fp32 rows (R, K) of a quantized (N, K) weight, unpacking only those rows."""
    if isinstance(table, BlockMinQLinear):
        return table.dequantize_rows(rows)
    if isinstance(table, WeightOnlyQLinear):
        from lowbit.core import get_format

        f = get_format(table.fmt)
        g = table.group_size
        if f.storage_bits * table.in_features % 8 or (g and table.in_features % g):
            return table.dequantized_weight()[rows]  # rows do not start on whole bytes / ragged groups
        row_bytes = table.in_features * f.storage_bits // 8
        packed = table.qweight.view(table.out_features, row_bytes)[rows]  # (R, K * bits / 8)
        signed = f.kind.value == "uniform" and f.signed
        codes = unpack(packed.reshape(-1), f.storage_bits, (rows.numel(), table.in_features), signed=signed)
        qp = table.qparams()
        zp = None if qp.zero_point is None else qp.zero_point[rows]
        sub = QParams(qp.fmt, per_group(g) if g else qp.granularity, qp.scale[rows], zp, qp.qmin, qp.qmax,
                      qp.codebook)
        return dequantize(codes, sub)
    if isinstance(table, nn.Linear):
        return table.weight[rows].float()
    return table.dequantized_weight()[rows]


@register_qmodule
class QTableEmbedding(nn.Module):
    """An embedding whose (vocab, hidden) table is a quantized linear's weight (``self.table``).

    ``forward(ids) = W[ids]`` with only the looked-up rows unpacked. With tied input/output
    embeddings the causal LM's head can be ``self.table`` itself, so the table is stored once.
    """

    def __init__(self, table: nn.Module):
        super().__init__()
        self.table = table
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features

    def spec(self) -> dict:
        return {"class": type(self).__name__, "table": self.table.spec()}

    @classmethod
    def from_spec(cls, spec: dict) -> "QTableEmbedding":
        return cls(module_from_spec(spec["table"]))

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized table (N, D), for code that reads ``embedding.weight``."""
        return self.table.dequantized_weight()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)  # (B*T,)
        uniq, inverse = torch.unique(flat, return_inverse=True)
        rows = dequantize_rows(self.table, uniq)  # (U, D)
        return rows[inverse].reshape(*ids.shape, self.embedding_dim)  # (B, T, D)

    def forward_ref(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, table={type(self.table).__name__}"


__all__ = ["GGML_BLOCK", "GGML_TYPES", "ggml_quantize", "linear_from_ggml", "linear_from_packed", "linear_on_ggml_grid",
           "BlockMinQLinear", "QTableEmbedding", "dequantize_rows"]
