"""Shared plumbing for handlers that swap float modules for quantized ones, one layer at a time."""

from __future__ import annotations

import logging
from typing import Callable

from rich.progress import Progress
from torch import nn

from lowbit.api import QuantizeReport, select_modules, set_submodule

log = logging.getLogger(__name__)

# Layers that usually hold weights but that these handlers leave in float, with the reason.
FLOAT_ONLY = {
    nn.Conv1d: "Conv1d: no quantized kernel for this scheme",
    nn.Conv2d: "Conv2d: no quantized kernel for this scheme (static PTQ handles convs)",
    nn.LayerNorm: "LayerNorm kept in float (normalisation is range-sensitive)",
}


class Skip(Exception):
    """Raised by a converter to leave a layer in float; the message is the reason, reported per layer."""


def swap_modules(model: nn.Module, config, types: tuple[type, ...], convert: Callable[[str, nn.Module], nn.Module],
                 report: QuantizeReport | None = None, progress: bool = True) -> QuantizeReport:
    """Replace each selected module of ``types`` by ``convert(name, module)``, logging each layer.

    A converter that raises :class:`Skip` leaves that layer in float; the reason goes in the report.
    """
    report = report or QuantizeReport()
    targets = list(select_modules(model, types, config.include, config.exclude))
    show = progress and len(targets) > 20
    with Progress(transient=True, disable=not show) as bar:
        task = bar.add_task(f"{config.scheme}", total=len(targets))
        for name, module in targets:
            try:
                new = convert(name, module)
            except Skip as why:
                report.skipped[name] = str(why)
                bar.advance(task)
                continue
            set_submodule(model, name, new)
            report.layers[name] = new.spec()
            log.debug("%s: %s -> %s", name, type(module).__name__, new.extra_repr())
            bar.advance(task)
    log.info("%s: quantized %d of %d selected layers", config.scheme,
             sum(1 for n, _ in targets if n in report.layers), len(targets))
    for name, module in model.named_modules():
        for t, why in FLOAT_ONLY.items():
            if type(module) is t and name not in report.skipped:
                report.skipped[name] = why
    return report


def quantized_embedding(name: str, emb: nn.Embedding) -> nn.Module:
    """int8 per-row ``QEmbedding`` for a plain lookup table; subclasses that change the lookup (Gemma's
    ``x * sqrt(hidden)`` scaled embedding) stay in float rather than silently lose that step."""
    from lowbit.nn import QEmbedding

    if type(emb).forward is not nn.Embedding.forward:
        raise Skip(f"{type(emb).__name__} changes the lookup (e.g. scales it); no quantized equivalent")
    return QEmbedding.from_float(emb)


def tied_head_name(model: nn.Module) -> str | None:
    """The full name of a causal LM's head when it shares its weight with the token embedding, else None."""
    from lowbit.errors import ConfigError
    from lowbit.models.adapters import adapter_for, backbone, backbone_prefix

    try:
        row = adapter_for(model)
    except ConfigError:
        return None
    if not (row.embeddings and row.head):
        return None
    lm = backbone(model)
    emb, head = lm.get_submodule(row.embeddings), lm.get_submodule(row.head)
    if getattr(emb, "weight", None) is None or getattr(head, "weight", None) is not emb.weight:
        return None
    return backbone_prefix(model) + row.head


def tie_embedding_to_head(model: nn.Module) -> str | None:
    """With tied input/output embeddings and a quantized LM head, make the token embedding look its
    rows up in the head's quantized table (``QTableEmbedding``), so the table is stored once, at the
    head's width, instead of a float embedding beside a quantized head. Returns the embedding's
    name when it was replaced, else None (untied model, float head, or no adapter row)."""
    from lowbit.errors import ConfigError
    from lowbit.models.adapters import adapter_for, backbone, backbone_prefix
    from lowbit.nn.gguf_linear import BlockMinQLinear, QTableEmbedding
    from lowbit.nn.qlinear import WeightOnlyQLinear

    try:
        row = adapter_for(model)
    except ConfigError:
        return None
    lm = backbone(model)
    if not (row.embeddings and row.head and getattr(getattr(lm, "config", None), "tie_word_embeddings", False)):
        return None
    emb, head = lm.get_submodule(row.embeddings), lm.get_submodule(row.head)
    if type(emb) is not nn.Embedding or not isinstance(head, (WeightOnlyQLinear, BlockMinQLinear)):
        return None
    if tuple(emb.weight.shape) != (head.out_features, head.in_features):
        return None
    from lowbit.api import set_submodule

    set_submodule(lm, row.embeddings, QTableEmbedding(head))
    return backbone_prefix(model) + row.embeddings
