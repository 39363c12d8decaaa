"""Input-adaptive precision (MISSION H.21): one model, a 4-bit path and an 8-bit path per linear layer,
the path picked per input from a cheap complexity estimate, or fixed by a runtime mode switch.

- :class:`DualQLinear` holds both paths of one layer: ``WeightOnlyQLinear`` int4 (groups of 64, the
  int4 CPU kernel) and ``WeightOnlyQLinear`` int8 per channel (the int8 kernel), built from the same
  fp32 weights. Its ``mode`` is ``"fast"`` (int4) or ``"accurate"`` (int8). Storage is honest: both
  paths are kept, ~12.6 bits per weight.
- :func:`make_adaptive` swaps every allocatable linear of a model for a :class:`DualQLinear`;
  :func:`set_mode` is the runtime switch (a power/latency mode: ``fast`` | ``accurate``).
- :class:`ComplexityRouter` decides per input. For sentence encoders the estimate is free: it is
  read off the tokenization, before any layer runs. Candidate features (token count, fraction of
  word-piece continuations, fraction of digits/punctuation tokens, mean token id: BERT ids above
  ~2000 are rarer word pieces) are scored on *calibration* sentences against the measured 4-bit
  error of each sentence; the best-ranked feature (Spearman) and a threshold routing a target
  fraction ``p`` of inputs to the 8-bit path are kept. :func:`adaptive_encode` then encodes the
  "hard" sentences with the accurate path and the rest with the fast one.

Expected trade-off: with a fraction ``p`` routed to 8-bit, time ≈ (1-p) t4 + p t8 and error
≈ (1-p) e4' + p e8', where a useful router makes the routed inputs the ones with the largest 4-bit
error. The benchmark (``bench/adaptive.py``) measures it against fixed 4-bit and fixed 8-bit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from lowbit.api import set_submodule
from lowbit.errors import ConfigError

log = logging.getLogger(__name__)

MODES = ("fast", "accurate")
FEATURES = ("n_tokens", "continuation_frac", "symbol_frac", "mean_token_id")


class DualQLinear(nn.Module):
    """A linear with an int4 (``fast``) and an int8 (``accurate``) weight-only path."""

    def __init__(self, fast: nn.Module, accurate: nn.Module, mode: str = "fast"):
        super().__init__()
        self.fast, self.accurate = fast, accurate
        self.mode = mode

    @classmethod
    def from_float(cls, linear: nn.Linear, group_size: int = 64, kernel: str = "auto") -> "DualQLinear":
        from lowbit.nn import WeightOnlyQLinear

        return cls(WeightOnlyQLinear.from_float(linear, 4, group_size, True, None, kernel),
                   WeightOnlyQLinear.from_float(linear, 8, 0, True, None, kernel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fast(x) if self.mode == "fast" else self.accurate(x)

    def extra_repr(self) -> str:
        return f"mode={self.mode}"


def make_adaptive(model: nn.Module, group_size: int = 64, include=("*",), exclude=()) -> nn.Module:
    """Swap every allocatable linear (in % group_size == 0, out % 16 == 0) for a :class:`DualQLinear`, in place."""
    from lowbit.mixed.profile import INT4_N, linear_layers

    n = 0
    for name, m in linear_layers(model, include, exclude).items():
        if m.in_features % group_size or m.out_features % INT4_N:
            log.info("adaptive: %s stays fp32 (shape %dx%d does not fit the int4 kernel)", name, m.in_features,
                     m.out_features)
            continue
        set_submodule(model, name, DualQLinear.from_float(m, group_size))
        n += 1
    if n == 0:
        raise ConfigError("no linear layer could be made adaptive")
    model.lowbit_adaptive = True
    set_mode(model, "fast")
    return model


def set_mode(model: nn.Module, mode: str) -> None:
    """The runtime switch: every :class:`DualQLinear` of ``model`` runs its ``mode`` path."""
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {MODES}, got {mode!r}")
    for m in model.modules():
        if isinstance(m, DualQLinear):
            m.mode = mode
    model.lowbit_mode = mode


# ------------------------------------------------------------------------------ the router

def sentence_features(tokenizer, sentences: list[str]) -> dict[str, np.ndarray]:
    """Cheap per-sentence complexity features from the tokenization alone."""
    out = {k: [] for k in FEATURES}
    for s in sentences:
        ids = tokenizer(s, truncation=True, max_length=256)["input_ids"][1:-1] or [0]
        toks = tokenizer.convert_ids_to_tokens(ids)
        out["n_tokens"].append(len(ids))
        out["continuation_frac"].append(sum(t.startswith("##") for t in toks) / len(toks))
        out["symbol_frac"].append(sum(not any(ch.isalpha() for ch in t) for t in toks) / len(toks))
        out["mean_token_id"].append(float(np.mean(ids)))
    return {k: np.asarray(v, dtype=float) for k, v in out.items()}


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1]) if len(a) > 2 else 0.0


@dataclass
class ComplexityRouter:
    """Routes an input to the accurate path when ``sign * feature >= threshold``."""

    feature: str
    threshold: float
    sign: float = 1.0
    fraction: float = 0.0  # the target share of inputs routed to 8-bit (on calibration data)
    spearman: float = 0.0  # rank correlation of the feature with the 4-bit error (calibration)

    def hard(self, features: dict[str, np.ndarray]) -> np.ndarray:
        return self.sign * features[self.feature] >= self.threshold

    @classmethod
    def fit(cls, features: dict[str, np.ndarray], error_fast: np.ndarray, fraction: float) -> "ComplexityRouter":
        """Pick the feature whose ranking best matches the per-input 4-bit error; threshold at ``fraction``."""
        if not 0.0 <= fraction <= 1.0:
            raise ConfigError(f"fraction must be in [0, 1], got {fraction}")
        scores = {k: _spearman(v, error_fast) for k, v in features.items()}
        best = max(scores, key=lambda k: abs(scores[k]))
        sign = 1.0 if scores[best] >= 0 else -1.0
        v = sign * features[best]
        thr = np.inf if fraction == 0 else float(np.quantile(v, 1.0 - fraction))
        log.info("router: %s (spearman %.3f vs 4-bit error), threshold %.4g for %.0f%% accurate",
                 best, scores[best], thr, 100 * fraction)
        return cls(best, thr, sign, fraction, scores[best])


def per_sentence_error(model: nn.Module, reference: torch.Tensor, sentences: list[str], mode: str,
                       batch_size: int = 32) -> np.ndarray:
    """``1 - cos`` of each sentence's embedding in ``mode`` against ``reference`` (N, D)."""
    set_mode(model, mode)
    emb = model.encode(sentences, batch_size=batch_size)
    return (1 - nn.functional.cosine_similarity(emb.float(), reference.float(), dim=1)).numpy()


def fit_router(model: nn.Module, fp32: nn.Module, sentences: list[str], fraction: float) -> ComplexityRouter:
    """Fit a :class:`ComplexityRouter` on calibration ``sentences`` (never on evaluation data)."""
    ref = fp32.encode(sentences, batch_size=32)
    err = per_sentence_error(model, ref, sentences, "fast")
    return ComplexityRouter.fit(sentence_features(model.tokenizer, sentences), err, fraction)


def adaptive_encode(model: nn.Module, sentences: list[str], router: ComplexityRouter,
                    batch_size: int = 32) -> tuple[torch.Tensor, np.ndarray]:
    """Embeddings (N, D) with hard sentences on the 8-bit path, the rest on 4-bit; returns (emb, hard mask)."""
    feats = sentence_features(model.tokenizer, sentences)
    hard = router.hard(feats)
    parts = []
    for mode, mask in (("accurate", hard), ("fast", ~hard)):
        idx = np.flatnonzero(mask)
        if len(idx):
            set_mode(model, mode)
            parts.append((idx, model.encode([sentences[i] for i in idx], batch_size=batch_size)))
    set_mode(model, "fast")
    if not parts:
        return torch.empty(0, 0), hard
    out = torch.empty(len(sentences), parts[0][1].shape[1])
    for idx, emb in parts:
        out[torch.from_numpy(idx)] = emb
    return out, hard


__all__ = ["DualQLinear", "make_adaptive", "set_mode", "ComplexityRouter", "fit_router", "adaptive_encode",
           "sentence_features", "per_sentence_error", "MODES"]
