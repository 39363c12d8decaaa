"""The quantize job: load a store model, ``lowbit.quantize`` it, measure it against its source, save it.

Runs on the job thread (``jobs.py``), never on the serving model: the source is loaded fresh from the
store, so serving continues untouched. The new folder appears in the store in one rename
(``lowbit.save`` -> ``atomic_dir``) only after the whole model is written.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Callable

import torch
from torch import nn

from lowbit.errors import ConfigError
from lowbit.service.jobs import Progress
from lowbit.service.store import ModelStore

log = logging.getLogger(__name__)

FIDELITY_SENTENCES = 64  # held-out evaluation sentences for cos vs the source (quick; evaluate() gives the full 256)


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
    progress("saving", 0.9)
    model.source = f"lowbit store model {source_id!r}"
    if before_save is not None:
        before_save()
    meta = store.save(model, target_id, fidelity=fidelity, overwrite=overwrite)
    return {"model_id": target_id, "source_id": source_id, "is_quantized": meta.is_quantized, "scheme": meta.scheme,
            "sizes": meta.sizes, "fidelity": fidelity, "calibration": meta.calibration.model_dump()
            if meta.calibration else None}
