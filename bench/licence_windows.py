"""Per-window perplexity and KL on the licence text: fp32, RTN and AWQ at W4 g128 symmetric (SmolLM2).

    flock /tmp/lowbit-heavy.lock .venv/bin/python bench/licence_windows.py

Why plain AWQ is worse than RTN in licence perplexity while closer to fp32 in KL (issue 18): the 7
windows of 512 tokens of CPython's LICENSE scored one by one (the whole-text perplexity is the geometric
mean of the windows'), then every predicted token bucketed by the probability fp32 gives the true next
token: summed NLL, mean entropy of the predicted distribution and mean KL(fp32 || model) per bucket and
model. RTN and AWQ as in bench/llm_methods.py (decoder linears, g128 = 64 on the 576-wide inputs,
calibration mix defaults). Writes bench/results/licence_windows.{md,json}.
"""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._llm_common import machine, quiet, rtn_decoder, write_results  # noqa: E402

BUCKETS = (0.0, 0.01, 0.1, 0.5, 0.9, 1.01)  # edges of fp32's probability of the true token


def main() -> None:
    import lowbit
    from lowbit.algorithms.awq import AWQConfig
    from lowbit.analysis.evaluate import lm_windows
    from lowbit.data import lm_eval_text
    from lowbit.models import load_model

    quiet()
    torch.set_num_threads(2)
    start = machine()
    fp = load_model("smollm2")
    windows = lm_windows(fp.tokenizer, lm_eval_text())  # (7, 512)
    rtn = copy.deepcopy(fp)
    rtn_decoder(rtn, bits=4, group_size=128, symmetric=True)
    awq = lowbit.quantize(copy.deepcopy(fp), AWQConfig(bits=4, group_size=128, symmetric=True))
    models = {"fp32": fp, "RTN W4 g128 sym": rtn, "AWQ W4 g128 sym": awq}
    rows, tokens = [], {n: {"nll": [], "entropy": [], "kl": []} for n in models}
    with torch.inference_mode():
        for i in range(windows.shape[0]):
            row = {"window": i, "first_tokens": fp.tokenizer.decode(windows[i, :12])}
            target = windows[i, 1:, None]  # (T-1, 1): the true next tokens
            ref = None
            for name, m in models.items():
                logp = torch.log_softmax(m(windows[i:i + 1])[0, :-1].float(), dim=-1)  # (T-1, V)
                ref = logp if ref is None else ref
                per = tokens[name]
                per["nll"].append(-logp.gather(1, target)[:, 0])
                per["entropy"].append(-(logp.exp() * logp).sum(-1))
                per["kl"].append((ref.exp() * (ref - logp)).sum(-1))
                row[name] = {"ppl": math.exp(float(per["nll"][-1].mean())), "kl": float(per["kl"][-1].mean())}
            rows.append(row)
    tokens = {n: {k: torch.cat(v) for k, v in per.items()} for n, per in tokens.items()}
    p_true = (-tokens["fp32"]["nll"]).exp()
    buckets = []
    for lo, hi in zip(BUCKETS[:-1], BUCKETS[1:]):
        sel = (p_true >= lo) & (p_true < hi)
        buckets.append({"p_fp32": [lo, min(hi, 1.0)], "tokens": int(sel.sum()),
                        **{n: {k: float(v[sel].sum() if k == "nll" else v[sel].mean()) for k, v in per.items()}
                           for n, per in tokens.items()}})
    total = {n: math.exp(sum(math.log(r[n]["ppl"]) for r in rows) / len(rows)) for n in models}
    md = ["# Licence text, window by window: fp32, RTN and AWQ at W4 g128 sym (SmolLM2)", "",
          f"`flock /tmp/lowbit-heavy.lock .venv/bin/python bench/licence_windows.py`; load {start['loadavg_1_5_15']}. "
          "ppl per 512-token window; KL(fp32 || model) per token.", "",
          "| window | starts with | fp32 ppl | RTN ppl | RTN KL | AWQ ppl | AWQ KL | AWQ vs RTN ppl |",
          "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        text = r["first_tokens"].replace("\n", " ").replace("|", "/").strip()
        md.append(f"| {r['window']} | {text} | {r['fp32']['ppl']:.3f} | {r['RTN W4 g128 sym']['ppl']:.3f} | "
                  f"{r['RTN W4 g128 sym']['kl']:.3f} | {r['AWQ W4 g128 sym']['ppl']:.3f} | "
                  f"{r['AWQ W4 g128 sym']['kl']:.3f} | "
                  f"{r['AWQ W4 g128 sym']['ppl'] / r['RTN W4 g128 sym']['ppl'] - 1:+.1%} |")
    md += ["", "Whole text: " + ", ".join(f"{n} {v:.3f}" for n, v in total.items()) + ".", "",
           "Every predicted token by the probability fp32 gives the true next token (NLL summed over the bucket's "
           "tokens, entropy and KL averaged, in nats):", "",
           "| p_fp32(true) | tokens | NLL fp32 | NLL RTN | NLL AWQ | entropy fp32 | entropy RTN | entropy AWQ | KL RTN "
           "| KL AWQ |", "|---|---|---|---|---|---|---|---|---|---|"]
    names = list(models)
    for b in buckets:
        md.append(f"| [{b['p_fp32'][0]}, {b['p_fp32'][1]}) | {b['tokens']} | "
                  + " | ".join(f"{b[n]['nll']:.0f}" for n in names) + " | "
                  + " | ".join(f"{b[n]['entropy']:.3f}" for n in names) + " | "
                  + " | ".join(f"{b[n]['kl']:.3f}" for n in names[1:]) + " |")
    write_results("licence_windows", rows, "\n".join(md) + "\n",
                  {"machine": machine(), "total_ppl": total, "buckets": buckets})
    print("\n".join(md))


if __name__ == "__main__":
    main()
