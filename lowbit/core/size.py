"""The size accountant: exact bytes of a quantized tensor, stored scales and zero-points included.

For ``n`` weights stored as ``b``-bit codes with ``p`` (scale, zero_point) pairs:

    bytes = ceil(n / 8) * b                    (packed codes, see lowbit.core.pack)
          + p * scale_bytes                    (one scale per pair)
          + p * zero_point_bytes               (affine only)
          + codebook bytes                     (codebook formats)
    bits per weight = 8 * bytes / n

More pairs (smaller groups) means less error but more stored (S, Z): int4 with fp16 scales costs
4.125 bits/weight at group 128, 4.25 at group 64, 4.5 at group 32 (symmetric), plus 4/g for 4-bit
zero-points when affine.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from lowbit.core.formats import Format, Kind, get_format
from lowbit.core.granularity import Granularity, PerTensor, n_pairs
from lowbit.core.pack import packed_nbytes


@dataclass(frozen=True)
class SizeReport:
    numel: int
    code_bytes: int
    scale_bytes: int
    zero_point_bytes: int
    codebook_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.code_bytes + self.scale_bytes + self.zero_point_bytes + self.codebook_bytes

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.total_bytes / self.numel if self.numel else 0.0

    @property
    def overhead_bytes(self) -> int:
        """Bytes spent on scales, zero-points and codebooks rather than codes."""
        return self.total_bytes - self.code_bytes

    @property
    def ratio_vs_fp32(self) -> float:
        return 4.0 * self.numel / self.total_bytes if self.total_bytes else math.inf

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(total_bytes=self.total_bytes, bits_per_weight=self.bits_per_weight,
                 ratio_vs_fp32=self.ratio_vs_fp32)
        return d


def size_of(
    shape: tuple[int, ...] | torch.Size,
    fmt: str | Format,
    granularity: Granularity = PerTensor(),
    symmetric: bool = True,
    scale_dtype: torch.dtype = torch.float16,
    zero_point_bits: int | None = None,
    codebook_levels_per_pair: bool = False,
) -> SizeReport:
    """Exact storage of a tensor of ``shape`` in ``fmt`` at ``granularity``.

    ``zero_point_bits`` defaults to the format's storage width (zero-points packed like codes).
    ``codebook_levels_per_pair`` counts a learned fp16 codebook per pair (k-means per channel);
    built-in codebooks (NF4, FP4, log2) are constants of the format and cost nothing per tensor.
    """
    fmt = get_format(fmt)
    numel = math.prod(shape)
    if fmt.kind is Kind.CAST:
        return SizeReport(numel, numel * fmt.storage_bits // 8, 0, 0, 0)
    pairs = n_pairs(torch.Size(shape), granularity)
    code_bytes = packed_nbytes(numel, fmt.storage_bits)
    scale_bytes = pairs * torch.finfo(scale_dtype).bits // 8
    zp_bytes = 0
    if not symmetric and fmt.kind is Kind.UNIFORM:
        zp_bytes = packed_nbytes(pairs, zero_point_bits or fmt.storage_bits)
    cb_bytes = pairs * fmt.levels * 2 if codebook_levels_per_pair else 0
    return SizeReport(numel, code_bytes, scale_bytes, zp_bytes, cb_bytes)
