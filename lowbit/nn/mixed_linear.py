"""``MixedInt8Linear``: LLM.int8() mixed-precision decomposition (Dettmers et al. 2022, sec. 3.2).

Per forward, the input columns (feature dimensions) in which any token has ``|x| >= threshold`` are
outliers. They are multiplied in float with the dequantized weight columns; all other columns go
through the int8 x int8 -> int32 product with per-token activation scales and per-row weight
scales (vector-wise quantization):

    y = int8_mm(x[:, regular], W[:, regular]) + x[:, outlier] @ dequant(W)[:, outlier]^T + b

Zeroing the outlier columns before the per-token absmax is what keeps the int8 grid fine for the
rest. Weights are stored once, int8 per output row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit import kernels
from lowbit.core import choose_qparams, per_channel, quantize
from lowbit.nn.base import register_qmodule

DEFAULT_THRESHOLD = 6.0  # the paper's outlier magnitude


@register_qmodule
class MixedInt8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 threshold: float = DEFAULT_THRESHOLD, kernel: str = "auto"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.threshold, self.kernel = threshold, kernel
        self.register_buffer("qweight_t", torch.zeros(in_features, out_features, dtype=torch.int8))  # (K, N)
        self.register_buffer("w_scale", torch.ones(out_features))  # (N,)
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.last_outliers = 0  # outlier columns of the last forward (diagnostics)
        self._fn = None

    @classmethod
    def from_float(cls, linear: nn.Linear, threshold: float = DEFAULT_THRESHOLD, kernel: str = "auto"):
        w = linear.weight.detach().float()
        qp = choose_qparams(w, "int8", symmetric=True, granularity=per_channel(0))
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, threshold, kernel)
        m.qweight_t.copy_(quantize(w, qp).t())
        m.w_scale.copy_(qp.scale)
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach().float())
        return m

    def spec(self) -> dict:
        return {"class": type(self).__name__, "in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, "threshold": self.threshold, "kernel": self.kernel}

    @classmethod
    def from_spec(cls, spec: dict) -> "MixedInt8Linear":
        return cls(**spec)

    def dequantized_weight(self) -> torch.Tensor:
        return self.qweight_t.t().float() * self.w_scale[:, None]  # (N, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fn is None:
            self._fn = kernels.KERNELS["int8_dynamic_linear"][kernels.resolve("int8_dynamic_linear", self.kernel)]
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()  # (M, K)
        cols = (x2.abs() >= self.threshold).any(dim=0)  # (K,) outlier feature dimensions
        self.last_outliers = int(cols.sum())
        if self.last_outliers:
            regular = x2.masked_fill(cols, 0.0)
            y = self._fn(regular, self.qweight_t, self.w_scale, self.bias)
            w_out = self.qweight_t[cols].float() * self.w_scale  # (K_out, N) dequantized outlier columns
            y = y + x2[:, cols] @ w_out
        else:
            y = self._fn(x2, self.qweight_t, self.w_scale, self.bias)
        return y.to(x.dtype).reshape(*shape[:-1], -1)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, llm.int8 threshold={self.threshold}"


__all__ = ["MixedInt8Linear", "DEFAULT_THRESHOLD"]
