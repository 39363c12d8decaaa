"""The W/A presets side by side (MISSION F.19): W8A8, W4A8, W4A4, W2A8 on SmolLM2 and MiniLM,
plus SmoothQuant's effect and LLM.int8 on SmolLM2.

    .venv/bin/python bench/presets.py [--model smollm2|minilm|both] [--full]

Every preset = SmoothQuant (alpha 0.5; folded into the RMSNorms on SmolLM2, kept per layer on
MiniLM) + integer weights + per-token integer activations (``WAQLinear`` / ``DynamicQLinear``).
Weights: GPTQ on SmolLM2 (4 calibration windows), RTN on MiniLM. Embeddings and the LM head stay
fp32. SmolLM2: perplexity / KL on the three evaluation texts (licence, held-out docs, science; 2, 1 and
1 windows, ``--full``: 7, 16 and 23), prefill tokens/s; MiniLM:
cosine vs fp32 embeddings and sentences/s at batch 32. Speeds are ratios to fp32 in the same run.
Writes bench/results/presets.md and .json.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._llm_common import CachedReference, Timer, machine, quiet, write_results  # noqa: E402


def configs(model_name: str):
    from lowbit.algorithms.llm_int8 import LLMInt8Config
    from lowbit.algorithms.presets import preset_config
    from lowbit.algorithms.smoothquant import WAConfig

    rows = [("W8A8 (SmoothQuant α=0.5)", preset_config("w8a8")),
            ("W8A8 no smoothing", WAConfig(alpha=None, name="w8a8-naive"))]
    if model_name == "smollm2":
        rows.append(("LLM.int8 (threshold 6)", LLMInt8Config()))
    rows += [("W4A8", preset_config("w4a8")), ("W4A4", preset_config("w4a4")), ("W2A8", preset_config("w2a8"))]
    return rows


def run(model_name: str, full: bool, calib: int, save=lambda rows: None) -> list[dict]:
    import lowbit
    from lowbit.algorithms._calib import default_calibration
    from lowbit.analysis.evaluate import evaluate
    from lowbit.models import load_model

    fp = load_model(model_name)
    ref = CachedReference(fp) if model_name == "smollm2" else fp
    rows = [{"model": model_name, "name": "fp32", **evaluate(fp, ref, quick=not full), "quant_wall_s": 0.0}]
    calib_data = default_calibration(fp, calib) if model_name == "smollm2" else None
    for name, cfg in configs(model_name):
        print(f"... {model_name} {name}", flush=True)
        m = copy.deepcopy(fp)
        with Timer() as t:
            lowbit.quantize(m, cfg, calib_data)
        r = evaluate(m, ref, quick=not full)
        rows.append({"model": model_name, "name": name, **r, "quant_wall_s": t.wall, "quant_cpu_s": t.cpu})
        print({k: r.get(k) for k in ("ppl", "kl", "ppl_heldout", "ppl_science", "cos_mean", "cos_min", "size_mb")},
              flush=True)
        del m
        save(rows)  # partial results survive a cut-off
    return rows


def render(rows: list[dict], meta: dict) -> str:
    out = ["# W/A presets: size, fidelity, speed (measured here)", "",
           "SmoothQuant α=0.5 first; weights GPTQ (SmolLM2) / RTN (MiniLM); g128 = 64 on 576-wide inputs of SmolLM2; "
           "embeddings and LM head fp32. Speed = ratio to fp32 measured in the same run"
           f"{'' if meta['full'] else ' (SmolLM2: 2, 1 and 1 eval windows of the licence, held-out docs and science texts)'}.",
           ""]
    for model in ("smollm2", "minilm"):
        rs = [r for r in rows if r["model"] == model]
        if not rs:
            continue
        base = rs[0]
        if model == "smollm2":
            out += ["## SmolLM2-135M", "", "| preset | MB | bits/w | ppl licence | Δppl | KL | ppl held-out | Δppl | KL | "
                    "ppl science | Δppl | KL | prefill tok/s | × fp32 |",
                    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
            for r in rs:
                texts = " | ".join(f"{r[p]:.3f} | {100 * (r[p] / base[p] - 1):+.2f}% | {r[k]:.4f}" if p in r and p in base
                                   else " | | " for p, k in (("ppl", "kl"), ("ppl_heldout", "kl_heldout"),
                                                              ("ppl_science", "kl_science")))
                out.append(f"| {r['name']} | {r['size_mb']:.1f} | {r['bits_per_weight']:.2f} | {texts} | "
                           f"{r['prefill_tps']:.0f} | {r['prefill_tps'] / base['prefill_tps']:.2f} |")
        else:
            out += ["", "## all-MiniLM-L6-v2", "", "| preset | MB | bits/w | cos mean | cos min | top-10 | sent/s b32 | × fp32 |",
                    "|---|---|---|---|---|---|---|---|"]
            for r in rs:
                out.append(f"| {r['name']} | {r['size_mb']:.1f} | {r['bits_per_weight']:.2f} | {r['cos_mean']:.4f} | "
                           f"{r['cos_min']:.4f} | {r['top10_agreement']:.3f} | {r['sps_b32']:.0f} | "
                           f"{r['sps_b32'] / base['sps_b32']:.2f} |")
    m = meta["machine"]
    out += ["", f"Machine: {m['cores']} cores, torch threads {m['torch_threads']}, load {m['loadavg_1_5_15']} (shared).", ""]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="both", choices=("smollm2", "minilm", "both"))
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--calib", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    quiet()
    torch.set_num_threads(args.threads)
    meta = {"machine": machine(), "full": args.full}
    rows = []
    if args.model != "both":  # keep the other model's rows from an earlier run
        import json

        from bench._llm_common import RESULTS

        old = RESULTS / "presets.json"
        if old.is_file():
            rows = [r for r in json.loads(old.read_text())["rows"] if r["model"] != args.model]
    for model in (("minilm", "smollm2") if args.model == "both" else (args.model,)):
        done = list(rows)
        rows += run(model, args.full, args.calib, lambda rs: write_results("presets", done + rs, render(done + rs, meta), meta))
        write_results("presets", rows, render(rows, meta), meta)
    md = render(rows, meta)
    write_results("presets", rows, md, meta)
    print(md)


if __name__ == "__main__":
    main()
