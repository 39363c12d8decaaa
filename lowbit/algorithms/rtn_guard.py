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
choose between two candidates per linear. Needs a causal LM whose family :mod:`lowbit.models.adapters`
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
        inputs: dict[str, list[torch.Tensor]] = {n: [] for n in linears}
        hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: inputs[n].append(args[0].detach()))
                 for n, m in linears.items()]
        try:
            run_layer(layer, hidden, kwargs, i, keep=False)  # the float layer, on the quantized stream
        finally:
            for h in hooks:
                h.remove()
        for n, m in linears.items():
            name = f"{prefix}.{i}.{n}"
            new, st = build(name, m)
            alt = rtn(name, m)
            method_error, rtn_error = output_errors(m, (new, alt), inputs[n])
            st["guard"] = {"method_error": method_error, "rtn_error": rtn_error}
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


def guard_record(stats: dict, key: str, windows: dict) -> dict:
    """metadata.json's record of a guard: ``{key: windows}`` (the judging windows' calibration_info) and every
    linear that kept RTN's codes, with both errors."""
    reverted = {n: s["guard"] for n, s in stats.items() if s.get("fallback") == "rtn"}
    return {key: windows, "judged": sum(1 for s in stats.values() if "guard" in s), "reverted": reverted}


__all__ = ["DEFAULT_GUARD_WINDOWS", "guarded_decoder", "guard_record", "held_out_error", "output_errors"]
