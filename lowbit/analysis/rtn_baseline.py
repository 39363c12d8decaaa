"""Round-to-nearest on a quantized model's own grid: the baseline a weight-only method must beat.

A calibrated method (GPTQ, AWQ) fits its rounding to its calibration text and can lose to plain RTN
on text unlike it (issue 18: GPTQ W4 calibrated on CPython's docs was worse than RTN on the licence
text, -30 % of RTN's perplexity increase); a calibration-free one (HQQ, SINQ) fits a weight-only
objective and can lose too. Neither is visible from the fp32 comparison alone. :func:`rtn_twin` builds
RTN on exactly the linears the method quantized, each with the bits, group size (the one the method
used for that linear, e.g. 64 on SmolLM2's 576-wide inputs at g128) and symmetry of its module, or
with ggml's reference rounding on a ``gguf`` grid; everything else (norms, embeddings, the LM head
where the method left it float) stays the fp32 model's. :func:`compare_to_rtn` then reports, per
measure of :func:`lowbit.analysis.evaluate.evaluate` (perplexity on each causal-LM text, an encoder's
mean cosine, a classifier's accuracy), the share of RTN's loss against fp32 the method removes,

    removed = (ppl_RTN - ppl_method) / (ppl_RTN - ppl_fp32)     (likewise for cosine, accuracy),

negative where the method is worse than RTN, and the measures where it is. :func:`explain_losses` scores each
causal-LM text where the method lost once more token by token, bucketed by fp32's probability of the true token,
and :func:`describe` words the verdict: RTN's flattening (the method closer to fp32 in every bucket) or a loss of
the method's own.
"""

from __future__ import annotations

import copy
import itertools
import logging

from torch import nn

from lowbit.analysis.evaluate import CONFIDENCE_EDGES, confidence_buckets, lm_eval_windows
from lowbit.core import get_format
from lowbit.nn import WeightOnlyQLinear
from lowbit.nn.base import QMODULES
from lowbit.nn.gguf_linear import BlockMinQLinear, linear_on_ggml_grid

log = logging.getLogger(__name__)

# What evaluate() reports and how each is judged: (key, label, higher is better, what it is measured on).
MEASURES = (("ppl", "perplexity", False, "licence"), ("ppl_heldout", "perplexity", False, "held-out docs"),
            ("ppl_science", "perplexity", False, "science"),
            ("cos_mean", "cosine to fp32", True, "evaluation sentences"),
            ("accuracy", "accuracy %", True, "digits test split"))
DIGITS = {"perplexity": 3, "cosine to fp32": 5, "accuracy %": 2}  # decimals each measure is printed with
# the buckets of fp32's probability p of the true next token that explain_losses reports (mispredicted, middle, sure)
BUCKETS = (f"p < {CONFIDENCE_EDGES[0]}", f"{CONFIDENCE_EDGES[0]} <= p < {CONFIDENCE_EDGES[1]}",
           f"p >= {CONFIDENCE_EDGES[1]}")


def rtn_twin(fp32: nn.Module, quantized: nn.Module, gguf: str | None = None) -> nn.Module | None:
    """A copy of ``fp32`` (sharing its tensors) with RTN on every linear that ``quantized`` stores weight-only
    (same name, bits, group size and symmetry; ggml's rounding of type ``gguf`` where given), or None where the
    two cannot be matched: no weight-only module, a quantized module with no float linear of that
    name in ``fp32`` (a rotated or restructured model), a codebook format (NF4) or a module that
    quantizes activations too."""
    float_linears = {n: m for n, m in fp32.named_modules() if isinstance(m, nn.Linear)}
    plan: dict[str, tuple] = {}
    for name, m in quantized.named_modules():
        if isinstance(m, (WeightOnlyQLinear, BlockMinQLinear)):
            if name not in float_linears:
                log.info("no RTN baseline: %s has no float linear of that name in the fp32 model", name)
                return None
            if gguf is not None:
                plan[name] = ("gguf", gguf)
                continue
            if isinstance(m, BlockMinQLinear):  # ggml's Q4_1 grid, but no gguf type named
                log.info("no RTN baseline: %s is a BlockMinQLinear and no gguf type was given", name)
                return None
            fmt = get_format(m.fmt)
            if fmt.kind.value != "uniform":
                log.info("no RTN baseline: %s is stored as %s", name, fmt.name)
                return None
            plan[name] = ("rtn", fmt.bits, m.group_size, m.symmetric)
        elif type(m) in QMODULES.values() and any(k in type(m).__name__ for k in ("Linear", "Conv")):
            # a quantized linear or conv of another kind (W/A, static, binary, mixed): RTN is not its twin
            log.info("no RTN baseline: %s is a %s", name, type(m).__name__)
            return None
    if not plan:
        return None
    # the twin shares fp32's tensors (read only here): it costs only its packed weights, not another float model
    twin = copy.deepcopy(fp32, {id(t): t for t in itertools.chain(fp32.parameters(), fp32.buffers())})
    for name, how in plan.items():
        linear = twin.get_submodule(name)
        if how[0] == "gguf":
            module = linear_on_ggml_grid(linear, how[1])
        else:
            _, bits, group, symmetric = how
            module = WeightOnlyQLinear.from_float(linear, bits, group, symmetric)
        twin.set_submodule(name, module)
    twin.lowbit_scheme = "rtn (same grid)"
    twin.lowbit_fp32_numel = getattr(quantized, "lowbit_fp32_numel", None) or sum(p.numel() for p in fp32.parameters())
    return twin


def baseline_for(fp32: nn.Module, quantized: nn.Module, config) -> nn.Module | None:
    """:func:`rtn_twin` of ``quantized`` made with ``config`` (its ``gguf`` grid, if any), or None where RTN is the
    scheme itself (``WeightOnlyConfig``: RTN, NF4) or has no twin."""
    from lowbit.algorithms.rtn import WeightOnlyConfig

    if config is None or isinstance(config, WeightOnlyConfig):
        return None
    return rtn_twin(fp32, quantized, getattr(config, "gguf", None))


def compare_to_rtn(fp32_row: dict, rtn_row: dict, row: dict) -> dict:
    """Per measure of ``evaluate()``'s rows (perplexity on each causal-LM text, an encoder's mean cosine, a
    classifier's accuracy): RTN's value, the share of RTN's loss against fp32 that ``row`` removes (None
    where RTN lost nothing), and ``worse_on``: where ``row`` is worse than RTN, each with whether it is
    nevertheless closer to fp32 in KL (causal LMs: rounding noise can flatten predictions in RTN's favour
    on text that fp32 itself mispredicts, docs/llm.md; None where no KL is measured)."""
    out: dict = {"scheme": rtn_row.get("scheme"), "texts": {}, "worse_on": []}
    for key, label, higher, default_name in MEASURES:
        if not all(key in r for r in (fp32_row, rtn_row, row)):
            continue
        name = "your text" if row.get("eval_data") == "user" and key in ("ppl", "cos_mean") else default_name
        sign = -1.0 if higher else 1.0
        v_fp, v_rtn, v = fp32_row[key], rtn_row[key], row[key]
        rtn_loss = sign * (v_rtn - v_fp)
        kl_key = "kl" + key[3:] if key.startswith("ppl") else None
        entry = {"measure": label, "key": key, "rtn": v_rtn, "value": v,
                 "removed": (rtn_loss - sign * (v - v_fp)) / rtn_loss if rtn_loss > 0 else None,
                 "kl_rtn": rtn_row.get(kl_key) if kl_key else None, "kl": row.get(kl_key) if kl_key else None}
        out["texts"][name] = entry
        if sign * (v - v_rtn) > 0:
            closer = None if entry["kl"] is None or entry["kl_rtn"] is None else entry["kl"] < entry["kl_rtn"]
            out["worse_on"].append({"text": name, "closer_in_kl": closer})
    return out


def perplexity_losses(comparison: dict) -> list[dict]:
    """The entries of ``comparison["worse_on"]`` measured by perplexity (causal-LM texts)."""
    return [w for w in comparison["worse_on"] if comparison["texts"][w["text"]]["key"].startswith("ppl")]


def explain_losses(comparison: dict, fp32: nn.Module, rtn: nn.Module, model: nn.Module, *, quick: bool = False,
                   eval_data: list[str] | None = None) -> None:
    """For every text where ``model`` has a higher perplexity than RTN (``comparison["worse_on"]``), score the
    text again token by token (:func:`lowbit.analysis.evaluate.confidence_buckets`) and add to its entry
    ``buckets`` (per bucket of fp32's confidence: tokens, RTN's and the model's summed NLL and mean KL) and
    ``flattening``: True where the model is closer to fp32 than RTN in every bucket and better on the tokens
    fp32 gives >= 10 % (``CONFIDENCE_EDGES``), i.e. RTN wins only on tokens fp32 itself mispredicts, where its
    rounding noise flattens predictions in its favour (docs/llm.md); False where the loss is the model's own.
    Costs one more pass of fp32, RTN and the model over each such text."""
    for w in perplexity_losses(comparison):
        key = comparison["texts"][w["text"]]["key"]
        windows = lm_eval_windows(model, key[3:], quick, eval_data)
        per_rtn, per_model = confidence_buckets([rtn, model], fp32, windows)
        w["buckets"] = {name: {"tokens": r["tokens"], "nll_rtn": r["nll"], "nll": m["nll"], "kl_rtn": r["kl"],
                               "kl": m["kl"]} for name, r, m in zip(BUCKETS, per_rtn, per_model)}
        filled = [b for b in w["buckets"].values() if b["tokens"]]
        confident = [w["buckets"][name] for name in BUCKETS[1:]]
        w["flattening"] = (all(b["kl"] < b["kl_rtn"] for b in filled)
                           and sum(b["nll"] for b in confident) < sum(b["nll_rtn"] for b in confident))


def _token_detail(w: dict) -> str:
    """What the buckets of :func:`explain_losses` say, in words."""
    b = w["buckets"]
    hard = b[BUCKETS[0]]["nll"] - b[BUCKETS[0]]["nll_rtn"]
    p_min = f"{CONFIDENCE_EDGES[0]:.0%}"
    confident = sum(b[n]["nll"] - b[n]["nll_rtn"] for n in BUCKETS[1:])
    if w["flattening"]:
        return (f"token by token this is RTN's flattening, not the scheme's error: closer to fp32 than RTN for every "
                f"confidence of fp32, {confident:+.0f} nats on the tokens fp32 gives >= {p_min}, {hard:+.0f} on those "
                "it mispredicts, where RTN's noisier, flatter predictions are rewarded (docs/llm.md)")
    further = [f"{n} (KL {b[n]['kl']:.3f} vs RTN's {b[n]['kl_rtn']:.3f})" for n in BUCKETS
               if b[n]["tokens"] and b[n]["kl"] >= b[n]["kl_rtn"]]
    return ("token by token a loss of its own: " + ("further from fp32 than RTN on the tokens where fp32's "
                                                    f"probability of the truth is {', '.join(further)}"
            if further else "closer to fp32 than RTN for every confidence of fp32")
            + f"; {confident:+.0f} nats on the tokens fp32 gives >= {p_min}, {hard:+.0f} on those it mispredicts")


def describe(scheme: str, comparison: dict, calibrated: bool) -> tuple[list[str], list[str]]:
    """Report lines and warning lines for :func:`compare_to_rtn`'s result; ``calibrated``: whether the scheme
    fitted anything to calibration data (what a warning then suggests)."""
    lines, warnings = [], []
    for name, t in comparison["texts"].items():
        share = ("RTN loses nothing to fp32 here" if t["removed"] is None
                 else f"removes {100 * t['removed']:.0f} % of RTN's loss against fp32")
        d = DIGITS[t["measure"]]
        lines.append(f"{scheme} vs RTN on the same grid, {name}: {t['measure']} {t['value']:.{d}f} vs "
                     f"{t['rtn']:.{d}f}; {share}")
    remedy = ("the calibration data may not represent this text: calibrate on data like it (--calib-data) or try a "
              "calibration-free scheme (hqq-sinq, sinq)" if calibrated else
              "a weight-only fit cannot see which inputs are large: try SINQ's column scales (sinq --symmetric, "
              "hqq-sinq), --guard on an affine grid, or a calibrated scheme (gptq, awq)")
    remedy_short = ("calibrate on data like it (--calib-data)" if calibrated else
                    "try SINQ's column scales (sinq --symmetric, hqq-sinq), --guard on an affine grid, or a "
                    "calibrated scheme (gptq, awq)")
    for w in comparison["worse_on"]:
        t = comparison["texts"][w["text"]]
        d = DIGITS[t["measure"]]
        head = (f"{scheme} is worse than RTN on the same grid on the {w['text']} ({t['measure']} {t['value']:.{d}f} vs "
                f"{t['rtn']:.{d}f})")
        if w.get("flattening") is not None:
            warnings.append(f"{head}; {_token_detail(w)}" + ("" if w["flattening"] else f"; {remedy}"))
        elif w["closer_in_kl"] is None:
            warnings.append(f"{head}; {remedy}")
        elif w["closer_in_kl"]:
            warnings.append(f"{head}, although closer to fp32 there (KL {t['kl']:.4f} vs RTN's {t['kl_rtn']:.4f}): "
                            "part of RTN's edge can be its rounding noise flattening predictions, which tokens that "
                            f"fp32 itself mispredicts reward (docs/llm.md); if this text matters, {remedy_short}")
        else:
            warnings.append(f"{head} and further from fp32 (KL {t['kl']:.4f} vs RTN's {t['kl_rtn']:.4f}); {remedy}")
    return lines, warnings
