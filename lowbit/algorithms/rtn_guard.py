"""The RTN-fallback guard for layer-local weight-only methods (HQQ, SINQ): per decoder linear, keep the
method's module or round-to-nearest's, whichever has the lower output error on calibration windows.

A weight-only objective (HQQ's ``l_p`` fit, SINQ's balanced spreads) cannot see which input columns carry
large activations, so a linear can come out with a lower weight error than RTN and a higher output error:
on SmolLM2 SINQ W4 sym is worse than RTN on 43-47 of 210 linears, mostly ``k_proj`` / ``q_proj``
(bench/results/layer_vs_rtn.md), although better on every decoder block. The guard judges each linear by

    err(M) = sum_b || X_b W^T - M(X_b) ||^2

over ``windows`` calibration windows (``X_b``: the linear's inputs with the layers before it quantized and
its own layer float, as GPTQ's guard and Hessians; ``W``: the float weight), and keeps RTN's module (same
bits, group and symmetry) where its error is strictly lower. Nothing is fitted to the windows: they only
choose between two candidates per linear. ``q_proj`` and ``k_proj`` are judged as a pair (stop 38): their errors
meet in one product, ``softmax(q k^T)``, so a per-linear choice can mix a fitted ``q`` with RTN's ``k`` and err more
than either (HQQ W4 sym on SmolLM2: held-out calibration KL 0.549 unguarded, 0.676 with per-linear choices). Each of
the four combinations is scored by the attention's output error with ``v`` / ``o`` float,

    err(Mq, Mk) = sum_b || Attn(X_b) - Attn_{Mq, Mk}(X_b) ||^2,

and the lowest kept (ties to the method). Needs a causal LM whose family :mod:`lowbit.models.adapters`
knows (the decoder runs layer by layer) and calibration text (the built-in mix by default); the choice is
recorded in ``metadata.json`` (``calibration.guard``)."""

from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import nn

from lowbit.algorithms._calib import calibration_info
from lowbit.algorithms._llm import layer_linears, layer_prefix
from lowbit.algorithms.sequential import process_layerwise, run_layer

log = logging.getLogger(__name__)

# Four 512-token windows (2048 tokens) as GPTQ's guard: more than the widest input (1536) of SmolLM2.
DEFAULT_GUARD_WINDOWS = 4
QK_PAIR = ("self_attn.q_proj", "self_attn.k_proj")  # judged together, on the attention's output (module doc)

Build = Callable[[str, nn.Linear], "tuple[nn.Module, dict]"]


def output_errors(linear: nn.Linear, modules, xs: list[torch.Tensor], targets: list[torch.Tensor] | None = None
                  ) -> list[float]:
    """``sum_b ||T_b W^T - M(X_b)||^2`` over held-out windows for each module ``M`` of ``modules``: ``X_b`` the
    linear's inputs through the quantized model, ``T_b`` the inputs the error is measured against (``targets``;
    ``X_b`` itself by default, as for GPTQ and this guard; the float model's for GPTAQ), ``W`` / bias the float
    linear's, its outputs computed once. The bias cancels."""
    errs = [0.0] * len(modules)
    with torch.inference_mode():
        for x, t in zip(xs, xs if targets is None else targets):
            y = torch.nn.functional.linear(t.float(), linear.weight.float(), linear.bias)
            for j, module in enumerate(modules):
                errs[j] += float(((y - module(x).float()).double() ** 2).sum())
    return errs


def held_out_error(linear: nn.Linear, module: nn.Module, xs: list[torch.Tensor], targets: list[torch.Tensor]) -> float:
    """:func:`output_errors` of one module."""
    return output_errors(linear, (module,), xs, targets)[0]


def guarded_decoder(model: nn.Module, windows: list[torch.Tensor], source: str, build: Build,
                    rtn: Callable[[str, nn.Linear], nn.Module], selected: Callable[[str], bool], report, stats: dict,
                    desc: str) -> dict:
    """Quantize every ``selected`` decoder linear of ``model`` in place with ``build(name, linear) -> (module,
    stats)``, falling back to ``rtn(name, linear)`` per linear where RTN's error on ``windows`` is lower
    (module doc). Fills ``report.layers`` / ``stats`` (``stats[name]["guard"]``: both errors; ``["fallback"] =
    "rtn"``) and returns the guard's record for metadata.json."""
    prefix = layer_prefix(model)

    def process(i: int, layer: nn.Module, hidden: list[torch.Tensor], kwargs: dict) -> None:
        linears = {n: m for n, m in layer_linears(layer).items() if selected(f"{prefix}.{i}.{n}")}
        pair = all(n in linears for n in QK_PAIR) and isinstance(getattr(layer, "self_attn", None), nn.Module)
        inputs: dict[str, list[torch.Tensor]] = {n: [] for n in linears if not (pair and n in QK_PAIR)}
        hooks = [linears[n].register_forward_pre_hook(lambda mod, args, n=n: inputs[n].append(args[0].detach()))
                 for n in inputs]
        calls: list[tuple[tuple, dict, torch.Tensor]] = []  # the attention's (args, kwargs, float output) per window
        if pair:
            hooks.append(layer.self_attn.register_forward_hook(
                lambda mod, args, kw, out: calls.append((args, kw, _first(out))), with_kwargs=True))
        try:
            run_layer(layer, hidden, kwargs, i, keep=False)  # the float layer, on the quantized stream
        finally:
            for h in hooks:
                h.remove()
        candidates = {n: (*build(f"{prefix}.{i}.{n}", m), rtn(f"{prefix}.{i}.{n}", m)) for n, m in linears.items()}
        errors = {}  # n -> (method_error, rtn_error), the other candidate of a pair at its partner's choice
        if pair:
            errors.update(_pair_choice(layer.self_attn, {n: (candidates[n][0], candidates[n][2]) for n in QK_PAIR},
                                       calls))
        for n, m in linears.items():
            name = f"{prefix}.{i}.{n}"
            new, st, alt = candidates[n]
            method_error, rtn_error = errors[n] if n in errors else output_errors(m, (new, alt), inputs[n])
            st["guard"] = {"method_error": method_error, "rtn_error": rtn_error}
            if n in errors:
                st["guard"]["measure"] = "attention output, with the other of q_proj / k_proj at its choice"
            if st["guard"]["rtn_error"] < st["guard"]["method_error"]:
                new, st["fallback"] = alt, "rtn"
                log.debug("%s guard: %s keeps RTN's codes (error %.4g < %.4g)", desc, name,
                          st["guard"]["rtn_error"], st["guard"]["method_error"])
            layer.set_submodule(n, new)
            report.layers[name] = new.spec()
            stats[name] = st

    process_layerwise(model, windows, process, desc=desc)
    record = guard_record(stats, "windows", calibration_info(windows, source))
    log.info("%s guard: %d of %d decoder linears kept RTN's codes", desc, len(record["reverted"]), record["judged"])
    return record


def _first(out):
    return (out[0] if isinstance(out, tuple) else out).detach()


def _pair_choice(attn: nn.Module, candidates: dict[str, tuple[nn.Module, nn.Module]],
                 calls: list[tuple[tuple, dict, torch.Tensor]]) -> dict[str, tuple[float, float]]:
    """The q_proj / k_proj pair's choice (module doc): ``err(Mq, Mk)`` for the four combinations of (method, RTN)
    candidates, the lowest kept (ties to the method). Returns, for each of the two, (its method's error, RTN's
    error) with the other linear at its chosen candidate, so the kept one is the lower of its two numbers."""
    (q, k), float_modules = QK_PAIR, (attn.get_submodule("q_proj"), attn.get_submodule("k_proj"))
    err = {}
    try:
        with torch.inference_mode():
            for a in (0, 1):  # 0 the method's candidate, 1 RTN's
                for b in (0, 1):
                    attn.q_proj, attn.k_proj = candidates[q][a], candidates[k][b]
                    err[a, b] = sum(float(((y.float() - _first(attn(*args, **kw)).float()).double() ** 2).sum())
                                    for args, kw, y in calls)
    finally:
        attn.q_proj, attn.k_proj = float_modules
    best = min(err, key=lambda ab: (err[ab], ab))  # (0, 0) first among equals
    return {q: (err[0, best[1]], err[1, best[1]]), k: (err[best[0], 0], err[best[0], 1])}


def guard_record(stats: dict, key: str, windows: dict) -> dict:
    """metadata.json's record of a guard: ``{key: windows}`` (the judging windows' calibration_info) and every
    linear that kept RTN's codes, with both errors."""
    reverted = {n: s["guard"] for n, s in stats.items() if s.get("fallback") == "rtn"}
    return {key: windows, "judged": sum(1 for s in stats.values() if "guard" in s), "reverted": reverted}


__all__ = ["DEFAULT_GUARD_WINDOWS", "QK_PAIR", "guarded_decoder", "guard_record", "held_out_error", "output_errors"]
