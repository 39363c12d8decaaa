"""Per-layer sensitivity (MISSION E.15): how much the model's output moves when ONE unit (a linear
layer, or a group of them) alone is quantized at each precision choice, everything else in fp32.

Measured on calibration data (disjoint from evaluation data), per unit and choice:

- ``drift``: the output error the allocator minimises; encoders ``mean(1 - cos(e_q, e_fp32))`` of
  sentence embeddings, causal LMs and classifiers ``mean KL(p_fp32 || p_q)`` of the output
  distributions (per token / per image);
- ``sqnr_db``: ``10 log10(sum y^2 / sum (y - y_q)^2)`` of the final outputs (embeddings / logits);
- ``loss_delta``: task loss of the quantized model minus fp32's: next-token NLL (LM), cross-entropy
  on labels (classifier); an encoder has no labels, so its loss is the distillation loss ``1 - cos``
  and ``loss_delta == drift``;
- ``weight_sse``: ``||Q(W) - W||^2`` over the unit's weights;
- ``hawq``: ``Tr(H) / n * ||Q(W) - W||^2``, the HAWQ-v2/v3 score (Dong et al., 2019/2020), with the
  Hessian trace of the unit's weights from Hutchinson's estimator ``Tr(H) ≈ mean_v v^T H v`` over
  Rademacher vectors ``v``, ``Hv`` by double back-propagation (``hessian_trace``; per unit, not per
  choice). The loss for the Hessian is the task loss (LM NLL, classifier CE) or, for encoders, the
  squared embedding distance to fp32, whose Hessian at the fp32 weights is the Gauss-Newton ``2 J^T J``.

Grouping (``group_by``): ``"layer"`` (every linear is a unit), ``"parent"`` (siblings under one
module: a Llama block's q/k/v/o, its gate/up/down), or ``"block"`` (everything under one numbered
block, ``...layers.7``). SmolLM2 at ``"parent"`` is 60 units, 4x fewer forwards than per layer.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from rich.progress import Progress
from torch import nn

from lowbit.api import set_submodule
from lowbit.errors import CalibrationError, ConfigError
from lowbit.mixed.profile import CHOICES, get_choice, layer_bytes, linear_layers

log = logging.getLogger(__name__)

SENSITIVITY_VERSION = 1
GROUP_BY = ("layer", "parent", "block")
DEFAULT_CHOICES = ("w2", "w3", "w4", "w8", "w8a8")  # fp32 has zero drift by definition
DRIFT_METRIC = {"encoder": "1 - cos(embedding)", "causal-lm": "KL(next token)", "classifier": "KL(class)"}


def group_units(names: list[str], group_by: str = "layer") -> dict[str, list[str]]:
    """Unit name -> member layer names (execution order kept)."""
    if group_by not in GROUP_BY:
        raise ConfigError(f"group_by must be one of {GROUP_BY}, got {group_by!r}")
    units: dict[str, list[str]] = {}
    for n in names:
        if group_by == "layer":
            key = n
        elif group_by == "parent":
            key = n.rpartition(".")[0] or n
        else:
            m = re.match(r"(.*?\.\d+)(\.|$)", n)
            key = m.group(1) if m else n
        units.setdefault(key, []).append(n)
    return units


# ------------------------------------------------------------------------------ the probe

class OutputProbe:
    """Runs fixed calibration batches and compares the outputs with the fp32 ones recorded first."""

    def __init__(self, model: nn.Module, batches: list, labels: list | None = None, max_tokens: int | None = None):
        self.model, self.task = model, getattr(model, "task", None)
        if self.task not in DRIFT_METRIC:
            raise ConfigError(f"sensitivity supports tasks {', '.join(DRIFT_METRIC)}; model has task {self.task!r}")
        if not batches:
            raise CalibrationError("sensitivity needs at least one calibration batch")
        self.inputs = [self._prepare(b, max_tokens) for b in batches]
        self.labels = labels
        with torch.inference_mode():
            self.ref = [self._run(x) for x in self.inputs]
        self.ref_loss = self._loss(self.ref)

    def _prepare(self, batch, max_tokens):
        if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], str):
            f = self.model.tokenize(list(batch))
            return {"input_ids": f["input_ids"], "attention_mask": f["attention_mask"],
                    "token_type_ids": f.get("token_type_ids")}
        if isinstance(batch, torch.Tensor):
            return batch[..., :max_tokens] if (max_tokens and self.task == "causal-lm") else batch
        if isinstance(batch, dict):
            return batch
        raise CalibrationError(f"unsupported calibration batch of type {type(batch).__name__}")

    def _run(self, x):
        out = self.model(**x) if isinstance(x, dict) else self.model(x)
        if self.task == "causal-lm":
            return torch.log_softmax(out[0, :-1].float(), dim=-1)  # (T-1, V) log-probs
        if self.task == "classifier":
            return torch.log_softmax(out.float(), dim=-1)  # (N, C)
        return out.float()  # (B, D) unit-norm embeddings

    def _loss(self, outs) -> float | None:
        if self.task == "causal-lm":
            nll = sum(float(-o.gather(1, x[0, 1:, None]).sum()) for o, x in zip(outs, self.inputs))
            return nll / sum(x.shape[-1] - 1 for x in self.inputs)
        if self.task == "classifier" and self.labels is not None:
            return float(sum(float(F.nll_loss(o, y, reduction="sum")) for o, y in zip(outs, self.labels))
                         / sum(len(y) for y in self.labels))
        return None

    def compare(self) -> dict:
        """Run the (partly quantized) model and measure drift, SQNR and loss delta against fp32."""
        with torch.inference_mode():
            outs = [self._run(x) for x in self.inputs]
        if self.task == "encoder":
            drift = float(torch.cat([1 - F.cosine_similarity(o, r, dim=1) for o, r in zip(outs, self.ref)]).mean())
        else:  # mean KL(p_ref || p_q) per row (token / image)
            kl = sum(float((r.exp() * (r - o)).sum()) for o, r in zip(outs, self.ref))
            drift = kl / sum(r.shape[0] for r in self.ref)
        if self.task == "encoder":
            sig = sum(float((r.double() ** 2).sum()) for r in self.ref)
            noise = sum(float(((r.double() - o.double()) ** 2).sum()) for o, r in zip(outs, self.ref))
        else:  # SQNR of the logits, up to the softmax shift: compare centred log-probs
            sig = sum(float(((r - r.mean(-1, keepdim=True)).double() ** 2).sum()) for r in self.ref)
            noise = sum(float((((r - r.mean(-1, keepdim=True)) - (o - o.mean(-1, keepdim=True))).double() ** 2).sum())
                        for o, r in zip(outs, self.ref))
        loss = self._loss(outs)
        return {
            "drift": max(drift, 0.0),
            "sqnr_db": math.inf if noise == 0 else 10 * math.log10(sig / noise),
            "loss_delta": drift if self.task == "encoder" else (None if loss is None else loss - self.ref_loss),
        }

    # ---- Hessian trace (Hutchinson) ----------------------------------------------------------
    def grad_loss(self, x, ref, labels=None) -> torch.Tensor:
        """The differentiable loss the Hessian is taken of (see the module docstring)."""
        out = self.model(**x) if isinstance(x, dict) else self.model(x)
        if self.task == "causal-lm":
            return F.cross_entropy(out[0, :-1].float(), x[0, 1:])
        if self.task == "classifier":
            return F.cross_entropy(out.float(), labels) if labels is not None else \
                F.kl_div(torch.log_softmax(out.float(), -1), ref, log_target=True, reduction="batchmean")
        return ((out.float() - ref) ** 2).sum(dim=1).mean()


def hutchinson_traces(probe: OutputProbe, weights: dict[str, torch.Tensor], samples: int = 4,
                      seed: int = 0, blockwise: bool | None = None) -> dict[str, float]:
    """``Tr(H_w)`` per weight tensor: mean over Rademacher ``v`` of ``v^T (H v)`` on the first batch.

    ``blockwise`` puts ``v`` on one tensor at a time (one Hessian-vector product per tensor and sample:
    the estimate has no cross-layer terms, and is >= 0 wherever ``H_ww`` is PSD); otherwise one product
    per sample serves all tensors (unbiased, noisier). Default: blockwise for at most 64 tensors.
    Attention runs on the math SDPA backend here (the fused CPU kernels have no double backward).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gen = torch.Generator().manual_seed(seed)
    names = list(weights)
    params = [weights[n] for n in names]
    blockwise = len(params) <= 64 if blockwise is None else blockwise
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    x, ref = probe.inputs[0], probe.ref[0]
    labels = probe.labels[0] if probe.labels else None
    acc = {n: 0.0 for n in names}
    try:
        with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
            loss = probe.grad_loss(x, ref, labels)
            grads = torch.autograd.grad(loss, params, create_graph=True)
            for _ in range(samples):
                vs = [torch.randint(0, 2, p.shape, generator=gen).float() * 2 - 1 for p in params]
                if blockwise:
                    for n, p, g, v in zip(names, params, grads, vs):
                        (hv,) = torch.autograd.grad(g, p, grad_outputs=v, retain_graph=True)
                        acc[n] += float((v * hv).sum()) / samples
                else:
                    hv = torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=True)
                    for n, v, h in zip(names, vs, hv):
                        acc[n] += float((v * h).sum()) / samples
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
    return acc


# ------------------------------------------------------------------------------ the report

@dataclass
class SensitivityReport:
    model: str
    task: str
    metric: str
    group_by: str
    choices: list[str]
    units: dict[str, dict] = field(default_factory=dict)  # unit -> {layers, params, shapes, hessian_trace, choices}
    calibration: dict = field(default_factory=dict)
    version: int = SENSITIVITY_VERSION

    def to_json(self) -> dict:
        d = dict(self.__dict__)
        return {k: (_finite(v) if k == "units" else v) for k, v in d.items()}

    @classmethod
    def from_json(cls, d: dict) -> "SensitivityReport":
        if not isinstance(d, dict) or d.get("version") != SENSITIVITY_VERSION:
            raise ConfigError(f"not a lowbit sensitivity report of version {SENSITIVITY_VERSION}")
        return cls(**{k: d[k] for k in ("model", "task", "metric", "group_by", "choices", "units", "calibration",
                                        "version")})

    def ranked(self, choice: str, key: str = "drift") -> list[tuple[str, dict]]:
        """Units sorted from most to least sensitive at ``choice``."""
        if choice not in self.choices:
            raise ConfigError(f"no sensitivity measured at {choice!r}; measured: {', '.join(self.choices)}")
        return sorted(self.units.items(), key=lambda kv: -(kv[1]["choices"][choice].get(key) or 0.0))


def _finite(obj):
    """JSON-safe copy: inf/nan floats become strings."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj


def _default_batches(model: nn.Module, n: int | None):
    from lowbit.algorithms._calib import default_calibration

    batches = default_calibration(model, n)
    labels = None
    if getattr(model, "task", None) == "classifier":
        from lowbit.models.digits import digits_data

        y = digits_data()[1][: sum(len(b) for b in batches)]
        labels = list(y.split([len(b) for b in batches]))
    return batches, labels


def measure_sensitivity(
    model: nn.Module,
    batches: list | None = None,
    *,
    choices: tuple[str, ...] = DEFAULT_CHOICES,
    group_by: str = "layer",
    include=("*",),
    exclude=(),
    labels: list | None = None,
    n_calib: int | None = None,
    max_tokens: int | None = None,
    hessian_samples: int = 2,
    progress: bool = True,
) -> SensitivityReport:
    """Quantize each unit alone at each choice, measure the output against fp32, restore it.

    ``batches`` default to the model's built-in calibration set (``n_calib`` samples); LM windows
    are cut to ``max_tokens``. ``hessian_samples=0`` skips the Hessian trace.
    """
    from lowbit.algorithms._calib import calibration_info

    for c in choices:
        get_choice(c)
    source = "user"
    if batches is None:
        batches, labels = _default_batches(model, n_calib)
        source = f"lowbit.data default for {getattr(model, 'model_name', '?')}"
    batches = list(batches)
    layers = linear_layers(model, include, exclude)
    if not layers:
        raise ConfigError("no nn.Linear layer to measure (include/exclude matched nothing)")
    units = group_units(list(layers), group_by)
    was_training = model.training
    model.eval()
    probe = OutputProbe(model, batches, labels, max_tokens)
    traces = {}
    if hessian_samples > 0:
        try:
            traces = hutchinson_traces(probe, {n: m.weight for n, m in layers.items()}, hessian_samples)
        except RuntimeError as exc:  # e.g. an op without double backward
            log.warning("Hessian trace skipped: %s", exc)
    report = SensitivityReport(getattr(model, "model_name", type(model).__name__), probe.task,
                               DRIFT_METRIC[probe.task], group_by, list(choices),
                               calibration={**calibration_info(batches, source), "max_tokens": max_tokens})
    work = [(u, c) for u in units for c in choices]
    with Progress(transient=True, disable=not progress or len(work) < 8) as bar:
        task = bar.add_task("sensitivity", total=len(work))
        for u, members in units.items():
            n_params = sum(layers[n].weight.numel() for n in members)
            tr = sum(traces.get(n, 0.0) for n in members) if traces else None
            entry = {"layers": members, "params": n_params,
                     "shapes": [[layers[n].in_features, layers[n].out_features] for n in members],
                     "hessian_trace": tr, "choices": {}}
            for c in choices:
                ch = get_choice(c)
                if not all(ch.fits(layers[n].in_features, layers[n].out_features) for n in members):
                    entry["choices"][c] = {"allowed": False}
                    bar.advance(task)
                    continue
                sse = 0.0
                try:
                    for n in members:
                        q = ch.build(layers[n])
                        sse += float(((q.dequantized_weight() - layers[n].weight.detach()) ** 2).sum())
                        set_submodule(model, n, q)
                    row = probe.compare()
                finally:
                    for n in members:
                        set_submodule(model, n, layers[n])
                row.update(allowed=True, weight_sse=sse,
                           hawq=None if tr is None else tr / n_params * sse,
                           bytes=sum(layer_bytes(layers[n].in_features, layers[n].out_features,
                                                 layers[n].bias is not None, c) for n in members))
                entry["choices"][c] = row
                bar.advance(task)
            report.units[u] = entry
            log.debug("%s: %s", u, {c: round(v.get("drift", 0), 6) for c, v in entry["choices"].items() if v.get("allowed")})
    model.train(was_training)
    return report


def cached_sensitivity(model: nn.Module, **kwargs) -> SensitivityReport:
    """:func:`measure_sensitivity` on the built-in calibration set, cached as JSON in the lowbit cache."""
    import json

    import lowbit
    from lowbit.models._cache import atomic_write_file, cache_dir, recipe_key

    recipe = {k: v for k, v in kwargs.items() if k != "progress"}
    if tuple(recipe.get("include", ("*",))) == ("*",) and not tuple(recipe.get("exclude", ())):
        recipe.pop("include", None)  # defaults do not change the result: keep one cache entry
        recipe.pop("exclude", None)
    if getattr(model, "task", None) != "causal-lm" or recipe.get("max_tokens") is None:
        recipe.pop("max_tokens", None)
        kwargs.pop("max_tokens", None)
    recipe = {k: list(v) if isinstance(v, tuple) else v for k, v in recipe.items()}
    key = recipe_key({"model": getattr(model, "model_name", None), "lowbit": lowbit.__version__,
                      "torch": torch.__version__, "v": SENSITIVITY_VERSION, **recipe})
    path = cache_dir() / f"sensitivity-{getattr(model, 'model_name', 'model')}-{key}.json"
    if path.is_file():
        try:
            return SensitivityReport.from_json(json.loads(path.read_text()))
        except (ValueError, ConfigError, KeyError, TypeError) as exc:
            log.warning("cached sensitivity %s unreadable (%s); measuring again", path, exc)
    report = measure_sensitivity(model, **kwargs)
    atomic_write_file(path, lambda tmp: tmp.write_text(json.dumps(report.to_json())))
    log.info("sensitivity cached at %s", path)
    return report


__all__ = ["measure_sensitivity", "cached_sensitivity", "SensitivityReport", "group_units", "hutchinson_traces",
           "OutputProbe", "CHOICES", "DEFAULT_CHOICES", "GROUP_BY"]
