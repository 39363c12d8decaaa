"""RTN vs HQQ (calibration-free) on SmolLM2-135M, decoder linears, both evaluation texts.

    nice -n 10 .venv/bin/python bench/hqq_bench.py                       # every row, one process
    nice -n 10 .venv/bin/python bench/hqq_bench.py --only W4 --part a     # or two halves side by side,
    nice -n 10 .venv/bin/python bench/hqq_bench.py --only W3 --part b
    nice -n 10 .venv/bin/python bench/hqq_bench.py --merge                # -> results/hqq.md

Same settings as bench/llm_methods.py (its helpers in bench/_llm_common.py): decoder-layer linears
only (embeddings / tied LM head fp32), "g128" = 128 on down_proj and 64 on the 576-wide inputs
(576 % 128 != 0) for every method, perplexity and KL(fp32 || model) at context 512 on the licence
text and 16 windows of held-out docs (lowbit.analysis.evaluate). SmolLM2's weights were dequantized
from Q4_1 (4-bit, blocks of 32, asymmetric), so 4-bit g32 affine RTN reproduces them almost exactly
and cannot be improved on; the comparison is at g128 (a grid the weights were not made on) and 3-bit.

Rows: RTN, HQQ, SINQ (RTN on Sinkhorn-normalised weights) and HQQ+SINQ at W4 g128 and W3 g128 (and the
calibrated references: GPTQ, GPTQ with HQQ / SINQ, AWQ with RTN's or HQQ's rounding), affine (HQQ proper: fp16 zero-points, scale fixed) and
symmetric (HQQ can only move the scale); "HQQ integer zp" rounds the zero-point to an integer (the
scale is then fitted too), to measure what storing float zero-points buys.
Quantization time is the HQQ (or RTN) pass over all decoder linears, one torch thread, measured
under the machine load recorded in the table; perplexity does not depend on the load.

Writes bench/results/hqq.md and .json (--part: hqq_part_<PART>.*). --merge gathers the --quick parts into
hqq.md (1-2 windows per text: the first runs, at load 7-14, could not finish a full evaluation) and the
parts on every window into hqq_full.md (stop 30: parts f1 and f2, docs/hqq.md).
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

# This file is named like the `hqq` package that transformers probes for (is_hqq_available): run as a
# script, its folder is sys.path[0] and `import hqq` would find this file (transformers then fails to
# import, and lowbit's model cache treats the failure as a damaged entry). Only the repo root goes on the path.
_here = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
sys.path.insert(0, str(_here.parent))

from bench._llm_common import CachedReference, Timer, machine, quiet, rtn_decoder, write_results  # noqa: E402

# (row name, family, kwargs); family "rtn" | "hqq" | "hqq-int" (HQQ with the zero-point rounded to an integer)
ROWS = [
    ("RTN W4 g128 asym", "rtn", dict(bits=4, group_size=128, symmetric=False)),
    ("HQQ W4 g128 asym", "hqq", dict(bits=4, group_size=128, symmetric=False)),
    ("RTN W3 g128 asym", "rtn", dict(bits=3, group_size=128, symmetric=False)),
    ("HQQ W3 g128 asym", "hqq", dict(bits=3, group_size=128, symmetric=False)),
    # W3 affine's default beta_0 was 10 (the paper's) until bench/hqq_defaults.py chose 30 on held-out windows
    ("HQQ beta 10 W3 g128 asym", "hqq", dict(bits=3, group_size=128, symmetric=False, beta=10.0)),
    # SINQ (lowbit.algorithms.sinkhorn): the same rounding on W / t, Sinkhorn-normalised column scales t stored per layer
    ("SINQ W4 g128 asym", "hqq", dict(bits=4, group_size=128, symmetric=False, iters=0, sinkhorn=True)),
    ("HQQ+SINQ W4 g128 asym", "hqq", dict(bits=4, group_size=128, symmetric=False, sinkhorn=True)),
    ("SINQ W3 g128 asym", "hqq", dict(bits=3, group_size=128, symmetric=False, iters=0, sinkhorn=True)),
    ("HQQ+SINQ W3 g128 asym", "hqq", dict(bits=3, group_size=128, symmetric=False, sinkhorn=True)),
    ("RTN W4 g128 sym", "rtn", dict(bits=4, group_size=128, symmetric=True)),
    ("HQQ W4 g128 sym", "hqq", dict(bits=4, group_size=128, symmetric=True)),
    ("SINQ W4 g128 sym", "hqq", dict(bits=4, group_size=128, symmetric=True, iters=0, sinkhorn=True)),
    ("RTN W3 g128 sym", "rtn", dict(bits=3, group_size=128, symmetric=True)),
    ("HQQ W3 g128 sym", "hqq", dict(bits=3, group_size=128, symmetric=True)),
    ("HQQ integer zp W4 g128 asym", "hqq-int", dict(bits=4, group_size=128, symmetric=False)),
    ("HQQ integer zp W3 g128 asym", "hqq-int", dict(bits=3, group_size=128, symmetric=False)),
    ("HQQ last iterate W4 g128 asym", "hqq-last", dict(bits=4, group_size=128, symmetric=False)),
    ("HQQ last iterate W3 g128 asym", "hqq-last", dict(bits=3, group_size=128, symmetric=False)),
    # the torch rounds (hqq_quantize_ref, the C kernel's twin): timed only, same codes up to float rounding
    ("HQQ W4 g128 asym, torch rounds (timing only)", "hqq-ref", dict(bits=4, group_size=128, symmetric=False)),
    # GPTQ references (default calibration) and GPTQ with HQQ's group parameters (init='hqq')
    ("GPTQ W4 g128 asym", "gptq", dict(bits=4, group_size=128, symmetric=False)),
    ("GPTQ+HQQ init W4 g128 asym", "gptq-hqq", dict(bits=4, group_size=128, symmetric=False)),
    ("GPTQ W4 g128 sym", "gptq", dict(bits=4, group_size=128, symmetric=True)),
    ("GPTQ+HQQ init W4 g128 sym", "gptq-hqq", dict(bits=4, group_size=128, symmetric=True)),
    ("GPTQ W3 g128 asym", "gptq", dict(bits=3, group_size=128, symmetric=False)),
    # GPTQ on SINQ's normalised weights (scheme gptq-sinq): W / t against the Hessian of t * x, t stored per layer
    ("GPTQ+SINQ W4 g128 asym", "gptq-sinq", dict(bits=4, group_size=128, symmetric=False)),
    ("GPTQ+SINQ W4 g128 sym", "gptq-sinq", dict(bits=4, group_size=128, symmetric=True)),
    ("GPTQ+SINQ W3 g128 asym", "gptq-sinq", dict(bits=3, group_size=128, symmetric=False)),
    # the same as the CLI's --scheme gptq-sinq builds it since stops 35 / 36: v_proj's attention-mixed Hessian and the
    # residual writers' token weights (the rows above are GPTQConfig's defaults, = --plain-hessian --plain-tokens)
    ("GPTQ+SINQ+attnH+resW W4 g128 sym", "gptq-sinq-scheme", dict(bits=4, group_size=128, symmetric=True)),
    ("GPTQ+SINQ+attnH+resW W4 g128 asym", "gptq-sinq-scheme", dict(bits=4, group_size=128, symmetric=False)),
    # GPTAQ (asymmetric calibration, RTN-fallback guard, MSE group scales: awq-gptaq's rounding) on SINQ's weights
    ("GPTAQ+SINQ W4 g128 sym", "gptaq-sinq", dict(bits=4, group_size=128, symmetric=True)),
    ("GPTQ+HQQ init W3 g128 asym", "gptq-hqq", dict(bits=3, group_size=128, symmetric=False)),
    # AWQ (its default calibration: 4 windows for the scale search) with RTN's or HQQ's rounding (scheme awq-hqq)
    ("AWQ W4 g128 asym", "awq", dict(bits=4, group_size=128, symmetric=False)),
    ("AWQ+HQQ W4 g128 asym", "awq-hqq", dict(bits=4, group_size=128, symmetric=False)),
    ("AWQ W3 g128 asym", "awq", dict(bits=3, group_size=128, symmetric=False)),
    ("AWQ+HQQ W3 g128 asym", "awq-hqq", dict(bits=3, group_size=128, symmetric=False)),
    # the RTN-fallback guard (lowbit.algorithms.rtn_guard; --guard): per decoder linear the method's module or RTN's,
    # whichever errs less on the mix's first 4 windows; through lowbit.quantize (the handler runs the guard)
    ("HQQ+guard W4 g128 sym", "hqq-guard", dict(bits=4, group_size=128, symmetric=True)),
    ("SINQ+guard W4 g128 sym", "hqq-guard", dict(bits=4, group_size=128, symmetric=True, iters=0, sinkhorn=True)),
    ("HQQ+guard W4 g128 asym", "hqq-guard", dict(bits=4, group_size=128, symmetric=False)),
    ("HQQ+SINQ+guard W4 g128 asym", "hqq-guard", dict(bits=4, group_size=128, symmetric=False, sinkhorn=True)),
    ("SINQ+guard W3 g128 asym", "hqq-guard", dict(bits=3, group_size=128, symmetric=False, iters=0, sinkhorn=True)),
    ("HQQ+SINQ+guard W3 g128 asym", "hqq-guard", dict(bits=3, group_size=128, symmetric=False, sinkhorn=True)),
]


# GPTQConfig fields of each GPTQ family of rows (beyond bits / group / symmetry)
GPTQ_FAMILIES = {"gptq": {}, "gptq-hqq": dict(init="hqq"), "gptq-sinq": dict(sinkhorn=True),
                 "gptq-sinq-scheme": dict(sinkhorn=True, attention_hessian=True, residual_weights=True),
                 "gptaq-sinq": dict(sinkhorn=True, asymmetric_calib=True, guard=True, init="mse")}


# AWQConfig fields of each AWQ family of rows
AWQ_FAMILIES = {"awq": {}, "awq-hqq": dict(init="hqq")}


def awq_decoder(model: nn.Module, bits: int, group_size: int, symmetric: bool, **extra) -> None:
    """AWQ with its defaults (built-in calibration, clipping search) on the decoder linears; ``extra``: other
    AWQConfig fields (init='hqq': HQQ's rounding in the searches and the stored codes)."""
    from lowbit.algorithms.awq import AWQConfig

    _calibrated(model, AWQConfig(bits=bits, group_size=group_size, symmetric=symmetric, **extra))


def _calibrated(model: nn.Module, config) -> None:
    """``lowbit.quantize(model, config)`` with the built-in calibration, the fp32 size recorded first."""
    import lowbit

    if not hasattr(model, "lowbit_fp32_numel"):
        model.lowbit_fp32_numel = sum(p.numel() for p in model.parameters())
    lowbit.quantize(model, config)


def gptq_decoder(model: nn.Module, bits: int, group_size: int, symmetric: bool, **extra) -> None:
    """GPTQ with its defaults (built-in calibration, 16 windows) on the decoder linears; ``extra``: other GPTQConfig
    fields (init='hqq': each group's scale / zero-point from HQQ; sinkhorn=True: SINQ's column scales)."""
    from lowbit.algorithms.gptq import GPTQConfig

    _calibrated(model, GPTQConfig(bits=bits, group_size=group_size, symmetric=symmetric, **extra))


def hqq_decoder(model: nn.Module, bits: int, group_size: int, symmetric: bool, integer_zero_point: bool = False,
                keep_best: bool = True, backend: str = "auto", **settings) -> dict:
    """HQQ on every decoder-layer linear with rtn_decoder's group-size policy (``settings``: HQQConfig fields
    such as ``lp`` / ``beta``, else its defaults); returns the summed squared weight errors (HQQ's and RTN's)."""
    from lowbit.algorithms._llm import decoder_layers, effective_group_size, layer_linears
    from lowbit.algorithms.hqq import HQQConfig, hqq_linear, hqq_quantize
    from lowbit.nn import WeightOnlyQLinear

    if not hasattr(model, "lowbit_fp32_numel"):
        model.lowbit_fp32_numel = sum(p.numel() for p in model.parameters())
    cfg = HQQConfig(bits=bits, group_size=group_size, symmetric=symmetric, **settings)
    err = {"sq_error": 0.0, "rtn_sq_error": 0.0}
    for layer in decoder_layers(model):
        for name, m in layer_linears(layer).items():
            g = effective_group_size(m.in_features, group_size)
            if integer_zero_point or not keep_best or backend != "auto":
                codes, qp, st = hqq_quantize(m.weight, bits, g, symmetric, cfg.iters, cfg.lp, cfg.beta, cfg.kappa,
                                             cfg.relax, integer_zero_point=integer_zero_point, keep_best=keep_best,
                                             backend=backend)
                new = WeightOnlyQLinear.from_quantized(m, codes, qp, g)
            else:
                new, st = hqq_linear(m, cfg, g)
            layer.set_submodule(name, new)
            err["sq_error"] += st["sq_error"]
            err["rtn_sq_error"] += st["rtn_sq_error"]
    model.lowbit_scheme = f"hqq-w{bits}-g{group_size}-{'sym' if symmetric else 'asym'}"
    return err


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="", help="comma-separated substrings of row names, e.g. 'W3,float'")
    ap.add_argument("--quick", action="store_true", help="1 and 2 eval windows instead of all")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--part", default="", help="write results/hqq_part_<PART>.json (rows run separately)")
    ap.add_argument("--merge", action="store_true", help="merge hqq.json and hqq_part_*.json into hqq.md/.json")
    args = ap.parse_args()
    if args.merge:
        return merge()
    out_name = f"hqq_part_{args.part}" if args.part else "hqq"
    quiet()
    torch.set_num_threads(args.threads)
    from lowbit.analysis.evaluate import evaluate
    from lowbit.models import load_model

    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    fp = load_model("smollm2")
    ref = CachedReference(fp)
    base = evaluate(fp, ref, quick=args.quick)
    rows = [{"name": "fp32", **base, "quant_wall_s": 0.0, "quant_cpu_s": 0.0}]
    meta = {"machine": machine(), "uptime_start": uptime, "quick": args.quick}
    for name, family, kw in ROWS:
        if args.only and not any(f.strip().lower() in name.lower() for f in args.only.split(",")):
            continue
        print(f"... {name}", flush=True)
        model = copy.deepcopy(fp)
        err = {}
        with Timer() as t:
            if family == "rtn":
                rtn_decoder(model, **kw)
            elif family in GPTQ_FAMILIES:
                gptq_decoder(model, **kw, **GPTQ_FAMILIES[family])
            elif family in AWQ_FAMILIES:
                awq_decoder(model, **kw, **AWQ_FAMILIES[family])
            elif family == "hqq-guard":
                from lowbit.algorithms.hqq import HQQConfig

                _calibrated(model, HQQConfig(**kw, guard=True))
            else:
                err = hqq_decoder(model, **kw, integer_zero_point=family == "hqq-int", keep_best=family != "hqq-last",
                                  backend="torch" if family == "hqq-ref" else "auto")
        if family == "hqq-ref":  # timing only
            rows.append({"name": name, "family": family, **kw, "quant_wall_s": t.wall, "quant_cpu_s": t.cpu,
                         "sq_error_vs_rtn": err["sq_error"] / err["rtn_sq_error"],
                         "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()})
            print(f"    {t.wall:.1f} s wall / {t.cpu:.1f} s CPU", flush=True)
            continue
        r = evaluate(model, ref, quick=args.quick)
        row = {"name": name, "family": family, **kw, **r, "quant_wall_s": t.wall, "quant_cpu_s": t.cpu,
               "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()}
        if family == "hqq-guard":
            row["guard_reverted"] = sorted(model.lowbit_calibration["guard"]["reverted"])
            print(f"    guard: {len(row['guard_reverted'])} of 210 linears kept RTN's codes", flush=True)
        if err and not kw.get("sinkhorn"):  # with SINQ both errors are of W / t: not comparable to the others
            row["sq_error_vs_rtn"] = err["sq_error"] / err["rtn_sq_error"]
        rows.append(row)
        print(f"    ppl held-out {r['ppl_heldout']:.3f}  licence {r['ppl']:.3f}  science {r['ppl_science']:.3f}  "
              f"{t.wall:.1f} s wall / {t.cpu:.1f} s CPU", flush=True)
        del model
        write_results(out_name, rows, render(rows, meta), meta)  # partial results survive a cut-off
    meta["machine_end"] = machine()
    meta["uptime_end"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    md = render(rows, meta)
    write_results(out_name, rows, md, meta)
    print(md)


def merge() -> None:
    """From the --part files: hqq.md/.json (the --quick parts) and hqq_full.md/.json (the parts on every window);
    rows in ROWS order, a row name's first file wins, fp32 from the first file of each kind."""
    import json

    from bench._llm_common import RESULTS

    files = sorted(RESULTS.glob("hqq_part_*.json"))  # hqq.json / hqq_full.json are outputs; rows come from parts
    order = ["fp32"] + [name for name, _, _ in ROWS]
    for quick, out in ((True, "hqq"), (False, "hqq_full")):
        rows, meta = {}, None
        for f in files:
            d = json.loads(f.read_text())
            if bool(d["meta"].get("quick")) != quick:
                continue
            meta = meta or d["meta"]
            for r in d["rows"]:
                rows.setdefault(r["name"], r)
        if meta is None:
            continue
        merged = [rows[n] for n in order if n in rows]
        md = render(merged, meta)
        write_results(out, merged, md, meta)
        print(md)


def _removed(r: dict, rtn: dict | None, fp: dict, key: str) -> str:
    """Share of RTN's perplexity increase over fp32 that a method removes, on one text."""
    if rtn is None or rtn is r or key not in r or key not in rtn or key not in fp or rtn[key] <= fp[key]:
        return ""
    return f"{100 * (rtn[key] - r[key]) / (rtn[key] - fp[key]):.0f}%"


def render(rows: list[dict], meta: dict) -> str:
    fp = rows[0]
    rtn = {(r["bits"], r["group_size"], r["symmetric"]): r for r in rows if r.get("family") == "rtn"}
    gptq = {(r["bits"], r["group_size"], r["symmetric"]): r for r in rows if r.get("family") == "gptq"}
    out = ["# SmolLM2-135M: RTN vs HQQ (calibration-free), weight-only, decoder linears", "",
           "g128 = 128 on down_proj, 64 on the 576-wide inputs, for every method; embeddings / tied LM head fp32. "
           "Judged at g128 and 3-bit because SmolLM2 came from a Q4_1 grid (4-bit g32 asymmetric), which g32 affine "
           "RTN reproduces almost exactly. Perplexity at context 512 on **held-out docs** (16 windows), the "
           "**licence** (7 windows) and **science** (23 windows of scikit-learn's dataset descriptions)"
           f"{' (quick: 1, 2 and 1 windows)' if meta.get('quick') else ''}. 'removed' = share "
           "of RTN's perplexity increase over fp32 removed (same bits, group, symmetry). 'sq err' = HQQ's summed "
           "squared weight error / RTN's. HQQ reads no calibration text. HQQ asym = the paper's method (fp16 "
           "zero-point optimised, min-max scale kept); HQQ sym = the scale optimised (no zero-point exists); "
           "'integer zp' = zero-point rounded to an integer, scale fitted with it; 'last iterate' = no per-group "
           "selection by squared error (the paper's iterations as they end). 'ppl / GPTQ' = the row's perplexity over "
           "GPTQ's (same bits, group, symmetry; GPTQ with its defaults: 16 windows of the built-in calibration mix) "
           "on held-out / licence / science; 'GPTQ+HQQ init' = GPTQ whose group scales / zero-points come from HQQ "
           "(init='hqq'). 'SINQ' = RTN on W / t with Sinkhorn-normalised column scales t stored per layer "
           "(Müller et al. 2025; calibration-free), 'HQQ+SINQ' = HQQ's rounds on W / t; 'removed' is against plain RTN. "
           "'torch rounds (timing only)' = the same HQQ with its rounds as torch ops (the C kernel's "
           "twin), timed and not evaluated.",
           "",
           "| method | ppl held-out docs | Δ vs fp32 | removed | ppl licence | Δ vs fp32 | removed | ppl science | "
           "Δ vs fp32 | removed | KL held-out | KL licence | KL science | ppl / GPTQ | sq err / RTN | MB | quantize wall s | "
           "CPU s | load (1 min) |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        key3 = (r.get("bits"), r.get("group_size"), r.get("symmetric"))
        ref = rtn.get(key3)
        if "ppl" not in r:  # timing-only row
            out.append(f"| {r['name']} | | | | | | | | | | | | | | {r.get('sq_error_vs_rtn', 0):.3f} | | "
                       f"{r['quant_wall_s']:.1f} | {r['quant_cpu_s']:.1f} | "
                       f"{r['uptime'].split('load average:')[-1].split(',')[0].strip()} |")
            continue
        g = gptq.get(key3)
        vs = " / ".join(f"{r[k] / g[k]:.3f}" for k in ("ppl_heldout", "ppl", "ppl_science") if k in r and k in g) \
            if g is not None and g is not r else ""
        size = f"{r['size_mb']:.1f}" if r.get("size_mb") else ""
        sq = f"{r['sq_error_vs_rtn']:.3f}" if "sq_error_vs_rtn" in r else ""
        load = r["uptime"].split("load average:")[-1].split(",")[0].strip() if "uptime" in r else ""
        texts = []
        for key in ("ppl_heldout", "ppl", "ppl_science"):  # files from before the third text lack ppl_science
            texts.append(f"{r[key]:.3f} | {100 * (r[key] / fp[key] - 1):+.2f}% | {_removed(r, ref, fp, key)}"
                         if key in r and key in fp else " | | ")
        kls = " | ".join(f"{r[k]:.4f}" if k in r else "" for k in ("kl_heldout", "kl", "kl_science"))
        out.append(f"| {r['name']} | {' | '.join(texts)} | {kls} | {vs} | {sq} | {size} | "
                   f"{r['quant_wall_s']:.1f} | {r['quant_cpu_s']:.1f} | {load} |")
    m = meta["machine"]
    out += ["", f"Machine: {m['cores']} cores shared with other jobs, torch threads {m['torch_threads']}. "
            f"`uptime` at start: {meta.get('uptime_start', '')}"
            f"{'; at end: ' + meta['uptime_end'] if 'uptime_end' in meta else ''}. "
            "Times are as measured under that load (wall inflated by it; CPU s is the steadier figure).", ""]
    return "\n".join(out)


if __name__ == "__main__":
    main()
