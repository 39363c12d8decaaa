"""Quantization-friendliness lint (MISSION I.23): what in an architecture will quantize badly, and
what to change. Each :class:`Finding` names a place, the measured value and a concrete suggestion.

Rules (ids are stable; thresholds are named constants below):

- ``weight-range``: a weight tensor whose crest factor ``max|W| / rms(W)`` is large (a per-tensor
  grid leaves typical weights few levels), or whose output channels differ widely in range
  (``max_c absmax_c / median_c absmax_c``: per-tensor scales waste levels on the small channels).
- ``activation-range`` / ``activation-outliers`` (need calibration batches): the input of a layer
  has a large crest factor, or a few input channels carry values far above the others
  (``absmax_c > OUTLIER_RATIO * median_c absmax_c``), the LLM.int8()/SmoothQuant outlier pattern.
- ``activation-kurtosis`` (need calibration batches): the per-token kurtosis of a linear's input
  across its channels, ``E[(x - mean)^4] / var^2`` per token averaged over tokens (3 for Gaussian
  values; large when a few channels dominate every token, which is what ruins a per-token 4-bit
  grid). On a Llama-layout float model the lint also measures it after QuaRot's rotations
  (``lowbit.algorithms.rotation``) on a copy, so the report shows before / after per linear.
- ``activation-function``: SiLU/Swish, GELU, Hardswish, Mish produce a skewed, unbounded range with a
  small negative lobe (SiLU's minimum is -0.278); a symmetric grid wastes half its levels on it.
  ReLU/ReLU6 outputs are one-signed and (ReLU6) bounded.
- ``squeeze-excitation``: a global-pool -> reduce -> expand -> sigmoid gate; the gate multiplies the
  whole feature map, so its error compounds, and sigmoid saturates.
- ``deep-narrow``: many stacked layers with few channels: every layer adds quantization noise and a
  narrow layer has few weights per output to average it.
- ``large-softmax``: a softmax over many entries (vocabulary logits, long attention rows): most
  probabilities are far below a uniform 8-bit step of 1/255.
- ``residual-precision``: a residual join (an ``add``) whose two inputs come from layers of different
  precisions (found by ``torch.fx`` tracing, or between consecutive blocks of a ModuleList when the
  model cannot be traced): the sum is only as precise as the coarser input and the scales differ.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

log = logging.getLogger(__name__)

CREST_WARN = 30.0  # max/rms above this: a per-tensor int8 grid gives the typical value < ~4 levels
CHANNEL_SPREAD_WARN = 10.0  # max/median channel absmax: per-tensor scales waste > 3 bits on most channels
KURTOSIS_WARN = 10.0  # per-token kurtosis across channels (Gaussian: 3); above this a few channels set the range
OUTLIER_RATIO = 8.0  # input channel absmax vs the median channel (LLM.int8 uses |x| > 6 absolute)
NARROW_WIDTH = 16  # channels at or below this count as narrow
DEEP_LAYERS = 16  # a stack of at least this many narrow weight layers counts as deep
LARGE_SOFTMAX = 1024  # entries per softmax row above which 8-bit probabilities lose most of them
SEVERITY = ("info", "warn", "high")

SMOOTH_ACTS = {nn.SiLU: "SiLU/Swish", nn.GELU: "GELU", nn.Hardswish: "Hardswish", nn.Mish: "Mish"}


@dataclass
class Finding:
    rule: str
    severity: str  # info | warn | high
    where: str
    message: str
    suggestion: str
    value: float | None = None


@dataclass
class LintReport:
    model: str
    findings: list[Finding] = field(default_factory=list)
    stats: dict = field(default_factory=dict)

    def by_rule(self, rule: str) -> list[Finding]:
        return [f for f in self.findings if f.rule == rule]

    def to_json(self) -> dict:
        return {"model": self.model, "findings": [asdict(f) for f in self.findings], "stats": self.stats}


def _precision(m: nn.Module) -> str | None:
    """A layer's precision label, or None for modules that hold no weights."""
    from lowbit.nn import DynamicQLinear, WeightOnlyQLinear

    if isinstance(m, WeightOnlyQLinear):
        return m.fmt
    if isinstance(m, DynamicQLinear):
        return "w8a8"
    if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
        return str(m.weight.dtype).replace("torch.", "")
    return None


# ------------------------------------------------------------------------------ weights

def _weight_findings(model: nn.Module) -> list[Finding]:
    out = []
    for name, m in model.named_modules():
        if not isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            continue
        w = m.weight.detach().float().reshape(m.weight.shape[0], -1)  # (out, in*k*k)
        if w.numel() < 16:
            continue
        crest = float(w.abs().max() / w.pow(2).mean().sqrt().clamp_min(1e-12))
        ch = w.abs().amax(dim=1)  # (out,)
        spread = float(ch.max() / ch.median().clamp_min(1e-12))
        if crest > CREST_WARN:
            out.append(Finding("weight-range", "warn", name,
                               f"weight crest factor max|W|/rms(W) = {crest:.0f}: a per-tensor grid gives typical "
                               f"weights only ~{127 / crest:.1f} int8 levels",
                               "quantize weights per channel or per group (--granularity per_channel / "
                               "--group-size 64), or clip outliers with an MSE observer", crest))
        if spread > CHANNEL_SPREAD_WARN:
            out.append(Finding("weight-range", "warn", name,
                               f"output channels differ {spread:.0f}x in range (max/median channel absmax)",
                               "use per-channel weight scales; per-tensor scales waste levels on the small channels",
                               spread))
    return out


# ------------------------------------------------------------------------------ activations

def _activation_findings(model: nn.Module, batches: list) -> tuple[list[Finding], dict]:
    from lowbit.algorithms._calib import capture_inputs, run_batches

    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv1d))}
    stats: dict[str, dict] = {}

    def record(name, x):
        x = x.float()
        if isinstance(layers[name], (nn.Conv2d, nn.Conv1d)):
            x = x.transpose(1, -1)  # channels last
        x = x.reshape(-1, x.shape[-1])  # (rows, channels)
        s = stats.setdefault(name, {"absmax": torch.zeros(x.shape[-1]), "sumsq": 0.0, "n": 0, "kurt": 0.0, "rows": 0})
        s["absmax"] = torch.maximum(s["absmax"], x.abs().amax(dim=0))
        s["sumsq"] += float(x.pow(2).sum())
        s["n"] += x.numel()
        s["kurt"] += float(token_kurtosis(x).sum())
        s["rows"] += x.shape[0]

    with capture_inputs(layers, record):
        run_batches(model, batches, desc="lint")
    out, summary = [], {}
    for name, s in stats.items():
        absmax = s["absmax"]
        rms = (s["sumsq"] / max(s["n"], 1)) ** 0.5
        crest = float(absmax.max()) / max(rms, 1e-12)
        med = float(absmax.median().clamp_min(1e-12))
        outliers = (absmax > OUTLIER_RATIO * med).nonzero().flatten().tolist()
        summary[name] = {"absmax": float(absmax.max()), "rms": rms, "crest": crest, "outlier_channels": outliers[:16],
                         "n_outlier_channels": len(outliers), "kurtosis": s["kurt"] / max(s["rows"], 1)}
        if outliers:
            ratio = float(absmax.max()) / med
            sev = "high" if ratio > 4 * OUTLIER_RATIO else "warn"
            out.append(Finding("activation-outliers", sev, name,
                               f"{len(outliers)} of {absmax.numel()} input channels exceed {OUTLIER_RATIO:.0f}x the "
                               f"median channel range (worst {ratio:.0f}x; channels {outliers[:8]})",
                               "migrate the outliers into the weights with SmoothQuant (--scheme w8a8-dynamic "
                               "--alpha 0.5-0.8), use per-token activation scales, or keep this layer's "
                               "activations in 8-bit/float", ratio))
        elif crest > CREST_WARN:
            out.append(Finding("activation-range", "warn", name,
                               f"input crest factor max/rms = {crest:.0f}: a per-tensor activation grid gives "
                               f"typical values ~{127 / crest:.1f} int8 levels",
                               "use per-token (dynamic) activation scales or a percentile/MSE observer that "
                               "clips the rare extremes", crest))
    return out, summary


def token_kurtosis(x: torch.Tensor) -> torch.Tensor:
    """Kurtosis of each row of ``x`` (rows, channels) across its channels: ``E[(x - mu)^4] / var^2``."""
    c = x - x.mean(dim=-1, keepdim=True)
    var = c.pow(2).mean(dim=-1)
    return c.pow(4).mean(dim=-1) / var.pow(2).clamp_min(1e-30)


def kurtosis_report(model: nn.Module, batches: list, before: dict | None = None) -> dict[str, dict]:
    """``{linear: {"before": k, "after": k_rotated}}``: per-token input kurtosis of every linear of
    ``model`` and, when it is a float Llama-layout causal LM, of a copy rotated by QuaRot's Hadamard
    folds (``after`` is None where no rotation applies). ``before``: this model's activation summary
    if already measured (``lint`` passes its own)."""
    import copy

    from lowbit.errors import ConfigError

    if before is None:
        _, before = _activation_findings(model, batches)
    rotated = None
    if getattr(model, "task", None) == "causal-lm" and not getattr(model, "lowbit_rotation", None):
        from lowbit.algorithms.rotation import rotate_model

        twin = copy.deepcopy(model)
        try:
            rotate_model(twin)
        except ConfigError as why:
            log.info("kurtosis after rotation not measured: %s", why)
        else:
            _, rotated = _activation_findings(twin, batches)
        del twin
    rotated = rotated or {}
    return {n: {"before": s["kurtosis"], "after": rotated.get(n, {}).get("kurtosis")} for n, s in before.items()}


def kurtosis_by_kind(kurt: dict[str, dict]) -> dict[str, dict]:
    """:func:`kurtosis_report` summarised per linear name (``q_proj``, ``down_proj``, ...): count,
    median and max over the blocks, before and after (None where not measured)."""
    import statistics

    kinds: dict[str, list] = {}
    for name, v in kurt.items():
        kinds.setdefault(name.rsplit(".", 1)[-1], []).append(v)
    out = {}
    for kind, vs in kinds.items():
        b = [v["before"] for v in vs]
        a = [v["after"] for v in vs if v["after"] is not None]
        out[kind] = {"n": len(vs), "median_before": statistics.median(b), "max_before": max(b),
                     "median_after": statistics.median(a) if a else None, "max_after": max(a) if a else None}
    return out


def _kurtosis_findings(kurt: dict[str, dict]) -> list[Finding]:
    out = []
    for name, k in kurt.items():
        if k["before"] > KURTOSIS_WARN:
            after = "" if k["after"] is None else f"; {k['after']:.1f} after QuaRot's Hadamard rotation"
            out.append(Finding("activation-kurtosis", "warn", name,
                               f"input kurtosis across channels {k['before']:.0f} per token (Gaussian: 3){after}",
                               "rotate before 4-bit activations (--rotate on w4a4 / w4a8: Hadamard folded into the "
                               "weights) or keep this input at 8 bits", k["before"]))
    return out


# ------------------------------------------------------------------------------ structure

def _activation_function_findings(model: nn.Module) -> list[Finding]:
    out, seen_cfg = [], False
    for name, m in model.named_modules():
        for t, label in SMOOTH_ACTS.items():
            if isinstance(m, t):
                out.append(Finding("activation-function", "warn", name or "model",
                                   f"{label} output range is skewed and unbounded (negative lobe down to about "
                                   f"-0.28 for SiLU, -0.17 for GELU): a symmetric grid wastes about half its levels",
                                   "quantize this activation with an affine (asymmetric) grid, keep the MLP's "
                                   "intermediate activations in 8-bit, or use ReLU/ReLU6 when training from scratch"))
        cfg = getattr(m, "config", None)
        act = getattr(cfg, "hidden_act", None)
        if isinstance(act, str) and not seen_cfg and not any(isinstance(x, tuple(SMOOTH_ACTS)) for x in model.modules()):
            seen_cfg = True
            if act.lower() in ("silu", "swish", "gelu", "gelu_new", "gelu_pytorch_tanh", "mish", "hardswish"):
                out.append(Finding("activation-function", "warn", name or "model",
                                   f"hidden activation {act!r} (applied functionally in every MLP) has a skewed, "
                                   "unbounded range with a negative lobe",
                                   "quantize the MLP's intermediate activations with an affine grid or per token "
                                   "(w8a8-dynamic does), or keep them in 8-bit"))
    return out


def _se_findings(model: nn.Module) -> list[Finding]:
    out = []
    for name, m in model.named_modules():
        kids = list(m.children())
        has_pool = any(isinstance(k, (nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool1d)) for k in kids)
        has_gate = any(isinstance(k, (nn.Sigmoid, nn.Hardsigmoid)) for k in kids)
        weights = [k for k in kids if isinstance(k, (nn.Conv2d, nn.Linear))]
        if has_pool and has_gate and len(weights) >= 2:
            out.append(Finding("squeeze-excitation", "warn", name or "model",
                               "squeeze-and-excitation gate (global pool -> reduce -> expand -> sigmoid) scales "
                               "every channel of the feature map: its quantization error multiplies the whole map",
                               "keep the SE reduce/expand layers and the gate in 8-bit or float, use a hard-sigmoid "
                               "gate (piecewise linear, as in MobileNetV3), or fold the gate into the next conv"))
    return out


def _deep_narrow_findings(model: nn.Module) -> list[Finding]:
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv1d))]
    def width(m):
        return min(m.in_features, m.out_features) if isinstance(m, nn.Linear) else min(m.in_channels, m.out_channels)
    narrow = [n for n, m in layers if width(m) <= NARROW_WIDTH]
    if len(narrow) >= DEEP_LAYERS:
        return [Finding("deep-narrow", "warn", f"{narrow[0]} .. {narrow[-1]}",
                        f"{len(narrow)} of {len(layers)} weight layers have <= {NARROW_WIDTH} channels: noise added "
                        "by every layer accumulates over depth and narrow layers have few weights to average it",
                        "keep narrow layers at 8 bits (mixed precision: --scheme mixed), use per-channel scales, "
                        "or trade depth for width (fewer, wider layers)", float(len(narrow)))]
    return []


def _softmax_findings(model: nn.Module) -> list[Finding]:
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and m.out_features >= LARGE_SOFTMAX and m.out_features >= 8 * m.in_features:
            out.append(Finding("large-softmax", "warn", name,
                               f"output layer of {m.out_features} classes feeds a softmax: probabilities ~1/"
                               f"{m.out_features} are far below an 8-bit step (1/255)",
                               "keep this layer and the logits in float or 8-bit per-channel weights; never "
                               "quantize the probabilities uniformly (use log-domain / float)", float(m.out_features)))
        cfg = getattr(m, "config", None)
        pos = getattr(cfg, "max_position_embeddings", None)
        if isinstance(pos, int) and pos >= LARGE_SOFTMAX and getattr(cfg, "num_attention_heads", None) and \
                not any(f.rule == "large-softmax" and "attention" in f.message for f in out):
            out.append(Finding("large-softmax", "info", name or "model",
                               f"attention softmax over up to {pos} positions: long rows make most attention "
                               f"probabilities smaller than an 8-bit step",
                               "keep attention softmax in float (lowbit does), or quantize probabilities with a "
                               "log2 grid if an integer-only path is needed", float(pos)))
        if isinstance(m, nn.Softmax):
            out.append(Finding("large-softmax", "info", name, "explicit softmax module",
                               "keep its output in float or quantize with a log2 grid"))
    return out


def _residual_findings(model: nn.Module) -> list[Finding]:
    """Adds whose operands come from layers of different precisions (fx), else block-to-block changes."""
    out = []
    class _Tracer(torch.fx.Tracer):  # weight layers (quantized ones too) are leaves of the graph
        def is_leaf_module(self, m, qualname):
            return _precision(m) is not None or super().is_leaf_module(m, qualname)

    try:
        gm = torch.fx.GraphModule(model, _Tracer().trace(model))
    except Exception:  # HF models and anything data-dependent: fall back to the block heuristic
        gm = None
    if gm is not None:
        mods = dict(gm.named_modules())

        def source(node, depth=0):
            """Precision of the nearest weight layer producing ``node`` (through elementwise ops)."""
            if depth > 20 or not isinstance(node, torch.fx.Node):
                return None, None
            if node.op == "call_module" and _precision(mods[node.target]) is not None:
                return node.target, _precision(mods[node.target])
            for a in node.args:
                got = source(a, depth + 1)
                if got[1] is not None:
                    return got
            return None, None

        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target in (operator.add, torch.add) and len(node.args) == 2:
                (na, pa), (nb, pb) = source(node.args[0]), source(node.args[1])
                if pa and pb and pa != pb:
                    out.append(Finding("residual-precision", "warn", f"{na} + {nb}",
                                       f"residual join adds a {pa} path ({na}) to a {pb} path ({nb})",
                                       "give both branches of the join the same precision, or requantize both to "
                                       "one scale (keep the add and the residual stream in float/int32)"))
        return out
    for name, m in model.named_modules():
        if not isinstance(m, nn.ModuleList) or len(m) < 2:
            continue
        ends = []
        for i, block in enumerate(m):
            last = [(n, _precision(x)) for n, x in block.named_modules() if _precision(x) is not None]
            if last:
                ends.append((f"{name}.{i}.{last[-1][0]}", last[-1][1]))
        for (na, pa), (nb, pb) in zip(ends, ends[1:]):
            if pa != pb:
                out.append(Finding("residual-precision", "warn", f"{na} -> {nb}",
                                   f"the residual stream written by {na} ({pa}) is joined with a branch ending in "
                                   f"{nb} ({pb})",
                                   "keep the residual adds in float and give the layers writing the residual "
                                   "stream one precision (e.g. all o_proj/down_proj at 8-bit)"))
    return out


# ------------------------------------------------------------------------------ entry point

def lint(model: nn.Module, batches: list | None = None) -> LintReport:
    """All rules on ``model``; activation rules run when ``batches`` (calibration data) are given."""
    report = LintReport(getattr(model, "model_name", type(model).__name__))
    report.findings += _weight_findings(model)
    if batches:
        with torch.inference_mode():
            found, summary = _activation_findings(model, batches)
        report.findings += found
        report.stats["activations"] = summary
        with torch.no_grad():
            kurt = kurtosis_report(model, batches, before=summary)
        report.stats["kurtosis"] = kurt
        report.findings += _kurtosis_findings(kurt)
    report.findings += _activation_function_findings(model)
    report.findings += _se_findings(model)
    report.findings += _deep_narrow_findings(model)
    report.findings += _softmax_findings(model)
    report.findings += _residual_findings(model)
    order = {s: i for i, s in enumerate(reversed(SEVERITY))}
    report.findings.sort(key=lambda f: (order[f.severity], f.rule))
    return report


__all__ = ["lint", "LintReport", "Finding", "kurtosis_report", "kurtosis_by_kind", "token_kurtosis"]
