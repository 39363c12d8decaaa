"""The format table: one row per number format lowbit can quantize to.

A format fixes the set of representable values up to a scale:

- ``uniform``  integers ``q`` in ``[qmin, qmax]``, value ``scale * (q - zero_point)``;
- ``codebook`` an index into a table of normalised levels (NF4, FP4 e2m1, log2, binary, k-means),
  value ``scale * codebook[q]``;
- ``float``    a hardware-style float (FP8 e4m3 / e5m2), value ``scale * float(bits)``;
- ``cast``     a plain dtype cast (fp16, bf16) with no scale.

``storage_bits`` is what one code occupies once packed (3 for int3, 2 for ternary); ``levels`` is the
number of distinct values. Codebooks are computed from their definitions, not typed in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import torch

from lowbit.errors import ConfigError


class Kind(str, Enum):
    UNIFORM = "uniform"
    CODEBOOK = "codebook"
    FLOAT = "float"
    CAST = "cast"


@dataclass(frozen=True)
class Format:
    name: str
    bits: int
    signed: bool
    levels: int
    kind: Kind
    storage_bits: int
    qmin: int | None = None  # uniform formats only
    qmax: int | None = None
    codebook: tuple[float, ...] | None = field(default=None, repr=False)  # sorted, max |level| = 1
    dtype: torch.dtype | None = None  # float / cast formats: the torch dtype that holds the value
    description: str = ""

    @property
    def max_level(self) -> float:
        """Largest magnitude representable before scaling (what absmax maps to)."""
        if self.kind is Kind.UNIFORM:
            return float(self.qmax)
        if self.kind is Kind.CODEBOOK:
            return max(abs(v) for v in self.codebook)
        if self.kind is Kind.FLOAT:
            return float(torch.finfo(self.dtype).max)
        return float("inf")

    def codebook_tensor(self, device=None) -> torch.Tensor:
        if self.codebook is None:
            raise ConfigError(f"format {self.name!r} has no codebook")
        return torch.tensor(self.codebook, dtype=torch.float32, device=device)


def nf4_levels() -> tuple[float, ...]:
    """NormalFloat-4 (Dettmers et al. 2023, QLoRA, eq. 4 and appendix E).

    Quantiles of N(0, 1) built asymmetrically so that 0 is exact: 8 positive levels from the
    quantiles at ``linspace(offset, 0.5, 9)[:-1]`` and 7 negative ones at ``linspace(offset, 0.5, 8)[:-1]``,
    with ``offset = 1 - (1/32 + 1/30) / 2 = 0.9677`` so the extreme quantile stays finite; then
    normalised to [-1, 1].
    """
    offset = 0.9677083
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg])
    values = values / values.abs().max()
    return tuple(sorted(float(v) for v in values))


def fp4_e2m1_levels() -> tuple[float, ...]:
    """FP4 E2M1 (OCP MX spec): sign, 2 exponent bits (bias 1), 1 mantissa bit; normalised by 6.

    Subnormal 0 and 0.5, normals ``2^(e-1) * (1 + m/2)`` for e in 1..3: 1, 1.5, 2, 3, 4, 6.
    """
    mags = {0.0, 0.5}
    for e in range(1, 4):
        for m in range(2):
            mags.add(2.0 ** (e - 1) * (1 + m / 2))
    top = max(mags)
    return tuple(sorted({s * v / top for v in mags for s in (1.0, -1.0)}))


def log2_levels(bits: int = 4) -> tuple[float, ...]:
    """Power-of-two levels: 0 and ``±2^-k`` for k = 0 .. 2^(bits-1) - 2 (15 levels at 4 bits)."""
    n = 2 ** (bits - 1) - 1
    mags = [2.0 ** -k for k in range(n)]
    return tuple(sorted([0.0] + mags + [-m for m in mags]))


def _uniform(name: str, bits: int, signed: bool, qmin: int, qmax: int, storage_bits: int, desc: str) -> Format:
    return Format(name, bits, signed, qmax - qmin + 1, Kind.UNIFORM, storage_bits, qmin, qmax, description=desc)


def _codebook(name: str, bits: int, levels: tuple[float, ...], desc: str) -> Format:
    return Format(name, bits, True, len(levels), Kind.CODEBOOK, bits, codebook=levels, description=desc)


def _build_table() -> dict[str, Format]:
    rows = [
        _codebook("binary", 1, (-1.0, 1.0), "sign(x) * mean|x| (BinaryConnect / XNOR-Net)"),
        _uniform("ternary", 2, True, -1, 1, 2, "{-1, 0, +1} * scale (TWN / TTQ)"),
        _uniform("int2", 2, True, -2, 1, 2, "two's-complement 2-bit"),
        _uniform("int3", 3, True, -4, 3, 3, "two's-complement 3-bit"),
        _uniform("int4", 4, True, -8, 7, 4, "two's-complement 4-bit"),
        _uniform("int8", 8, True, -128, 127, 8, "two's-complement 8-bit; symmetric uses [-127, 127]"),
        _uniform("uint4", 4, False, 0, 15, 4, "unsigned 4-bit, affine with a zero-point"),
        _uniform("uint8", 8, False, 0, 255, 8, "unsigned 8-bit, affine with a zero-point"),
        _codebook("nf4", 4, nf4_levels(), "QLoRA NormalFloat-4: N(0,1) quantiles"),
        _codebook("fp4_e2m1", 4, fp4_e2m1_levels(), "OCP FP4 E2M1, emulated through its 16 values"),
        _codebook("log2", 4, log2_levels(4), "power-of-two levels 0, ±2^-k"),
        Format("fp8_e4m3", 8, True, 254, Kind.FLOAT, 8, dtype=torch.float8_e4m3fn,
               description="FP8 E4M3 (finite, max 448), emulated by torch's float8 cast"),
        Format("fp8_e5m2", 8, True, 247, Kind.FLOAT, 8, dtype=torch.float8_e5m2,
               description="FP8 E5M2 (max 57344), emulated by torch's float8 cast"),
        Format("fp16", 16, True, 2**16 - 2**11, Kind.CAST, 16, dtype=torch.float16, description="IEEE half cast"),
        Format("bf16", 16, True, 2**16 - 2**8, Kind.CAST, 16, dtype=torch.bfloat16, description="bfloat16 cast"),
    ]
    return {f.name: f for f in rows}


FORMATS: dict[str, Format] = _build_table()


def get_format(name: str | Format) -> Format:
    """Look a format up by name; the error lists every valid name."""
    if isinstance(name, Format):
        return name
    try:
        return FORMATS[name]
    except KeyError:
        raise ConfigError(f"unknown format {name!r}; valid formats: {', '.join(FORMATS)}") from None


def int_format(bits: int, signed: bool = True) -> Format:
    """The uniform integer format of a bit width: int2/int3/int4/int8, or uint4/uint8."""
    name = f"{'' if signed else 'u'}int{bits}"
    if name not in FORMATS:
        valid = [f.name for f in FORMATS.values() if f.kind is Kind.UNIFORM and f.name != "ternary"]
        raise ConfigError(f"no integer format with bits={bits}, signed={signed}; valid: {', '.join(valid)}")
    return FORMATS[name]
