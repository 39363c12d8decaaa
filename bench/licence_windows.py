"""Per-window perplexity and KL on the licence text: fp32, RTN and AWQ at W4 g128 symmetric (SmolLM2).

    flock /tmp/lowbit-heavy.lock .venv/bin/python bench/licence_windows.py

Why plain AWQ is worse than RTN in licence perplexity while closer to fp32 in KL (issue 18): the 7
windows of 512 tokens of CPython's LICENSE scored one by one (`lm_scores` on each window; the whole-text
perplexity is the geometric mean of the windows'). RTN and AWQ as in bench/llm_methods.py (decoder
linears, g128 = 64 on the 576-wide inputs, calibration mix defaults). Writes
bench/results/licence_windows.{md,json}.
"""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._llm_common import machine, quiet, rtn_decoder, write_results  # noqa: E402


def main() -> None:
    import lowbit
    from lowbit.algorithms.awq import AWQConfig
    from lowbit.analysis.evaluate import lm_scores, lm_windows
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
    rows = []
    for i in range(windows.shape[0]):
        row = {"window": i, "first_tokens": fp.tokenizer.decode(windows[i, :12])}
        for name, m in models.items():
            s = lm_scores(m, None if m is fp else fp, windows[i:i + 1])
            row[name] = {"ppl": s["ppl"], "kl": s.get("kl", 0.0)}
        rows.append(row)
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
    md += ["", "Whole text: " + ", ".join(f"{n} {v:.3f}" for n, v in total.items()) + "."]
    write_results("licence_windows", rows, "\n".join(md) + "\n", {"machine": machine(), "total_ppl": total})
    print("\n".join(md))


if __name__ == "__main__":
    main()
