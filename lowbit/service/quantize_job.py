"""The quantize job: load a store model, ``lowbit.quantize`` it, measure it against its source, save it.

Runs on the job thread (``jobs.py``), never on the serving model: the source is loaded fresh from the
store, so serving continues untouched. The new folder appears in the store in one rename
(``lowbit.save`` -> ``atomic_dir``) only after the whole model is written.
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any, Callable

import torch
from torch import nn

from lowbit.errors import ConfigError
from lowbit.service.jobs import Progress
from lowbit.service.store import ModelStore

log = logging.getLogger(__name__)

FIDELITY_SENTENCES = 64  # held-out evaluation sentences for cos vs the source (quick; evaluate() gives the full 256)
LAYER_ERROR_SENTENCES = 8  # sentences for the per-layer error (the operator page's chart)


def _run_task(model: nn.Module, sentences: list[str]) -> None:
    """One forward of ``model`` over ``sentences`` (an encoder batch, or each sentence through a causal LM)."""
    if getattr(model, "task", None) == "encoder":
        feats = model.tokenize(sentences)
        model(feats["input_ids"], feats["attention_mask"], feats.get("token_type_ids"))
        return
    for s in sentences:
        ids = model.tokenizer(s, truncation=True, max_length=128)["input_ids"]
        if ids:
            model(torch.tensor([ids]))  # (1, T)


def layer_errors(model: nn.Module, reference: nn.Module, n_sentences: int = LAYER_ERROR_SENTENCES) -> dict[str, float]:
    """Output SQNR (dB) of every quantized layer against the same-named layer of ``reference`` on the
    same inputs: ``10 log10(sum(y^2) / sum((y_q - y)^2))``. Each layer sees its own model's input, so
    errors of earlier layers accumulate (what the served model really computes). Empty for a task
    without a text front end."""
    from lowbit.data import eval_sentences
    from lowbit.nn import QMODULES

    if getattr(model, "task", None) not in ("encoder", "causal-lm") or getattr(model, "tokenizer", None) is None:
        return {}
    kinds = tuple(QMODULES.values())
    names = [n for n, m in model.named_modules() if isinstance(m, kinds)]
    signal = {n: 0.0 for n in names}
    noise = {n: 0.0 for n in names}
    outs: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = []
    try:
        for n in names:
            hooks.append(reference.get_submodule(n).register_forward_hook(
                lambda mod, args, out, n=n: outs[n].append(out.detach().float())))
        sents = eval_sentences(n_sentences)
        with torch.inference_mode():
            _run_task(reference, sents)
        for h in hooks:
            h.remove()
        hooks = []
        step = {n: 0 for n in names}

        def compare(mod, args, out, n):
            ref = outs[n][step[n]]
            step[n] += 1
            signal[n] += float(ref.pow(2).sum())
            noise[n] += float((out.detach().float() - ref).pow(2).sum())

        for n in names:
            hooks.append(model.get_submodule(n).register_forward_hook(
                lambda mod, args, out, n=n: compare(mod, args, out, n)))
        with torch.inference_mode():
            _run_task(model, sents)
    except (AttributeError, IndexError, RuntimeError) as exc:  # a layer without a twin or a different call count
        log.warning("per-layer error not measured: %s: %s", type(exc).__name__, exc)
        return {}
    finally:
        for h in hooks:
            h.remove()
    return {n: round(10 * math.log10(signal[n] / noise[n]), 2) if noise[n] > 0 else float("inf") for n in names
            if signal[n] > 0}


def measure_fidelity(model: nn.Module, reference: nn.Module) -> dict[str, Any]:
    """Cosine of embeddings vs the source model (encoders) or ``evaluate(quick=True)`` otherwise."""
    if getattr(model, "task", None) == "encoder":
        from lowbit.data import eval_sentences

        sents = eval_sentences(FIDELITY_SENTENCES)
        cos = torch.nn.functional.cosine_similarity(model.encode(sents), reference.encode(sents), dim=1)  # (N,)
        return {"cos_mean": float(cos.mean()), "cos_min": float(cos.min()), "n_sentences": len(sents),
                "reference": "source model", "data": "lowbit.data.eval_sentences"}
    from lowbit.analysis.evaluate import evaluate

    out = evaluate(model, reference, quick=True)
    return {k: v for k, v in out.items() if isinstance(v, (int, float, str))}


def compare_with_rtn(model: nn.Module, source: nn.Module, config: Any, fidelity: dict) -> dict[str, Any] | None:
    """RTN on ``model``'s own grid measured as :func:`measure_fidelity` measured ``model`` (``fidelity``)
    (:mod:`lowbit.analysis.rtn_baseline`); logs a warning per measure where ``model`` is worse than RTN. None
    for RTN itself or a model RTN cannot mirror (W/A, static, binary)."""
    from lowbit.analysis.rtn_baseline import baseline_for, compare_to_rtn, describe, explain_losses

    twin = baseline_for(source, model, config)
    if twin is None:
        return None
    comparison = compare_to_rtn(measure_fidelity(source, source), measure_fidelity(twin, source), fidelity)
    explain_losses(comparison, source, twin, model, quick=True)  # measure_fidelity's windows
    for warning in describe(getattr(model, "lowbit_scheme", "the scheme"), comparison,
                            bool(getattr(model, "lowbit_calibration", None)))[1]:
        log.warning(warning)
    return comparison


def quantize_task(store: ModelStore, source_id: str, target_id: str, config: Any, *, calib: int | None,
                  calibration_data: list | None, overwrite: bool, progress: Progress,
                  before_save: Callable[[], None] | None = None) -> dict[str, Any]:
    """Quantize ``source_id`` with ``config`` into ``target_id``; returns a summary for ``GET /jobs/{id}``.

    ``before_save()`` runs just before the folder is written and may refuse (e.g. the target became
    the serving model): the job then fails and writes nothing."""
    import lowbit
    from lowbit.algorithms._calib import default_calibration

    progress("loading source", 0.05)
    source = store.load(source_id)
    if getattr(source, "lowbit_report", None) is not None:
        raise ConfigError(f"model {source_id!r} is already quantized ({source.lowbit_scheme}); quantize an fp32 model")
    progress("quantizing", 0.2)
    model = copy.deepcopy(source)
    if calibration_data is None and calib:
        calibration_data = default_calibration(model, calib)
    lowbit.quantize(model, config, calibration_data)
    progress("measuring fidelity", 0.7)
    fidelity = measure_fidelity(model, source)
    progress("comparing with RTN on the same grid", 0.78)
    vs_rtn = compare_with_rtn(model, source, config, fidelity)
    if vs_rtn is not None:
        fidelity["vs_rtn"] = vs_rtn
    progress("per-layer error", 0.85)
    layers = layer_errors(model, source)
    if layers:  # JSON has no infinity: an exact layer is reported as null
        fidelity["layers"] = {k: (v if math.isfinite(v) else None) for k, v in layers.items()}
        fidelity["layers_metric"] = ("output SQNR dB of each quantized layer vs the source on "
                                     f"{LAYER_ERROR_SENTENCES} eval sentences (errors accumulate)")
    progress("saving", 0.9)
    model.source = f"lowbit store model {source_id!r}"
    if before_save is not None:
        before_save()
    meta = store.save(model, target_id, fidelity=fidelity, overwrite=overwrite)
    return {"model_id": target_id, "source_id": source_id, "is_quantized": meta.is_quantized, "scheme": meta.scheme,
            "sizes": meta.sizes, "fidelity": fidelity, "calibration": meta.calibration.model_dump()
            if meta.calibration else None}
