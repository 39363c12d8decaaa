"""Output-driven calibration: each layer's clipping range chosen by what it does to the model's output.

The seed notes' "cross-entropy / KL on outputs (highest accuracy)" row. Per-tensor observers judge
a range by the error of the tensor itself; this one judges it by the loss of the *final outputs* of
the quantized model against fp32 on the calibration set: ``KL(softmax(z_fp32) || softmax(z_q))``
for logits, ``1 - cos`` for embeddings. Search is greedy coordinate descent, layer by layer in
forward order, over a small grid of clipping ratios of each layer's min-max range (keeping it
tractable: ``layers x ratios`` forward passes of the calibration subset), with every other
quantizer active at its current range, so later layers see the earlier choices (cf. the layer-wise
search of Nagel et al. 2021, section 4.3, done here against the network output).

:class:`OutputObserver` is the per-tensor part: a min-max observer that marks its quantizer as
searched; :func:`search_output_ranges` is the model-level part, run by the static-PTQ handler.
"""

from __future__ import annotations

import logging
from typing import Callable, Protocol, Sequence

import torch
from rich.progress import Progress

from lowbit.observers.minmax import MinMaxObserver

log = logging.getLogger(__name__)

DEFAULT_RATIOS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)


class OutputObserver(MinMaxObserver):
    """Min-max range as the starting point; the final range comes from :func:`search_output_ranges`."""

    name = "output"
    model_level = True


class RangeQuantizer(Protocol):
    def get_range(self) -> tuple[torch.Tensor, torch.Tensor]: ...
    def set_range(self, min_val: torch.Tensor, max_val: torch.Tensor) -> None: ...


def search_output_ranges(quantizers: Sequence[tuple[str, RangeQuantizer]], loss: Callable[[], float],
                         ratios: Sequence[float] = DEFAULT_RATIOS) -> dict[str, dict]:
    """Greedy per-layer search: for each quantizer (in order) keep the ratio of its starting range with
    the lowest ``loss()``; returns ``{name: {"ratio", "loss"}}``. Ties keep the larger range."""
    ratios = sorted({float(r) for r in ratios}, reverse=True)
    chosen: dict[str, dict] = {}
    with Progress(transient=True, disable=len(quantizers) < 4) as bar:
        task = bar.add_task("output-driven ranges", total=len(quantizers))
        for name, q in quantizers:
            lo0, hi0 = q.get_range()
            best = None
            for r in ratios:
                q.set_range(lo0 * r, hi0 * r)
                value = float(loss())
                if best is None or value < best[1] - 1e-12:
                    best = (r, value)
            q.set_range(lo0 * best[0], hi0 * best[0])
            chosen[name] = {"ratio": best[0], "loss": best[1]}
            log.debug("output search %s: ratio %.2f loss %.3g", name, *best)
            bar.advance(task)
    return chosen
