"""SmoothQuant W8A8 on SmolLM2-135M: perplexity vs the migration strength alpha (and no smoothing).

    .venv/bin/python bench/smoothquant_alpha.py [--full] [--alphas 0.5,0.6,0.7,0.8]

W8A8 = int8 weights per channel x int8 activations per token (DynamicQLinear) on every decoder
linear; smoothing folded into the RMSNorms / up_proj (o_proj keeps 1/s in the module).
Calibration 8 x 512 tokens of lm_calib_text. Writes bench/results/smoothquant_alpha.md and .json.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._llm_common import CachedReference, machine, quiet, write_results  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--alphas", default="none,0.5,0.6,0.7,0.8,0.9")
    args = ap.parse_args()
    quiet()
    torch.set_num_threads(1)
    import lowbit
    from lowbit.algorithms.smoothquant import WAConfig
    from lowbit.analysis.evaluate import evaluate
    from lowbit.models import load_model

    fp = load_model("smollm2")
    ref = CachedReference(fp)
    base = evaluate(fp, ref, quick=not args.full)
    rows = [{"alpha": "fp32", **base}]
    meta = {"machine": machine(), "full": args.full}
    for a in args.alphas.split(","):
        alpha = None if a == "none" else float(a)
        m = lowbit.quantize(copy.deepcopy(fp), WAConfig(alpha=alpha))
        r = evaluate(m, ref, quick=not args.full)
        rows.append({"alpha": a, **r})
        print(a, r["ppl"], r["kl"], r["ppl_heldout"], r["kl_heldout"], flush=True)
        md = ["# SmoothQuant W8A8 on SmolLM2-135M vs alpha", "",
              f"ppl @512 on the licence text (lm_eval_text{'' if args.full else ', 2 windows'}; fp32 {base['ppl']:.4f}) "
              f"and on the held-out docs text (lm_heldout_text{', 16 windows' if args.full else ', 1 window'}; "
              f"fp32 {base['ppl_heldout']:.4f}). Calibration: 8 x 512 tokens of lm_calib_text.", "",
              "| alpha | ppl licence | Δppl | KL licence | ppl held-out | Δppl | KL held-out |",
              "|---|---|---|---|---|---|---|"]
        md += [f"| {r['alpha']} | {r['ppl']:.4f} | {100 * (r['ppl'] / base['ppl'] - 1):+.2f}% | {r['kl']:.4f} | "
               f"{r['ppl_heldout']:.4f} | {100 * (r['ppl_heldout'] / base['ppl_heldout'] - 1):+.2f}% | "
               f"{r['kl_heldout']:.4f} |" for r in rows[1:]]
        md += ["", f"Machine: {meta['machine']}", ""]
        write_results("smoothquant_alpha", rows, "\n".join(md), meta)
    print("\n".join(md))


if __name__ == "__main__":
    main()
