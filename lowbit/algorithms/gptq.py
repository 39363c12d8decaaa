"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers"): weight-only quantization that corrects each rounding error with the columns still
to be quantized, using second-order information of the layer's inputs.

For a linear with weight ``W`` (N, K) and calibration inputs ``X`` (M, K), the layer loss
``||X W^T - X Q^T||^2`` has Hessian ``H = 2 X^T X`` (K, K), the same for every output row.
Quantizing column ``j`` to ``q_j`` and updating the remaining columns optimally (OBS) gives

    err_j  = (w_j - q_j) / [H^-1]_jj
    W[:, j+1:] -= err_j  [H^-1]_{j, j+1:}

with ``H^-1`` of the not-yet-quantized columns. All those inverses are rows of the upper Cholesky
factor ``U`` of ``H^-1`` (sec. 4, step 3), so one factorisation serves the whole pass. Updates are
applied lazily per block of ``block_size`` columns (step 2); columns are visited by decreasing
``diag(H)`` ("act order", the permutation is undone on the codes); ``percdamp * mean(diag(H))``
is added to the diagonal for stability. Group scales (``group_size`` contiguous input columns,
so the stored layout is the one of RTN and the int4 kernels apply) are computed from the current,
error-updated weights when the first column of the group is reached.

GPTAQ (Li et al. 2025, "GPTAQ: Efficient Finetuning-Free Quantization for Asymmetric Calibration",
arXiv 2504.02692), ``GPTQConfig(asymmetric_calib=True)``: the layer objective becomes
``||X_fp W^T - X_q Q^T||^2``, with ``X_fp`` the inputs the fp32 model gives this linear and ``X_q``
those after the already-quantized earlier layers (``dX = X_fp - X_q``). With the damping
``lambda ||Q - W||^2`` it is a quadratic in ``Q`` with the same Hessian ``H`` (of ``X_q``) as GPTQ and
its minimum at

    W* = W + W P H_d^-1,     P = dX^T X_q  (K, K),  H_d = H + lambda I

(set the gradient ``X_q^T (X_q Q^T - X_fp W^T) + lambda (Q - W)^T`` to 0 and use
``X_q^T X_fp = X_q^T X_q + X_q^T dX``). The loss is ``(Q - W*) H_d (Q - W*)^T`` per row plus a constant,
so the OBS pass above, started from ``W*`` instead of ``W``, keeps the not-yet-quantized columns at
the exact minimiser of the asymmetric loss given the quantized ones, step by step: the paper's
closed form (GPTQ's update plus the ``P`` term), with the whole term applied once up front rather than
column by column inside the pass. ``dX = 0`` gives ``P = 0`` and ``W* = W``: GPTQ bit for bit.
Only a share ``alpha`` of the term is applied, ``W* = W + alpha W P H_d^-1`` (``DEFAULT_ASYM_ALPHA``,
chosen on held-out calibration windows): with ~8k calibration tokens the full term fits the
accumulated error ``dX`` of those tokens rather than its systematic part.
``P`` is summed per window in window order like ``S`` (:meth:`GPTQ.add_cross`) and scaled by the
same ``2 / M``.

``GPTQConfig(attention_hessian=True)``: v_proj's Hessian (and GPTAQ's cross term) is built from its inputs mixed
by each head's attention probabilities, ``z_i = sum_j a_ij x_j``, the inputs its error reaches the model through
(``attention_hessian.py``; BoA, Kim et al. 2025). ``GPTQConfig(residual_weights=True)``: o_proj / down_proj's
Hessians (and cross terms) weigh each token by ``1 / ms(r_t)``, ``r_t`` the residual after their add, the factor the
next norm applies to their error, ``H = sum_t x_t x_t^T / ms(r_t)`` (``residual_hessian.py``).

Interface: ``g = GPTQ(K); g.add_batch(x)`` per calibration batch, then
``codes, qparams, loss = g.solve(W, fmt, symmetric, group_size)``; ``WeightOnlyQLinear.from_quantized``
wraps the result. The handler runs decoder layers sequentially (``sequential.py``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass

import torch
from torch import nn

from lowbit.algorithms._calib import calibration_info, capture_inputs
from lowbit.algorithms.attention_hessian import mixed_value_inputs, mixed_value_linear
from lowbit.algorithms.residual_hessian import residual_scales, residual_sources, residual_weighted_inputs
from lowbit.algorithms._llm import (
    LLAMA_GROUP_NORMS,
    LLAMA_INPUT_GROUPS,
    effective_group_size,
    group_norms,
    input_groups,
    layer_linears,
    layer_prefix,
    lm_calibration,
    n_tokens,
    widest_input,
)
from lowbit.algorithms._weights import check_weight_fields, weight_scheme_name
from lowbit.algorithms.scale_tuning import (
    DEFAULT_TUNE_LR,
    DEFAULT_TUNE_WINDOWS,
    check_tuning_fields,
    finish_tuning,
    start_tuning,
)
from lowbit.algorithms.rtn_guard import guard_record, held_out_error
from lowbit.algorithms.sequential import process_layerwise
from lowbit.algorithms.sinkhorn import sinkhorn_column_scales
from lowbit.api import QuantizeReport, name_selected, register_handler
from lowbit.config import BaseConfig, option_bool, register_config, register_scheme
from lowbit.core import Kind, QParams, choose_qparams, get_format, per_channel, per_group
from lowbit.core.threads import torch_threads
from lowbit.errors import CalibrationError, ConfigError
from lowbit.nn import WeightOnlyQLinear, weight_format
from lowbit.nn.double_quant import DoubleQuantQLinear, double_quant_roundtrip

log = logging.getLogger(__name__)

# The paper uses 1% of the mean diagonal with 128 x 2048 tokens. With our ~8k calibration tokens, 10%
# generalises better: lowest error on held-out calibration windows at 8 and 16 fitted windows
# (bench/gptq_damping.py; the evaluation texts played no part in the choice).
DEFAULT_PERCDAMP = 0.1
DEFAULT_CALIB_WINDOWS = 16  # 512-token windows of the built-in text (8k tokens; the widest input has 1536)
DEFAULT_BLOCK = 128  # lazy-batch width (sec. 4, step 2)
# The RTN-fallback guard judges each linear on calibration windows it was not fitted on; 4 x 512 tokens
# (2048) exceed the widest input (1536), and are the held-out set size bench/gptq_damping.py uses (8).
DEFAULT_GUARD_WINDOWS = 4
# GPTAQ's share of the asymmetric term, W* = W + alpha W P H_d^-1. The exact minimiser (alpha = 1) fits the
# accumulated error dX of 8k calibration tokens far too closely: SmolLM2 W4 held-out calibration KL 1.65 vs
# GPTQ's 0.355; alpha 0.25 / 0.5 give 0.219 / 0.214 (bench/gptaq_alpha.py, calibration windows 40..47, no
# evaluation text). 0.25: within 3% of 0.5 and further from the collapse between 0.5 and 1 (W3's dX is larger).
DEFAULT_ASYM_ALPHA = 0.25

# init="mse": the group range is shrunk by p in {1, 1 - MSE_STEP, ...} (MSE_MAX_SHRINK / MSE_STEP candidates) and
# the p minimising sum |w - q(w)|^MSE_NORM over the group is kept: the search of the GPTQ reference implementation's
# quantizer with mse=True (Frantar et al. 2022, github.com/IST-DASLab/gptq, quant.py: grid 100, norm 2.4, shrink down
# to 0.2). p = 1 (min-max) is a candidate, so the group error is never above min-max's.
MSE_NORM = 2.4  # the reference's norm: between 2 (MSE) and the max norm, it weighs the large errors a bit more
MSE_STEP = 0.01
# 1.00 .. 0.71 (30 candidates), not the reference's 0.21: over the reference's 80 candidates, SmolLM2's W4 g128 groups
# (layers 0, 5, .., 25) chose p >= 0.80 in 99.9 % and p < 0.75 in none; the search costs in proportion to its length
MSE_MAX_SHRINK = 0.3
INITS = ("minmax", "hqq", "mse")


def _mse_candidates(vals: torch.Tensor, f, symmetric: bool, shrink: torch.Tensor, qmin: int, qmax: int,
                    scale_dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The candidate scales (S, N) and integer zero-points (S, N) | None of the shrunk ranges ``p * [min, max]``
    (affine: the range includes 0) for ``vals`` (N, g), as :func:`lowbit.core.qparams_from_range` computes them,
    the scale rounded to its stored precision."""
    from lowbit.core.quant import SCALE_EPS

    p = shrink[:, None]  # (S, 1)
    if symmetric:
        absmax = vals.abs().amax(dim=1)[None, :]  # (1, N)
        s = (p * absmax / qmax).clamp_min(SCALE_EPS)  # (S, N)
        z = None
    else:
        lo = vals.amin(dim=1).clamp_max(0)[None, :] * p  # (S, N)
        hi = vals.amax(dim=1).clamp_min(0)[None, :] * p
        s = ((hi - lo) / (qmax - qmin)).clamp_min(SCALE_EPS)
    if scale_dtype is not None:
        s = s.to(scale_dtype).float()
    if not symmetric:
        z = (qmin - torch.round(lo / s)).clamp(qmin, qmax)  # (S, N), integer-valued
    return s, z


def mse_group_init(fmt: str, symmetric: bool, norm: float = MSE_NORM, step: float = MSE_STEP,
                   max_shrink: float = MSE_MAX_SHRINK, scale_dtype: torch.dtype | None = torch.float16):
    """``vals (N, g) -> (scale (N,), zero_point (N,) | None)``: per row, the shrink ``p`` of the group's
    min-max range (symmetric: ``s = p max|w| / qmax``; affine: ``[p min(w, 0), p max(w, 0)]``) minimising

        sum_j |w_j - s (clamp(round(w_j / s) + z, qmin, qmax) - z)|^norm

    over ``p in {1, 1 - step, ..., > 1 - max_shrink}``, the first (largest) ``p`` of equal errors; scales
    rounded to ``scale_dtype`` (how they are stored) before the error is measured. The ``group_init`` hook of
    :meth:`GPTQ.solve` (``GPTQConfig(init="mse")``, applied to the error-updated weights) and of
    :func:`rtn_solution`. Integer zero-points (``float_zero_point = False``). Vectorised over the candidates
    and rows; :func:`mse_group_init_ref` is the loop it must agree with bit for bit."""
    f = get_format(fmt)
    if f.kind is not Kind.UNIFORM:
        raise ConfigError(f"init='mse' searches integer grids, not {f.name}")
    qmax = f.qmax
    qmin = f.qmin if not symmetric else -qmax
    n_cand = max(1, int(round(max_shrink / step)))
    shrink = torch.tensor([1 - step * i for i in range(n_cand)], dtype=torch.float32)  # (S,)

    def init(vals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        vals = vals.float()
        s, z = _mse_candidates(vals, f, symmetric, shrink, qmin, qmax, scale_dtype)  # (S, N)
        zz = 0 if z is None else z[..., None]
        q = torch.clamp(torch.round(vals[None] / s[..., None]) + zz, qmin, qmax)  # (S, N, g)
        err = ((q - zz) * s[..., None] - vals[None]).abs_().pow_(norm).sum(dim=-1)  # (S, N)
        best = torch.argmin(err, dim=0)  # (N,), the first minimum: the largest p of equal errors
        rows = torch.arange(vals.shape[0])
        return s[best, rows], None if z is None else z[best, rows]

    init.float_zero_point = False
    return init


def mse_group_init_ref(fmt: str, symmetric: bool, norm: float = MSE_NORM, step: float = MSE_STEP,
                       max_shrink: float = MSE_MAX_SHRINK, scale_dtype: torch.dtype | None = torch.float16):
    """The reference twin of :func:`mse_group_init`: one candidate at a time, a running strict minimum per row."""
    f = get_format(fmt)
    qmax = f.qmax
    qmin = f.qmin if not symmetric else -qmax
    n_cand = max(1, int(round(max_shrink / step)))

    def init(vals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        vals = vals.float()
        best_err = torch.full((vals.shape[0],), float("inf"))
        best_s = torch.zeros(vals.shape[0])
        best_z = None if symmetric else torch.zeros(vals.shape[0])
        for i in range(n_cand):
            p = torch.tensor([1 - step * i], dtype=torch.float32)
            s, z = _mse_candidates(vals, f, symmetric, p, qmin, qmax, scale_dtype)  # (1, N)
            s = s[0]
            for r in range(vals.shape[0]):
                zr = 0 if z is None else z[0, r]
                q = torch.clamp(torch.round(vals[r] / s[r]) + zr, qmin, qmax)
                e = ((q - zr) * s[r] - vals[r]).abs().pow(norm).sum()
                if e < best_err[r]:
                    best_err[r], best_s[r] = e, s[r]
                    if best_z is not None:
                        best_z[r] = zr
        return best_s, best_z

    init.float_zero_point = False
    return init


class GPTQ:
    """Accumulates ``H = 2/M sum_b x_b^T x_b`` over calibration windows of one linear, then solves.

    The window sums are added in the order the windows arrive, ``S = ((S_0 + S_1) + S_2) + ...`` with
    ``S_b = x_b^T x_b`` computed alone, and scaled once at the end: the same float operations as the
    across-ranks reduction (``gptq_ranks.reduce_hessian``), so one process and any number of torchrun
    ranks build bit-identical Hessians from the same windows (at the same GEMM thread count)."""

    def __init__(self, in_features: int):
        self.in_features = in_features
        self.S = torch.zeros(in_features, in_features, dtype=torch.float32)  # sum_b x_b^T x_b, window order
        self.n = 0
        self.P: torch.Tensor | None = None  # GPTAQ: sum_b dx_b^T x_b (K, K), None for plain GPTQ
        self.alpha = 1.0  # GPTAQ: share of the asymmetric term applied (GPTQConfig.asym_alpha)
        self._H: torch.Tensor | None = None
        self._factor: tuple | None = None  # (key, perm, U): shared by the linears that read this input

    @property
    def H(self) -> torch.Tensor:
        """The Hessian ``2 / n * S`` (K, K), computed once after the last window."""
        if self._H is None:
            self._H = self.S * (2.0 / max(self.n, 1))
        return self._H

    @H.setter
    def H(self, value: torch.Tensor) -> None:
        self._H = value
        self._factor = None

    def add_batch(self, x: torch.Tensor) -> None:
        """Add one window's inputs ``x`` (..., K): ``S += x^T x`` (the product first, then the sum)."""
        x = x.reshape(-1, self.in_features).to(self.S.dtype)  # (M, K)
        self.S += x.T @ x
        self.n += x.shape[0]
        self._H = None
        self._factor = None

    def add_cross(self, x_fp: torch.Tensor, x_q: torch.Tensor) -> None:
        """GPTAQ: add one window's ``(x_fp - x_q)^T x_q`` (K, K) to ``P``; ``x_q`` is the window given to
        :meth:`add_batch` (which counts the tokens), ``x_fp`` the float model's inputs of the same tokens."""
        x_q = x_q.reshape(-1, self.in_features).to(self.S.dtype)  # (M, K)
        dx = x_fp.reshape(-1, self.in_features).to(self.S.dtype) - x_q  # (M, K)
        if self.P is None:
            self.P = torch.zeros_like(self.S)
        self.P += dx.T @ x_q

    def scaled(self, t: torch.Tensor) -> "GPTQ":
        """The statistics of the inputs ``t * x`` (``t`` (K,)): ``S' = T S T`` and GPTAQ's ``P' = T P T``, ``T = diag(t)``;
        solving ``W / t`` with them gives the same layer outputs to fit (SINQ's column scales under GPTQ)."""
        g = GPTQ(self.in_features)
        tt = t.to(self.S.dtype)[:, None] * t.to(self.S.dtype)[None, :]  # (K, K): t_i t_j
        g.S, g.n, g.alpha = self.S * tt, self.n, self.alpha
        g.P = None if self.P is None else self.P * tt
        return g

    def inverse_factor(self, percdamp: float, act_order: bool, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The column order ``perm`` (K,) and the upper Cholesky factor ``U`` (K, K) of the damped,
        permuted ``H^-1``; computed once per Hessian, so q/k/v (and gate/up) share it.

        At most two K x K temporaries are alive at a time besides ``H`` itself (this is the peak
        memory of sequential quantization for the widest layer)."""
        key = (percdamp, act_order, dtype)
        if self._factor is not None and self._factor[0] == key:
            return self._factor[1], self._factor[2]
        diag = torch.diag(self.H)
        perm = torch.argsort(diag, descending=True) if act_order else torch.arange(self.in_features)
        H = self.H[perm][:, perm].to(dtype)  # (K, K), permuted copy; the row-permuted temporary is freed
        dead = torch.diag(H) == 0  # inputs that were always 0: their weight is irrelevant
        H[dead, dead] = 1
        H.diagonal().add_(percdamp * torch.mean(torch.diag(H)))
        try:
            # one thread: LAPACK's blocked Cholesky sums in a thread-count-dependent order (1 vs 2 threads
            # differ by ~1e-5 at K = 1536), which flips codes; at one thread GPTQ's codes are the same at
            # any torch thread count and on every rank (measured no slower: 0.11 vs 0.13 s at K = 1536)
            with torch_threads(1):
                L = torch.linalg.cholesky(H)
                del H
                Hinv = torch.cholesky_inverse(L)
                del L
                U = torch.linalg.cholesky(Hinv, upper=True)
        except torch.linalg.LinAlgError:
            raise CalibrationError("GPTQ: the damped Hessian is not positive definite; raise percdamp or give "
                                   "more calibration tokens") from None
        del Hinv
        self._factor = (key, perm, U)
        return perm, U

    def solve(self, weight: torch.Tensor, fmt: str = "int4", symmetric: bool = True, group_size: int = 128,
              block_size: int = DEFAULT_BLOCK, percdamp: float = DEFAULT_PERCDAMP, act_order: bool = True,
              scale_dtype: torch.dtype | None = torch.float16, double_quant: bool = False,
              dtype: torch.dtype = torch.float32, grid: str | None = None,
              group_init=None) -> tuple[torch.Tensor, QParams, float]:
        """Codes (N, K), their qparams (per group, or per channel if ``group_size == 0``) and the
        layer loss ``sum((W - Q)^2 / diag(H^-1)) / 2`` summed over columns (the paper's Losses).

        ``group_init(vals) -> (scale, zero_point | None)``: the parameters of the group about to be
        quantized from its current, error-updated weights ``vals`` (N, g) instead of min-max (e.g. HQQ,
        :func:`lowbit.algorithms.hqq.hqq_group_init`, or the l_p-optimal shrink :func:`mse_group_init`); a
        float zero-point rounds ``round(w / s + z)``, an integer one (``group_init.float_zero_point = False``)
        ``round(w / s) + z`` as min-max does.

        ``grid="q4_0"``: ggml's Q4_0 grid for int4 symmetric groups: ``scale = m / -8`` with ``m`` the
        group's value of largest magnitude (signed, so the scale may be negative) and codes in the
        full ``[-8, 7]``, so a GGUF export writes the codes unchanged."""
        if self.n == 0:
            raise CalibrationError("GPTQ.solve called before any add_batch: no calibration inputs")
        f = get_format(fmt)
        if f.kind not in (Kind.UNIFORM, Kind.CODEBOOK):
            raise ConfigError(f"GPTQ quantizes to integer or codebook formats, not {f.name}")
        N, K = weight.shape
        perm, U = self.inverse_factor(percdamp, act_order, dtype)
        invperm = torch.argsort(perm)
        W = weight.detach().to(dtype)[:, perm]  # (N, K) permuted copy, updated in place below
        if self.P is not None:  # GPTAQ: start from W* = W + W P H_d^-1 (module docstring), permuted
            P = (self.P * (2.0 / self.n)).to(dtype)[perm][:, perm]  # (K, K), the scale of H
            W = W + self.alpha * ((W @ P) @ (U.T @ U))  # U^T U = H_d^-1 (permuted)
        W[:, torch.diag(self.H)[perm] == 0] = 0  # dead inputs

        g = group_size or K
        n_groups = K // g
        scale = torch.zeros(N, n_groups, dtype=torch.float32)
        float_zp = group_init is not None and getattr(group_init, "float_zero_point", True)  # HQQ: fp16 zero-points
        zp = None if symmetric or f.kind is not Kind.UNIFORM else torch.zeros(
            N, n_groups, dtype=torch.float32 if float_zp else torch.int32)
        ready = torch.zeros(n_groups, dtype=torch.bool)
        codes = torch.zeros(N, K, dtype=torch.int8 if (f.kind is Kind.UNIFORM and f.signed) else torch.uint8)
        cb = f.codebook_tensor().to(dtype) if f.kind is Kind.CODEBOOK else None
        qmax = f.qmax if f.kind is Kind.UNIFORM else None
        qmin = (f.qmin if (not symmetric or f.name == "ternary") else -qmax) if qmax is not None else None
        if grid == "q4_0":
            if f.name != "int4" or not symmetric:
                raise ConfigError(f"grid 'q4_0' needs int4 symmetric, got {f.name} symmetric={symmetric}")
            qmin = f.qmin  # -8
        loss = 0.0

        def group_params(grp: int, W1: torch.Tensor, i1: int, i2: int) -> None:
            cols = torch.arange(grp * g, (grp + 1) * g)
            pos = invperm[cols]  # where the group's columns sit in the permuted order
            vals = W[:, pos].clone()  # (N, g)
            inblock = (pos >= i1) & (pos < i2)
            vals[:, inblock] = W1[:, pos[inblock] - i1]  # current-block columns hold the updated values
            if grid == "q4_0":  # d = (signed value of largest |w|) / -8, as ggml's quantize_row_q4_0_ref
                s = torch.gather(vals.float(), 1, vals.abs().argmax(dim=1, keepdim=True))[:, 0] / -8
                s = torch.where(s == 0, torch.full_like(s, 2.0 ** -24), s)  # all-zero group: any scale
                qp = None
            elif group_init is not None:
                s, z_init = group_init(vals.float())
                qp = QParams(f, per_channel(0), s, z_init, qmin, qmax)
            else:
                qp = choose_qparams(vals.float(), f, symmetric, per_channel(0))
                s = qp.scale
            if double_quant:
                s = double_quant_roundtrip(s)
            elif scale_dtype is not None:
                s = s.to(scale_dtype).float()
            scale[:, grp] = s
            if zp is not None:
                zp[:, grp] = qp.zero_point
            ready[grp] = True

        for i1 in range(0, K, block_size):
            i2 = min(i1 + block_size, K)
            W1 = W[:, i1:i2].clone()  # (N, B)
            E1 = torch.zeros_like(W1)
            U1 = U[i1:i2, i1:i2]
            for i in range(i2 - i1):
                col = int(perm[i1 + i])
                grp = col // g
                if not ready[grp]:
                    group_params(grp, W1, i1, i2)
                w = W1[:, i]
                s = scale[:, grp].to(dtype)
                if cb is not None:
                    q = torch.bucketize(w / s, (cb[1:] + cb[:-1]) / 2)
                    dq = cb[q] * s
                else:
                    z = 0 if zp is None else zp[:, grp].to(dtype)
                    if float_zp and zp is not None:  # float zero-point: round(w / s + z)
                        q = torch.clamp(torch.round(w / s + z), qmin, qmax)
                    else:
                        q = torch.clamp(torch.round(w / s) + z, qmin, qmax)
                    dq = (q - z) * s
                codes[:, col] = q.to(codes.dtype)
                d = U1[i, i]
                err = (w - dq) / d
                loss += float((err * err).sum()) / 2
                W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
                E1[:, i] = err
            W[:, i2:] -= E1 @ U[i1:i2, i2:]

        gran = per_group(g) if group_size else per_channel(0)
        scale_out = scale if group_size else scale[:, 0]
        zp_out = None if zp is None else (zp if group_size else zp[:, 0])
        qp = QParams(f, gran, scale_out, zp_out, qmin, qmax, codebook=f.codebook_tensor() if cb is not None else None)
        return codes, qp, loss


# ------------------------------------------------------------------------------------ config


@register_config("gptq")
@dataclass(frozen=True)
class GPTQConfig(BaseConfig):
    bits: int = 4
    group_size: int = 128  # 0 = per channel; falls back to a divisor of in_features (see _llm.py)
    symmetric: bool = True
    fmt: str | None = None  # a codebook instead of int{bits}, e.g. "nf4"
    double_quant: bool = False  # QLoRA-style 8-bit storage of the group scales (lowbit.nn.double_quant)
    act_order: bool = True
    percdamp: float = DEFAULT_PERCDAMP
    block_size: int = DEFAULT_BLOCK
    n_calib: int | None = None  # 512-token windows of the built-in set (None = DEFAULT_CALIB_WINDOWS)
    kernel: str = "auto"
    gguf: str | None = None  # "q4_0": round on ggml's Q4_0 grid (int4 sym, group 32, codes [-8, 7])
    asymmetric_calib: bool = False  # GPTAQ: match the fp32 model's layer outputs (module docstring)
    asym_alpha: float = DEFAULT_ASYM_ALPHA  # GPTAQ: W* = W + alpha W P H_d^-1 (1 = the exact minimiser)
    guard: bool = False  # a linear whose held-out error is above RTN's keeps RTN's codes (make_gptq_process)
    guard_windows: int = DEFAULT_GUARD_WINDOWS  # held-out calibration windows the guard judges on
    init: str = "minmax"  # group scales/zero-points: "minmax" (RTN's), "hqq" (HQQ's fit to the updated weights) or
    # "mse" (the shrink of the min-max range minimising the group's l_2.4 rounding error, mse_group_init)
    rotate: bool = False  # QuaRot Hadamard rotations folded into the float weights first (lowbit.algorithms.rotation)
    rotate_seed: int = 0  # seed of the residual rotation's random sign diagonal
    tune_windows: int = 0  # > 0: then tune the group scales end to end on that many windows (scale_tuning.py)
    tune_lr: float = DEFAULT_TUNE_LR
    tune_epochs: int = 1  # passes over the tuning windows
    tune_bf16: bool = False  # the tuning's forward / backward under bf16 autocast (~1.6x faster on CPUs with bf16)
    # SINQ's column scales (lowbit.algorithms.sinkhorn): each linear solves W / t against the Hessian of t * x and
    # stores t (WeightOnlyQLinear.input_scale); t comes from the weight alone
    sinkhorn: bool = False
    # v_proj's Hessian from its inputs mixed by the attention probabilities (lowbit.algorithms.attention_hessian):
    # its error as the attention outputs see it, the attention sink weighted by the attention it receives
    attention_hessian: bool = False
    # o_proj / down_proj (the residual writers): each token's inputs weighted by 1 / rms of the residual after the
    # add, the factor the next norm applies to its error (lowbit.algorithms.residual_hessian)
    residual_weights: bool = False

    def __post_init__(self):
        check_weight_fields(self.bits, self.group_size, self.fmt, self.double_quant)
        storage = self.fmt or ("double_quant" if self.double_quant else None)
        check_tuning_fields(self.tune_windows, self.tune_lr, storage, self.tune_epochs)
        if self.gguf not in (None, "q4_0") or (self.gguf and (self.bits, self.group_size, self.symmetric, self.fmt,
                                                             self.double_quant) != (4, 32, True, None, False)):
            raise ConfigError(f"gptq gguf={self.gguf!r}: only 'q4_0' with bits=4, group_size=32, symmetric, no fmt "
                              "or double_quant (q8_0 and q4_1 need no option: --bits 8 / --affine at group 32)")
        if not 0 < self.percdamp < 1:
            raise ConfigError(f"percdamp must be in (0, 1), got {self.percdamp}")
        if self.block_size < 1:
            raise ConfigError(f"block_size must be >= 1, got {self.block_size}")
        if self.init not in INITS:
            raise ConfigError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.init != "minmax" and (self.fmt or self.gguf or self.double_quant):
            raise ConfigError(f"init={self.init!r} fits integer grids: not with fmt, gguf or double_quant")
        if not 0 <= self.asym_alpha <= 1:
            raise ConfigError(f"asym_alpha must be in [0, 1], got {self.asym_alpha}")
        if self.guard and self.guard_windows < 1:
            raise ConfigError(f"guard_windows must be >= 1 with guard=True, got {self.guard_windows}")
        if self.sinkhorn and (self.fmt or self.gguf or self.double_quant or self.rotate):
            raise ConfigError("sinkhorn=True stores per-layer column scales beside integer codes: not with fmt, gguf, "
                              "double_quant or rotate")
        if self.rotate and self.gguf:
            raise ConfigError("rotate=True needs online Hadamard transforms that llama.cpp's graph does not have: "
                              "not with gguf")

    @property
    def format_name(self) -> str:
        return weight_format(self.bits, self.symmetric, self.fmt)

    @property
    def scheme(self) -> str:
        method = "gptaq" if self.asymmetric_calib else "gptq"
        name = weight_scheme_name(method, self.bits, self.group_size, self.symmetric, self.fmt, self.double_quant)
        return f"{name}{'-ggml' if self.gguf else ''}{'-guard' if self.guard else ''}" \
               f"{'' if self.init == 'minmax' else f'-{self.init}init'}{'-rot' if self.rotate else ''}" \
               f"{'-tuned' if self.tune_windows else ''}{'-sinq' if self.sinkhorn else ''}" \
               f"{'-attnh' if self.attention_hessian else ''}{'-resw' if self.residual_weights else ''}"


def wrap_quantized(linear: nn.Linear, codes: torch.Tensor, qp: QParams, group_size: int, kernel: str,
                   double_quant: bool, input_scale: torch.Tensor | None = None) -> WeightOnlyQLinear:
    """A ``WeightOnlyQLinear`` (or its double-quantized-scales variant) holding codes from any method
    (``input_scale``: the codes are of ``W / input_scale``, SINQ's column scales)."""
    if double_quant:
        return DoubleQuantQLinear.from_quantized(linear, codes, qp, group_size, kernel)
    return WeightOnlyQLinear.from_quantized(linear, codes, qp, group_size, kernel, input_scale=input_scale)


def group_init_for(config: GPTQConfig):
    """The ``group_init`` hook of :meth:`GPTQ.solve` that ``config.init`` names (None: min-max)."""
    if config.init == "hqq":
        from lowbit.algorithms.hqq import hqq_group_init

        return hqq_group_init(config.bits, config.symmetric)
    if config.init == "mse":
        return mse_group_init(config.format_name, config.symmetric)
    return None


def rtn_solution(weight: torch.Tensor, fmt: str, symmetric: bool, group_size: int, double_quant: bool = False,
                 grid: str | None = None, group_init=None) -> tuple[torch.Tensor, QParams]:
    """Round-to-nearest codes (N, K) and qparams in GPTQ's storage conventions (fp16 or double-quantized
    group scales, ``grid``, codebooks): :meth:`GPTQ.solve` with ``H = I`` and no act order, whose inverse
    factor ``U`` is diagonal, so no rounding error reaches another column and the group scales come
    from the weights as they are. The guard's alternative to a GPTQ solution; with ``group_init`` (e.g.
    :func:`mse_group_init`) RTN on that group-parameter search."""
    K = weight.shape[1]
    g = GPTQ(K)
    g.S, g.n = torch.eye(K, dtype=torch.float32), 2  # H = 2 / 2 * I
    codes, qp, _ = g.solve(weight, fmt, symmetric, group_size, act_order=False, double_quant=double_quant, grid=grid,
                           group_init=group_init)
    return codes, qp


def check_enough_tokens(batches: list[torch.Tensor], in_features: int, window: int) -> None:
    """A Hessian of K inputs needs at least K tokens to have full rank."""
    have = n_tokens(batches)
    if have < in_features:
        need = -(-in_features // window)
        raise CalibrationError(f"GPTQ needs at least {in_features} calibration tokens (the widest layer has "
                               f"{in_features} inputs, so its Hessian needs that many samples for full rank); "
                               f"got {have}. Use at least {need} windows of {window} tokens (--calib {need})")


def split_held_out(batches: list, n_held: int, source: str) -> tuple[list, list]:
    """The guard's split: the last ``n_held`` calibration windows are held out (never fitted)."""
    if n_held and len(batches) <= n_held:
        raise CalibrationError(f"the GPTQ guard holds out the last {n_held} calibration windows and needs at least "
                               f"one more to fit; {source} gave {len(batches)} (give more windows, or guard=False)")
    return (batches[:-n_held], batches[-n_held:]) if n_held else (batches, [])


@register_handler(GPTQConfig)
def _quantize_gptq(model: nn.Module, config: GPTQConfig, calibration_data=None) -> QuantizeReport:
    from lowbit.algorithms.gptq_ranks import check_ranks_support, quantize_gptq_ranks, ranks_active

    if ranks_active():
        check_ranks_support(config)
        if config.init != "minmax" or config.rotate or config.tune_windows or config.sinkhorn:
            raise ConfigError("GPTQ with init != 'minmax', rotate=True, tune_windows or sinkhorn runs in one process "
                              "(not across torchrun ranks)")
    if config.tune_windows and calibration_data is not None:
        calibration_data = list(calibration_data)  # read twice: tuning windows, then the method's
    tuning = start_tuning(model, calibration_data, config.tune_windows)  # fp32 targets, before any change
    report = QuantizeReport()
    if config.rotate:  # QuaRot: rotations folded into the float weights before any quantization
        from lowbit.algorithms.rotation import rotate_model, rotation_specs

        report.extra["rotation"] = rotate_model(model, config.rotate_seed)
        report.layers.update(rotation_specs(model))  # recorded before their linears: load rebuilds them first
    n_held = config.guard_windows if config.guard else 0
    batches, source = lm_calibration(model, calibration_data, (config.n_calib or DEFAULT_CALIB_WINDOWS) + n_held)
    batches, held = split_held_out(batches, n_held, source)
    prefix = layer_prefix(model)
    check_enough_tokens(batches, widest_input(model), batches[0].shape[-1])

    if ranks_active():  # one rank of a torchrun job: sharded calibration, fixed-order Hessian reduce
        return quantize_gptq_ranks(model, config, batches, source)
    stats: dict[str, dict] = {}
    t0 = time.perf_counter()
    process = make_gptq_process(config, prefix, report, stats, groups=input_groups(model), held_out=len(held),
                                norms=group_norms(model))
    process_layerwise(model, batches + held, process, desc=config.scheme)
    report.extra["gptq"] = {"seconds": time.perf_counter() - t0, "n_tokens": n_tokens(batches), "layers": stats}
    model.lowbit_calibration = calibration_info(batches, source)
    if config.guard:
        model.lowbit_calibration["guard"] = report.extra["gptq"]["guard"] = guard_record(
            stats, "held_out", calibration_info(held, "last windows of the calibration data"))
        log.info("gptq guard: %d of %d linears kept RTN's codes", len(model.lowbit_calibration["guard"]["reverted"]),
                 len(stats))
    finish_tuning(model, tuning, config.tune_lr, report, config.tune_epochs, config.tune_bf16)
    return report


def selected_linears(config, layer: nn.Module, layer_name: str,
                     groups: tuple[tuple[str, ...], ...]) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """The linears of ``layer`` that ``config.include`` / ``exclude`` select (by full name
    ``layer_name.<linear>``), and for each the linear whose Hessian it uses: one Hessian per distinct
    input (q/k/v share one, gate/up share one, the first present linear of each group owns it)."""
    linears = {n: m for n, m in layer_linears(layer).items()
               if name_selected(f"{layer_name}.{n}", config.include, config.exclude)}
    owner: dict[str, str] = {}
    for group in groups:
        present = [n for n in group if n in linears]
        for n in present:
            owner[n] = present[0]
    for n in linears:
        owner.setdefault(n, n)
    return linears, owner


def make_gptq_process(config: GPTQConfig, prefix: str, report: QuantizeReport, stats: dict, wrap=None,
                      groups: tuple[tuple[str, ...], ...] = LLAMA_INPUT_GROUPS, held_out: int = 0, act_quant=None,
                      norms: tuple[str | None, ...] = LLAMA_GROUP_NORMS):
    """The per-layer step of sequential GPTQ: Hessians from one float pass, solve, swap modules.

    ``wrap(name, linear, codes, qparams, group_size) -> module`` builds the quantized module
    (default: ``WeightOnlyQLinear``; the W/A presets pass one that builds ``WAQLinear``). ``groups``:
    the layer's linears by shared input (one Hessian each), from the family's adapter row; ``norms`` the norm
    feeding each group (None: a residual writer), which ``config.residual_weights`` needs.

    ``config.asymmetric_calib`` (GPTAQ): the process asks ``process_layerwise`` for the float stream
    (``process.float_stream``) and is called with the float model's hidden states as a fifth argument;
    it runs the float layer on them window by window, capturing ``X_fp`` beside ``X_q`` for
    :meth:`GPTQ.add_cross`, and advances that stream in place. ``act_quant(name, x) -> x`` (GPTAQ only;
    the W/A presets): the activations the quantized linear will multiply (its run-time activation
    grid) replace ``X_q`` in the Hessian and the cross term, so the solve minimises
    ``||W X_fp - W_q Q_a(X_q)||`` and the weights absorb part of the activation rounding error too.

    ``config.guard``: the last ``held_out`` windows of ``inputs`` are not fitted; for each linear the
    GPTQ module and the RTN module (:func:`rtn_solution`, same format, group and symmetry, built by the
    same ``wrap``) are judged by :func:`held_out_error` on them, and RTN's is kept where its error is
    strictly lower (``stats[name]["fallback"] = "rtn"``)."""
    from lowbit.algorithms.sequential import run_layer

    asym = config.asymmetric_calib
    group_init = group_init_for(config)
    if act_quant is not None and not asym:
        raise ConfigError("act_quant (activation-aware weights) needs GPTAQ's float stream: asymmetric_calib=True")
    if config.guard and held_out < 1:
        raise ConfigError(f"{config.scheme}: the RTN-fallback guard needs held-out calibration windows, and this "
                          "path gives none (low-memory and W/A-preset GPTQ run without it): use guard=False")
    if held_out and not config.guard:
        raise ConfigError("held-out windows are given but guard=False")

    if config.sinkhorn and wrap is not None:
        raise ConfigError(f"{config.scheme}: SINQ's column scales are stored by WeightOnlyQLinear; this path builds "
                          "other modules (the W/A presets)")

    def build(n: str, m: nn.Module, codes: torch.Tensor, qp: QParams, g: int, t: torch.Tensor | None = None):
        return wrap_quantized(m, codes, qp, g, config.kernel, config.double_quant, t) if wrap is None \
            else wrap(n, m, codes, qp, g)

    def process(i: int, layer: nn.Module, inputs: list, kwargs: dict, fp_inputs: list | None = None) -> None:
        if asym and fp_inputs is None:
            raise ConfigError(f"{config.scheme}: GPTAQ needs the float model's activations beside the quantized "
                              "ones; run this process through sequential.process_layerwise")
        linears, owner = selected_linears(config, layer, f"{prefix}.{i}", groups)
        if not linears:
            if fp_inputs is not None:
                for j in range(len(fp_inputs)):
                    fp_inputs[j] = run_layer(layer, [fp_inputs[j]], kwargs, i)[0]
            return
        # v_proj (when attention_hessian): its own Hessian, of the attention-mixed inputs (attention_hessian.py)
        attn, mixed_v = mixed_value_linear(layer, linears, owner, config.attention_hessian)
        hess = {n: GPTQ(linears[n].in_features) for n in set(owner.values())}
        full = {f"{prefix}.{i}.{n}": n for n in hess}  # hooks name the full layer on NaN
        fv = f"{prefix}.{i}.{mixed_v}"
        mods = {f: linears[n] for f, n in full.items() if n != mixed_v}
        # the residual writers (when residual_weights): inputs scaled by 1 / rms of the residual after their add
        sources = residual_sources(layer, tuple(zip(groups, norms))) if config.residual_weights else {}
        wsrc = {f: sources[n] for f, n in full.items() if n in sources}
        plain = {f: m for f, m in mods.items() if f not in wsrc}

        def mixing(fn, transform=None):
            """v_proj's attention-mixed inputs to ``fn`` during a pass (nothing without attention_hessian)."""
            return mixed_value_inputs(attn, fn, transform) if mixed_v is not None else contextlib.nullcontext()

        def weighting(fn):
            """The residual writers' weighted inputs to ``fn(full name, x)`` (nothing without residual_weights)."""
            return residual_weighted_inputs(layer, {f: mods[f] for f in wsrc}, wsrc, fn) if wsrc \
                else contextlib.nullcontext()
        n_fit = len(inputs) - held_out
        held_q: dict[str, list] = {n: [] for n in hess}  # held-out inputs through the quantized model
        held_fp: dict[str, list] = {n: [] for n in hess}  # GPTAQ: the float model's, same windows
        if not asym:
            with capture_inputs(plain, lambda f, x: hess[full[f]].add_batch(x)), \
                    weighting(lambda f, x: hess[full[f]].add_batch(x)), mixing(lambda z: hess[mixed_v].add_batch(z)):
                run_layer(layer, inputs[:n_fit] if held_out else inputs, kwargs, i, keep=False)
            if held_out:
                with capture_inputs(plain, lambda f, x: held_q[full[f]].append(x)), \
                        weighting(lambda f, x: held_q[full[f]].append(x)), mixing(lambda z: held_q[mixed_v].append(z)):
                    run_layer(layer, inputs[n_fit:], kwargs, i, keep=False)
        else:
            for j in range(len(inputs)):  # window by window: x_q and x_fp of one window alive at a time
                xq: dict[str, torch.Tensor] = {}
                xf: dict[str, torch.Tensor] = {}
                s_fp: dict[str, torch.Tensor] = {}  # the writers' 1 / rms(residual), (1, T, 1), of the float stream
                with capture_inputs(mods, xq.__setitem__), mixing(
                        lambda z: xq.__setitem__(fv, z), None if act_quant is None else lambda x: act_quant(fv, x)):
                    run_layer(layer, [inputs[j]], kwargs, i, keep=False)
                with capture_inputs(mods, xf.__setitem__), mixing(lambda z: xf.__setitem__(fv, z)), \
                        residual_scales(layer, wsrc, s_fp.__setitem__):
                    fp_inputs[j] = run_layer(layer, [fp_inputs[j]], kwargs, i)[0]  # the float stream advances
                for f, n in full.items():
                    if act_quant is not None and f != fv:  # what the quantized linear will multiply at run time
                        xq[f] = act_quant(f, xq[f])
                    if f in s_fp:  # one weight per token for both streams: the cross term stays x_fp - x_q
                        xq[f], xf[f] = xq[f].float() * s_fp[f], xf[f].float() * s_fp[f]
                    if j < n_fit:
                        hess[n].alpha = config.asym_alpha
                        hess[n].add_batch(xq[f])
                        hess[n].add_cross(xf[f], xq[f])
                    else:
                        held_q[n].append(xq[f])
                        held_fp[n].append(xf[f])
        for n, m in linears.items():
            t = time.perf_counter()
            g = effective_group_size(m.in_features, config.group_size)
            h, w, t_col = hess[owner[n]], m.weight, None
            if config.sinkhorn:  # solve W / t against the Hessian of t * x: the same layer output
                t_col, _ = sinkhorn_column_scales(w)
                h, w = h.scaled(t_col), w.detach().float() / t_col
            codes, qp, loss = h.solve(
                w, config.format_name, config.symmetric, g, config.block_size, config.percdamp,
                config.act_order, double_quant=config.double_quant, grid=config.gguf, group_init=group_init)
            new = build(n, m, codes, qp, g, t_col)
            name = f"{prefix}.{i}.{n}"
            st = {"loss": loss, "seconds": 0.0, "group_size": g}
            if n == mixed_v:
                st["hessian"] = "attention-mixed inputs"
            elif owner[n] in sources:
                st["hessian"] = "residual-weighted inputs"
            if held_out:
                rcodes, rqp = rtn_solution(m.weight, config.format_name, config.symmetric, g, config.double_quant,
                                           config.gguf)
                alt = build(n, m, rcodes, rqp, g)
                xs, targets = held_q[owner[n]], (held_fp if asym else held_q)[owner[n]]
                st["guard"] = {"gptq_error": held_out_error(m, new, xs, targets),
                               "rtn_error": held_out_error(m, alt, xs, targets)}
                if st["guard"]["rtn_error"] < st["guard"]["gptq_error"]:
                    new = alt
                    st["fallback"] = "rtn"
                    log.info("gptq guard: %s keeps RTN's codes (held-out error %.4g < GPTQ's %.4g)", name,
                             st["guard"]["rtn_error"], st["guard"]["gptq_error"])
            layer.set_submodule(n, new)
            report.layers[name] = new.spec()
            st["seconds"] = time.perf_counter() - t
            stats[name] = st
            log.debug("gptq %s: loss %.4g", name, loss)

    process.float_stream = asym  # process_layerwise keeps the float model's hidden states for it
    return process


# the GPTQ-family schemes (and awq-gptq / awq-gptaq) build v_proj's Hessian from attention-mixed inputs unless told
# otherwise (GPTQConfig / AWQConfig keep attention_hessian=False): SmolLM2 W4 g128 sym, held-out calibration KL plain
# -> mixed (bench/results/w4_heldout.md): GPTQ 0.393 -> 0.245, GPTAQ 0.235 -> 0.193, gptaq-rot 0.154 -> 0.139,
# awq-gptq 0.281 -> 0.253, awq-gptaq 0.198 -> 0.190 (its licence KL rises, 0.308 -> 0.384: docs/llm.md)
SCHEME_ATTENTION_HESSIAN = True
# ... and weight the residual writers' tokens by 1 / ms(residual after the add) (residual_hessian.py; GPTQConfig keeps
# residual_weights=False): held-out calibration KL without -> with, GPTQ W4 0.245 -> 0.250, GPTAQ W4 0.193 -> 0.192,
# gptaq-rot W4 0.139 -> 0.133, GPTQ W3 1.329 -> 1.299, awq-gptaq 0.190 -> 0.187 (awq-gptq 0.253 -> 0.260 and its
# perplexity worse too: off there; docs/llm.md); GPTQ W4 then has no block or linear worse than RTN's
SCHEME_RESIDUAL_WEIGHTS = True
SCHEME_OPTIONS = ("bits", "group_size", "symmetric", "kernel", "attention_hessian", "residual_weights")


def _weight_options(options: dict) -> dict:
    """The CLI's --bits / --group-size / --symmetric / --kernel as GPTQConfig fields (the GPTQ schemes' defaults)."""
    return dict(bits=int(options.get("bits", 4)), group_size=int(options.get("group_size", 128)),
                symmetric=option_bool(options.get("symmetric", True)), kernel=options.get("kernel", "auto"),
                attention_hessian=scheme_attention_hessian(options),
                residual_weights=scheme_residual_weights(options))


def scheme_residual_weights(options: dict, default: bool = SCHEME_RESIDUAL_WEIGHTS) -> bool:
    """The schemes' --residual-weights / --plain-tokens (default :data:`SCHEME_RESIDUAL_WEIGHTS`)."""
    return option_bool(options.get("residual_weights", default))


def scheme_attention_hessian(options: dict) -> bool:
    """The schemes' --attention-hessian / --plain-hessian (default :data:`SCHEME_ATTENTION_HESSIAN`)."""
    return option_bool(options.get("attention_hessian", SCHEME_ATTENTION_HESSIAN))


@register_scheme("gptq", "GPTQ weight-only (Hessian error compensation, act-order, lazy blocks), decoder layers "
                 "one at a time: --bits {2,3,4,8} --group-size N --symmetric/--affine; causal LMs only",
                 options=SCHEME_OPTIONS + ("gguf",), models=("smollm2",))
def _gptq_scheme(options: dict) -> GPTQConfig:
    if options.get("gguf"):  # --gguf q4_0: llama.cpp's Q4_0 grid (int4 symmetric, blocks of 32, codes -8..7)
        return GPTQConfig(bits=4, group_size=32, symmetric=True, gguf=options["gguf"],
                          kernel=options.get("kernel", "auto"), attention_hessian=scheme_attention_hessian(options),
                          residual_weights=scheme_residual_weights(options))
    return GPTQConfig(**_weight_options(options))


@register_scheme("gptaq", "GPTAQ: GPTQ calibrated asymmetrically (each linear matches the fp32 model's outputs from "
                 "the quantized model's inputs) with the RTN-fallback guard on held-out calibration windows",
                 options=SCHEME_OPTIONS, models=("smollm2",))
def _gptaq_scheme(options: dict) -> GPTQConfig:
    return GPTQConfig(**_weight_options(options), asymmetric_calib=True, guard=True)


@register_scheme("gptq-guard", "GPTQ with the RTN-fallback guard: a linear whose output error on held-out "
                 "calibration windows is above RTN's keeps RTN's codes (recorded in metadata.json)",
                 options=SCHEME_OPTIONS, models=("smollm2",))
def _gptq_guard_scheme(options: dict) -> GPTQConfig:
    return GPTQConfig(**_weight_options(options), guard=True)


@register_scheme("gptq-hqq", "GPTQ whose group scales / zero-points come from HQQ's fit to the group's error-updated "
                 "weights instead of min-max (affine: fp16 zero-points)",
                 options=SCHEME_OPTIONS, models=("smollm2",))
def _gptq_hqq_scheme(options: dict) -> GPTQConfig:
    return GPTQConfig(**_weight_options(options), init="hqq")


@register_scheme("gptq-mse", "GPTQ whose group scales come from the shrink of the min-max range minimising the "
                 "group's l_2.4 rounding error on its error-updated weights (the GPTQ reference's mse search)",
                 options=SCHEME_OPTIONS, models=("smollm2",))
def _gptq_mse_scheme(options: dict) -> GPTQConfig:
    return GPTQConfig(**_weight_options(options), init="mse")


@register_scheme("gptaq-rot", "QuaRot + GPTAQ weight-only: Hadamard rotations folded into the float weights (online "
                 "transforms before down_proj and, with a tied head, in the final norm), then GPTAQ with MSE group "
                 "scales; Llama-layout causal LMs; decodes on the fast decoder, not exportable to GGUF",
                 options=SCHEME_OPTIONS, models=("smollm2",))
def _gptaq_rot_scheme(options: dict) -> GPTQConfig:
    return GPTQConfig(**_weight_options(options), asymmetric_calib=True, init="mse", rotate=True)


@register_scheme("gptaq-rot-tuned", "gptaq-rot, then its group scales tuned end to end against the fp32 model's "
                 f"next-token distribution on {DEFAULT_TUNE_WINDOWS} calibration windows, codes fixed (EfficientQAT's "
                 "E2E-QP; ~6 more minutes on SmolLM2 and 2 cores); same size and kernels",
                 options=SCHEME_OPTIONS + ("tune_windows", "tune_epochs", "tune_bf16"),
                 models=("smollm2",))
def _gptaq_rot_tuned_scheme(options: dict) -> GPTQConfig:
    return GPTQConfig(**_weight_options(options), asymmetric_calib=True, init="mse", rotate=True,
                      tune_windows=int(options.get("tune_windows", DEFAULT_TUNE_WINDOWS)),
                      tune_epochs=int(options.get("tune_epochs", 1)),
                      tune_bf16=option_bool(options.get("tune_bf16", False)))


@register_scheme("gptq-sinq", "GPTQ on SINQ's Sinkhorn-normalised weights: each linear solves W / t (column scales t "
                 "from the weight, stored per layer) against the Hessian of t * x",
                 options=SCHEME_OPTIONS, models=("smollm2",))
def _gptq_sinq_scheme(options: dict) -> GPTQConfig:
    return GPTQConfig(**_weight_options(options), sinkhorn=True)


@register_scheme("gptq-nf4", "GPTQ onto the NF4 codebook with double-quantized group scales (QLoRA storage)",
                 options=("group_size", "kernel", "attention_hessian", "residual_weights"), models=("smollm2",))
def _gptq_nf4_scheme(options: dict) -> GPTQConfig:
    return GPTQConfig(bits=4, fmt="nf4", group_size=int(options.get("group_size", 64)), double_quant=True,
                      kernel=options.get("kernel", "auto"), attention_hessian=scheme_attention_hessian(options),
                      residual_weights=scheme_residual_weights(options))
