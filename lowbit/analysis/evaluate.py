"""The evaluation harness: one call measures fidelity, size and speed of a model against fp32.

``evaluate(model, reference=None, quick=False)`` dispatches on ``model.task``:

- ``encoder``: cosine of sentence embeddings vs the fp32 reference (mean, min) over the fixed
  evaluation corpus, top-10 retrieval-neighbour agreement, sentences/s at batch 1 and 32
  (tokenization included);
- ``causal-lm``: perplexity at context 512 on the licence text (non-overlapping windows), mean
  KL(p_fp32 || p_model) of next-token distributions on the same tokens, the same two on 16 windows
  of held-out docs text (``ppl_heldout``, ``kl_heldout``: the docs topics LM calibration never
  uses) and on all windows of scikit-learn's dataset descriptions (``ppl_science``,
  ``kl_science``: scientific prose, a third domain), prefill tokens/s;
- ``classifier``: top-1 accuracy (%) on the held-out digits split, samples/s.

Every result also carries ``model``, ``scheme``, ``task``, ``size_bytes`` (exact, see
footprint.py) and ``bits_per_weight`` (8 * size_bytes / parameters of the fp32 architecture).
Timings are medians of a few repeats after a warm-up, on the current torch thread count.
"""

from __future__ import annotations

import functools
import logging
import math
import statistics
import time
from typing import Callable

import torch
from torch import nn

from lowbit.analysis.footprint import fp32_numel, model_size_bytes
from lowbit.errors import ConfigError

log = logging.getLogger(__name__)

LM_CONTEXT = 512
LM_HELDOUT_WINDOWS = 16  # 8k tokens of the held-out docs text (quick: 1)
LM_SCIENCE_WINDOWS = None  # every window of the science text (23 x 512 with SmolLM2's tokenizer; quick: 1)
# The causal-LM texts evaluate() reports: (key suffix, lowbit.data function, windows, quick windows).
LM_TEXTS = (("", "lm_eval_text", None, 2), ("_heldout", "lm_heldout_text", LM_HELDOUT_WINDOWS, 1),
            ("_science", "lm_science_text", LM_SCIENCE_WINDOWS, 1))
CONFIDENCE_EDGES = (0.1, 0.9)  # fp32's probability of the true token: mispredicted < 0.1 <= middle < 0.9 <= sure
ENCODER_SENTENCES = 256  # the fixed evaluation corpus size
TOPK = 10


def median_seconds(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of fn() over `repeats` runs after `warmup` untimed runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _is_fp32(model: nn.Module) -> bool:
    return getattr(model, "lowbit_scheme", "fp32") == "fp32"


# ----------------------------------------------------------------------------------- encoder

@functools.lru_cache(maxsize=4)
def _fp32_minilm_embeddings(n: int) -> torch.Tensor:
    from lowbit.data import eval_sentences
    from lowbit.models.minilm import load_minilm

    return load_minilm().encode(eval_sentences(n), batch_size=32)


def topk_agreement(emb: torch.Tensor, ref: torch.Tensor, k: int = TOPK) -> float:
    """Mean over rows of |kNN(emb) ∩ kNN(ref)| / k, neighbours by cosine within the corpus, self excluded."""
    def neighbours(e: torch.Tensor) -> torch.Tensor:
        e = nn.functional.normalize(e.float(), dim=1)
        sim = e @ e.T  # (N, N)
        sim.fill_diagonal_(-math.inf)
        idx = sim.topk(k, dim=1).indices  # (N, k)
        return torch.zeros_like(sim).scatter_(1, idx, 1.0)  # (N, N) 0/1 masks

    shared = (neighbours(emb) * neighbours(ref)).sum(dim=1)  # (N,)
    return float((shared / k).mean())


def evaluate_encoder(model: nn.Module, reference: nn.Module | None, quick: bool,
                     eval_data: list[str] | None = None) -> dict:
    """cos_mean, cos_min, top10_agreement, sps_b1, sps_b32 for a sentence encoder with .encode(), on
    lowbit's evaluation sentences or the user's (``eval_data``)."""
    from lowbit.data import eval_sentences

    if not hasattr(model, "encode"):
        raise ConfigError("an encoder must have encode(sentences, batch_size) -> (N, D) embeddings")
    n = 64 if quick else ENCODER_SENTENCES
    sentences = list(eval_data)[: n if quick else None] if eval_data is not None else eval_sentences(n)
    n = len(sentences)
    emb = model.encode(sentences, batch_size=32).float()
    if reference is not None:
        ref = reference.encode(sentences, batch_size=32).float()
    elif getattr(model, "model_name", None) == "minilm" and not _is_fp32(model) and eval_data is None:
        ref = _fp32_minilm_embeddings(n)
    else:  # no reference to compare with (the fp32 model itself, or a user's model without its source)
        ref = emb
    cos = nn.functional.cosine_similarity(emb, ref, dim=1)  # (N,)
    b1 = sentences[: 8 if quick else 32]
    repeats = 1 if quick else 3
    t_b1 = median_seconds(lambda: model.encode(b1, batch_size=1), repeats=repeats)
    t_b32 = median_seconds(lambda: model.encode(sentences, batch_size=32), repeats=repeats)
    return {
        "n_sentences": n,
        "cos_mean": float(cos.mean()),
        "cos_min": float(cos.min()),
        "top10_agreement": topk_agreement(emb, ref),
        "sps_b1": len(b1) / t_b1,
        "sps_b32": len(sentences) / t_b32,
    }


# --------------------------------------------------------------------------------- causal LM

def lm_windows(tokenizer, text: str, context: int = LM_CONTEXT, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping full windows of `context` token ids of `text`: (W, context); the tail is dropped."""
    ids = torch.tensor(tokenizer(text).input_ids, dtype=torch.long)
    n = len(ids) // context
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ConfigError(f"text has {len(ids)} tokens, fewer than one window of {context}")
    return ids[: n * context].view(n, context)  # (W, context)


@functools.lru_cache(maxsize=1)
def _fp32_smollm2():
    from lowbit.models.smollm2 import load_smollm2

    return load_smollm2()


def lm_scores(model: nn.Module, reference: nn.Module | None, windows: torch.Tensor) -> dict:
    """Perplexity ``exp(mean NLL)`` and mean next-token ``KL(p_ref || p_model)`` over ``windows`` (W, T)
    of token ids, each window scored on its own; also the median prefill seconds per window."""
    nll, kl, count, times = 0.0, 0.0, 0, []
    with torch.inference_mode():
        for window in windows:
            ids = window.unsqueeze(0)  # (1, T)
            start = time.perf_counter()
            logits = model(ids)[0, :-1].float()  # (T-1, V): predictions for tokens 1..T-1
            times.append(time.perf_counter() - start)
            logp = torch.log_softmax(logits, dim=-1)
            nll += float(-logp.gather(1, window[1:, None]).sum())
            if reference is not None:
                ref_logp = torch.log_softmax(reference(ids)[0, :-1].float(), dim=-1)  # (T-1, V)
                kl += float((ref_logp.exp() * (ref_logp - logp)).sum())
            count += len(window) - 1
    timed = times[1:] if len(times) > 1 else times  # the first window doubles as warm-up
    return {"ppl": math.exp(nll / count), "kl": kl / count, "n_windows": len(windows),
            "seconds_per_window": statistics.median(timed)}


def lm_context(model: nn.Module) -> int:
    """LM_CONTEXT, or the model's own position limit when that is shorter."""
    config = getattr(getattr(model, "lm", None), "config", None)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return min(LM_CONTEXT, int(limit)) if limit else LM_CONTEXT


def _user_lm_windows(tokenizer, texts: list[str], context: int) -> torch.Tensor:
    """The user's evaluation texts as windows of ``context`` tokens (one shorter window if short)."""
    ids = torch.tensor(tokenizer("\n\n".join(texts)).input_ids, dtype=torch.long)
    if len(ids) < context:
        if len(ids) < 2:
            raise ConfigError("the evaluation text has fewer than 2 tokens")
        return ids[None]  # (1, T)
    return lm_windows(tokenizer, "\n\n".join(texts), context)


def lm_eval_windows(model: nn.Module, suffix: str = "", quick: bool = False,
                    eval_data: list[str] | None = None) -> torch.Tensor:
    """The windows (W, T) :func:`evaluate_causal_lm` scores for ``ppl{suffix}``: the user's texts when given
    (``suffix`` ""), else the built-in text of ``LM_TEXTS`` with that suffix."""
    import lowbit.data

    ctx = lm_context(model)
    if eval_data is not None:
        return _user_lm_windows(model.tokenizer, eval_data, ctx)
    for s, fn, windows, quick_windows in LM_TEXTS:
        if s == suffix:
            return lm_windows(model.tokenizer, getattr(lowbit.data, fn)(), ctx,
                              max_windows=quick_windows if quick else windows)
    raise ConfigError(f"no evaluation text for ppl{suffix}")


def confidence_buckets(models: list[nn.Module], reference: nn.Module, windows: torch.Tensor) -> list[list[dict]]:
    """Every predicted token of ``windows`` (W, T) bucketed by the probability ``reference`` gives the true
    next token (``CONFIDENCE_EDGES``: mispredicted, middle, sure); per model and bucket the tokens, their
    summed NLL and mean KL(p_ref || p_model). Shows where a model's perplexity is won or lost (docs/llm.md,
    "Where plain AWQ loses on the licence")."""
    edges = torch.tensor(CONFIDENCE_EDGES)
    sums = [[{"tokens": 0, "nll": 0.0, "kl": 0.0} for _ in range(len(CONFIDENCE_EDGES) + 1)] for _ in models]
    with torch.inference_mode():
        for window in windows:
            ids, target = window.unsqueeze(0), window[1:, None]  # (1, T), (T-1, 1): the true next tokens
            ref = torch.log_softmax(reference(ids)[0, :-1].float(), dim=-1)  # (T-1, V)
            bucket = torch.bucketize(ref.gather(1, target)[:, 0].exp(), edges, right=True)  # (T-1,): 0 .. len(edges)
            for per, m in zip(sums, models):
                logp = torch.log_softmax(m(ids)[0, :-1].float(), dim=-1)  # (T-1, V)
                nll, kl = -logp.gather(1, target)[:, 0], (ref.exp() * (ref - logp)).sum(-1)  # (T-1,) each
                for b, entry in enumerate(per):
                    sel = bucket == b
                    entry["tokens"] += int(sel.sum())
                    entry["nll"] += float(nll[sel].sum())
                    entry["kl"] += float(kl[sel].sum())
    for per in sums:
        for entry in per:
            entry["kl"] = entry["kl"] / entry["tokens"] if entry["tokens"] else 0.0
    return sums


def evaluate_causal_lm(model: nn.Module, reference: nn.Module | None, quick: bool,
                       eval_data: list[str] | None = None) -> dict:
    """ppl and mean next-token KL at context 512 on the licence text (``ppl``, ``kl``), the held-out
    docs text (``ppl_heldout``, ``kl_heldout``) and the science text (``ppl_science``,
    ``kl_science``), window counts ``n_windows*``, and prefill tokens/s (licence windows); with
    ``eval_data`` (the user's texts) ``ppl`` / ``kl`` are measured on those instead and the built-in
    texts skipped."""
    if reference is None and not (_is_fp32(model) and getattr(model, "model_name", None) == "smollm2"):
        reference = _fp32_smollm2() if getattr(model, "model_name", None) == "smollm2" else None
    ctx = lm_context(model)
    if eval_data is not None:
        user = lm_scores(model, reference, lm_eval_windows(model, "", quick, eval_data))
        return {"n_windows": user["n_windows"], "context": ctx, "ppl": user["ppl"], "kl": user["kl"],
                "prefill_tps": ctx / user["seconds_per_window"], "eval_data": "user"}
    out: dict = {"context": ctx}
    for suffix, *_ in LM_TEXTS:
        r = lm_scores(model, reference, lm_eval_windows(model, suffix, quick))
        out.update({f"n_windows{suffix}": r["n_windows"], f"ppl{suffix}": r["ppl"], f"kl{suffix}": r["kl"]})
        if not suffix:
            out["prefill_tps"] = ctx / r["seconds_per_window"]
    return out


# -------------------------------------------------------------------------------- classifier

def evaluate_classifier(model: nn.Module, quick: bool) -> dict:
    """Top-1 accuracy (%) on the held-out digits split and samples/s on the whole split as one batch."""
    from lowbit.models.digits import digits_data

    _, _, x_test, y_test = digits_data()
    with torch.inference_mode():
        correct = int((model(x_test).argmax(dim=1) == y_test).sum())
        seconds = median_seconds(lambda: model(x_test), repeats=3 if quick else 5)
    return {"n_test": len(y_test), "accuracy": 100.0 * correct / len(y_test), "sps": len(y_test) / seconds}


# ---------------------------------------------------------------------------------- dispatch

def evaluate(
    model: nn.Module,
    reference: nn.Module | None = None,
    *,
    quick: bool = False,
    fp32_params: int | None = None,
    eval_data: list[str] | None = None,
) -> dict:
    """Measure `model` (fidelity vs `reference` or the fp32 model, size, speed); a flat JSON-ready dict.

    `fp32_params` is the parameter count of the fp32 architecture for bits_per_weight (default:
    model.lowbit_fp32_numel, else the model's float parameters).
    """
    task = getattr(model, "task", None)
    model.eval()
    if task == "encoder":
        metrics = evaluate_encoder(model, reference, quick, eval_data)
    elif task == "causal-lm":
        metrics = evaluate_causal_lm(model, reference, quick, eval_data)
    elif task == "classifier":
        metrics = evaluate_classifier(model, quick)
    else:
        raise ConfigError(f"model has task {task!r}; evaluate supports: encoder, causal-lm, classifier")
    size = model_size_bytes(model)
    numel = fp32_numel(model, fp32_params)
    result = {
        "model": getattr(model, "model_name", type(model).__name__),
        "scheme": getattr(model, "lowbit_scheme", "fp32"),
        "task": task,
        "size_bytes": size,
        "size_mb": size / 1e6,
        "fp32_params": numel,
        "bits_per_weight": 8.0 * size / numel if numel else float("nan"),
        "quick": quick,
        "threads": torch.get_num_threads(),
        **metrics,
    }
    log.info("evaluated %s/%s: %s", result["model"], result["scheme"],
             {k: round(v, 5) if isinstance(v, float) else v for k, v in metrics.items()})
    return result
