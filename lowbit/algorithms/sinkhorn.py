"""Sinkhorn-normalised column scales for calibration-free weight quantization (SINQ: Müller et al. 2025,
"SINQ: Sinkhorn-Normalized Quantization for Calibration-Free Low-Precision LLM Weights", arXiv 2509.22944).

A weight ``W`` (N, K) is written ``W = diag(r) M diag(t)`` with row scales ``r`` (N,) and column scales
``t`` (K,) chosen so that ``M``'s rows and columns have balanced standard deviations, found by alternating
normalisation in the log domain (Sinkhorn-Knopp on standard deviations instead of sums):

    c <- c + log std_col(M) - mean(log std_col(M)),   then   r <- r + log std_row(M) - mean(log std_row(M)),

``M = W / e^r / e^c`` (broadcast over rows / columns). The paper measures the *imbalance*
``max(std) / min(std)`` over all rows and columns and keeps the iterate where it is lowest.

What lowbit uses of it: only ``t``. Groups run along a row (contiguous input columns of one output row), so a
row scale multiplies every weight of a group and the group's min-max scale absorbs it: the codes of ``W / t``
and of ``M`` are the same, and ``r`` needs no storage. ``t`` does: the layer stores ``Q(W / t)`` and computes
``y = Q(W / t) (t * x)`` (``WeightOnlyQLinear.input_scale``, K fp16 values per layer). Dividing a column by
its spread evens the columns within each group, so a few large columns no longer set a group's step for all
the others; the error of column ``j`` in ``W``'s units is ``t_j`` times its error in ``M``'s. No data is read.

``t`` is normalised to geometric mean 1 and rounded to fp16 (as stored) before ``W / t`` is quantized, so what
is scored is what is stored.
"""

from __future__ import annotations

import torch

from lowbit.errors import ConfigError

# Iterations of the alternating normalisation, chosen on held-out calibration windows (the last 4 of the mix;
# bench/hqq_defaults.py, bench/results/hqq_defaults.md), KL to fp32 of HQQ on W / t at W4 g128 affine: 1 iteration
# 0.269, 4 0.200, 16 0.204 (RTN 0.392, plain HQQ 0.287); W3 affine 1.081 / 1.099 / 1.095 (flat). The paper's default is
# 16 (it also stops early when the imbalance rises, which keeping the best iterate covers).
DEFAULT_SINKHORN_ITERS = 4
_TINY = 1e-12
_LOG_LIMIT = 6.9  # |log t| <= ln 1000: a column of zeros (std 0) keeps a finite scale, well inside fp16's range


def imbalance(m: torch.Tensor) -> float:
    """``max / min`` of the standard deviations of all rows and columns of ``m`` (N, K) (the paper's measure)."""
    sr, sc = m.std(1), m.std(0)
    return float(torch.maximum(sr.max(), sc.max()) / torch.minimum(sr.min(), sc.min()).clamp_min(_TINY))


def _check(weight: torch.Tensor, iters: int) -> torch.Tensor:
    if weight.dim() != 2 or min(weight.shape) < 2:
        raise ConfigError(f"Sinkhorn scales need a 2-D weight with at least 2 rows and columns, got {tuple(weight.shape)}")
    if iters < 0:
        raise ConfigError(f"sinkhorn iters must be >= 0, got {iters}")
    w = weight.detach().float()
    if not bool(torch.isfinite(w).all()):
        raise ConfigError("Sinkhorn scales need a finite weight (it holds NaN or inf)")
    return w


class _Best:
    """The iterate of lowest imbalance seen so far (its log column scales), and the imbalance of iterate 0."""

    def __init__(self):
        self.imbalance, self.log_c, self.iteration, self.before = float("inf"), None, 0, 0.0

    def see(self, it: int, row_std: torch.Tensor, col_std: torch.Tensor, log_c: torch.Tensor) -> None:
        low = torch.minimum(row_std.min(), col_std.min()).clamp_min(_TINY)  # a zero row / column: finite, not kept
        imb = float(torch.maximum(row_std.max(), col_std.max()) / low)
        if it == 0:
            self.before = imb
        if imb < self.imbalance:
            self.imbalance, self.log_c, self.iteration = imb, log_c, it

    def result(self) -> tuple[torch.Tensor, dict]:
        t = self.log_c.reshape(-1).float().exp().to(torch.float16).float()  # (K,), as stored
        return t, {"imbalance_before": self.before, "imbalance": self.imbalance, "iteration": self.iteration}


def _step(log_s: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """One normalisation step: ``log s += log std - mean(log std)`` (spreads towards their geometric mean), clamped."""
    ls = std.clamp_min(_TINY).log()
    return (log_s + ls - ls.mean()).clamp(-_LOG_LIMIT, _LOG_LIMIT)


def sinkhorn_column_scales(weight: torch.Tensor, iters: int = DEFAULT_SINKHORN_ITERS) -> tuple[torch.Tensor, dict]:
    """Column scales ``t`` (K,), fp16 values in fp32, geometric mean ~1, and stats (imbalance before / after,
    the iterate kept) for ``weight`` (N, K): the iterate of lowest imbalance among ``0..iters`` (0: ``t = 1``).

    The spreads of ``M = W / e^r / e^c`` come from four products with vectors per iteration instead of forming
    ``M``: ``std_col(M)_j = e^-c_j sqrt((S2_j - S1_j^2 / N) / (N - 1))`` with ``S1 = W^T e^-r``, ``S2 = (W^2)^T e^-2r``
    (and the same along rows), in float64 against cancellation. :func:`sinkhorn_column_scales_ref` forms ``M``."""
    w = _check(weight, iters).double()
    w2 = w * w  # (N, K)
    n, k = w.shape
    log_r = torch.zeros(n, dtype=torch.float64)
    log_c = torch.zeros(k, dtype=torch.float64)

    def col_std() -> torch.Tensor:  # (K,)
        ir = (-log_r).exp()
        var = (w2.t() @ (ir * ir) - (w.t() @ ir) ** 2 / n) / (n - 1)
        return var.clamp_min(0).sqrt() * (-log_c).exp()

    def row_std() -> torch.Tensor:  # (N,)
        ic = (-log_c).exp()
        var = (w2 @ (ic * ic) - (w @ ic) ** 2 / k) / (k - 1)
        return var.clamp_min(0).sqrt() * (-log_r).exp()

    best = _Best()
    for it in range(iters + 1):
        sc = col_std()
        best.see(it, row_std(), sc, log_c)
        if it == iters:
            break
        log_c = _step(log_c, sc)
        log_r = _step(log_r, row_std())
    return best.result()


def sinkhorn_column_scales_ref(weight: torch.Tensor, iters: int = DEFAULT_SINKHORN_ITERS) -> tuple[torch.Tensor, dict]:
    """:func:`sinkhorn_column_scales` forming ``M`` at each step and taking ``torch.std`` of it (the reference twin)."""
    w = _check(weight, iters)
    log_r = torch.zeros(w.shape[0], 1)  # (N, 1)
    log_c = torch.zeros(1, w.shape[1])  # (1, K)
    m = w
    best = _Best()
    for it in range(iters + 1):
        sc = m.std(0, keepdim=True)  # (1, K): the current M's column spreads
        best.see(it, m.std(1), sc, log_c)
        if it == iters:
            break
        log_c = _step(log_c, sc)
        m = w / log_r.exp() / log_c.exp()
        log_r = _step(log_r, m.std(1, keepdim=True))
        m = w / log_r.exp() / log_c.exp()
    return best.result()


__all__ = ["sinkhorn_column_scales", "sinkhorn_column_scales_ref", "imbalance", "DEFAULT_SINKHORN_ITERS"]
