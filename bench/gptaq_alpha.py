"""How GPTAQ's share of the asymmetric term (GPTQConfig.asym_alpha) was chosen: held-out *calibration*
windows, never evaluation text.

    .venv/bin/python bench/gptaq_alpha.py --alpha 0.25 --bits 4    # one setting per run (appends)
    .venv/bin/python bench/gptaq_alpha.py --render                 # -> results/gptaq_alpha.md

SmolLM2 W{bits} g128 sym (g64 on the 576-wide inputs), GPTAQ fitted on the default 16 x 512 calibration
windows of lowbit.data.lm_calib_text (windows 0..15); scored by perplexity and KL(fp32 || model) on
windows 40..47 of the same text (never fitted, as bench/gptq_damping.py). alpha = 0 is plain GPTQ
(``W* = W``), alpha = 1 the exact minimiser ``W + W P H_d^-1`` of the asymmetric objective.

Writes bench/results/gptaq_alpha.md and .json.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._llm_common import RESULTS, Timer, machine, quiet, write_results  # noqa: E402

HELD_OUT = range(40, 48)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--alpha", type=float, default=None)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--render", action="store_true")
    args = ap.parse_args()
    path = RESULTS / "gptaq_alpha.json"
    rows = json.loads(path.read_text())["rows"] if path.is_file() else []
    if not args.render:
        quiet()
        torch.set_num_threads(1)
        import lowbit
        from lowbit.algorithms._calib import default_calibration
        from lowbit.algorithms.gptq import GPTQConfig
        from lowbit.analysis.evaluate import lm_scores
        from lowbit.models import load_model

        fp = load_model("smollm2")
        held = torch.cat(default_calibration(fp, max(HELD_OUT) + 1)[HELD_OUT.start:HELD_OUT.stop])  # (8, 512)
        model = copy.deepcopy(fp)
        cfg = GPTQConfig(bits=args.bits, group_size=128, symmetric=True, asymmetric_calib=args.alpha > 0,
                         asym_alpha=args.alpha or 1.0)
        with Timer() as t:
            lowbit.quantize(model, cfg)
        s = lm_scores(model, fp, held)
        rows = [r for r in rows if (r["bits"], r["alpha"]) != (args.bits, args.alpha)]
        rows.append({"bits": args.bits, "alpha": args.alpha, "ppl": s["ppl"], "kl": s["kl"],
                     "fp32_ppl": lm_scores(fp, None, held)["ppl"], "quant_cpu_s": t.cpu,
                     "loadavg": machine()["loadavg_1_5_15"]})
        print(rows[-1], flush=True)
    rows.sort(key=lambda r: (r["bits"], r["alpha"]))
    md = ["# GPTAQ: share alpha of the asymmetric term, judged on held-out calibration windows", "",
          "SmolLM2 W-bits g128 sym, GPTAQ fitted on calibration windows 0..15, scored on calibration windows "
          "40..47 (never fitted; no evaluation text). alpha 0 = GPTQ, 1 = exact asymmetric minimiser.", "",
          "| bits | alpha | ppl held-out calib | fp32 ppl | KL | quantize CPU s | load |", "|---|---|---|---|---|---|---|"]
    md += [f"| {r['bits']} | {r['alpha']} | {r['ppl']:.3f} | {r['fp32_ppl']:.3f} | {r['kl']:.4f} | "
           f"{r['quant_cpu_s']:.0f} | {r['loadavg']} |" for r in rows]
    write_results("gptaq_alpha", rows, "\n".join(md) + "\n", {"machine": machine()})
    print("\n".join(md))


if __name__ == "__main__":
    main()
