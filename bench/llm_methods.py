"""RTN vs GPTQ vs AWQ (and NF4 with / without double quantization) on SmolLM2-135M.

    .venv/bin/python bench/llm_methods.py                 # every row, one process (~40 min on 2 cores)
    .venv/bin/python bench/llm_methods.py --only "W4 g128,W2" --part a   # two halves side by side,
    .venv/bin/python bench/llm_methods.py --only "W3 g128,NF4" --part b   # one per core,
    .venv/bin/python bench/llm_methods.py --merge                        # -> llm_methods_merged.md

SmolLM2's weights were dequantized from Q4_1 (4-bit, blocks of 32, asymmetric), so 4-bit g32
asymmetric RTN reproduces them almost exactly; methods are judged at **g128 symmetric**, 3-bit and
2-bit. "g128" means 128 where the input width allows it (down_proj, 1536 inputs) and 64 for the
576-wide q/k/v/o/gate/up inputs (576 is not a multiple of 128): the same for every method.
Only decoder-layer linears are quantized (embeddings / tied LM head stay fp32, 28% of the weights).
Calibration: each method's default on lowbit.data.lm_calib_text (GPTQ 16 x 512 tokens, AWQ the
4 windows its search uses): since issue 18 the mix of docs prose, stdlib code, package licences and
package READMEs (docs/data.md), disjoint from the three evaluation texts; --calib overrides the
window count for all. Results files from before the mix were calibrated on the docs-only text
(``lm_calib_text("docs")``); --merge tags their calibrated rows "(docs calib)".
Metrics: perplexity at context 512 and KL(fp32 || model) per token on three texts (held-out docs:
the docs topics calibration never uses; the licence: legal text; science: scikit-learn's dataset
descriptions, a domain no calibration source and no default touches), exact size,
quantization time (wall and CPU seconds: the machine is shared, CPU time is the steadier figure),
and for GPTQ/AWQ the share of RTN's perplexity increase they remove.

Writes bench/results/llm_methods.md and .json (or llm_methods_part_<PART>.* with --part).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._llm_common import CachedReference, Timer, machine, quiet, rtn_decoder, write_results  # noqa: E402

# (row name, family, kwargs); family "rtn" | "rtn-mse" (RTN, MSE group-scale search) | "gptq" | "awq" | "awq-gptq"
# (AWQ scales + clipping, GPTQ rounding) | "awq-gptaq" (AWQ scales, GPTAQ rounding); GPTQ rows may set guard=True (RTN
# fallback judged on held-out calibration windows), asymmetric_calib=True (GPTAQ), init="mse" and rotate=True (QuaRot
# rotations folded in first: lowbit.algorithms.rotation) and tune_windows (group scales then tuned end to end:
# lowbit.algorithms.scale_tuning), attention_hessian=True (v_proj's Hessian of attention-mixed inputs); AWQ rows clip,
# init, attention_hessian, residual_weights and attention_scales
ROWS = [
    ("RTN W4 g128 sym", "rtn", dict(bits=4, group_size=128, symmetric=True)),
    ("GPTQ W4 g128 sym", "gptq", dict(bits=4, group_size=128, symmetric=True)),
    ("AWQ W4 g128 sym", "awq", dict(bits=4, group_size=128, symmetric=True)),
    ("AWQ+GPTQ W4 g128 sym", "awq-gptq", dict(bits=4, group_size=128, symmetric=True)),
    ("GPTQ+guard W4 g128 sym", "gptq", dict(bits=4, group_size=128, symmetric=True, guard=True)),
    ("GPTAQ+guard W4 g128 sym", "gptq", dict(bits=4, group_size=128, symmetric=True, asymmetric_calib=True, guard=True)),
    ("RTN-MSE W4 g128 sym", "rtn-mse", dict(bits=4, group_size=128, symmetric=True)),
    ("GPTQ-MSE W4 g128 sym", "gptq", dict(bits=4, group_size=128, symmetric=True, init="mse")),
    ("GPTAQ-MSE W4 g128 sym", "gptq", dict(bits=4, group_size=128, symmetric=True, asymmetric_calib=True, init="mse")),
    ("AWQ+GPTAQ W4 g128 sym", "awq-gptaq", dict(bits=4, group_size=128, symmetric=True)),
    ("AWQ+GPTAQ-MSE W4 g128 sym", "awq-gptaq", dict(bits=4, group_size=128, symmetric=True, init="mse")),
    ("GPTAQ-MSE-rot W4 g128 sym", "gptq", dict(bits=4, group_size=128, symmetric=True, asymmetric_calib=True, init="mse",
                                               rotate=True)),
    ("GPTAQ-MSE-rot-tuned W4 g128 sym", "gptq", dict(bits=4, group_size=128, symmetric=True, asymmetric_calib=True,
                                                     init="mse", rotate=True, tune_windows=96)),
    # v_proj's Hessian of the attention-mixed inputs (GPTQConfig.attention_hessian; stop 35)
    ("GPTQ+attnH W4 g128 sym", "gptq", dict(bits=4, group_size=128, symmetric=True, attention_hessian=True)),
    ("GPTAQ+guard+attnH W4 g128 sym", "gptq", dict(bits=4, group_size=128, symmetric=True, asymmetric_calib=True,
                                                   guard=True, attention_hessian=True)),
    ("AWQ+GPTAQ-MSE+attnH W4 g128 sym", "awq-gptaq", dict(bits=4, group_size=128, symmetric=True, init="mse",
                                                          attention_hessian=True)),
    ("GPTAQ-MSE-rot+attnH W4 g128 sym", "gptq", dict(bits=4, group_size=128, symmetric=True, asymmetric_calib=True,
                                                     init="mse", rotate=True, attention_hessian=True)),
    ("GPTQ+attnH W4 g128 asym", "gptq", dict(bits=4, group_size=128, symmetric=False, attention_hessian=True)),
    # o_proj / down_proj tokens weighted by 1 / rms of the residual after their add (GPTQConfig.residual_weights; stop 36)
    ("GPTQ+attnH+resW W4 g128 sym", "gptq", dict(bits=4, group_size=128, symmetric=True, attention_hessian=True,
                                                 residual_weights=True)),
    ("GPTAQ+guard+attnH+resW W4 g128 sym", "gptq", dict(bits=4, group_size=128, symmetric=True, asymmetric_calib=True,
                                                        guard=True, attention_hessian=True, residual_weights=True)),
    ("GPTAQ-MSE-rot+attnH+resW W4 g128 sym", "gptq", dict(bits=4, group_size=128, symmetric=True,
                                                          asymmetric_calib=True, init="mse", rotate=True,
                                                          attention_hessian=True, residual_weights=True)),
    ("GPTQ+attnH+resW W4 g128 asym", "gptq", dict(bits=4, group_size=128, symmetric=False, attention_hessian=True,
                                                  residual_weights=True)),
    ("GPTQ+attnH+resW W3 g128 sym", "gptq", dict(bits=3, group_size=128, symmetric=True, attention_hessian=True,
                                                 residual_weights=True)),
    ("AWQ+GPTAQ-MSE+attnH+resW W4 g128 sym", "awq-gptaq", dict(bits=4, group_size=128, symmetric=True, init="mse",
                                                               attention_hessian=True, residual_weights=True)),
    ("GPTAQ-MSE-rot-tuned+attnH+resW W4 g128 sym", "gptq", dict(bits=4, group_size=128, symmetric=True,
                                                                asymmetric_calib=True, init="mse", rotate=True,
                                                                tune_windows=96, attention_hessian=True,
                                                                residual_weights=True)),
    # AWQ's GPTQ / GPTAQ schemes as the CLI builds them, with and without the q/k/v scale search
    # (AWQConfig.attention_scales; stop 38)
    ("AWQ+GPTQ+attnH W4 g128 sym", "awq-gptq", dict(bits=4, group_size=128, symmetric=True, attention_hessian=True)),
    ("AWQ+GPTQ+attnH-noqkvS W4 g128 sym", "awq-gptq", dict(bits=4, group_size=128, symmetric=True,
                                                           attention_hessian=True, attention_scales=False)),
    ("AWQ+GPTAQ-MSE+attnH+resW-noqkvS W4 g128 sym", "awq-gptaq", dict(bits=4, group_size=128, symmetric=True,
                                                                      init="mse", attention_hessian=True,
                                                                      residual_weights=True, attention_scales=False)),
    ("RTN W3 g128 sym", "rtn", dict(bits=3, group_size=128, symmetric=True)),
    ("GPTQ W3 g128 sym", "gptq", dict(bits=3, group_size=128, symmetric=True)),
    ("GPTQ+guard W3 g128 sym", "gptq", dict(bits=3, group_size=128, symmetric=True, guard=True)),
    ("GPTQ+attnH W3 g128 sym", "gptq", dict(bits=3, group_size=128, symmetric=True, attention_hessian=True)),
    ("GPTAQ+guard+attnH W3 g128 sym", "gptq", dict(bits=3, group_size=128, symmetric=True, asymmetric_calib=True,
                                                   guard=True, attention_hessian=True)),
    ("GPTAQ+guard W3 g128 sym", "gptq", dict(bits=3, group_size=128, symmetric=True, asymmetric_calib=True, guard=True)),
    ("AWQ W3 g128 sym", "awq", dict(bits=3, group_size=128, symmetric=True)),
    ("AWQ+GPTQ W3 g128 sym", "awq-gptq", dict(bits=3, group_size=128, symmetric=True)),
    ("GPTAQ-MSE-rot W3 g128 sym", "gptq", dict(bits=3, group_size=128, symmetric=True, asymmetric_calib=True, init="mse",
                                               rotate=True)),
    ("GPTAQ-MSE-rot-tuned W3 g128 sym", "gptq", dict(bits=3, group_size=128, symmetric=True, asymmetric_calib=True,
                                                     init="mse", rotate=True, tune_windows=96)),
    ("RTN W2 g64 asym", "rtn", dict(bits=2, group_size=64, symmetric=False)),
    ("GPTQ W2 g64 asym", "gptq", dict(bits=2, group_size=64, symmetric=False)),
    ("AWQ W2 g64 asym", "awq", dict(bits=2, group_size=64, symmetric=False)),
    ("RTN NF4 g64", "rtn", dict(bits=4, group_size=64, fmt="nf4")),
    ("RTN NF4 g64 + double quant", "rtn", dict(bits=4, group_size=64, fmt="nf4", double_quant=True)),
    ("GPTQ NF4 g64 + double quant", "gptq", dict(bits=4, group_size=64, fmt="nf4", double_quant=True)),
]


def quantize_row(fp, family: str, kw: dict, n_calib: int, percdamp: float | None = None):
    import lowbit
    from lowbit.algorithms.awq import AWQConfig
    from lowbit.algorithms.gptq import GPTQConfig

    model = copy.deepcopy(fp)
    with Timer() as t:
        if family == "rtn":
            rtn_decoder(model, **kw)
        elif family == "rtn-mse":
            rtn_mse_decoder(model, **kw)
        elif family == "gptq":
            extra = {} if percdamp is None else {"percdamp": percdamp}
            lowbit.quantize(model, GPTQConfig(n_calib=n_calib, **extra, **kw))
        else:
            rounding = {"awq-gptq": "gptq", "awq-gptaq": "gptaq"}.get(family, "rtn")
            lowbit.quantize(model, AWQConfig(n_calib=n_calib, rounding=rounding, **kw))
    return model, t


def rtn_mse_decoder(model, bits: int, group_size: int, symmetric: bool = True):
    """RTN on every decoder-layer linear with each group's scale from the MSE shrink search
    (lowbit.algorithms.gptq.mse_group_init) instead of min-max; GPTQ/AWQ's group-size fallback (576 -> 64)."""
    from lowbit.algorithms._llm import decoder_layers, effective_group_size, layer_linears
    from lowbit.algorithms.gptq import mse_group_init, rtn_solution, wrap_quantized
    from lowbit.nn import weight_format

    if not hasattr(model, "lowbit_fp32_numel"):
        model.lowbit_fp32_numel = sum(p.numel() for p in model.parameters())
    fmt = weight_format(bits, symmetric, None)
    init = mse_group_init(fmt, symmetric)
    for layer in decoder_layers(model):
        for name, m in layer_linears(layer).items():
            g = effective_group_size(m.in_features, group_size)
            codes, qp = rtn_solution(m.weight, fmt, symmetric, g, group_init=init)
            layer.set_submodule(name, wrap_quantized(m, codes, qp, g, "auto", False))
    model.lowbit_scheme = f"rtn-mse-w{bits}-g{group_size}{'-sym' if symmetric else '-asym'}"
    return model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="", help="comma-separated substrings of row names, e.g. 'W4 g128,NF4'; "
                    "'=NAME' matches that row name exactly")
    ap.add_argument("--quick", action="store_true", help="2 eval windows instead of all")
    ap.add_argument("--calib", type=int, default=None,
                    help="calibration windows of 512 tokens (default: each method's own, GPTQ 16, AWQ the 4 its search uses)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a loaded box)")
    ap.add_argument("--percdamp", type=float, default=None, help="GPTQ damping (default 0.01)")
    ap.add_argument("--calib-text", default="mix", choices=("mix", "docs"),
                    help="built-in calibration text: the mix (default) or the docs-only text of results before it")
    ap.add_argument("--part", default="", help="write results/llm_methods_part_<PART>.json (rows run in parallel)")
    ap.add_argument("--append", action="store_true", help="keep the rows already in the output file (same name: replaced)")
    ap.add_argument("--merge", action="store_true", help="merge llm_methods.json and the part files into llm_methods_merged.md/.json")
    args = ap.parse_args()
    if args.merge:
        return merge()
    quiet()
    torch.set_num_threads(args.threads)
    from lowbit.analysis.evaluate import evaluate
    from lowbit.models import load_model

    out_name = f"llm_methods_part_{args.part}" if args.part else "llm_methods"
    fp = load_model("smollm2")
    ref = CachedReference(fp)
    base = evaluate(fp, ref, quick=args.quick)
    rows = [{"name": "fp32", **base, "quant_wall_s": 0.0, "quant_cpu_s": 0.0}]
    meta = {"machine": machine(), "calib_windows": args.calib, "quick": args.quick, "percdamp": args.percdamp,
            "calib_text": _calib_text_record(args.calib_text)}
    if args.append:  # rows of earlier runs of this file (one locked run per group of rows)
        import json

        from bench._llm_common import RESULTS

        old = RESULTS / f"{out_name}.json"
        if old.is_file():
            d = json.loads(old.read_text())
            if d["meta"].get("quick") != args.quick or d["meta"].get("calib_text") != meta["calib_text"]:
                raise SystemExit(f"--append: {old} was measured with other settings (quick / calibration text)")
            meta["machine"] = d["meta"]["machine"]
            meta["runs"] = d["meta"].get("runs", [d["meta"]["machine"]["loadavg_1_5_15"]])
            meta["runs"].append(machine()["loadavg_1_5_15"])
            rows += [r for r in d["rows"] if r["name"] != "fp32"]
    for name, family, kw in ROWS:
        if args.only and not any(f.strip()[1:].lower() == name.lower() if f.strip().startswith("=")
                                 else f.strip().lower() in name.lower() for f in args.only.split(",")):
            continue
        print(f"... {name}", flush=True)
        rows = [r for r in rows if r["name"] != name]
        from lowbit.data import lm_calib_source

        with lm_calib_source(args.calib_text):
            model, t = quantize_row(fp, family, kw, args.calib, args.percdamp)
        r = evaluate(model, ref, quick=args.quick)
        guard = (getattr(model, "lowbit_calibration", None) or {}).get("guard")
        if guard is not None:  # the linears whose held-out calibration error was lower with RTN's codes
            r["guard_reverted"] = sorted(guard["reverted"])
            print(f"    guard: {len(guard['reverted'])} of {guard['judged']} linears kept RTN's codes: "
                  f"{', '.join(n.replace('lm.model.layers.', '') for n in sorted(guard['reverted']))}", flush=True)
        rows.append({"name": name, "family": family, **kw, **r, "quant_wall_s": t.wall, "quant_cpu_s": t.cpu})
        print("    " + "  ".join(f"{label} {r[p]:.3f} (kl {r[k]:.4f})" for label, p, k, _ in TEXTS if p in r)
              + f"  {r['size_mb']:.1f} MB  {t.wall:.0f} s wall / {t.cpu:.0f} s CPU", flush=True)
        del model
        write_results(out_name, rows, render(rows, meta), meta)  # partial results survive a cut-off
    meta["machine_end"] = machine()
    md = render(rows, meta)
    write_results(out_name, rows, md, meta)
    print(md)


def merge() -> None:
    """One table (results/llm_methods_merged.md/.json) from the main results file and the --part files."""
    import json

    from bench._llm_common import RESULTS

    files = [RESULTS / "llm_methods.json"] + sorted(RESULTS.glob("llm_methods_part_*.json"))
    rows, fp32 = [], []
    for f in files:
        if f.is_file():
            d = json.loads(f.read_text())
            tag = ""
            if d["meta"].get("percdamp") is not None:
                tag += f" (percdamp {d['meta']['percdamp']})"
            if d["meta"].get("calib_windows"):
                tag += f" ({d['meta']['calib_windows']} calib windows)"
            docs_calib = (d["meta"].get("calib_text") or {}).get("name", "docs") == "docs"  # before the mix
            for r in d["rows"]:
                if r["name"] == "fp32":
                    fp32.append((d["meta"], r))
                    continue
                calibrated = r.get("family", "rtn") != "rtn"
                rows.append({**r, "name": r["name"] + tag + (" (docs calib)" if docs_calib and calibrated else "")})
    if not fp32:
        raise SystemExit("no results files with an fp32 row to merge")
    # the fp32 row measured on the most texts (files from before the third text lack ppl_science);
    # full evaluations before quick ones
    meta, base = max(fp32, key=lambda mr: (sum(p in mr[1] for _, p, _, _ in TEXTS), not mr[0].get("quick")))
    order = [name for name, _, _ in ROWS]
    best = {r["name"]: r for r in rows}

    def position(name: str):  # ROWS order, a row's tagged variants after it, unknown names last
        plain = name.split(" (")[0]
        return (order.index(plain) if plain in order else len(order), name != plain, name)

    rows = [base] + [best[n] for n in sorted(best, key=position)]
    md = render(rows, meta)
    write_results("llm_methods_merged", rows, md, meta)  # never overwrite the sources
    print(md)


def _share(r: dict, rtn: dict | None, fp: dict, key: str) -> str:
    """Share of RTN's perplexity increase over fp32 that a method removes, on one text."""
    if rtn is None or key not in r or rtn[key] <= fp[key]:
        return ""
    return f"{100 * (rtn[key] - r[key]) / (rtn[key] - fp[key]):.0f}%"


# (label, ppl key, KL key, column title) of the three evaluation texts evaluate() reports
TEXTS = (("held-out", "ppl_heldout", "kl_heldout", "held-out docs"), ("licence", "ppl", "kl", "licence"),
         ("science", "ppl_science", "kl_science", "science"))


def _calib_text_record(name: str = "mix") -> dict:
    """Which built-in calibration text the methods' defaults read (name, bytes per domain, sha256)."""
    from lowbit.data import lm_calib_composition

    comp = lm_calib_composition(name)
    return {"name": name, "sha256": comp["sha256"], "bytes": comp["bytes"],
            "domain_bytes": {d: v["bytes"] for d, v in comp["domains"].items()}}


def _calib_source(meta: dict) -> str:
    rec = meta.get("calib_text")
    if not rec or rec.get("name") == "docs":
        return "lm_calib_text('docs') (the calibration half of the docs topics: the default before the mix)"
    parts = ", ".join(f"{d} {b / 1000:.0f} kB" for d, b in rec["domain_bytes"].items())
    return f"lm_calib_text() = the calibration mix ({parts}; sha256 {rec['sha256'][:12]}; docs/data.md)"


def _calib_text(meta: dict) -> str:
    if meta.get("calib_windows"):
        return f"{meta['calib_windows']} x 512 tokens"
    from lowbit.algorithms.awq import AWQConfig
    from lowbit.algorithms.gptq import DEFAULT_CALIB_WINDOWS, DEFAULT_PERCDAMP

    a = AWQConfig()
    return (f"each method's defaults: GPTQ {DEFAULT_CALIB_WINDOWS} x 512 tokens, percdamp {DEFAULT_PERCDAMP}; "
            f"AWQ searches on the first {a.search_tokens} tokens")


def render(rows: list[dict], meta: dict) -> str:
    fp = rows[0]
    rtn_by_setting = {}
    for r in rows:
        if r.get("family") == "rtn":
            rtn_by_setting[r["name"].replace("RTN ", "").replace(" + double quant", "")] = r
    out = ["# SmolLM2-135M: RTN vs GPTQ vs AWQ (weight-only, decoder linears)", "",
           "Judged at **g128 symmetric / 3-bit / 2-bit** because SmolLM2 came from a Q4_1 (4-bit g32 asym) grid. "
           "g128 = 128 on down_proj, 64 on the 576-wide inputs (576 % 128 != 0), identical for all methods. "
           "Embeddings / tied LM head fp32. Calibration: "
           f"{_calib_text(meta)} of {_calib_source(meta)}. Rows marked '(docs calib)' come from results "
           "files calibrated on the docs-only text, before the mix. "
           "Three perplexity texts at context 512: **held-out docs** (16 windows of the docs topics calibration "
           "never sees), the **licence** (7 windows of CPython's LICENSE: legal text) and **science** (23 windows "
           "of scikit-learn's dataset descriptions: scientific prose, used for no choice of defaults)"
           f"{' (quick: 1, 2 and 1 windows)' if meta.get('quick') else ''}. "
           "'removed' = share of RTN's perplexity increase over fp32 that the method removes (same bits, group, "
           "symmetry); a negative share means worse than RTN. Empty cells: not measured in that row's run.",
           "",
           "| method | " + " | ".join(f"ppl {title} | Δ | removed | KL {label}" for label, _, _, title in TEXTS)
           + " | MB | bits/w (whole model) | quantize wall s | CPU s |",
           "|---|" + "---|---|---|---|" * len(TEXTS) + "---|---|---|---|"]
    for r in rows:
        rtn = None
        if r.get("family") in ("gptq", "awq", "awq-gptq", "awq-gptaq", "rtn-mse"):
            key = r["name"].split(" ", 1)[1].replace(" + double quant", "").split(" (")[0]
            rtn = rtn_by_setting.get(key)
        cells = []
        for _, p, k, _ in TEXTS:
            if p in r and p in fp:
                cells.append(f"{r[p]:.3f} | {100 * (r[p] / fp[p] - 1):+.2f}% | {_share(r, rtn, fp, p)} | "
                             f"{r.get(k, 0):.4f}")
            else:
                cells.append(" | | | ")
        out.append(f"| {r['name']} | {' | '.join(cells)} | "
                   f"{r['size_mb']:.1f} | {8 * r['size_bytes'] / fp['fp32_params']:.2f} | {r['quant_wall_s']:.0f} | {r['quant_cpu_s']:.0f} |")
    m = meta["machine"]
    out += ["", f"Machine: {m['cores']} cores, torch threads {m['torch_threads']}, load average at start "
            f"{m['loadavg_1_5_15']}{', at end ' + str(meta['machine_end']['loadavg_1_5_15']) if 'machine_end' in meta else ''}"
            " (shared with other engineers' jobs: wall times are inflated; CPU s is the steadier figure)."
            + (f" Rows measured in {len(meta['runs'])} runs (--append), load at each start: {meta['runs']}."
               if meta.get("runs") else ""), ""]
    for r in rows:  # GPTQ's RTN-fallback guard: which linears kept RTN's codes (held-out calibration windows)
        if "guard_reverted" in r:
            names = ", ".join(n.replace("lm.model.layers.", "") for n in r["guard_reverted"]) or "none"
            out.append(f"- {r['name']}: guard kept RTN's codes for {len(r['guard_reverted'])} linears: {names}")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
