"""HQQ's settings per bit width, chosen on held-out *calibration* windows (issue 18: HQQ at W3 lost to RTN).

    nice -n 10 .venv/bin/python bench/hqq_defaults.py            # -> results/hqq_defaults.md / .json
    nice -n 10 .venv/bin/python bench/hqq_defaults.py --only guard --part guard   # -> hqq_defaults_part_guard.*

Also SINQ's Sinkhorn-normalised column scales under RTN and HQQ (lowbit.algorithms.sinkhorn; the number of
Sinkhorn iterations), and GPTQ calibrated on the mix's first 16 windows as the yardstick a calibration-free method is
judged against (issue 18: within 10 % of GPTQ).

HQQ reads no text; its settings (p of the l_p norm, the half-quadratic penalty beta) were chosen on the last 4
windows of the calibration mix (docs/hqq.md). This bench scores RTN and HQQ variants there, at W3 and W4 g128
affine and W4 g128 symmetric (SmolLM2's decoder linears, the group policy of the other LLM benches: 128 on
down_proj, 64 on the 576-wide inputs), by perplexity and KL(fp32 || model) over those windows. No evaluation
text is read, so a setting chosen here is not fitted to the numbers docs/hqq.md reports on them.

How beta acts (errors in grid steps): the shrinkage ``relu(|r| - |r|^(p-1) / beta)`` sets to zero, and so fits,
the residuals below a threshold that falls as beta grows; the rest are left out of the parameter fit. A large
beta leaves most residuals out, so the parameters move little from RTN's (beta -> inf is RTN); a small beta fits
nearly all of them, the l2 fit with its outliers.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._llm_common import quiet, rtn_decoder, write_results  # noqa: E402
from bench.hqq_bench import _calibrated, gptq_decoder, hqq_decoder  # noqa: E402

HELD_OUT_WINDOWS = 4  # the last 4 windows of the calibration mix, as docs/hqq.md's choice of defaults

# (bits, symmetric, row label, HQQ settings, None for RTN or "gptq" for the calibrated yardstick)
GRID = [(bits, sym, label, kw) for bits, sym in ((3, False), (4, False), (4, True)) for label, kw in (
    ("RTN", None),
    ("HQQ p 0.7 beta 10 (the paper's)", dict(beta=10.0)),
    ("HQQ p 0.7 beta 30", dict(beta=30.0)),
    ("HQQ p 0.7 beta 100", dict(beta=100.0)),
    ("HQQ p 0.7 beta 300", dict(beta=300.0)),
    ("HQQ p 0.9 beta 10", dict(lp=0.9)),
    ("HQQ p 0.9 beta 100", dict(lp=0.9, beta=100.0)),
    # SINQ's column scales (lowbit.algorithms.sinkhorn): RTN / HQQ on W / t, 4 (the default), 1 or 16 iterations
    ("SINQ (RTN on W / t)", dict(iters=0, sinkhorn=True)),
    ("HQQ+SINQ", dict(sinkhorn=True)),
    ("HQQ+SINQ 1 Sinkhorn iteration", dict(sinkhorn=True, sinkhorn_iters=1)),
    ("HQQ+SINQ 16 Sinkhorn iterations", dict(sinkhorn=True, sinkhorn_iters=16)),
    # the RTN-fallback guard (lowbit.algorithms.rtn_guard), judging each linear on the mix's first 4 windows
    ("HQQ + guard", dict(guard=True)),
    ("SINQ (RTN on W / t) + guard", dict(iters=0, sinkhorn=True, guard=True)),
    ("HQQ+SINQ + guard", dict(sinkhorn=True, guard=True)),
    ("GPTQ (calibrated on windows 0..15, the yardstick)", "gptq"),
)]


def main() -> None:
    import argparse

    from lowbit.algorithms._calib import LM_CALIB_WINDOW, default_calibration
    from lowbit.algorithms.hqq import HQQConfig
    from lowbit.analysis.evaluate import lm_scores
    from lowbit.data import lm_calib_text
    from lowbit.models import load_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="", help="comma-separated substrings of row labels (RTN rows always run)")
    ap.add_argument("--part", default="", help="write results/hqq_defaults_part_<PART>.* instead")
    args = ap.parse_args()
    wanted = [w for w in args.only.split(",") if w]
    quiet()
    torch.set_num_threads(2)
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    fp = load_model("smollm2")
    n_windows = len(fp.tokenizer(lm_calib_text("mix")).input_ids) // LM_CALIB_WINDOW
    windows = default_calibration(fp, n_windows)  # all of the mix's windows; the last 4 are scored
    held = torch.cat(windows[-HELD_OUT_WINDOWS:])  # (4, 512)
    base = lm_scores(fp, None, held)
    rows = [{"name": "fp32", "bits": 32, "ppl": base["ppl"], "kl": 0.0}]
    for bits, sym, label, kw in GRID:
        if wanted and kw is not None and not any(w in label for w in wanted):
            continue
        m = copy.deepcopy(fp)
        if kw is None:
            rtn_decoder(m, bits, 128, sym)
        elif kw == "gptq":
            gptq_decoder(m, bits, 128, sym)
        elif kw.get("guard"):  # through the handler: the guard reads calibration windows (the mix's first 4)
            _calibrated(m, HQQConfig(bits=bits, group_size=128, symmetric=sym, **kw))
        else:
            hqq_decoder(m, bits, 128, sym, **kw)
        r = lm_scores(m, fp, held)
        name = f"{label} W{bits} g128 {'sym' if sym else 'asym'}"
        rows.append({"name": name, "bits": bits, "symmetric": sym, "settings": kw, "ppl": r["ppl"], "kl": r["kl"]})
        print(f"{name}: ppl {r['ppl']:.3f} KL {r['kl']:.4f}", flush=True)
        del m
    meta = {"uptime_start": uptime, "held_out": f"the last {HELD_OUT_WINDOWS} of {len(windows)} calibration windows",
            "uptime_end": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()}
    md = ["# HQQ settings per bit width on held-out calibration windows (SmolLM2, decoder linears)", "",
          f"Perplexity / KL(fp32 || model) on {meta['held_out']} (no evaluation text). fp32 ppl {base['ppl']:.3f}. "
          "g128 = 128 on down_proj, 64 on the 576-wide inputs.", "",
          "| row | ppl | KL |", "|---|---|---|"]
    md += [f"| {r['name']} | {r['ppl']:.3f} | {r['kl']:.4f} |" for r in rows]
    md += ["", f"`uptime` at start: {meta['uptime_start']}; at end: {meta['uptime_end']} (the load dates the run; "
               "no timing is reported here)", ""]
    write_results(f"hqq_defaults_part_{args.part}" if args.part else "hqq_defaults", rows, "\n".join(md), meta)
    print("\n".join(md))


if __name__ == "__main__":
    main()
