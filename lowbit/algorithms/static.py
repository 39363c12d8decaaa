"""Static PTQ (MISSION B.8-B.10): weights and activations quantized, activation ranges from calibration.

Recipe (Jacob et al. 2018; Krishnamoorthi 2018 whitepaper; Nagel et al. 2021):

1. fold BatchNorm into the preceding conv / linear (``lowbit.integer.bn_fold``);
2. optional SmoothQuant migration for Linear layers (``smooth_alpha``; Xiao et al. 2023): the
   per-channel factor ``s`` divides the input and multiplies the weight, so outlier channels of
   transformer hidden states stop dictating the per-tensor activation scale;
3. every selected Linear / Conv2d becomes a fake-quant wrapper whose input :class:`ActQuantizer`
   observes the calibration batches (hooks live only for the pass; NaN/inf names the layer);
4. each quantizer's range comes from its observer (``minmax | ema | percentile | mse | kl``); the
   ``output`` observer then searches each layer's clipping ratio against the KL / cosine loss of
   the model's final outputs (``lowbit.observers.output``);
5. wrappers become real int8 modules (:class:`StaticQLinear`, :class:`StaticQConv2d`) unless
   ``real_int8=False`` keeps the fake-quant model (for QAT or analysis).

LayerNorm, softmax, embeddings and other layers stay in float and are listed in the report.
Activations are per tensor; ``granularity`` is the weights' (per_channel or per_tensor);
``symmetric`` picks the activation scheme (weights are always symmetric).

Across ``torch.distributed`` ranks (``torchrun ... -m lowbit quantize --scheme w8a8-static``) each
rank runs batches ``r, r + W, ...`` (``lowbit.algorithms.ranks``), and the result does not depend on W:

- SmoothQuant maxima: all-reduce ``max``; the alpha search's sampled rows are drawn per batch with a
  generator seeded by the batch index and gathered in batch order (one process draws from one
  generator across batches, so 1 rank under torchrun and a plain process sample different rows);
- ``minmax`` / ``ema`` / ``output`` observers: each batch's per-channel (min, max) is gathered in
  batch order and replayed into the observer (``[min, max]`` is all these observers read of a batch),
  so the ranges equal one process's bit for bit (a layer called twice per batch is the exception for
  ``ema``: its two calls become one);
- histogram observers (``percentile`` / ``mse`` / ``kl``): a first pass fixes each histogram's range
  to the global one (min / max over ranks), a second fills it with no re-binning, and the integer
  counts are summed over ranks (exact): 1 and W ranks agree, but one process re-bins as its range
  grows, so its histogram (and range) differ slightly;
- the ``output`` search's loss is a per-batch sum gathered in batch order: each rank runs its share
  of the subset, and the chosen ratios equal one process's.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import nn

from lowbit.algorithms._calib import calibration_info, capture_inputs, default_calibration, run_batches
from lowbit.algorithms.ranks import (all_max, all_sum_counts, collective_guard, gather_batches,
                                    gather_scalars, local_indices, ranks_active, require_batches, with_world_size)
from lowbit.algorithms.smoothing import smoothing_factors
from lowbit.api import QuantizeReport, register_handler, select_modules, set_submodule
from lowbit.config import BaseConfig, register_config, register_scheme
from lowbit.core import choose_qparams, fake_quantize, int_format, per_channel, qparams_from_range
from lowbit.errors import CalibrationError, ConfigError
from lowbit.nn.static import FakeQuantConv2d, FakeQuantLinear, StaticQConv2d, StaticQLinear
from lowbit.observers import OBSERVERS, HistogramObserver, MinMaxObserver
from lowbit.observers.histogram import RANGE_EPS
from lowbit.observers.output import DEFAULT_RATIOS, search_output_ranges

log = logging.getLogger(__name__)

GRANULARITIES = ("per_channel", "per_tensor")
ALPHA_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
SAMPLE_ROWS = 256  # calibration tokens kept per batch and layer for the alpha search

# Layers static PTQ leaves in float, with the reason recorded in the report.
FLOAT_LAYERS = {
    nn.LayerNorm: "LayerNorm kept in float (normalisation is range-sensitive; lowbit.integer has an integer one)",
    nn.Embedding: "Embedding kept in float (static PTQ quantizes Linear/Conv2d; see QEmbedding for int8 tables)",
    nn.Conv1d: "Conv1d: no static int8 kernel, kept in float",
    nn.ConvTranspose2d: "ConvTranspose2d: no static int8 kernel, kept in float",
    nn.BatchNorm2d: "BatchNorm2d not folded (no conv directly before it), kept in float",
    nn.BatchNorm1d: "BatchNorm1d not folded, kept in float",
}


@register_config("w8a8-static")
@dataclass(frozen=True)
class StaticConfig(BaseConfig):
    observer: str = "minmax"  # minmax | ema | percentile | mse | kl | output (minmax: best measured on MiniLM)
    granularity: str = "per_channel"  # of the weights; activations are per tensor
    symmetric: bool = True  # activations symmetric (zero_point 0) or affine; weights always symmetric
    weight_bits: int = 8
    act_bits: int = 8
    percentile: float = 99.99  # for observer="percentile"
    smooth_alpha: float | str | None = "auto"  # SmoothQuant strength for Linear layers; "auto" = per-layer
    # search over alpha_grid (least output error of the layer on calibration tokens); None = off
    alpha_grid: tuple[float, ...] = ALPHA_GRID
    fold_bn: bool = True
    output_ratios: tuple[float, ...] = DEFAULT_RATIOS  # clipping ratios tried per layer by observer="output"
    output_samples: int = 64  # calibration samples per loss evaluation of the output search
    real_int8: bool = True  # swap in int8 modules; False keeps the fake-quant wrappers
    kernel: str = "auto"  # int8_mm: auto | fast (torch._int_mm) | reference

    def __post_init__(self):
        if self.observer not in OBSERVERS:
            raise ConfigError(f"unknown observer {self.observer!r}; valid observers: {', '.join(OBSERVERS)}")
        if self.granularity not in GRANULARITIES:
            raise ConfigError(f"granularity {self.granularity!r} not supported by static PTQ; valid: "
                              f"{', '.join(GRANULARITIES)} (activations are always per tensor)")
        for what, bits in (("weight_bits", self.weight_bits), ("act_bits", self.act_bits)):
            if bits not in (2, 3, 4, 8):
                raise ConfigError(f"{what}={bits} not supported; valid: 2, 3, 4, 8")
        if self.smooth_alpha is not None and self.smooth_alpha != "auto" and not (
                isinstance(self.smooth_alpha, (int, float)) and 0.0 <= self.smooth_alpha <= 1.0):
            raise ConfigError(f"smooth_alpha must be in [0, 1], 'auto' or None, got {self.smooth_alpha!r}")
        if not self.alpha_grid or not all(0.0 <= a <= 1.0 for a in self.alpha_grid):
            raise ConfigError(f"alpha_grid must hold SmoothQuant strengths in [0, 1], got {self.alpha_grid}")
        if not self.output_ratios or not all(0.0 < r <= 1.0 for r in self.output_ratios):
            raise ConfigError(f"output_ratios must be clipping ratios in (0, 1], got {self.output_ratios}")
        if self.output_samples < 1:
            raise ConfigError(f"output_samples must be at least 1, got {self.output_samples}")

    @property
    def scheme(self) -> str:
        return f"w{self.weight_bits}a{self.act_bits}-static"


# ---------------------------------------------------------------------------------- helpers


def model_outputs(model: nn.Module, batch) -> torch.Tensor:
    """The model's final output for one calibration batch (embeddings, logits)."""
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], str):
        return model.encode(list(batch), batch_size=len(batch))
    if isinstance(batch, dict):
        out = model(**batch)
    else:
        out = model(batch)
    return getattr(out, "logits", out)


def output_loss(task: str | None, ref: torch.Tensor, out: torch.Tensor) -> float:
    """``1 - cos`` for embeddings; ``KL(softmax(ref) || softmax(out))`` per row for logits."""
    ref, out = ref.float(), out.float()
    if task == "encoder":
        return float(1.0 - nn.functional.cosine_similarity(ref, out, dim=-1).mean())
    ref2, out2 = ref.reshape(-1, ref.shape[-1]), out.reshape(-1, out.shape[-1])  # (rows, classes)
    logp, logq = torch.log_softmax(ref2, dim=-1), torch.log_softmax(out2, dim=-1)
    return float((logp.exp() * (logp - logq)).sum(dim=-1).mean())


def _subset(batches: list, n: int) -> list:
    """The first ``n`` samples of the calibration batches (whole batches, the last one truncated)."""
    out, have = [], 0
    for b in batches:
        size = len(b) if not isinstance(b, dict) else next(iter(b.values())).shape[0]
        take = min(size, n - have)
        out.append(b[:take] if not isinstance(b, dict) else {k: v[:take] for k, v in b.items()})
        have += take
        if have >= n:
            break
    return out


class _Tracker:
    """Which quantized layer is running, so a failing calibration batch names it."""

    def __init__(self, wrappers: dict[str, nn.Module]):
        self.current: str | None = None
        self.last: str | None = None
        self.order: list[str] = []  # first-call order = forward order
        self.handles = []
        for name, m in wrappers.items():
            self.handles.append(m.register_forward_pre_hook(self._enter(name)))
            self.handles.append(m.register_forward_hook(self._exit(name)))

    def _enter(self, name):
        def hook(mod, args):
            self.current = name
            if name not in self.order:
                self.order.append(name)

        return hook

    def _exit(self, name):
        def hook(mod, args, out):
            self.current, self.last = None, name

        return hook

    def where(self) -> str:
        if self.current:
            return f"in layer {self.current!r}"
        return f"after layer {self.last!r}" if self.last else "before the first quantized layer"

    def remove(self):
        for h in self.handles:
            h.remove()


def guarded_pass(model: nn.Module, modules: dict[str, nn.Module], batches: list, desc: str) -> list[str]:
    """Run the calibration batches; a failing batch raises a CalibrationError naming the layer.

    Returns the names of ``modules`` in the order the forward pass first reached them."""
    tracker = _Tracker(modules)
    try:
        run_batches(model, batches, desc=desc)
        return tracker.order
    except CalibrationError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        shapes = sorted({tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__ for b in batches},
                        key=str)[:3]
        raise CalibrationError(f"calibration batch failed {tracker.where()}: {exc} (batches given: {shapes}; "
                               "they must be valid inputs of the model)") from None
    finally:
        tracker.remove()


def smoothing_stats(model: nn.Module, targets: dict[str, nn.Module], batches: list,
                    keep_rows: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per-input-channel max |x| of the Linear targets, and up to ``keep_rows`` sampled input rows per
    batch. Hooks sit on every target, so NaN/inf names the first layer it reaches and a bad batch
    names the layer where it failed."""
    stats: dict[str, torch.Tensor] = {}
    rows: dict[str, list[torch.Tensor]] = {}
    gen = torch.Generator().manual_seed(0)

    def record(name: str, x: torch.Tensor) -> None:
        if isinstance(targets[name], nn.Linear):
            x2 = x.reshape(-1, x.shape[-1]).float()  # (tokens, K)
            m = x2.abs().amax(dim=0)  # (K,)
            stats[name] = torch.maximum(stats[name], m) if name in stats else m
            if keep_rows:
                idx = torch.randperm(x2.shape[0], generator=gen)[:keep_rows]
                rows.setdefault(name, []).append(x2[idx].clone())

    with capture_inputs(targets, record):
        guarded_pass(model, targets, batches, "smoothing stats")
    return stats, {n: torch.cat(r) for n, r in rows.items()}


def smoothing_stats_ranks(model: nn.Module, targets: dict[str, nn.Module], batches: list,
                          keep_rows: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """:func:`smoothing_stats` across ranks: this rank's batches ``r, r + W, ...``, maxima all-reduced
    (exact); batch ``b``'s sampled rows drawn with a generator seeded ``b`` and gathered in batch order,
    so the result does not depend on W."""
    linears = {n: m for n, m in targets.items() if isinstance(m, nn.Linear)}
    stats: dict[str, torch.Tensor] = {}
    mine: dict[str, list[torch.Tensor]] = {n: [] for n in linears}  # per local batch: (rows, K)
    now: dict = {}

    def record(name: str, x: torch.Tensor) -> None:
        if name in linears:
            x2 = x.reshape(-1, x.shape[-1]).float()  # (tokens, K)
            m = x2.abs().amax(dim=0)  # (K,)
            stats[name] = torch.maximum(stats[name], m) if name in stats else m
            if keep_rows:
                idx = torch.randperm(x2.shape[0], generator=now["gen"])[:keep_rows]
                now["rows"].setdefault(name, []).append(x2[idx].clone())

    with capture_inputs(targets, record):
        for b in local_indices(len(batches)):
            now.update(gen=torch.Generator().manual_seed(b), rows={})
            guarded_pass(model, targets, [batches[b]], "smoothing stats")
            for n, m in linears.items():
                got = now["rows"].get(n)
                mine[n].append(torch.cat(got) if got else torch.zeros(0, m.in_features))
    rows: dict[str, torch.Tensor] = {}
    with collective_guard("static calibration (smoothing statistics)"):
        seen = all_max(torch.tensor([float(n in stats) for n in linears]))
        for k, (n, m) in enumerate(linears.items()):
            if not seen[k]:
                continue
            stats[n] = all_max(stats[n] if n in stats else torch.zeros(m.in_features))  # |x| >= 0
            if keep_rows:
                rows[n] = torch.cat(gather_batches(mine[n], len(batches)))
    return stats, rows


def calibrate_ranges_ranks(model: nn.Module, wrappers: dict[str, nn.Module], batches: list) -> list[str]:
    """The observers' calibration pass across ranks; returns the wrappers' forward order.

    Pass 1 (this rank's batches, one at a time): each quantizer sees the batch through a fresh min-max
    observer, giving that batch's per-channel ``[min, max]`` (C, 2) (``(0, 2)``: not reached). These are
    gathered in batch order; min-max / EMA / output observers replay them (exact). Histogram observers
    get the global range (``min`` / ``max`` over every batch, as their ``_observe`` computes it), then
    pass 2 fills the fixed-range histograms and the counts are summed over ranks."""
    real = {n: w.act.observer for n, w in wrappers.items()}
    mine: dict[str, list[torch.Tensor]] = {n: [] for n in wrappers}
    order: list[str] = []
    local = local_indices(len(batches))
    try:
        for b in local:
            for w in wrappers.values():
                w.act.observer = MinMaxObserver(w.act.fmt, w.act.symmetric, w.act.axis)
            reached = guarded_pass(model, wrappers, [batches[b]], "calibrating ranges")
            order = order or reached
            for n, w in wrappers.items():
                o = w.act.observer
                mine[n].append(torch.stack([o.min_val, o.max_val], dim=1) if o.n_batches else torch.zeros(0, 2))
    finally:
        for n, w in wrappers.items():
            w.act.observer = real[n]
    hist: dict[str, HistogramObserver] = {}
    with collective_guard("static calibration (activation ranges)"):
        for n in wrappers:
            seq = [t for t in gather_batches(mine[n], len(batches)) if t.numel()]  # (C, 2) per batch reached
            obs = real[n]
            if isinstance(obs, HistogramObserver):
                if seq:
                    lo_b = torch.stack([t[:, 0] for t in seq])  # (batches, C)
                    hi_b = torch.stack([t[:, 1] for t in seq])
                    if obs.symmetric:  # the histogram of |x| over [0, max |x|]
                        lo_b, hi_b = torch.zeros_like(lo_b), torch.maximum(hi_b.abs(), lo_b.abs())
                    else:
                        lo_b, hi_b = lo_b.clamp(max=0.0), hi_b.clamp(min=0.0)
                    hi_b = torch.maximum(hi_b, lo_b + RANGE_EPS)
                    obs.hist = torch.zeros(lo_b.shape[1], obs.bins)
                    obs.lo, obs.hi = lo_b.amin(dim=0), hi_b.amax(dim=0)
                    hist[n] = obs
                continue
            for t in seq:  # amin / amax of [min, max] are the batch's own: the same update as the batch
                obs._observe(t)
                obs.n_batches += 1
        if not hist:
            return order
        for n, w in wrappers.items():  # pass 2: only histograms observe; "float" passes x through as observe does
            if n not in hist:
                w.act.set_mode("float")
        for b in local:
            guarded_pass(model, wrappers, [batches[b]], "calibrating histograms")
        for n, w in wrappers.items():
            if n in hist:
                all_sum_counts(hist[n].hist)
                hist[n].n_batches = 1  # observed (every rank's counts are in)
            else:
                w.act.set_mode("observe")
    return order


def search_alpha(x: torch.Tensor, act_absmax: torch.Tensor, weight: torch.Tensor, grid, act_bits: int = 8,
                 weight_bits: int = 8) -> tuple[float, dict]:
    """The SmoothQuant strength of ``grid`` with the least ``||x W^T - fq(x / s) fq(W s)^T||^2`` on sampled
    calibration rows ``x`` (T, K); the per-tensor activation scale comes from the full-set ``act_absmax``
    (Xiao et al. 2023 pick alpha per model by hand; this picks it per layer, cf. AWQ's grid search)."""
    w = weight.detach().float()
    ref = x @ w.t()  # (T, N)
    errors = {}
    for a in grid:
        s = smoothing_factors(act_absmax, w, a)  # (K,)
        xs = x / s
        amax = (act_absmax / s).max()
        qx = qparams_from_range(-amax, amax, int_format(act_bits), True)
        ws = w * s
        qw = choose_qparams(ws, int_format(weight_bits), True, per_channel(0))
        out = fake_quantize(xs, qx) @ fake_quantize(ws, qw).t()
        errors[float(a)] = float(((out - ref) ** 2).mean())
    best = min(errors, key=errors.get)
    return best, errors


# ---------------------------------------------------------------------------------- handler


@register_handler(StaticConfig)
def _quantize_static(model: nn.Module, config: StaticConfig, calibration_data=None) -> QuantizeReport:
    start = time.perf_counter()
    report = QuantizeReport()
    batches, source = calibration_data, "user"
    if batches is None:
        batches, source = default_calibration(model), f"lowbit.data default for {getattr(model, 'model_name', '?')}"
    batches = list(batches)
    if not batches:
        raise CalibrationError("calibration data is empty: static PTQ needs at least one batch")
    distributed = ranks_active()
    if distributed:
        require_batches(len(batches), "static calibration")
    model.eval()

    if config.fold_bn:
        from lowbit.integer.bn_fold import fold_batchnorms

        pairs = fold_batchnorms(model)
        report.extra["bn_folded"] = [f"{bn} -> {layer}" for layer, bn in pairs]
        for _, bn in pairs:
            report.layers[bn] = model.get_submodule(bn).spec()

    targets = dict(select_modules(model, (nn.Linear, nn.Conv2d), config.include, config.exclude))
    for name, m in list(targets.items()):
        why = StaticQConv2d.unsupported(m) if isinstance(m, nn.Conv2d) else None
        if why:
            report.skipped[name] = why
            del targets[name]
    if not targets:
        return report

    smooth: dict[str, torch.Tensor] = {}
    linears = {n: m for n, m in targets.items() if isinstance(m, nn.Linear)}
    if config.smooth_alpha is not None and linears:
        auto = config.smooth_alpha == "auto"
        stats, rows = (smoothing_stats_ranks if distributed else smoothing_stats)(
            model, targets, batches, SAMPLE_ROWS if auto else 0)
        alphas = {}
        for n in linears:
            if n not in stats:
                continue
            alphas[n] = search_alpha(rows[n], stats[n], linears[n].weight, config.alpha_grid, config.act_bits,
                                     config.weight_bits)[0] if auto else float(config.smooth_alpha)
            smooth[n] = smoothing_factors(stats[n], linears[n].weight, alphas[n])
        report.extra["smooth_alpha"] = alphas

    opts = {"percentile": config.percentile} if config.observer == "percentile" else {}
    per_channel = config.granularity == "per_channel"
    wrappers: dict[str, nn.Module] = {}
    for name, m in targets.items():
        common = dict(weight_bits=config.weight_bits, act_bits=config.act_bits, act_symmetric=config.symmetric,
                      weight_per_channel=per_channel, observer=config.observer, name=name, observer_options=opts)
        if isinstance(m, nn.Linear):
            w = FakeQuantLinear(m, smooth=smooth.get(name), **common)
        else:
            w = FakeQuantConv2d(m, **common)
        set_submodule(model, name, w)
        wrappers[name] = w

    if distributed:
        order = calibrate_ranges_ranks(model, wrappers, batches)
    else:
        order = guarded_pass(model, wrappers, batches, "calibrating ranges")
    for name, w in wrappers.items():
        w.act.calibrate()

    if any(w.act.model_level for w in wrappers.values()):
        report.extra["output_search"] = _output_search(model, wrappers, order, batches, config)

    report.extra["act_ranges"] = {n: [float(w.act.min_val), float(w.act.max_val)] for n, w in wrappers.items()}
    report.extra["observer"] = config.observer
    report.extra["float_ops"] = "LayerNorm, softmax, GELU, residual adds and embeddings run in float"
    for name, w in wrappers.items():
        if config.real_int8:
            real = (StaticQLinear if isinstance(w, FakeQuantLinear) else StaticQConv2d).from_fake(w, config.kernel)
            set_submodule(model, name, real)
            report.layers[name] = real.spec()
        else:
            report.layers[name] = {"class": type(w).__name__, "act_bits": config.act_bits,
                                   "weight_bits": config.weight_bits, "loadable": False}
    for name, module in model.named_modules():
        for t, why in FLOAT_LAYERS.items():
            if type(module) is t and name not in report.skipped:
                report.skipped[name] = why
    model.lowbit_calibration = with_world_size(calibration_info(batches, source))
    report.extra["calibration_seconds"] = time.perf_counter() - start
    log.info("%s (%s observer): %d layers quantized, %d left in float, calibration %.1f s", config.scheme,
             config.observer, len(report.layers), len(report.skipped), report.extra["calibration_seconds"])
    return report


def _output_search(model: nn.Module, wrappers: dict[str, nn.Module], order: list[str], batches: list,
                   config: StaticConfig) -> dict:
    """Reference outputs with every quantizer off, then the per-layer greedy search of clipping ratios.

    Across ranks each rank evaluates its share of the subset's batches; the per-batch losses are
    gathered in batch order and summed as one process sums them (the same floats, the same order)."""
    subset = _subset(batches, config.output_samples)
    mine = local_indices(len(subset))
    task = getattr(model, "task", None)
    for w in wrappers.values():
        w.act.set_mode("float")
    with torch.inference_mode():
        refs = {j: model_outputs(model, subset[j]).float() for j in mine}
    for w in wrappers.values():
        w.act.set_mode("quantize")

    def loss() -> float:
        with torch.inference_mode(), collective_guard("static calibration (output search)"):
            values = [output_loss(task, refs[j], model_outputs(model, subset[j])) for j in mine]
            return sum(gather_scalars(values, len(subset))) / len(subset)

    before = loss()
    chosen = search_output_ranges([(n, wrappers[n].act) for n in order], loss, config.output_ratios)
    log.info("output-driven search: loss %.3g -> %.3g", before, loss())
    return {"loss_before": before, "loss_after": loss(), "layers": chosen}


# ---------------------------------------------------------------------------------- scheme


def _bool(v) -> bool:
    return v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes", "symmetric")


@register_scheme("w8a8-static", "int8 weights + int8 activations with calibrated static ranges (observer: "
                 "minmax|ema|percentile|mse|kl|output), BN folded, SmoothQuant for linears, torch._int_mm",
                 options=("observer", "granularity", "symmetric", "kernel", "alpha"))
def _scheme(options: dict) -> StaticConfig:
    kw = {}
    if "observer" in options:
        kw["observer"] = options["observer"]
    if "granularity" in options:
        kw["granularity"] = options["granularity"]
    if "symmetric" in options:
        kw["symmetric"] = _bool(options["symmetric"])
    if "kernel" in options:
        kw["kernel"] = options["kernel"]
    if "alpha" in options:
        a = options["alpha"]
        kw["smooth_alpha"] = None if a in (None, "none") else ("auto" if a == "auto" else float(a))
    return StaticConfig(**kw)
